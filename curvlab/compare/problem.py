"""The comparison problem: the Gauss-Newton matrix G, the gradient g and the loss on fixed batches.

Conventions (as everywhere in curvlab): ``L(θ) = (1/N) Σ_n ℓ_n(θ)`` is the mean token
cross-entropy over the N non-ignored target tokens of *all* batches; θ is restricted to the
coordinates of a block partition (the other parameters stay fixed); ``G = Jᵀ H_z J`` is the GGN
of that loss (:func:`curvlab.ggn`) and ``g = ∇L`` in the same coordinates.

:class:`Curvature` wraps a curvature operator and caches what is small enough to hold densely:
the whole matrix when ``n <= dense_max``, each diagonal block ``C_bb`` when ``n_b <= dense_max``,
and their eigendecompositions. Larger pieces are only ever used through products (diagonals
of those come from per-token pullbacks: :mod:`curvlab.compare.per_token`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from curvlab import distributed
from curvlab.curvature.blocks import Partition
from curvlab.curvature.model_fn import LogitsFn, default_logits_fn, model_params
from curvlab.curvature.operators import CurvatureOperator, fisher, ggn
from curvlab.curvature.space import BlockSpace
from curvlab.data.batches import Batch
from curvlab.errors import ConfigError, CurvlabError
from curvlab.models.attention import math_attention


class Curvature:
    """A symmetric PSD curvature operator ``C`` over a partition, with dense pieces cached.

    ``dense()`` is ``C`` itself when ``n <= dense_max`` (else ``None``); ``block(i)`` the dense
    diagonal block ``C_ii`` when ``n_i <= dense_max`` (sliced from ``dense()`` when that exists);
    ``eigh(i)`` their eigendecompositions (``i=None``: the whole matrix). Products use the dense
    matrices when they exist and the operator otherwise.
    """

    def __init__(self, op: CurvatureOperator, dense_max: int) -> None:
        self.op = op
        self.dense_max = int(dense_max)
        self.partition: Partition = op.partition
        self.names = tuple(self.partition.names)
        self.sizes = tuple(self.partition.sizes)
        self.offsets = tuple(self.partition.offsets)
        self.n = int(op.shape[0])
        self._dense: torch.Tensor | None = None
        self._blocks: dict[int, torch.Tensor | None] = {}
        self._eigh: dict[int | None, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._subops: dict[int, CurvatureOperator] = {}
        self.products = 0  # operator-vector products run through this object (columns)

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    def slice(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def sub(self, i: int) -> CurvatureOperator:
        """The diagonal block ``C_ii`` as an operator."""
        if i not in self._subops:
            self._subops[i] = self.op.block(self.names[i])
        return self._subops[i]

    def dense(self) -> torch.Tensor | None:
        if self._dense is None and self.n <= self.dense_max:
            d = self.op.to_dense()
            self.products += self.n
            self._dense = (d + d.T) / 2
        return self._dense

    def block(self, i: int) -> torch.Tensor | None:
        if i not in self._blocks:
            full = self.dense()
            if full is not None:
                s = self.slice(i)
                self._blocks[i] = full[s, s]
            elif self.sizes[i] <= self.dense_max:
                d = self.sub(i).to_dense()
                self.products += self.sizes[i]
                self._blocks[i] = (d + d.T) / 2
            else:
                self._blocks[i] = None
        return self._blocks[i]

    def eigh(self, i: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(w, U)`` with ``C = U diag(w) Uᵀ`` (``i=None``: the whole matrix), or ``None``."""
        if i not in self._eigh:
            m = self.dense() if i is None else self.block(i)
            self._eigh[i] = None if m is None else torch.linalg.eigh(m)
        return self._eigh[i]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C v`` for ``v`` of shape ``(n,)`` or ``(n, k)``."""
        d = self.dense()
        if d is not None:
            return d @ v
        self.products += 1 if v.ndim == 1 else v.shape[1]
        return self.op @ v

    def block_matvec(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """``C_ii v`` for ``v`` of shape ``(n_i,)`` or ``(n_i, k)``."""
        b = self.block(i)
        if b is not None:
            return b @ v
        self.products += 1 if v.ndim == 1 else v.shape[1]
        return self.sub(i) @ v

    def blockdiag_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``blockdiag(C_11, ..., C_bb) v``."""
        return torch.cat([self.block_matvec(i, v[self.slice(i)]) for i in range(len(self.names))])


def as_batch_list(batches: Batch | Sequence[Batch]) -> list[Batch]:
    out = [batches] if isinstance(batches, Batch) else list(batches)
    if not out or not all(isinstance(b, Batch) for b in out):
        raise ConfigError("batches must be a Batch or a non-empty list of Batch")
    return out


