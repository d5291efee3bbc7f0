"""Matrix-free curvature operators of the mean token cross-entropy.

``L(θ) = (1/N) Σ_n ℓ_n(θ)``, the mean over the N non-ignored target tokens of all batches given.
θ is restricted to the coordinates of a block partition (others stay fixed).

- :func:`ggn`: ``G = Jᵀ H_z J`` — J the Jacobian of the logits, H_z the analytic softmax
  cross-entropy Hessian in logit space (:mod:`curvlab.curvature.logit_space`). A product is one
  forward pass carrying tangents (``J v``), the logit-space product, and one VJP (``Jᵀ u``).
  On a fixed batch the linearization is cached (``torch.func.linearize`` for ``J v``, a stored
  VJP for ``Jᵀ u``) and reused across products.
- :func:`hessian`: ``H = ∂²L/∂θ²`` by forward-over-reverse (``jvp`` of ``grad``), the path that
  is correct through ``layer_norm``.
- :func:`fisher`: empirical (``kind="empirical"``) or Monte-Carlo (``kind="mc"``) Fisher,
  ``Jᵀ M J`` with the per-token outer products of logit gradients (true or sampled labels).

All are :class:`CurvatureOperator`: ``op @ v`` for a vector, ``op @ V`` for a matrix of columns
(``vmap``), ``op.block(row, col)``, ``op.block_diagonal()``, ``op.to_dense()``,
``op.to_scipy()``. Every product runs with gradient mode on and the math attention kernel.
``precision`` (``fp32``, ``tf32``, ``bf16``) and ``compile`` (``torch.compile`` of the product
closures) are described in :mod:`curvlab.curvature.precision`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functionalize, grad, jvp, linearize, vjp, vmap

from curvlab import distributed
from curvlab.curvature.blocks import Partition, partition
from curvlab.curvature.logit_space import LogitCurvature
from curvlab.curvature.model_fn import LogitsFn, default_logits_fn, model_params
from curvlab.curvature.precision import (
    CompiledProduct,
    CompileWarning,
    check_precision,
    compile_backend,
    precision_context,
)
from curvlab.curvature.space import BlockSpace
from curvlab.data.batches import Batch
from curvlab.errors import ConfigError, CurvlabError
from curvlab.models.attention import math_attention

# how the losses of several batches combine: ``tokens``, the mean over all their tokens;
# ``batches``, the mean over the batches of each batch's mean token loss
NORMALIZATIONS = ("tokens", "batches")
# On CPU, vmapped products beat a loop only when each product is too small to keep the cores
# busy (measured: 3.3M parameters: vmap 1.8x slower; 133k: 1.3x slower; 1.6k: 10x faster).
VMAP_CPU_MAX_PARAMS = 20_000


class CacheWarning(UserWarning):
    """The linearization cache would not fit; products recompute it."""


def available_memory(device: torch.device) -> int:
    """Bytes of free memory on ``device`` (host RAM for CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _as_batches(batches: Batch | Sequence[Batch] | Any) -> list[Batch]:
    if isinstance(batches, Batch):
        return [batches]
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and all(
        isinstance(b, torch.Tensor) for b in batches
    ):
        return [Batch(batches[0], batches[1])]
    out = list(batches)
    if not out or not all(isinstance(b, Batch) for b in out):
        raise ConfigError("batches must be a Batch, a list of Batch, or an (inputs, targets) pair")
    return out


class _Engine:
    """Products with the curvature of one model on fixed batches, over ``names`` parameters."""

    def __init__(
        self,
        model: nn.Module,
        batches: Batch | Sequence[Batch],
        names: list[str],
        kind: str,
        *,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        ignore_index: int,
        cache: bool | str,
        chunk_tokens: int,
        mc_samples: int = 1,
        seed: int = 0,
        logits_fn: LogitsFn | Sequence[LogitsFn | None] | None = None,
        cache_fraction: float = 0.5,
        precision: str = "fp32",
        compile: bool | str = False,
        normalization: str = "tokens",
    ) -> None:
        self.model = model
        self.kind = kind
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalization {normalization!r}; expected one of "
                              f"{', '.join(NORMALIZATIONS)}")
        self.normalization = normalization
        self.params = model_params(model, dtype, device)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        if not self.dtype.is_floating_point:
            raise ConfigError(f"parameters must be floating point, got {self.dtype}")
        self.precision = check_precision(precision, self.dtype)
        self.compile_backend = compile_backend(compile)
        self.names = names
        self.num_params = sum(p.numel() for p in self.params.values())
        self.ignore_index = ignore_index
        self.batches = [b.to(self.device) for b in _as_batches(batches)]
        fns = (list(logits_fn) if isinstance(logits_fn, (list, tuple))
               else [logits_fn] * len(self.batches))
        if len(fns) != len(self.batches):
            raise ConfigError(f"{len(fns)} logits functions for {len(self.batches)} batches")
        self.logits_fns = [fn or default_logits_fn for fn in fns]
        counts = [int((b.targets != ignore_index).sum()) for b in self.batches]
        # under torchrun the batches are this rank's shard; the loss is the mean over all ranks'
        counts = [int(round(c)) for c in distributed.sum_scalars(*counts)]
        self.num_tokens = sum(counts)
        if self.num_tokens == 0:
            raise CurvlabError("the batches have no target tokens that are not ignored")
        if normalization == "batches":
            if not all(counts):
                raise CurvlabError("a batch has no target tokens that are not ignored")
            # the mean over batches of each batch's mean: batch k's tokens weigh 1/(K N_k)
            self.scales = [1.0 / (len(counts) * c) for c in counts]
        else:
            self.scales = [1.0 / self.num_tokens] * len(counts)
        for name, p in self.params.items():
            if not torch.isfinite(p).all():
                raise CurvlabError(f"parameter {name} holds NaN or Inf values")
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if embeddings:
            vocab = embeddings[0].num_embeddings
            top = max(int(b.inputs.max()) for b in self.batches)
            if top >= vocab:
                raise CurvlabError(f"token id {top} >= vocabulary size {vocab} of the model's "
                                   "input embedding")
        self.generator = torch.Generator().manual_seed(seed)
        self.mc_samples = mc_samples
        self.chunk_tokens = chunk_tokens
        self.cached = False
        self._states: list[dict[str, Any]] | None = None
        self._want_cache = cache
        self._cache_fraction = cache_fraction

    # -- the model as a function of the active parameters -----------------------------------
    def _fn(self, i: int):
        """Flat logits of batch ``i`` as a function of the active parameters."""
        frozen = {k: v for k, v in self.params.items() if k not in self.names}
        batch, fn = self.batches[i], self.logits_fns[i]

        def logits(active: Mapping[str, torch.Tensor]) -> torch.Tensor:
            out = fn(self.model, {**frozen, **active}, batch.inputs)
            return out.reshape(-1, out.shape[-1])

        return logits

    def active(self) -> dict[str, torch.Tensor]:
        return {k: self.params[k] for k in self.names}

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """Gradient mode on, math attention, this operator's precision."""
        with torch.enable_grad(), math_attention(), precision_context(self.precision,
                                                                      self.device):
            yield

    def estimate_cache_bytes(self) -> int:
        """Bytes the linearization cache needs: tensors saved by one forward pass, times 2
        (the ``J v`` graph and the VJP each keep their own), summed over batches."""
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        active = {k: v.detach().requires_grad_(True) for k, v in self.active().items()}
        with self._context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._fn(0)(active)
        factor = 4 if self.kind == "hessian" else 2  # forward-over-reverse keeps more
        return factor * total * len(self.batches)

    def set_cache(self, cache: bool | str) -> None:
        """Choose cached (``True``), recomputed (``False``) or ``"auto"`` linearizations
        before the first product (a memory plan's decision); raises once products ran."""
        if self._states is not None:
            raise RuntimeError("set_cache after the first product")
        self._want_cache = cache

    def _setup(self) -> None:
        if self._states is not None:
            return
        want = self._want_cache
        if want == "auto":
            need = self.estimate_cache_bytes()
            budget = self._cache_fraction * available_memory(self.device)
            want = need <= budget
            if not want:
                warnings.warn(
                    f"curvature cache would need {need / 2**30:.1f} GiB of "
                    f"{budget / 2**30:.1f} GiB allowed; recomputing the linearization per "
                    "product (slower, less memory)",
                    CacheWarning,
                    stacklevel=3,
                )
        self.cached = bool(want)
        states = []
        with self._context():
            for i, batch in enumerate(self.batches):
                fn = self._fn(i)
                state: dict[str, Any] = {"fn": fn, "batch": batch, "scale": self.scales[i]}
                targets = batch.targets.reshape(-1)
                if self.kind == "hessian" and self.cached:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        _, state["hvp"] = _linearize(grad(self._loss_fn(state)),
                                                     self.active())
                elif self.kind != "hessian":
                    if self.cached:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", UserWarning)
                            z, state["jvp"] = _linearize(fn, self.active())
                        self._check_targets(z, targets)
                        _, state["vjp"] = vjp(fn, self.active())
                        state["M"] = self._logit_curvature(z, targets, batch.token_range,
                                                           state["scale"])
                        state["z_dtype"] = z.dtype  # bf16: the VJP takes a bf16 cotangent
                    else:
                        state["M"] = None  # built from the first product's forward pass
                if self.compile_backend is not None:
                    state["compiled"] = CompiledProduct(
                        self._closure(state), self.compile_backend,
                        f"{self.kind} ({'cached' if self.cached else 'fresh'})",
                        trace=self.cached,  # stored pullbacks and linearized graphs
                        on_failure=self._compile_failed)
                states.append(state)
        self._states = states

    def _closure(self, state: dict[str, Any]):
        """The product on one batch as a function of the tangent alone (what is compiled)."""

        def product(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return self._eager_one(state, t)

        return product

    def _compile_failed(self, error: BaseException) -> None:
        """One failed compilation: every batch's products run eagerly (one warning)."""
        for state in self._states or ():
            state.pop("compiled", None)

    def _check_targets(self, z: torch.Tensor, targets: torch.Tensor) -> None:
        valid = targets[targets != self.ignore_index]
        if valid.numel() and (int(valid.max()) >= z.shape[-1] or int(valid.min()) < 0):
            raise CurvlabError(f"target id {int(valid.max())} outside the model's "
                               f"{z.shape[-1]} logits")

    def _logit_curvature(self, z: torch.Tensor, targets: torch.Tensor,
                         token_range: tuple[int, int] | None, scale: float) -> LogitCurvature:
        self._check_targets(z, targets)
        return LogitCurvature(
            z.detach().to(self.dtype), targets, kind=self.kind, scale=scale,
            ignore_index=self.ignore_index, mc_samples=self.mc_samples,
            generator=self.generator, chunk_tokens=self.chunk_tokens, token_range=token_range,
        )

    def prepare(self) -> None:
        """Compute what products need before they run under ``vmap``."""
        self._setup()
        if self.kind == "hessian":
            return
        for state in self._states:
            if state["M"] is None:
                with torch.no_grad(), math_attention(), precision_context(self.precision,
                                                                          self.device):
                    z = state["fn"](self.active())
                state["M"] = self._logit_curvature(z, state["batch"].targets.reshape(-1),
                                                   state["batch"].token_range, state["scale"])

    # -- products -------------------------------------------------------------------------
    def _loss_fn(self, state: dict[str, Any]):
        fn, targets = state["fn"], state["batch"].targets.reshape(-1)

        def loss(active: Mapping[str, torch.Tensor]) -> torch.Tensor:
            ce = torch.nn.functional.cross_entropy(  # bf16 logits: the loss in self.dtype
                fn(active).to(self.dtype), targets, ignore_index=self.ignore_index,
                reduction="sum")
            return ce * state["scale"]

        return loss

    def _product_one(self, state: dict[str, Any], t: dict[str, torch.Tensor]):
        compiled = state.get("compiled")
        if compiled is not None and (self.kind == "hessian" or state["M"] is not None):
            return compiled(t)
        return self._eager_one(state, t)

    def _eager_one(self, state: dict[str, Any], t: dict[str, torch.Tensor]):
        """One batch's product."""
        if self.kind == "hessian":
            if self.cached:
                return state["hvp"](t)
            return jvp(grad(self._loss_fn(state)), (self.active(),), (t,))[1]
        if self.cached:
            u = state["M"](state["jvp"](t)).to(state["z_dtype"])
            return state["vjp"](u)[0]
        fn = state["fn"]

        def with_tangent(p):
            z, jz = jvp(fn, (p,), (t,))
            return z, (z, jz)

        # one forward pass carrying tangents, then one VJP through the same graph
        _, vjp_fn, (z, jz) = vjp(with_tangent, self.active(), has_aux=True)
        if state["M"] is None:
            state["M"] = self._logit_curvature(z, state["batch"].targets.reshape(-1),
                                               state["batch"].token_range, state["scale"])
        return vjp_fn(state["M"](jz).to(jz.dtype))[0]

    def product(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Curvature times tangent ``t`` (dict over ``names``), summed over this process's
        batches (under ``torchrun`` the caller all-reduces, once per product)."""
        self._setup()
        total = None
        with self._context(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", UserWarning)  # torch.func's notes on linearize
            warnings.simplefilter("always", CompileWarning)
            for state in self._states:
                out = self._product_one(state, t)
                if total is None:
                    total = out
                else:  # in place: one parameter-sized result, not three
                    for k in out:
                        total[k] = total[k].add_(out[k])
                    del out
        for w in caught:  # what was not ignored, passed on to the caller's filters
            warnings.warn(w.message, w.category, stacklevel=3)
        return total


def _linearize(fn, primals):
    """``torch.func.linearize`` of the functionalized ``fn``. linearize traces ``jvp`` once
    with the primal values as graph constants; an in-place operation in the model (Falcon's
    ``mlp_output += attention_output``) then mutates a constant on every call, so the second
    product differs from the first (measured: 64% relative on a tiny Falcon). Functionalized,
    the trace has no in-place operations."""
    return linearize(functionalize(fn), primals)


class CurvatureOperator:
    """A curvature matrix restricted to (row space) x (column space) of a block partition.

    ``shape = (rows, cols)``; square for the operator on a whole partition. Supports
    ``op @ v`` (1-D vector, ``[cols, k]`` matrix, or per-parameter dict), :meth:`matmat`,
    :meth:`block`, :meth:`block_diagonal`, :meth:`to_dense`, :meth:`to_scipy`.
    """

    def __init__(
        self, engine: _Engine, partition: Partition, row: BlockSpace, col: BlockSpace,
        label: str,
    ) -> None:
        self.engine = engine
        self.partition = partition
        self.row_space, self.col_space = row, col
        self.label = label
        self.kind = engine.kind

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row_space.size, self.col_space.size)

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def num_tokens(self) -> int:
        return self.engine.num_tokens

    @property
    def precision(self) -> str:
        """``fp32``, ``tf32`` or ``bf16`` (:mod:`curvlab.curvature.precision`)."""
        return self.engine.precision

    def __repr__(self) -> str:
        return (f"CurvatureOperator({self.label}, shape={self.shape}, dtype={self.dtype}, "
                f"precision={self.precision}, device={self.device}, tokens={self.num_tokens})")

    def _local_matvec(self, v: torch.Tensor) -> torch.Tensor:
        e = self.engine
        t = self.col_space.to_tangents(v, e.names, e.params)
        return self.row_space.from_tangents(e.product(t))

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """One product of a 1-D ``v``: the per-parameter results are copied into the flat
        output one by one and released as they go (peak: the output and the gradient, not the
        gradient twice)."""
        e = self.engine
        grads = e.product(self.col_space.to_tangents(v, e.names, e.params))
        segments = self.row_space.segments
        last = {name: i for i, (name, *_rest) in enumerate(segments)}
        out = v.new_empty(self.row_space.size)
        for i, (name, start, stop, off) in enumerate(segments):
            out[off : off + stop - start] = grads[name].reshape(-1)[start:stop]
            if last[name] == i:
                del grads[name]
        return _reduced(out)

    def __matmul__(self, v: Any) -> Any:
        if isinstance(v, Mapping):
            flat = self.col_space.flatten_dict(v).to(self.dtype)
            return self.row_space.unflatten(self @ flat)
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(np.asarray(v))
        v = v.to(device=self.device, dtype=self.dtype)
        if v.ndim == 1:
            if v.shape[0] != self.shape[1]:
                raise ConfigError(f"vector has {v.shape[0]} entries, operator has {self.shape[1]} "
                                  "columns")
            return self._matvec(v)
        if v.ndim == 2:
            return self.matmat(v)
        raise ConfigError(f"operator products take 1-D or 2-D tensors, got {v.ndim}-D")

    def matmat(
        self, V: torch.Tensor, chunk_size: int | None = 32, vectorize: bool | None = None
    ) -> torch.Tensor:
        """``op @ V`` for ``V`` of shape ``[cols, k]``.

        ``vectorize`` runs the products under ``vmap`` in chunks of ``chunk_size`` columns.
        Default: on accelerators, and on CPU for models under ``VMAP_CPU_MAX_PARAMS``
        parameters; for larger models on CPU one column after another measured faster.
        """
        V = V.to(device=self.device, dtype=self.dtype)
        if V.shape[0] != self.shape[1]:
            raise ConfigError(f"matrix has {V.shape[0]} rows, operator has {self.shape[1]} columns")
        if V.shape[1] == 1:
            return self._matvec(V[:, 0])[:, None]
        if vectorize is None:
            vectorize = self.device.type != "cpu" or self.engine.num_params < VMAP_CPU_MAX_PARAMS
        if not vectorize:
            return self._column_by_column(V)
        self.engine.prepare()
        rows = V.T.contiguous()
        try:
            return _reduced(vmap(self._local_matvec, chunk_size=chunk_size)(rows).T)
        except RuntimeError as e:
            # graphs traced by torch.func.linearize may hold a `view` that a vmapped tangent's
            # layout cannot take (seen on learned position embeddings): same result by a loop
            if "view size is not compatible" not in str(e):
                raise
            return self._column_by_column(V)

    def _column_by_column(self, V: torch.Tensor) -> torch.Tensor:
        return _reduced(torch.stack([self._local_matvec(V[:, i]) for i in range(V.shape[1])],
                                    dim=1))

    def block(self, row: str, col: str | None = None) -> CurvatureOperator:
        """The (row block, column block) sub-operator (the diagonal block if ``col`` is None)."""
        col = row if col is None else col
        rows = BlockSpace(self.partition.select([row]), self.row_space.shapes)
        cols = BlockSpace(self.partition.select([col]), self.col_space.shapes)
        return CurvatureOperator(self.engine, self.partition, rows, cols,
                                 f"{self.kind}[{row}, {col}]")

    def block_diagonal(self) -> BlockDiagonalOperator:
        """The layerwise operator ``blockdiag(C_11, ..., C_bb)`` of the partition."""
        return BlockDiagonalOperator([self.block(n) for n in self.partition.names], self)

    def to_dense(self, chunk_size: int | None = 32) -> torch.Tensor:
        """The matrix ``[rows, cols]``, column chunk by column chunk."""
        n = self.shape[1]
        step = chunk_size or n
        cols = []
        for i in range(0, n, step):
            j = min(n, i + step)
            eye = torch.zeros(n, j - i, dtype=self.dtype, device=self.device)
            eye[torch.arange(i, j), torch.arange(j - i)] = 1
            cols.append(self.matmat(eye, chunk_size))
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy in/out, float64 numpy dtype)."""
        return _to_scipy(self)


def _reduced(local: torch.Tensor) -> torch.Tensor:
    """The sum over ``torchrun`` ranks of their products on their shards (one all-reduce)."""
    return distributed.all_reduce_sum(local) if distributed.active() else local


class BlockDiagonalOperator:
    """``blockdiag`` of the diagonal blocks of a curvature operator (layerwise curvature)."""

    def __init__(self, blocks: list[CurvatureOperator], parent: CurvatureOperator) -> None:
        self.blocks = blocks
        self.parent = parent
        self.partition = parent.partition
        self.kind = parent.kind
        self.sizes = [b.shape[0] for b in blocks]

    shape = property(lambda self: self.parent.shape)
    dtype = property(lambda self: self.parent.dtype)
    device = property(lambda self: self.parent.device)

    def __repr__(self) -> str:
        return f"BlockDiagonalOperator({self.kind}, blocks={self.partition.names})"

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v).to(device=self.device, dtype=self.dtype)
        parts = torch.split(v, self.sizes, dim=0)
        return torch.cat([b @ p for b, p in zip(self.blocks, parts)], dim=0)

    def matmat(
        self, V: torch.Tensor, chunk_size: int | None = 32, vectorize: bool | None = None
    ) -> torch.Tensor:
        parts = torch.split(V.to(device=self.device, dtype=self.dtype), self.sizes, dim=0)
        return torch.cat([b.matmat(p, chunk_size, vectorize) for b, p in zip(self.blocks, parts)],
                         dim=0)

    def to_dense(self, chunk_size: int | None = 32) -> torch.Tensor:
        return torch.block_diag(*[b.to_dense(chunk_size) for b in self.blocks])

    def to_scipy(self):
        return _to_scipy(self)


def _to_scipy(op):
    from scipy.sparse.linalg import LinearOperator

    def mv(x):
        x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        return (op @ x).detach().cpu().double().numpy()

    def mm(X):
        X = torch.as_tensor(np.asarray(X, dtype=np.float64))
        return op.matmat(X).detach().cpu().double().numpy()

    return LinearOperator(op.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)


def default_partition(model: nn.Module) -> Partition:
    """The layer partition when the model has repeated blocks, else one block per parameter."""
    try:
        return partition(model, "layer")
    except ConfigError:
        return partition(model, "param")


def _partition_for(model: nn.Module, blocks: Partition | str | Sequence[str] | None) -> Partition:
    if isinstance(blocks, Partition):
        return blocks
    if blocks is None:
        return default_partition(model)
    return partition(model, blocks)


def _make(
    kind: str,
    model: nn.Module,
    batches: Batch | Sequence[Batch],
    blocks: Partition | str | Sequence[str] | None,
    **kw: Any,
) -> CurvatureOperator:
    part = _partition_for(model, blocks)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    space = BlockSpace(part, shapes)
    engine = _Engine(model, batches, space.params, kind, **kw)
    return CurvatureOperator(engine, part, space, space, kind)


def ggn(
    model: nn.Module,
    batches: Batch | Sequence[Batch],
    blocks: Partition | str | Sequence[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    ignore_index: int = -100,
    cache: bool | str = "auto",
    chunk_tokens: int = 4096,
    logits_fn: LogitsFn | Sequence[LogitsFn | None] | None = None,
    precision: str = "fp32",
    compile: bool | str = False,
    normalization: str = "tokens",
) -> CurvatureOperator:
    """Generalized Gauss-Newton ``G = Jᵀ H_z J`` of the mean token cross-entropy.

    ``H_z`` is per token ``(diag(p) − p pᵀ)/N`` (N = non-ignored tokens of all ``batches``);
    with ``normalization="batches"`` the loss is instead the mean over the ``K`` batches of each
    batch's mean token cross-entropy, ``(1/K) Σ_k L_k``, and batch ``k``'s tokens weigh
    ``1/(K N_k)`` (the two agree when every batch has the same token count). ``logits_fn``: one
    for all batches or one per batch (None: the model's forward).
    J the Jacobian of the logits w.r.t. the partition's coordinates (``blocks``: a
    :class:`Partition`, a preset name or globs; default the layer partition). ``cache``:
    ``"auto"`` caches the linearization when it fits in half the free memory, else recomputes
    per product (with a :class:`CacheWarning`); ``True``/``False`` force it.
    ``precision``: ``fp32`` (default), ``tf32`` or ``bf16`` products of float32 parameters;
    ``compile``: ``torch.compile`` of the product closures (``True`` or a backend name), eager
    after one warning where it fails (:mod:`curvlab.curvature.precision`).
    """
    return _make("ggn", model, batches, blocks, dtype=dtype, device=device,
                 ignore_index=ignore_index, cache=cache, chunk_tokens=chunk_tokens,
                 logits_fn=logits_fn, precision=precision, compile=compile,
                 normalization=normalization)


def hessian(
    model: nn.Module,
    batches: Batch | Sequence[Batch],
    blocks: Partition | str | Sequence[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    ignore_index: int = -100,
    cache: bool | str = "auto",
    logits_fn: LogitsFn | None = None,
    precision: str = "fp32",
    compile: bool | str = False,
) -> CurvatureOperator:
    """Hessian ``H = ∂²L/∂θ²`` of the mean token cross-entropy by forward-over-reverse
    (``jvp`` of ``grad``). On a fixed batch the forward-over-reverse graph is linearized once
    (``torch.func.linearize``) when it fits (``cache``, as for :func:`ggn`). ``precision`` and
    ``compile`` as for :func:`ggn`."""
    return _make("hessian", model, batches, blocks, dtype=dtype, device=device,
                 ignore_index=ignore_index, cache=cache, chunk_tokens=4096, logits_fn=logits_fn,
                 precision=precision, compile=compile)


def fisher(
    model: nn.Module,
    batches: Batch | Sequence[Batch],
    blocks: Partition | str | Sequence[str] | None = None,
    *,
    kind: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    ignore_index: int = -100,
    cache: bool | str = "auto",
    chunk_tokens: int = 4096,
    logits_fn: LogitsFn | None = None,
    precision: str = "fp32",
    compile: bool | str = False,
) -> CurvatureOperator:
    """Fisher ``Jᵀ M J``: ``kind="empirical"`` uses the true labels, ``M_n = g_n g_nᵀ / N``
    with ``g_n = ∂ℓ_n/∂z_n``; ``kind="mc"`` draws ``mc_samples`` labels per token from the
    model's softmax (``seed``), an unbiased estimate of the GGN. ``precision`` and ``compile``
    as for :func:`ggn`."""
    kinds = {"empirical": "efisher", "mc": "mcfisher"}
    if kind not in kinds:
        raise ConfigError(f"unknown Fisher kind {kind!r}; expected empirical or mc")
    return _make(kinds[kind], model, batches, blocks, dtype=dtype, device=device,
                 ignore_index=ignore_index, cache=cache, chunk_tokens=chunk_tokens,
                 mc_samples=mc_samples, seed=seed, logits_fn=logits_fn, precision=precision,
                 compile=compile)


CURVATURES = {"ggn": ggn, "hessian": hessian, "efisher": fisher, "mcfisher": fisher}


def curvature_operator(
    kind: str, model: nn.Module, batches: Any, blocks: Any = None, **kw: Any
) -> CurvatureOperator:
    """Operator by name: ``ggn``, ``hessian``, ``efisher`` (empirical Fisher), ``mcfisher``."""
    if kind not in CURVATURES:
        raise ConfigError(f"unknown curvature {kind!r}; valid: {', '.join(CURVATURES)}")
    if kind == "hessian":
        kw.pop("chunk_tokens", None)
    if kind in ("efisher", "mcfisher"):
        kw["kind"] = "empirical" if kind == "efisher" else "mc"
    return CURVATURES[kind](model, batches, blocks, **kw)
