"""Metrics of a preconditioned direction: quadratic-model decrease, per-block split, true loss
after a line-searched step, spectrum of the preconditioned curvature, off-diagonal energy.

Quadratic model (GGN, *undamped*): ``m(d) = gᵀd + ½ dᵀGd``, so that ``L(θ + d) ≈ L(θ) + m(d)``.
For a direction d the best step along it is ``α* = −gᵀd / dᵀGd`` and ``m(α* d) = −½ (gᵀd)² /
dᵀGd``. Per block b (coordinates of partition block b):

    m(α d) = Σ_b c_b(α),   c_b(α) = α g_bᵀd_b + ½ α² d_bᵀ(Gd)_b

(``(Gd)_b`` includes the cross-block terms ``Σ_c G_bc d_c``, so each pair's cross term is split
half to each block); ``d_bᵀ(Gd)_b = d_bᵀG_bb d_b + d_bᵀ Σ_{c≠b} G_bc d_c`` (own + cross).

Spectrum: of the *damped* curvature preconditioned by P, ``S = P^{-1/2} (G + λI) P^{-1/2}``,
whose eigenvalues are those of ``P⁻¹(G + λI)`` (the matrix CG/Newton-type iterations on the
damped model see); for ``P = G + λI`` all are 1. See :func:`preconditioned_spectrum`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from curvlab.compare.directions import Preconditioner, SolveInfo
from curvlab.compare.problem import Curvature, Problem
from curvlab.curvature.coupling import coupling_map
from curvlab.data.batches import Batch
from curvlab.linalg import LinalgWarning, lanczos

SPECTRUM_METHODS = ("dense", "lanczos", "ritz", "analytic")


@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenvalues of ``S = P^{-1/2} (G + λI) P^{-1/2}`` and how they were found.

    method: ``dense`` (all eigenvalues of the dense S: exact), ``lanczos``
    (:func:`curvlab.linalg.lanczos` on S applied matrix-free with ``P^{-1/2}`` in closed form),
    ``ritz`` (Rayleigh–Ritz of the pencil ``(G + λI, P)`` on a Krylov space of ``P⁻¹(G + λI)``
    built with CG solves: ``bottom >= λ_min`` and ``top <= λ_max``, so ``condition`` is a lower
    bound), ``analytic`` (``P = G + λI``: every eigenvalue is 1).
    converged: Lanczos' residual test on both ends (always True for ``dense``/``analytic``).
    """

    top: float
    bottom: float
    method: str
    converged: bool = True
    steps: int = 0

    @property
    def condition(self) -> float:
        """``top / bottom`` (inf when ``bottom <= 0``)."""
        return self.top / self.bottom if self.bottom > 0 else math.inf


@dataclass(frozen=True)
class DirectionMetrics:
    """Everything measured for one preconditioner at one damping (``d = −P⁻¹ g``).

    grad_dot ``gᵀd`` (< 0 for SPD P); curvature ``dᵀGd``; norm ``‖d‖``; step_best
    ``α* = −gᵀd / dᵀGd`` (NaN if ``dᵀGd <= 0``); cosine_full ``cos(d, d_full)`` at the same
    damping (NaN without ``full``); block_grad_dot ``g_bᵀd_b``, block_curvature ``d_bᵀ(Gd)_b``,
    block_own_curvature ``d_bᵀG_bb d_b`` per partition block; val_steps the step sizes tried
    (``step_grid · α*``) and val_losses ``L_val(θ + α d)`` at each; spectrum of
    ``P^{-1/2}(G + λI)P^{-1/2}`` (None if not computed); solve: how ``P⁻¹ g`` was computed.
    """

    preconditioner: str
    damping: float
    grad_dot: float
    curvature: float
    norm: float
    step_best: float
    cosine_full: float
    block_grad_dot: tuple[float, ...]
    block_curvature: tuple[float, ...]
    block_own_curvature: tuple[float, ...]
    val_steps: tuple[float, ...]
    val_losses: tuple[float, ...]
    val_loss: float  # L_val(θ), for val_decrease
    spectrum: Spectrum | None
    solve: SolveInfo

    def model_change(self, step: float = 1.0) -> float:
        """``m(α d) = α gᵀd + ½ α² dᵀGd``."""
        return step * self.grad_dot + 0.5 * step**2 * self.curvature

    @property
    def decrease_unit(self) -> float:
        """``−m(d)``: predicted decrease at the unit step (negative: the step overshoots)."""
        return -self.model_change(1.0)

    @property
    def decrease_best(self) -> float:
        """``−m(α* d) = ½ (gᵀd)² / dᵀGd``: predicted decrease at the best step along d."""
        return -self.model_change(self.step_best) if math.isfinite(self.step_best) else math.nan

    def block_change(self, step: float | None = None) -> tuple[float, ...]:
        """``c_b(α) = α g_bᵀd_b + ½ α² d_bᵀ(Gd)_b`` (sums to ``m(α d)``); ``step=None``: α*."""
        a = self.step_best if step is None else step
        return tuple(a * gd + 0.5 * a * a * c
                     for gd, c in zip(self.block_grad_dot, self.block_curvature))

    def block_share(self, step: float | None = None) -> tuple[float, ...]:
        """``c_b(α) / m(α d)``: each block's share of the model change (sums to 1)."""
        c = self.block_change(step)
        total = sum(c)
        return tuple(x / total if total else math.nan for x in c)

    def block_cross(self, step: float | None = None) -> tuple[float, ...]:
        """``½ α² d_bᵀ Σ_{c≠b} G_bc d_c``: the cross-block part of ``c_b(α)``."""
        a = self.step_best if step is None else step
        return tuple(0.5 * a * a * (c - o)
                     for c, o in zip(self.block_curvature, self.block_own_curvature))

    @property
    def val_loss_best(self) -> float:
        """``min_α L_val(θ + α d)`` over the grid (NaN/Inf values never win)."""
        finite = [v for v in self.val_losses if math.isfinite(v)]
        return min(finite) if finite else math.nan

    @property
    def val_step(self) -> float:
        """The step size of the grid with the lowest validation loss."""
        finite = [(v, i) for i, v in enumerate(self.val_losses) if math.isfinite(v)]
        return self.val_steps[min(finite)[1]] if finite else math.nan

    @property
    def val_decrease(self) -> float:
        """``L_val(θ) − min_α L_val(θ + α d)`` (positive: the line-searched step helps)."""
        return self.val_loss - self.val_loss_best