class Problem:
    """G, g and the loss of ``model`` on ``batches`` over the coordinates of ``blocks``.

    ``ggn`` is a :class:`Curvature` of ``G``; ``efisher()`` one of the empirical Fisher (built on
    first use). ``grad`` is ``g`` (float64 or the chosen ``dtype``), ``loss`` ``L(θ)``.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Batch | Sequence[Batch],
        blocks: Partition | str | Sequence[str] | None = "layer",
        *,
        dtype: torch.dtype | None = torch.float64,
        device: torch.device | str | None = None,
        dense_max: int = 2048,
        logits_fn: LogitsFn | None = None,
        ignore_index: int = -100,
        cache: bool | str = "auto",
        precision: str = "fp32",
        compile: bool | str = False,
    ) -> None:
        self.model = model
        self.logits_fn = logits_fn or default_logits_fn
        self.ignore_index = ignore_index
        self.dense_max = dense_max
        self._op_kw = dict(dtype=dtype, device=device, ignore_index=ignore_index, cache=cache,
                           logits_fn=logits_fn, precision=precision, compile=compile)
        op = ggn(model, as_batch_list(batches), blocks, **self._op_kw)
        self.ggn = Curvature(op, dense_max)
        self.partition: Partition = op.partition
        self.space: BlockSpace = op.row_space
        self.params = model_params(model, op.dtype, op.device)
        self.dtype, self.device = op.dtype, op.device
        self.batches = [b.to(self.device) for b in as_batch_list(batches)]
        self.num_tokens = op.num_tokens
        self.n = self.ggn.n
        self._efisher: Curvature | None = None
        self.loss, self.grad, self.vocab = self._loss_and_grad()

    def efisher(self) -> Curvature:
        """The empirical Fisher ``Jᵀ M J`` (``M_n = g_n g_nᵀ / N``) on the same batches/blocks."""
        if self._efisher is None:
            op = fisher(self.model, self.batches, self.partition, kind="empirical",
                        **self._op_kw)
            self._efisher = Curvature(op, self.dense_max)
        return self._efisher

    def _ce_sum(self, params: dict[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, int]:
        out = self.logits_fn(self.model, params, batch.inputs)
        logits = out.reshape(-1, out.shape[-1])
        ce = torch.nn.functional.cross_entropy(
            logits, batch.targets.reshape(-1), ignore_index=self.ignore_index, reduction="sum")
        return ce, logits.shape[-1]

    def _loss_and_grad(self) -> tuple[float, torch.Tensor, int]:
        names = self.space.params
        active = {k: self.params[k].detach().clone().requires_grad_(True) for k in names}
        total, grads, vocab = 0.0, None, 0
        with torch.enable_grad(), math_attention():
            for batch in self.batches:
                ce, vocab = self._ce_sum({**self.params, **active}, batch)
                loss = ce / self.num_tokens
                g = torch.autograd.grad(loss, [active[k] for k in names], allow_unused=True)
                g = [torch.zeros_like(active[k]) if x is None else x for k, x in zip(names, g)]
                grads = g if grads is None else [a + b for a, b in zip(grads, g)]
                total += float(loss.detach())
        flat = self.space.from_tangents(dict(zip(names, grads))).detach()
        if distributed.active():  # this rank's shard: sum over ranks (loss and g, two reductions)
            flat = distributed.all_reduce_sum(flat)
            total = distributed.sum_scalars(total)[0]
        if not torch.isfinite(flat).all():
            raise CurvlabError("the gradient holds NaN or Inf values")
        return total, flat, vocab

    def loss_at(self, batches: Sequence[Batch], direction: torch.Tensor | None = None,
                step: float = 1.0) -> float:
        """``L(θ + step · direction)`` (mean token cross-entropy over all tokens of ``batches``;
        ``direction`` in partition coordinates, ``None`` for ``L(θ)``; under ``torchrun`` the
        batches are this rank's shard and the mean is over all ranks' tokens)."""
        params = dict(self.params)
        if direction is not None:
            t = self.space.to_tangents(step * direction, self.space.params, self.params)
            params.update({k: self.params[k] + t[k] for k in self.space.params})
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(self.device)
                ce, _ = self._ce_sum(params, batch)
                total += float(ce)
                count += int((batch.targets != self.ignore_index).sum())
        total, count = distributed.sum_scalars(total, count)
        if count == 0:
            raise CurvlabError("the validation batches have no target tokens that are not ignored")
        return total / count

    @property
    def products(self) -> int:
        """Operator-vector products run so far with G and the empirical Fisher (columns)."""
        return self.ggn.products + (self._efisher.products if self._efisher else 0)

    @property
    def rank_bound(self) -> int:
        """``rank G <= N (V − 1)``: each token's ``H_z`` has rank ``V − 1`` (null vector 1)."""
        return self.num_tokens * (self.vocab - 1)
