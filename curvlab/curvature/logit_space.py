"""Curvature of the loss in logit space: the middle factor M of ``Jᵀ M J``.

For the mean token cross-entropy ``L = (1/N) Σ_n ℓ_n``, ``ℓ_n = −log softmax(z_n)[y_n]`` over the
N non-ignored target tokens (of all batches that form the loss), the per-token matrices are

- ``ggn``: the exact Hessian ``∂²L/∂z_n² = (diag(p_n) − p_n p_nᵀ) / N``;
- ``efisher`` (empirical Fisher): ``g_n g_nᵀ / N`` with ``g_n = p_n − e_{y_n} = ∂ℓ_n/∂z_n``;
- ``mcfisher`` (Monte-Carlo Fisher): ``(1/K) Σ_k ĝ_nk ĝ_nkᵀ / N`` with ``ĝ_nk = p_n − e_{ŷ_nk}``
  and labels ``ŷ_nk ~ softmax(z_n)`` drawn with an explicit seed; its expectation is ``ggn``.

Ignored tokens have ``M_n = 0``. Products are computed in chunks of tokens so that a large
vocabulary does not need several ``[N, V]`` temporaries at once.

Square-root factors (:func:`token_columns`, :func:`token_cotangents`): every per-token matrix
above is a sum of outer products of vectors ``a (e_c − p_n)``:
``diag p − p pᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ`` (the *root columns*, V per token) and
``g_n g_nᵀ`` (one column, the true label ``c = y_n``). A cotangent that is one such column at
one token, pulled back through the network (one VJP), gives that token's contribution to a
diagonal or a Kronecker factor without any cross-token term. Sampled labels
(:func:`label_cotangents`) give it in expectation with one cotangent for many tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

KINDS = ("ggn", "efisher", "mcfisher")


class LogitCurvature:
    """Block-diagonal (per token) logit-space matrix for one batch.

    ``logits`` are ``[N, V]`` (detached), ``targets`` ``[N]``; ``scale`` is ``1/N_total``, the
    normalization of the mean loss over all tokens of all batches the operator sums over.
    ``token_range``: where these N tokens sit in their whole batch (a row shard under
    ``torchrun``; see :func:`sample_labels`).
    """

    def __init__(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        *,
        kind: str = "ggn",
        scale: float,
        ignore_index: int = -100,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        chunk_tokens: int = 4096,
        token_range: tuple[int, int] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown logit curvature {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.scale = scale
        self.chunk = max(1, chunk_tokens)
        self.mask = (targets != ignore_index).to(logits.dtype)
        self.probs = torch.softmax(logits.detach(), dim=-1)
        self.factors: torch.Tensor | None = None  # [K, N, V] for the Fisher kinds
        if kind != "ggn":
            safe = torch.where(targets == ignore_index, 0, targets)
            if kind == "efisher":
                labels = safe[None]
            else:
                labels = sample_labels(self.probs, mc_samples, generator, token_range,
                                       self.chunk)
            onehot = torch.nn.functional.one_hot(labels, logits.shape[-1]).to(logits.dtype)
            self.factors = (self.probs[None] - onehot) * self.mask[None, :, None]

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """``M u`` for ``u`` of shape ``[N, V]``."""
        out = []
        for i in range(0, u.shape[0], self.chunk):
            j = min(i + self.chunk, u.shape[0])
            uc, w = u[i:j], self.mask[i:j, None] * self.scale
            if self.kind == "ggn":
                p = self.probs[i:j]
                pu = p * uc
                out.append((pu - p * pu.sum(-1, keepdim=True)) * w)
            else:
                f = self.factors[:, i:j]  # [K, n, V]
                coef = (f * uc[None]).sum(-1, keepdim=True)  # [K, n, 1]
                out.append((f * coef).mean(0) * self.scale)
        return out[0] if len(out) == 1 else torch.cat(out)


def logit_gradient(
    logits: torch.Tensor, targets: torch.Tensor, *, scale: float, ignore_index: int = -100,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``g_z = ∂L/∂z``: per token ``(p_n − e_{y_n}) · scale`` (zero for ignored tokens).

    ``logits`` ``[N, V]``, ``targets`` ``[N]``; ``scale`` is ``1/N_total`` as for
    :class:`LogitCurvature`, so that ``g_z`` is the gradient of the mean token cross-entropy.
    ``probs``: ``softmax(logits)`` if already computed (e.g. ``LogitCurvature.probs``), saving
    one pass over the ``[N, V]`` logits.
    """
    mask = targets != ignore_index
    safe = torch.where(mask, targets, 0)
    g = torch.softmax(logits.detach(), dim=-1) if probs is None else probs.clone()
    g[torch.arange(len(safe), device=g.device), safe] -= 1  # − e_y, no [N, V] one-hot
    return g.mul_((mask.to(g.dtype) * scale)[:, None])