def measure_direction(
    problem: Problem, name: str, damping: float, d: torch.Tensor, *,
    d_full: torch.Tensor | None, val_batches: Sequence[Batch], val_loss: float,
    step_grid: Sequence[float], spectrum: Spectrum | None, info: SolveInfo,
) -> DirectionMetrics:
    """The :class:`DirectionMetrics` of the direction ``d`` of preconditioner ``name`` at
    ``damping``: one product with G, one with ``BD(G)`` and ``len(step_grid)`` validation
    losses (``L_val(θ + α d)``, ``α`` in ``step_grid · α*``); ``d_full`` for the cosine."""
    g, curv = problem.grad, problem.ggn
    sl = [curv.slice(i) for i in range(len(curv.names))]
    gd_vec = curv.matvec(d)
    own = curv.blockdiag_matvec(d)
    gd, dgd = float(g @ d), float(d @ gd_vec)
    alpha = -gd / dgd if dgd > 0 else math.nan
    steps = tuple(s * (alpha if math.isfinite(alpha) else 1.0) for s in step_grid)
    losses = tuple(problem.loss_at(val_batches, d, a) for a in steps)
    cos = math.nan
    if d_full is not None:
        cos = float(d @ d_full / (d.norm() * d_full.norm()).clamp_min(1e-300))
    return DirectionMetrics(
        name, damping, gd, dgd, float(d.norm()), alpha, cos,
        tuple(float(g[s] @ d[s]) for s in sl), tuple(float(d[s] @ gd_vec[s]) for s in sl),
        tuple(float(d[s] @ own[s]) for s in sl), steps, losses, val_loss, spectrum, info)


class _Preconditioned:
    """``S = P^{-1/2} (G + λI) P^{-1/2}`` as a :mod:`curvlab.linalg` operator."""

    def __init__(self, curv: Curvature, pre: Preconditioner, damping: float) -> None:
        self.curv, self.pre, self.damping = curv, pre, damping
        self.shape = (curv.n, curv.n)
        self.dtype, self.device = curv.dtype, curv.device

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        w = self.pre.inv_sqrt(v)
        return self.pre.inv_sqrt(self.curv.matvec(w) + self.damping * w)


