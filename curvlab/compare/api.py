"""``compare_preconditioners``: full vs layerwise (and other) Gauss-Newton preconditioners on one
model, and ``compare_checkpoints`` over the checkpoints of one run. See docs/compare.md.

Sign conventions: a *decrease* is positive when the loss (or its model) goes down, i.e.
``decrease = −m(α d)`` and ``val_decrease = L_val(θ) − L_val(θ + α d)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvlab import distributed
from curvlab.compare.directions import (
    PRECONDITIONERS,
    PreconditionerBuilder,
    check_names,
    direction,
)
from curvlab.compare.errors import CompareError
from curvlab.compare.metrics import (
    DirectionMetrics,
    OffDiagonalEnergy,
    measure_direction,
    off_diagonal_energy,
    preconditioned_spectrum,
)
from curvlab.compare.per_token import DiagonalInfo
from curvlab.compare.problem import Problem, as_batch_list
from curvlab.curvature.blocks import Partition
from curvlab.curvature.model_fn import LogitsFn
from curvlab.data.batches import Batch
from curvlab.errors import ConfigError

DEFAULT_PRECONDITIONERS = ("full", "layerwise", "diag", "adam", "kfac", "shampoo", "soap", "muon",
                           "identity")
DEFAULT_DAMPINGS = (1e-3, 1e-2)
STEP_GRID = (1.0, 0.71, 0.5, 0.35, 0.25)  # multiples of α* (the paper's line-search grid)


@dataclass(frozen=True)
class CompareResult:
    """A preconditioner comparison on one model (see :func:`compare_preconditioners`).

    rows: one :class:`DirectionMetrics` per (damping, preconditioner), dampings outer.
    loss / val_loss: ``L(θ)`` on the batches / validation batches; grad_norm ``‖g‖``;
    tokens / val_tokens: target tokens the losses average over; n: coordinates of θ compared.
    off_diagonal: ``‖G − BD(G)‖_F / ‖G‖_F`` (None if not computed).
    methods: how reference quantities were obtained, in words (``diag``, ``adam``, ``kfac``,
    ``shampoo``, ``soap``, ``muon``: estimators, samples and covered coordinates).
    diagonals: per diagonal used (``ggn``: ``diag(G)`` of ``diag`` and K-FAC's other
    coordinates; ``efisher``: ``diag(F)`` of ``adam`` and of the other coordinates of
    ``shampoo``/``soap``/``muon``) the estimator and estimated relative error of each block
    (:class:`~curvlab.compare.per_token.DiagonalInfo`).
    products: operator-vector products (columns) with G and F; partition: the blocks used
    (``None`` when read back from a file).
    """

    blocks: tuple[str, ...]
    block_sizes: tuple[int, ...]
    preconditioners: tuple[str, ...]
    dampings: tuple[float, ...]
    rows: tuple[DirectionMetrics, ...]
    loss: float
    val_loss: float
    grad_norm: float
    tokens: int
    val_tokens: int
    n: int
    off_diagonal: OffDiagonalEnergy | None
    step_grid: tuple[float, ...]
    methods: dict[str, str] = field(default_factory=dict)
    diagonals: dict[str, DiagonalInfo] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    products: int = 0
    partition: Partition | None = None

    def row(self, preconditioner: str, damping: float) -> DirectionMetrics:
        for r in self.rows:
            if r.preconditioner == preconditioner and r.damping == damping:
                return r
        raise KeyError(f"no row for {preconditioner!r} at damping {damping:g}")

    def ratio(self, preconditioner: str, damping: float, metric: str = "decrease_best"
              ) -> float:
        """``metric(preconditioner) / metric(full)`` at the same damping (NaN without full)."""
        if "full" not in self.preconditioners:
            return math.nan
        ref = getattr(self.row("full", damping), metric)
        value = getattr(self.row(preconditioner, damping), metric)
        return value / ref if ref else math.nan


def _dampings(dampings: Sequence[float] | float) -> tuple[float, ...]:
    values = (dampings,) if isinstance(dampings, (int, float)) else tuple(dampings)
    if not values:
        raise ConfigError("give at least one damping")
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"dampings must be finite and >= 0, got {v:g}")
    if len(set(values)) != len(values):
        raise ConfigError("a damping is listed twice")
    return tuple(float(v) for v in values)


def _methods(builder: PreconditionerBuilder, names: Sequence[str], blocks: Sequence[str]
             ) -> tuple[dict[str, str], dict[str, DiagonalInfo]]:
    """How each reference quantity was obtained: words for the table, per-block diagonal
    estimators for the file."""
    methods: dict[str, str] = {}
    diagonals: dict[str, DiagonalInfo] = {}
    n = builder.problem.n
    if "diag" in names or "kfac" in names:
        diagonals["ggn"] = builder.diag_ggn().info
        methods["diag"] = "diag(G) per block: " + diagonals["ggn"].describe(blocks)
    first_order = [m for m in ("adam", "shampoo", "soap", "muon") if m in names]
    if first_order:
        diagonals["efisher"] = builder.diag_efisher().info
        methods["adam"] = (f"diag(F) exact from {diagonals['efisher'].pullbacks:,} per-token "
                           f"gradients (also the other coordinates of "
                           f"{', '.join(m for m in first_order if m != 'adam') or '-'})")
    if "kfac" in names:
        est = builder.kfac_estimator
        est += f"({builder.kfac_samples} samples)" if est == "mc" else ""
        methods["kfac"] = (f"{est}, {len(builder.kfac_factors())} linear layers covering "
                           f"{builder.kfac_coverage():,} of {n:,} coordinates")
    for name, mats in (("shampoo", builder.matrices), ("soap", builder.matrices),
                       ("muon", builder.muon_matrices)):
        if name in names:
            shapes = builder.problem.space.shapes
            covered = sum(shapes[m].numel() for m in mats())
            what = ("Newton-Schulz (5 steps) on" if name == "muon" else
                    "per-token Kronecker factors L, R of")
            methods[name] = (f"{what} {len(mats())} matrices covering {covered:,} of {n:,} "
                             "coordinates; the rest adam")
    return methods, diagonals


def compare_preconditioners(
    model: nn.Module,
    batches: Batch | Sequence[Batch],
    val_batches: Batch | Sequence[Batch],
    *,
    preconditioners: Sequence[str] = DEFAULT_PRECONDITIONERS,
    dampings: Sequence[float] | float = DEFAULT_DAMPINGS,
    blocks: Partition | str | Sequence[str] | None = "layer",
    cg_tol: float = 1e-4,
    cg_max_iter: int | None = 1000,
    dense_max: int = 2048,
    diag_exact_max: int = 4096,
    diag_samples: int = 64,
    kfac_estimator: str = "mc",
    kfac_samples: int = 4,
    max_precond_dim: int = 10000,
    step_grid: Sequence[float] = STEP_GRID,
    spectrum: bool = True,
    spectrum_steps: int = 60,
    spectrum_tol: float = 1e-6,
    ritz_steps: int = 10,
    ritz_tol: float = 1e-2,
    energy: bool = True,
    energy_probes: int = 64,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
    device: torch.device | str | None = None,
    logits_fn: LogitsFn | None = None,
    ignore_index: int = -100,
    cache: bool | str = "auto",
    precision: str = "fp32",
    compile: bool | str = False,
    progress: Callable[[str], None] | None = None,
) -> CompareResult:
    """Compare preconditioned Gauss-Newton directions ``d = −P⁻¹ g`` on ``model``.

    ``G`` (GGN) and ``g`` are of the mean token cross-entropy over ``batches`` on the
    coordinates of ``blocks`` (default: the layer partition, which also defines ``layerwise``).
    For each damping λ in ``dampings`` and each preconditioner (see
    :mod:`curvlab.compare.directions`) this computes the direction and its
    :class:`DirectionMetrics`: predicted decreases of the undamped model ``m(d) = gᵀd + ½ dᵀGd``
    at the unit and the best step, the per-block split, the cosine to the full-GN direction,
    the validation loss ``L_val(θ + α d)`` for ``α`` in ``step_grid · α*`` on ``val_batches``,
    and (``spectrum``) the extreme eigenvalues of ``P^{-1/2}(G + λI)P^{-1/2}``
    (:func:`curvlab.compare.metrics.preconditioned_spectrum`: ``spectrum_steps`` Lanczos steps
    to relative residual ``spectrum_tol``, or ``ritz_steps`` Rayleigh–Ritz vectors with CG
    solves to ``ritz_tol`` for a layerwise P with blocks too large to factor);
    ``energy`` adds ``‖G − BD(G)‖_F / ‖G‖_F``.

    Matrices (and blocks) with at most ``dense_max`` coordinates are held densely (exact
    diagonals, eigendecompositions, spectra); larger ones are used through products: CG with
    relative tolerance ``cg_tol`` (at most ``cg_max_iter`` steps; dampings are solved from the
    largest down, each warm-started from the previous solution; the damped model's error is at
    most ``½ cg_tol² ‖g‖² / λ``), randomized energy with ``energy_probes`` probes. ``diag(G)``
    of larger blocks comes from per-token pullbacks (:mod:`curvlab.compare.per_token`): exact
    when ``N · V <= diag_exact_max``, else ``diag_samples`` Monte-Carlo label draws (one
    pullback per sequence and draw);
    ``diag(F)`` and Shampoo's factors (``max_precond_dim``: larger factors are kept as their
    diagonals) always from the N per-token gradients. ``seed`` fixes all random draws.
    ``cache`` is the operators' linearization cache (:func:`curvlab.ggn`; on small models
    ``False`` is faster: tracing the linearization costs more than it saves). ``precision`` and
    ``compile`` are those of the curvature products (:mod:`curvlab.curvature.precision`;
    ``tf32``/``bf16`` need ``dtype=torch.float32``); gradients, losses, diagonals and Kronecker
    factors stay in ``dtype``.
    Never prints; ``progress`` (if given) receives short status strings.

    Raises :class:`~curvlab.errors.ConfigError` for unknown names or bad options and
    :class:`~curvlab.compare.errors.SingularPreconditionerError` for a singular ``P``
    (e.g. λ = 0 on a GGN with a null space).
    """
    names = check_names(list(preconditioners))
    lams = _dampings(dampings)
    grid = tuple(float(s) for s in step_grid)
    if not grid or any(not math.isfinite(s) or s <= 0 for s in grid):
        raise ConfigError("step_grid must be a non-empty list of positive numbers")
    if cg_tol <= 0 or ritz_tol <= 0 or spectrum_steps < 2 or ritz_steps < 2:
        raise ConfigError("cg_tol and ritz_tol must be > 0, spectrum_steps and ritz_steps >= 2")
    val = as_batch_list(val_batches)
    say = progress or (lambda _msg: None)

    say("gradient and curvature")
    problem = Problem(model, batches, blocks, dtype=dtype, device=device, dense_max=dense_max,
                      logits_fn=logits_fn, ignore_index=ignore_index, cache=cache,
                      precision=precision, compile=compile)
    builder = PreconditionerBuilder(problem, cg_tol=cg_tol, cg_max_iter=cg_max_iter,
                                    diag_exact_max=diag_exact_max, diag_samples=diag_samples,
                                    kfac_estimator=kfac_estimator, kfac_samples=kfac_samples,
                                    max_precond_dim=max_precond_dim, seed=seed)
    val_loss = problem.loss_at(val)
    val_tokens = int(distributed.sum_scalars(  # all ranks' shards under torchrun
        sum(int((b.targets != ignore_index).sum()) for b in val))[0])
    order = ["full"] + [n for n in names if n != "full"] if "full" in names else list(names)
    rows: dict[tuple[str, float], DirectionMetrics] = {}
    warm: dict[str, torch.Tensor] = {}
    for lam in sorted(lams, reverse=True):
        d_full = None
        for name in order:
            say(f"{name} at damping {lam:g}")
            pre = builder.make(name, lam)
            d = direction(pre, problem.grad, warm.get(name))
            info = pre.info
            if info.method in ("cg", "dense+cg"):
                warm[name] = -d
            if name == "full":
                d_full = d
            spec = None
            if spectrum and pre.linear:
                spec = preconditioned_spectrum(
                    problem.ggn, pre, lam, steps=spectrum_steps, tol=spectrum_tol,
                    ritz_steps=ritz_steps, ritz_tol=ritz_tol, seed=seed)
            rows[(name, lam)] = measure_direction(
                problem, name, lam, d, d_full=d_full, val_batches=val, val_loss=val_loss,
                step_grid=grid, spectrum=spec, info=info)
    off = None
    if energy:
        say("off-diagonal energy")
        off = off_diagonal_energy(problem.ggn, probes=energy_probes, seed=seed)
    methods, diagonals = _methods(builder, names, problem.ggn.names)
    return CompareResult(
        blocks=problem.ggn.names, block_sizes=problem.ggn.sizes, preconditioners=names,
        dampings=lams, rows=tuple(rows[(n, lam)] for lam in lams for n in names),
        loss=problem.loss, val_loss=val_loss, grad_norm=float(problem.grad.norm()),
        tokens=problem.num_tokens, val_tokens=val_tokens, n=problem.n, off_diagonal=off,
        step_grid=grid, methods=methods, diagonals=diagonals,
        options=dict(cg_tol=cg_tol, cg_max_iter=cg_max_iter, dense_max=dense_max,
                     diag_exact_max=diag_exact_max, diag_samples=diag_samples,
                     kfac_estimator=kfac_estimator, kfac_samples=kfac_samples,
                     max_precond_dim=max_precond_dim, spectrum_steps=spectrum_steps,
                     spectrum_tol=spectrum_tol, ritz_steps=ritz_steps, ritz_tol=ritz_tol,
                     energy_probes=energy_probes, seed=seed,
                     dtype=str(problem.dtype).removeprefix("torch."),
                     partition=problem.partition.preset),
        products=problem.products,
        partition=problem.partition,
    )


@dataclass(frozen=True)
class CheckpointComparison:
    """The comparison on one checkpoint of a run: its path, training step and result."""

    checkpoint: str
    step: int
    result: CompareResult


def check_same_model(configs: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Raise :class:`CompareError` unless every ``(path, model config dict)`` has the same
    config (checkpoints of one run)."""
    if not configs:
        raise CompareError("no checkpoint given")
    path0, ref = configs[0]
    for path, cfg in configs[1:]:
        if cfg != ref:
            keys = sorted(k for k in set(ref) | set(cfg) if ref.get(k) != cfg.get(k))
            diff = ", ".join(f"{k} {ref.get(k)!r} vs {cfg.get(k)!r}" for k in keys[:4])
            raise CompareError(
                f"checkpoints {path0} and {path} hold different models ({diff}); compare "
                "checkpoints of one run (one model config) in one call")


