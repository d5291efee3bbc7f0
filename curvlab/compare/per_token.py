"""Per-token pullbacks on the comparison's batches: diagonals of G and of the empirical Fisher
F, and Shampoo's Kronecker factors, without cross-token terms and without clamping.

Conventions (those of :mod:`curvlab.compare.problem`): ``L = (1/N) Σ_n ℓ_n`` over the N
non-ignored target tokens of all batches, ``G = Σ_n J_nᵀ H_n J_n`` with
``H_n = (diag p_n − p_n p_nᵀ) / N``, ``F = (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` (the empirical Fisher of
``curvlab.fisher(kind="empirical")``), everything over the partition's coordinates.

A *pullback* is one VJP ``Jᵀu`` of a logit cotangent ``u`` through one sequence's graph. Squared
and summed, the pullbacks of

- ``exact``: the V root columns ``√p_c (e_c − p_n) / √N`` of each token, one token per
  cotangent (:func:`curvlab.curvature.logit_space.token_columns`), give ``diag G`` exactly
  (``N · V`` pullbacks);
- ``mc``: ``S`` draws of labels ``ŷ_n ~ p_n`` for every token, one cotangent
  ``Σ_{n ∈ sequence} (e_{ŷ_n} − p_n) / √(N S)`` per sequence and draw (the Monte-Carlo labels
  of K-FAC's ``mc``; :func:`~curvlab.curvature.logit_space.label_cotangents`), give an
  unbiased estimate of ``diag G`` (the cross-token terms have mean 0: independent zero-mean
  labels) that is a sum of squares, so never negative (``B · S`` pullbacks for B sequences);
- ``empirical``: the true label at one token, ``∇ℓ_n / √N``, give ``Σ_n (∇ℓ_n)² / N =
  diag F`` exactly and the sums ``Σ_n G_n G_nᵀ`` of per-token gradient matrices (``N``
  pullbacks).

Cost: per batch one forward pass without gradients (the probabilities), then per *sequence*
one forward pass with its graph and its tokens' pullbacks in batches (``is_grads_batched``).
The sequences of a batch do not interact in a language model's forward pass, so a pullback
needs only its own sequence's graph (about B times cheaper than through the whole batch; a
``logits_fn`` that mixes the rows of a batch is not supported here). Under ``torchrun`` each
rank pulls back its rows and the sums are all-reduced; Monte-Carlo labels are drawn for the
whole batch and sliced, so they do not depend on the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from curvlab import distributed
from curvlab.compare.problem import Problem
from curvlab.curvature.logit_space import (
    label_cotangents,
    sample_labels,
    token_columns,
    token_cotangents,
)
from curvlab.errors import ConfigError
from curvlab.models.attention import math_attention

DIAGONAL_ESTIMATORS = ("dense", "exact", "mc")


@dataclass(frozen=True)
class DiagonalInfo:
    """How a diagonal was obtained, per block of the partition.

    estimators: per block ``dense`` (the diagonal of the dense block ``C_bb``), ``exact``
    (per-token root columns, or per-token gradients for F) or ``mc`` (``samples`` Monte-Carlo
    label draws per token). rel_errors: per block the estimated relative standard error
    ``‖se_b‖ / ‖d_b‖`` (0 for dense and exact blocks). For ``mc`` ``se_j² = Σ_{b,s} x_{bsj}²``
    over the independent terms ``x_{bsj} = (Jᵀu_{bs})_j²`` (sequence b, draw s) whose sum is
    the estimate ``d_j``: an unbiased estimate of ``Σ E[x²] >= Var(d_j)``. It is a standard
    error, not a bound: on the ``tiny`` preset (2 sequences) the measured error of one
    estimate was 0.6-1.1 times it at 16-256 draws (0.55-2.3 at 4). samples: label draws per
    token (0 when no block is ``mc``);
    pullbacks: VJPs run (all processes).
    """

    estimators: tuple[str, ...]
    rel_errors: tuple[float, ...]
    samples: int = 0
    pullbacks: int = 0

    def describe(self, names: Sequence[str]) -> str:
        """``block estimator [error]`` for each block and the cost, e.g. ``embed mc 3.1%, head
        dense; mc: 64 label draws per token; 512 pullbacks``."""
        cells = []
        for name, est, err in zip(names, self.estimators, self.rel_errors):
            cells.append(f"{name} {est}" + (f" {err:.1%}" if est == "mc" else ""))
        extra = [f"mc: {self.samples} label draws per token"] if self.samples else []
        extra += [f"{self.pullbacks:,} pullbacks"] if self.pullbacks else []
        return "; ".join([", ".join(cells), *extra])


@dataclass(frozen=True, eq=False)
class DiagonalEstimate:
    """``values``, the diagonal over the partition's coordinates, and ``info``
    (:class:`DiagonalInfo`)."""

    values: torch.Tensor
    info: DiagonalInfo


def _chunk(n: int, chunk: int | None) -> int:
    """Pullbacks per batched VJP: ``chunk``, else at most 256 and ~2^24 gradient entries."""
    return chunk or max(1, min(256, 2**24 // max(n, 1)))


def pullbacks(
    problem: Problem, kind: str, *, samples: int = 1, seed: int = 0,
    chunk: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Pullbacks (module docstring) of ``kind`` (``exact``, ``mc`` with ``samples`` label draws
    from ``seed``, ``empirical``) on ``problem``'s batches, in batches: ``{parameter: [k,
    *shape]}`` for the parameters of the partition (whole parameters; entries outside the
    partition are not zeroed)."""
    names = problem.space.params
    gen = torch.Generator().manual_seed(seed)
    scale = problem.num_tokens ** -0.5
    k = _chunk(problem.n, chunk)
    fn = problem.logits_fn
    for batch in problem.batches:
        with torch.no_grad(), math_attention():
            out = fn(problem.model, problem.params, batch.inputs)
        rows, width = out.shape[0], out.shape[-1]
        targets = batch.targets.reshape(-1)
        probs = torch.softmax(out.reshape(-1, width).detach(), dim=-1)
        weight = (targets != problem.ignore_index).to(probs.dtype) * scale
        seq = targets.numel() // rows
        if kind == "mc":  # S label draws for the whole batch (shard-independent), [S, B·T]
            labels = sample_labels(probs, samples, gen, batch.token_range)
        else:
            tok, cls, coef = token_columns(probs, targets, kind=kind,
                                           ignore_index=problem.ignore_index)
            row_of = torch.div(tok, seq, rounding_mode="floor")
        for r in range(rows):
            span = slice(r * seq, (r + 1) * seq)
            if kind == "mc":
                if not bool(weight[span].any()):
                    continue
                cots = label_cotangents(probs[span], weight[span] * samples ** -0.5,
                                        labels[:, span], chunk=k)
            else:
                pick = row_of == r
                if not bool(pick.any()):
                    continue
                cots = token_cotangents(probs[span], weight[span], tok[pick] - r * seq,
                                        cls[pick], coef[pick], chunk=k)
            active = {n: problem.params[n].detach().clone().requires_grad_(True) for n in names}
            with torch.enable_grad(), math_attention():
                z = fn(problem.model, {**problem.params, **active}, batch.inputs[r:r + 1])
                z = z.reshape(-1, width)
            for u in cots:
                grads = torch.autograd.grad(z, [active[n] for n in names], grad_outputs=u,
                                            retain_graph=True, is_grads_batched=True,
                                            allow_unused=True)
                yield {n: (torch.zeros(u.shape[0], *active[n].shape, dtype=u.dtype,
                                       device=u.device) if g is None else g)
                       for n, g in zip(names, grads)}