def preconditioned_spectrum(
    curv: Curvature, pre: Preconditioner, damping: float, *, steps: int = 60,
    tol: float = 1e-6, ritz_steps: int = 10, ritz_tol: float = 1e-2, seed: int = 0,
    method: str | None = None,
) -> Spectrum:
    """Top and bottom eigenvalues of ``S = P^{-1/2} (G + λI) P^{-1/2}`` (module docstring).

    Default ``method``: ``analytic`` for ``full``; ``dense`` when ``n <= dense_max`` (S built
    from the dense G and ``P^{-1/2}`` applied to the identity) and ``P^{-1/2}`` is available;
    else ``lanczos`` (at most ``steps`` steps, which="both", relative residual ``tol``) when
    ``P^{-1/2}`` is available in closed form (identity, diag, adam, kfac, layerwise with all
    blocks dense); else ``ritz`` (``ritz_steps`` Krylov vectors, each costing one product with
    G and one solve with P by CG to relative tolerance ``ritz_tol``: the solves only shape the
    search space, the Ritz values stay inner bounds however loose they are).
    """
    if method is None:
        if pre.name == "full":
            method = "analytic"
        elif pre.has_inv_sqrt:
            method = "dense" if curv.dense() is not None else "lanczos"
        else:
            method = "ritz"
    if method == "analytic":
        return Spectrum(1.0, 1.0, "analytic")
    if method == "dense":
        a = curv.dense() + damping * torch.eye(curv.n, dtype=curv.dtype, device=curv.device)
        s = pre.inv_sqrt(pre.inv_sqrt(a).T)  # (P^{-1/2} (P^{-1/2} A)ᵀ) = S (symmetric)
        ev = torch.linalg.eigvalsh((s + s.T) / 2)
        return Spectrum(float(ev[-1]), float(ev[0]), "dense")
    if method == "lanczos":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LinalgWarning)
            r = lanczos(_Preconditioned(curv, pre, damping), k=1, which="both",
                        max_iter=max(2, min(steps, curv.n)), tol=tol, seed=seed,
                        return_vectors=False)
        curv.products += r.products
        return Spectrum(float(r.eigenvalues[0]), float(r.eigenvalues[-1]), "lanczos",
                        bool(r.converged.all()), r.iterations)
    if method == "ritz":
        top, bottom, m = pencil_ritz(lambda v: curv.matvec(v) + damping * v, pre.apply,
                                     lambda v: pre.solve(v, tol=ritz_tol), curv.n,
                                     steps=ritz_steps, seed=seed,
                                     dtype=curv.dtype, device=curv.device)
        return Spectrum(top, bottom, "ritz", True, m)
    raise ValueError(f"unknown spectrum method {method!r}; valid: {', '.join(SPECTRUM_METHODS)}")


def pencil_ritz(apply_a, apply_p, solve_p, n: int, *, steps: int, seed: int,
                dtype: torch.dtype, device: torch.device) -> tuple[float, float, int]:
    """Largest and smallest Ritz values of the symmetric-definite pencil ``(A, P)`` on the
    Krylov space ``span{v, P⁻¹A v, …, (P⁻¹A)^{m−1} v}`` (``m = min(steps, n)``, v Gaussian from
    ``seed``).

    The basis is orthonormalized in the Euclidean inner product (two Gram–Schmidt passes); the
    Ritz values are the eigenvalues of ``(QᵀAQ, QᵀPQ)`` with A and P applied exactly, so by
    Courant–Fischer they lie in ``[λ_min, λ_max]`` of ``P⁻¹A`` even when the solves that shaped
    the space were inexact. Returns ``(top, bottom, m)``.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    basis = [q / q.norm()]
    for _ in range(min(steps, n) - 1):
        w = solve_p(apply_a(basis[-1]))
        Q = torch.stack(basis, dim=1)
        for _ in range(2):
            w = w - Q @ (Q.T @ w)
        norm = float(w.norm())
        if not math.isfinite(norm) or norm <= 1e-10 * float(basis[-1].norm()):
            break  # invariant subspace: its Ritz values are exact
        basis.append(w / norm)
    Q = torch.stack(basis, dim=1)
    a = (Q.T @ apply_a(Q)).double().cpu().numpy()
    p = (Q.T @ apply_p(Q)).double().cpu().numpy()
    theta = scipy.linalg.eigh((a + a.T) / 2, (p + p.T) / 2, eigvals_only=True)
    return float(np.max(theta)), float(np.min(theta)), Q.shape[1]


@dataclass(frozen=True)
class OffDiagonalEnergy:
    """``‖G − BD(G)‖_F / ‖G‖_F``: exact (from the dense G or dense column blocks), or the
    randomized ratio ``sqrt(Σ_{r≠c} E‖G_rc z‖² / Σ_{r,c} E‖G_rc z‖²)`` with ``probes``
    Rademacher vectors per column block (:func:`curvlab.curvature.coupling.coupling_map`)."""

    value: float
    exact: bool
    probes: int = 0


def off_diagonal_energy(curv: Curvature, *, probes: int = 64, seed: int = 0
                        ) -> OffDiagonalEnergy:
    """Off-diagonal (cross-block) energy of G over its partition (see the class)."""
    d = curv.dense()
    if d is not None:
        total = float(d.double().square().sum())
        own = sum(float(b.double().square().sum())
                  for b in (curv.block(i) for i in range(len(curv.names))))
        return OffDiagonalEnergy(math.sqrt(max(total - own, 0.0) / total) if total else 0.0,
                                 True)
    cmap = coupling_map(curv.op, exact_max=curv.dense_max, probes=probes, seed=seed)
    curv.products += sum(n if n <= curv.dense_max else probes for n in curv.sizes)
    return OffDiagonalEnergy(cmap.off_diagonal_energy(), bool(cmap.exact.all()),
                             0 if bool(cmap.exact.all()) else probes)