def sample_labels(
    probs: torch.Tensor, samples: int, generator: torch.Generator | None,
    token_range: tuple[int, int] | None = None, chunk_tokens: int = 4096,
) -> torch.Tensor:
    """``samples`` labels per token drawn from the rows of ``probs`` ``[N, V]``: ``[samples, N]``.

    Inverse-CDF sampling with float64 uniforms drawn for the *whole* batch (``token_range =
    (first token, batch tokens)``, default ``(0, N)``) and sliced to these tokens, so a row
    shard of a batch gets the labels the whole batch would get from the same generator state.
    """
    n = probs.shape[0]
    start, total = token_range if token_range is not None else (0, n)
    u = torch.rand(total, samples, generator=generator, dtype=torch.float64)[start:start + n]
    out = []
    for i in range(0, n, max(1, chunk_tokens)):
        cdf = probs[i:i + chunk_tokens].detach().double().cpu().cumsum(-1)
        cdf = cdf / cdf[:, -1:]
        idx = torch.searchsorted(cdf, u[i:i + chunk_tokens].contiguous(), right=True)
        out.append(idx.clamp_(max=probs.shape[-1] - 1))
    labels = torch.cat(out) if out else u.new_zeros(0, samples, dtype=torch.long)
    return labels.T.contiguous().to(probs.device)


TOKEN_COLUMNS = ("exact", "empirical")


def token_columns(
    probs: torch.Tensor, targets: torch.Tensor, *, kind: str, ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns ``a_k (e_{c_k} − p_{i_k})`` at tokens ``i_k`` whose outer products sum to a
    per-token logit-space matrix: ``(tokens, classes, coef)``, each of shape ``[K]``.

    - ``exact``: every class of every token, ``a = √p_c``: ``Σ_k = diag p_n − p_n p_nᵀ``
      (V columns per token);
    - ``empirical``: the true label, ``a = 1``: ``Σ_k = g_n g_nᵀ``, ``g_n = p_n − e_{y_n}``.

    Ignored tokens get no column. ``probs`` ``[N, V]`` (a softmax), ``targets`` ``[N]``.
    (Monte-Carlo labels: :func:`sample_labels` and :func:`label_cotangents`.)
    """
    if kind not in TOKEN_COLUMNS:
        raise ValueError(f"unknown column kind {kind!r}; expected one of {TOKEN_COLUMNS}")
    v = probs.shape[1]
    rows = torch.nonzero(targets != ignore_index).flatten()
    if kind == "exact":
        tokens = rows.repeat_interleave(v)
        classes = torch.arange(v, device=probs.device).repeat(len(rows))
        return tokens, classes, probs[tokens, classes].sqrt()
    return rows, targets[rows], probs.new_ones(len(rows))


def label_cotangents(
    probs: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 64,
) -> Iterator[torch.Tensor]:
    """Batches ``[k, N, V]`` of logit cotangents ``u_s = weight ⊙ (p − e_{ŷ_s})`` over all N
    tokens at once, one per row ``s`` of ``labels`` ``[S, N]`` (e.g. :func:`sample_labels`):
    for labels drawn from p, ``E[u uᵀ]`` is ``weight_n² (diag p_n − p_n p_nᵀ)`` per token
    and the cross-token terms vanish in expectation (independent zero-mean labels)."""
    v = probs.shape[1]
    w = weight[None, :, None]
    for s in range(0, labels.shape[0], max(1, chunk)):
        onehot = torch.nn.functional.one_hot(labels[s:s + chunk], v).to(probs.dtype)
        yield (probs[None] - onehot) * w


def token_cotangents(
    probs: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, classes: torch.Tensor,
    coef: torch.Tensor, chunk: int = 64,
) -> Iterator[torch.Tensor]:
    """Batches ``[k, N, V]`` of logit cotangents, cotangent ``j`` equal to
    ``weight_i a_j (e_c − p_i)`` at token ``i = tokens[j]`` (``c = classes[j]``, ``a = coef[j]``)
    and zero at every other token (columns from :func:`token_columns`; ``weight`` ``[N]``, e.g.
    ``1/N_total`` for the mean loss). Sums of outer products of their pullbacks ``Jᵀu`` hold
    no cross-token terms."""
    n, v = probs.shape
    for s in range(0, len(tokens), max(1, chunk)):
        i, c = tokens[s:s + chunk], classes[s:s + chunk]
        k = torch.arange(len(i), device=probs.device)
        root = coef[s:s + chunk] * weight[i]
        u = probs.new_zeros(len(i), n, v)
        u[k, i] = -root[:, None] * probs[i]
        u[k, i, c] += root
        yield u
