"""Curvature quantities along a training run: gradient share, sharpness against the optimizer's
stability threshold, per-block heterogeneity.

All vectors live in the coordinates of a :class:`~curvlab.curvature.operators.CurvatureOperator`
(its partition's blocks, block after block; the order of its products and Lanczos vectors), and
the loss is the operator's: the mean token cross-entropy ``L(θ)`` over all non-ignored target
tokens of its batches.

- :func:`loss_gradient` — ``g = ∇L(θ)`` on the operator's batches; :func:`parameter_vector` —
  ``θ``; the step between two checkpoints is ``parameter_vector(next) − parameter_vector(this)``.
- :func:`gradient_share` — ``‖Vᵀ g‖² / ‖g‖²`` for the top-``k`` Ritz vectors ``V``: the fraction
  of the gradient (or of a step) inside the top eigenspace (Gur-Ari, Roberts & Dyer 2018,
  "Gradient Descent Happens in a Tiny Subspace").
- :func:`adam_preconditioner`, :func:`preconditioned_sharpness` — AdamW's ``P = diag(√v̂ + ε)``
  read from a checkpoint, and ``λ_max(P⁻¹ H)``.
- :func:`stability_threshold`, :func:`checkpoint_lr`, :func:`checkpoint_threshold` — the threshold
  a sharpness is compared with, and the learning rate a run applied at a checkpoint's step.
- :func:`js_distances` — pairwise Jensen-Shannon distances between (block) spectral densities on
  one common grid (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian Perspective").

Which quantity is defined for which method (:func:`stability_threshold`):

============  ==========================================  =========================================
method        sharpness                                   threshold
============  ==========================================  =========================================
adamw         ``λ_max(P⁻¹H)``, ``P = diag(√v̂ + ε)``       ``(2 + 2β₁)/((1 − β₁) η)`` (38/η at
                                                          β₁ = 0.9; Cohen et al. 2022, "Adaptive
                                                          Gradient Methods at the Edge of
                                                          Stability"): the stability limit of
                                                          preconditioned heavy-ball momentum
muon, soap,   ``λ_max(H)``                                ``2/η``, **a reference line only**: the
sgd                                                       limit of plain gradient descent on a
                                                          quadratic. Muon's update is an
                                                          orthogonalized momentum (its size does
                                                          not scale with the gradient) and SOAP's
                                                          a rotated Adam; neither has ``2/η`` as
                                                          its stability threshold.
gn, gn-prox,  ``λ_max(H)`` (and of the GGN)               none: the outer step ``θ + α Δ`` is an
layerwise-*                                               approximate Newton step whose size
                                                          ``α ≤ 1`` a line search picks on fresh
                                                          batches (stored as ``ls_step`` in the
                                                          checkpoint's metrics); there is no fixed
                                                          learning rate to compare a curvature with
============  ==========================================  =========================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad

from curvlab.checkpoint import CheckpointInfo
from curvlab.curvature.model_fn import model_params
from curvlab.curvature.operators import CurvatureOperator, _reduced
from curvlab.errors import CheckpointError, ConfigError, CurvlabError
from curvlab.linalg import LanczosResult, SpectralDensity, lanczos
from curvlab.linalg.operator import DiagonallyScaledOperator

GN_OPTIMIZERS = ("gn", "gn-prox", "layerwise-gn", "layerwise-gn-prox")
GD_REFERENCE = ("muon", "muon-adamw", "soap", "sgd")


def loss_gradient(op: CurvatureOperator) -> torch.Tensor:
    """``g = ∇L(θ)`` [n]: the gradient of the operator's loss (mean token cross-entropy over all
    non-ignored target tokens of ``op``'s batches, ``1/N`` with N the tokens of all batches) at
    the operator's parameters, in ``op``'s row coordinates and dtype.

    The loss is the one ``op``'s Hessian products differentiate twice (the same closure, the same
    batches, the same precision). Under ``torchrun`` the batches are this rank's shard and ``g``
    is summed over the ranks (one all-reduce), as the products are.
    """
    if not isinstance(op, CurvatureOperator):
        raise ConfigError(f"loss_gradient needs a CurvatureOperator, got {type(op).__name__}")
    e = op.engine
    e._setup()  # the per-batch states the products use (their logits closures and scales)
    total: dict[str, torch.Tensor] | None = None
    with e._context():
        for state in e._states:
            g = grad(e._loss_fn(state))(e.active())
            total = g if total is None else {k: total[k] + g[k] for k in total}
    flat = _reduced(op.row_space.from_tangents(total).detach().contiguous())
    if not torch.isfinite(flat).all():
        raise CurvlabError("the gradient holds NaN or Inf values")
    return flat


def parameter_vector(model: nn.Module, op: CurvatureOperator) -> torch.Tensor:
    """``θ`` of ``model`` [n] in ``op``'s row coordinates and dtype (``model`` must have the
    parameters ``op`` was built on, e.g. the next checkpoint of the same run: then
    ``parameter_vector(next, op) − parameter_vector(model, op)`` is the step in ``op``'s
    coordinates)."""
    params = model_params(model, op.dtype, op.device)
    missing = [n for n in op.row_space.params if n not in params]
    if missing:
        raise CurvlabError(f"the model has no parameter {missing[0]} of the operator")
    for name in op.row_space.params:
        if tuple(params[name].shape) != tuple(op.row_space.shapes[name]):
            raise CurvlabError(f"parameter {name} has shape {tuple(params[name].shape)}, the "
                               f"operator's {tuple(op.row_space.shapes[name])}")
    return op.row_space.from_tangents(params).clone()


def gradient_share(vectors: torch.Tensor, g: torch.Tensor) -> float:
    """``‖Vᵀ g‖² / ‖g‖²``: the fraction of ``g``'s squared norm inside the span of the columns of
    ``V`` [n, k] (orthonormal: e.g. the top-k Ritz vectors of
    :func:`~curvlab.linalg.lanczos`). In ``[0, 1]``; NaN for ``g = 0``. Works for any vector
    ``g`` (the gradient, or the step between two checkpoints), computed in float64."""
    V = torch.as_tensor(vectors)
    g = torch.as_tensor(g)
    if V.ndim == 1:
        V = V[:, None]
    if V.ndim != 2 or g.ndim != 1 or V.shape[0] != g.shape[0]:
        raise ConfigError(f"gradient_share needs V [n, k] and g [n], got {tuple(V.shape)} and "
                          f"{tuple(g.shape)}")
    V, g = V.double(), g.to(V.device).double()
    norm2 = float(g @ g)
    if norm2 == 0.0:
        return math.nan
    c = V.T @ g
    return float(c @ c) / norm2


def _optimizer_of(source: CheckpointInfo | torch.optim.Optimizer, model: nn.Module
                  ) -> tuple[str, torch.optim.Optimizer | None]:
    """The optimizer's name and the optimizer itself rebuilt on ``model``'s parameters (from a
    checkpoint: as the trainer builds it, then its stored state loaded)."""
    if isinstance(source, torch.optim.Optimizer):
        name = "adamw" if isinstance(source, torch.optim.AdamW) else type(source).__name__.lower()
        return name, source
    if not isinstance(source, CheckpointInfo):
        raise ConfigError("adam_preconditioner needs a CheckpointInfo or a torch optimizer, "
                          f"got {type(source).__name__}")
    name = str(source.optimizer.get("name", ""))
    trainer = source.extra.get("trainer") or {}
    stored = (trainer.get("method") or {}).get("optimizer")
    config = source.extra.get("train_config")
    if name != "adamw" or stored is None or config is None:
        return name, None
    from curvlab.train.config import TrainConfig
    from curvlab.train.optimizers import build_optimizer, hidden_matrices

    cfg = TrainConfig.from_dict(dict(config))
    opt = build_optimizer(cfg.optimizer, dict(model.named_parameters()), hidden_matrices(model),
                          lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          weight_decay=cfg.weight_decay)
    try:
        opt.load_state_dict(stored)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{source.path}: its AdamW state does not fit the model ({e})"
                              ) from None
    return name, opt


def adam_preconditioner(
    source: CheckpointInfo | torch.optim.Optimizer, op: CurvatureOperator, model: nn.Module,
) -> torch.Tensor | None:
    """AdamW's diagonal preconditioner ``p = √v̂ + ε`` [n] in ``op``'s coordinates and dtype, or
    ``None`` when ``source`` holds no AdamW state (Muon, SOAP, GN methods, a checkpoint without
    trainer state).

    ``v̂ = v / (1 − β₂^t)`` with ``v`` the stored ``exp_avg_sq`` (``max_exp_avg_sq`` under
    ``amsgrad``) and ``t`` its step count, per parameter; computed as ``torch.optim.AdamW`` does,
    ``√v / √(1 − β₂^t) + ε`` (ε added after the square root; the same in
    :func:`curvlab.train.optimizers._adamw_update`), here in float64 before the cast to ``op``'s
    dtype. The update AdamW applied at that step is ``θ ← θ(1 − η λ) − η m̂ / p`` with
    ``m̂ = m / (1 − β₁^t)``. ``source``: a curvlab training checkpoint's :class:`CheckpointInfo`
    (its optimizer is rebuilt on ``model``'s parameters exactly as the trainer builds it, and the
    stored state loaded) or a live ``torch.optim.AdamW`` over ``model``'s parameters.
    """
    name, opt = _optimizer_of(source, model)
    if opt is None or name != "adamw":
        return None
    by_param = {id(p): n for n, p in model.named_parameters()}
    pieces: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        for p in group["params"]:
            name_p = by_param.get(id(p))
            state = opt.state.get(p)
            if name_p is None or not state:
                continue
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            t = float(state["step"])
            bc2 = 1.0 - beta2**t
            pieces[name_p] = v.detach().double().sqrt() / math.sqrt(bc2) + eps
    missing = [n for n in op.row_space.params if n not in pieces]
    if missing:
        raise CurvlabError(f"the AdamW state has no second moment for {missing[0]} (no step "
                           "taken on it)")
    return op.row_space.from_tangents(pieces).to(device=op.device, dtype=op.dtype)


def preconditioned_sharpness(
    op: Any, p_diag: torch.Tensor, *, k: int = 1, tol: float = 1e-8, seed: int = 0,
    **lanczos_kw: Any,
) -> LanczosResult:
    """Top-``k`` eigenvalues of ``P⁻¹ H`` (``P = diag(p_diag)``, ``p_diag > 0``; ``H`` = ``op``):
    Lanczos (:func:`curvlab.linalg.lanczos`, ``tol``, ``seed`` and ``lanczos_kw`` passed on) on
    the symmetric ``P^{-1/2} H P^{-1/2}``, which has the same eigenvalues. Its eigenvectors (if
    returned) are those of the symmetric form; ``P^{-1/2} w`` are eigenvectors of ``P⁻¹H``.
    With ``p_diag`` from :func:`adam_preconditioner` the first eigenvalue is AdamW's
    preconditioned sharpness (Cohen et al. 2022), compared with
    :func:`stability_threshold` ``("adamw", η, betas)``."""
    p = torch.as_tensor(p_diag)
    if not bool((p > 0).all()) or not bool(torch.isfinite(p).all()):
        raise CurvlabError("the preconditioner must be positive and finite")
    scaled = DiagonallyScaledOperator(op, p.double().rsqrt().to(op.dtype))
    return lanczos(scaled, k=k, tol=tol, seed=seed, **lanczos_kw)


def stability_threshold(
    optimizer: str, lr: float | None, betas: Sequence[float] | None = None,
) -> tuple[str, float] | None:
    """The value a sharpness is compared with (see the module docstring's table):

    - ``adamw``: ``("adam", (2 + 2β₁) / ((1 − β₁) η))`` for ``λ_max(P⁻¹H)`` (β₁ from ``betas``,
      default 0.9: ``38/η``; Cohen et al. 2022);
    - ``muon``, ``muon-adamw``, ``soap``, ``sgd``: ``("gd", 2/η)`` for ``λ_max(H)``, the
      gradient-descent threshold drawn as a reference line (not these methods' own threshold);
    - GN methods, an unknown method, no (or a non-positive) ``lr``: ``None``.
    """
    if lr is None or not (lr > 0) or not math.isfinite(lr):
        return None
    if optimizer == "adamw":
        b1 = 0.9 if betas is None else float(betas[0])
        if not 0 <= b1 < 1:
            raise ConfigError(f"beta1 must be in [0, 1), got {b1}")
        return ("adam", (2 + 2 * b1) / ((1 - b1) * lr))
    if optimizer in GD_REFERENCE:
        return ("gd", 2.0 / lr)
    return None


def checkpoint_lr(info: CheckpointInfo) -> float | None:
    """The learning rate a baseline run (AdamW, Muon, SOAP) applied at the step that produced the
    checkpoint (step ``t`` ≥ 1: the update from θ_{t−1} to θ_t, 0-based schedule position
    ``t − 1``), from the stored :class:`~curvlab.train.TrainConfig` and
    :func:`curvlab.train.schedules.lr_factor` as the trainer computes it; the same step produced
    the second moment the checkpoint holds. ``None`` for GN methods (their outer step is
    line-searched; the inner learning rate is no step size of the outer iteration) and for
    checkpoints without a training configuration."""
    config = info.extra.get("train_config") if isinstance(info.extra, Mapping) else None
    if config is None:
        return None
    from curvlab.train.config import TrainConfig
    from curvlab.train.schedules import lr_factor

    cfg = TrainConfig.from_dict(dict(config))
    if cfg.is_gn:
        return None
    t = max(int(info.step) - 1, 0)
    return cfg.lr * lr_factor(cfg.schedule, t, cfg.max_steps, warmup=cfg.warmup_steps,
                              final=cfg.final_lr_frac)


def checkpoint_threshold(info: CheckpointInfo) -> tuple[str, float] | None:
    """:func:`stability_threshold` for the checkpoint's optimizer, its :func:`checkpoint_lr` and
    its stored β's."""
    config = info.extra.get("train_config") or {}
    return stability_threshold(str(info.optimizer.get("name", "")), checkpoint_lr(info),
                               config.get("betas"))


def _bin_masses(d: SpectralDensity, edges: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mass of ``d``'s Gaussian-smoothed density (width ``sigma``) in each bin of ``edges``:
    exact differences of normal CDFs, so no mass is lost however narrow ``sigma`` is."""
    nodes = torch.cat(d.nodes).double()
    weights = torch.cat(d.weights).double() / d.probes
    cdf = 0.5 * (1 + torch.erf((edges[:, None] - nodes[None]) / (sigma * math.sqrt(2))))
    return ((cdf[1:] - cdf[:-1]) * weights).sum(1)


def js_distances(
    densities: Sequence[SpectralDensity], grid: torch.Tensor | np.ndarray | None = None, *,
    points: int = 1000, sigma: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise Jensen-Shannon distances between spectral densities on one common grid.

    Each density ``φ_b`` (SLQ nodes ``θ_j`` and weights ``τ_j``, :class:`SpectralDensity`) is
    smoothed by Gaussians of one common width ``sigma`` (default 1% of the range of all nodes
    together, so that every block is smoothed alike) and binned on the grid: ``q_b[i]`` is its
    mass in the bin around grid point ``i`` (bin edges half-way between points; the outer bins
    take the tails), exact by normal CDFs and normalized to sum 1. Then

        JS(p, q) = ½ Σ_i p_i log₂(p_i/m_i) + ½ Σ_i q_i log₂(q_i/m_i),   m = (p + q)/2,

    and the distance is ``√JS`` (base 2: in ``[0, 1]``; a metric). Default grid: ``points``
    equally spaced from ``min θ − 6σ`` to ``max θ + 6σ`` over all densities.

    Returns ``(grid, D)``: the grid (float64 [points]) and the symmetric [b, b] distance matrix
    (zero diagonal). Zhang et al. 2024 use this distance between the Hessian spectra of
    parameter blocks as their measure of block heterogeneity.
    """
    dens = list(densities)
    if len(dens) < 1 or not all(isinstance(d, SpectralDensity) for d in dens):
        raise ConfigError("js_distances needs one or more SpectralDensity")
    nodes = torch.cat([torch.cat(d.nodes) for d in dens]).double()
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        width = (hi - lo) or abs(hi) or 1.0
        sigma = 0.01 * width
    sigma = float(sigma)
    if not (sigma > 0) or not math.isfinite(sigma):
        raise ConfigError(f"sigma must be > 0, got {sigma}")
    if grid is None:
        if points < 2:
            raise ConfigError(f"points must be >= 2, got {points}")
        grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, points, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
        raise ConfigError("the grid must be 2 or more increasing points")
    inner = (grid[1:] + grid[:-1]) / 2
    inf = torch.tensor([math.inf], dtype=torch.float64)
    edges = torch.cat([-inf, inner, inf])
    q = torch.stack([_bin_masses(d, edges, sigma) for d in dens])
    q = q / q.sum(1, keepdim=True)
    b = len(dens)
    D = torch.zeros(b, b, dtype=torch.float64)
    for i in range(b):
        for j in range(i + 1, b):
            D[i, j] = D[j, i] = _js(q[i], q[j])
    return grid, D


def _js(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        nz = a > 0
        return (a[nz] * torch.log2(a[nz] / m[nz])).sum()

    value = float(0.5 * kl(p) + 0.5 * kl(q))
    return math.sqrt(max(value, 0.0))