def compare_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    batches: Batch | Sequence[Batch],
    val_batches: Batch | Sequence[Batch],
    *,
    load: Callable[..., tuple[nn.Module, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> tuple[CheckpointComparison, ...]:
    """:func:`compare_preconditioners` on each checkpoint of one run, on the same batches.

    Every checkpoint is loaded first (``load``, default :func:`curvlab.load_model`, on the CPU)
    and their model configs compared: checkpoints of different models raise
    :class:`CompareError` before any curvature is computed (unknown preconditioners and bad
    dampings even before loading). Results are sorted by training step (ties keep the given
    order). ``kwargs`` go to :func:`compare_preconditioners`.
    """
    from curvlab.checkpoint import load_model

    check_names(list(kwargs.get("preconditioners", DEFAULT_PRECONDITIONERS)))  # fail early
    _dampings(kwargs.get("dampings", DEFAULT_DAMPINGS))
    load = load or load_model
    paths = [str(p) for p in checkpoints]
    infos = []
    for path in paths:
        _, info = load(path)
        infos.append(info)
    check_same_model([(p, i.model_dict()) for p, i in zip(paths, infos)])
    out = []
    for k, (path, info) in enumerate(zip(paths, infos)):
        model, _ = load(path)
        if progress:
            progress(f"[{k + 1}/{len(paths)}] {path} (step {info.step})")
        result = compare_preconditioners(model, batches, val_batches, progress=progress,
                                         **kwargs)
        out.append(CheckpointComparison(path, int(info.step), result))
        del model
    return tuple(sorted(out, key=lambda c: c.step))


__all__ = [
    "DEFAULT_DAMPINGS",
    "DEFAULT_PRECONDITIONERS",
    "PRECONDITIONERS",
    "STEP_GRID",
    "CheckpointComparison",
    "CompareResult",
    "DirectionMetrics",
    "check_same_model",
    "compare_checkpoints",
    "compare_preconditioners",
]