def _coordinates(problem: Problem, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[k, n]``: the partition's coordinates of batched per-parameter tensors."""
    k = next(iter(grads.values())).shape[0]
    parts = [grads[name].reshape(k, -1)[:, start:stop]
             for name, start, stop, _ in problem.space.segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _sum_squares(problem: Problem, kind: str, samples: int, seed: int, fourth: bool,
                 chunk: int | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    total = torch.zeros(problem.n, dtype=problem.dtype, device=problem.device)
    quad = torch.zeros_like(total) if fourth else None
    count = 0
    for grads in pullbacks(problem, kind, samples=samples, seed=seed, chunk=chunk):
        sq = _coordinates(problem, grads).square()
        total += sq.sum(0)
        if quad is not None:
            quad += sq.square().sum(0)
        count += sq.shape[0]
    sums = [total] + ([quad] if quad is not None else [])
    distributed.all_reduce_(sums)
    count = int(distributed.sum_scalars(count)[0])
    return total, quad, count


def ggn_diagonal(
    problem: Problem, *, exact_max: int = 4096, samples: int = 64, seed: int = 0,
    chunk: int | None = None,
) -> DiagonalEstimate:
    """``diag(G)``: per block the diagonal of the dense block where :class:`Problem` holds it
    (``n_b <= dense_max``); the other blocks from pullbacks, ``exact`` when the ``N · V`` root
    columns are at most ``exact_max``, else ``mc`` with ``samples`` label draws (``B ·
    samples`` pullbacks for B sequences; seeded). Never negative."""
    curv = problem.ggn
    dense = [curv.block(i) for i in range(len(curv.names))]
    if all(b is not None for b in dense):
        values = torch.cat([b.diagonal() for b in dense])
        return DiagonalEstimate(values, DiagonalInfo(("dense",) * len(dense),
                                                     (0.0,) * len(dense)))
    if exact_max < 0 or samples < 1:
        raise ConfigError("the diagonal needs exact_max >= 0 and at least 1 Monte-Carlo sample")
    kind = "exact" if problem.num_tokens * problem.vocab <= exact_max else "mc"
    est, quad, count = _sum_squares(problem, kind, samples, seed, kind == "mc", chunk)
    parts, names, errors = [], [], []
    for i, b in enumerate(dense):
        s = curv.slice(i)
        if b is not None:
            parts.append(b.diagonal())
            names.append("dense")
            errors.append(0.0)
            continue
        parts.append(est[s])
        names.append(kind)
        err = 0.0
        if quad is not None:
            norm = float(est[s].norm())
            err = math.sqrt(float(quad[s].sum())) / norm if norm > 0 else 0.0
        errors.append(err)
    info = DiagonalInfo(tuple(names), tuple(errors), samples if kind == "mc" else 0, count)
    return DiagonalEstimate(torch.cat(parts), info)


@dataclass(frozen=True, eq=False)
class EmpiricalStatistics:
    """From the per-token gradients ``∇ℓ_n`` (``empirical`` pullbacks): ``diagonal``, the exact
    ``diag F = (1/N) Σ_n (∇ℓ_n)²``; ``factors``, per matrix parameter ``W [m, c]`` Shampoo's
    Kronecker factors ``L = (1/(N c)) Σ_n G_n G_nᵀ`` and ``R = (1/(N m)) Σ_n G_nᵀ G_n``
    (``G_n = ∇_W ℓ_n``; a factor with more than ``max_dim`` rows is kept as its diagonal, a
    1-D tensor)."""

    diagonal: DiagonalEstimate
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _factor(g: torch.Tensor, dims: tuple[int, int], full: bool) -> torch.Tensor:
    """``Σ_k g_k g_kᵀ`` (``dims = (1, 2)``) or ``Σ_k g_kᵀ g_k`` (``(2, 1)``) of ``g [k, m, c]``;
    only its diagonal unless ``full``."""
    if not full:
        return g.square().sum(dim=(0, dims[1]))
    return torch.einsum("kmc,knc->mn", g, g) if dims[0] == 1 else \
        torch.einsum("kmc,kmd->cd", g, g)


def empirical_statistics(
    problem: Problem, matrices: Sequence[str], *, max_dim: int = 10000,
    chunk: int | None = None,
) -> EmpiricalStatistics:
    """``diag F`` and the Kronecker factors of ``matrices`` (2-D parameters of the partition,
    covered whole) from one ``empirical`` pass of ``N`` pullbacks (see the class)."""
    zeros = dict(dtype=problem.dtype, device=problem.device)
    facs: dict[str, list[torch.Tensor]] = {}
    for m in matrices:
        rows, cols = problem.params[m].shape
        facs[m] = [torch.zeros((d, d) if d <= max_dim else (d,), **zeros) for d in (rows, cols)]
    diag = torch.zeros(problem.n, **zeros)
    count = 0
    for grads in pullbacks(problem, "empirical", chunk=chunk):
        diag += _coordinates(problem, grads).square().sum(0)
        count += next(iter(grads.values())).shape[0]
        for m in matrices:
            left, right = facs[m]
            left += _factor(grads[m], (1, 2), left.ndim == 2)
            right += _factor(grads[m], (2, 1), right.ndim == 2)
    distributed.all_reduce_([diag] + [t for m in matrices for t in facs[m]])
    count = int(distributed.sum_scalars(count)[0])
    # the pullbacks are ∇ℓ_n / √N, so their sums of products are already means over tokens
    factors = {m: (left / right.shape[0], right / left.shape[0])
               for m, (left, right) in facs.items()}
    b = len(problem.ggn.names)
    est = DiagonalEstimate(diag, DiagonalInfo(("exact",) * b, (0.0,) * b, 0, count))
    return EmpiricalStatistics(est, factors)


def rotated_diagonal(
    problem: Problem, bases: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    *, chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """SOAP's second moment on one batch: per matrix ``W`` with orthonormal bases
    ``(Q_L, Q_R)`` (``None``: the identity), ``D = (1/N) Σ_n (Q_Lᵀ G_n Q_R)²`` elementwise,
    ``G_n = ∇_W ℓ_n`` — the diagonal of F in the rotated basis, ``diag((Q_L ⊗ Q_R)ᵀ F_W
    (Q_L ⊗ Q_R))`` (one ``empirical`` pass of N pullbacks)."""
    out: dict[str, torch.Tensor] = {}
    for grads in pullbacks(problem, "empirical", chunk=chunk):
        for m, (ql, qr) in bases.items():
            g = grads[m]
            if ql is not None:
                g = ql.T @ g
            if qr is not None:
                g = g @ qr
            sq = g.square().sum(0)
            out[m] = sq if m not in out else out[m] + sq
    for m in bases:
        if m not in out:
            out[m] = torch.zeros(problem.params[m].shape, dtype=problem.dtype,
                                 device=problem.device)
    keys = list(bases)
    distributed.all_reduce_([out[m] for m in keys])
    return out

