"""Conjugate gradients for ``(A + λI) x = b`` with ``A`` symmetric and ``A + λI`` positive definite.

Hestenes–Stiefel recurrence: ``r_0 = b − (A + λI) x_0``, ``p_0 = r_0``;
``α_i = r_iᵀ r_i / p_iᵀ (A + λI) p_i``, ``x_{i+1} = x_i + α_i p_i``,
``r_{i+1} = r_i − α_i (A + λI) p_i``, ``p_{i+1} = r_{i+1} + (r_{i+1}ᵀ r_{i+1} / r_iᵀ r_i) p_i``.
The ``i``-th iterate minimizes the ``(A + λI)``-norm of the error over the Krylov space of
dimension ``i``; in exact arithmetic CG ends in at most ``n`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvlab.linalg.errors import NotPositiveDefiniteError
from curvlab.linalg.operator import Operator, as_operator, matmat


@dataclass(frozen=True, eq=False)
class CGResult:
    """Solution of ``(A + λI) x = b``.

    x: shape of ``b`` (``(n,)`` or ``(n, k)``), operator dtype and device.
    residual_norm: float64 CPU tensor, shape ``()`` or ``(k,)``: ``‖r‖`` of the recursively
        updated residual (equal to ``‖b − (A + λI) x‖`` up to rounding).
    iterations: CG steps (one operator product each, a block product for ``(n, k)``).
    converged: bool tensor like ``residual_norm``: ``‖r‖ <= tol · ‖b‖``.
    residual: the recursively updated residual ``r ≈ b − (A + λI) x``, shape of ``x``.
    breakdown: bool tensor like ``residual_norm``: the column stopped at a search direction with
        ``pᵀ (A + λI) p <= 0`` (only with ``on_breakdown="stop"``; its ``x`` is the iterate
        before that direction).
    products: operator products run (``iterations``, plus one for ``x0``).
    """

    x: torch.Tensor
    residual_norm: torch.Tensor
    iterations: int
    converged: torch.Tensor
    residual: torch.Tensor | None = None
    breakdown: torch.Tensor | None = None
    products: int = 0


def cg(
    op: Operator | torch.Tensor,
    b: torch.Tensor,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int | None = None,
    x0: torch.Tensor | None = None,
    on_breakdown: str = "raise",
) -> CGResult:
    """Solve ``(op + damping · I) x = b`` by conjugate gradients.

    ``b`` may be ``(n,)`` or ``(n, k)``: the ``k`` systems run as independent CG recurrences
    sharing one block product per step; each column stops updating once
    ``‖r‖ <= tol · ‖b‖`` (relative residual). ``max_iter`` defaults to ``10 n``; ``x0`` (shape
    of ``b``) is the initial guess, costing one more product. One host synchronization per
    step (the convergence and definiteness tests).

    A search direction ``p`` with ``pᵀ (A + λI) p <= 0`` (an indefinite operator, or a singular
    one at ``λ = 0`` once the residual has left its range by rounding) raises
    :class:`NotPositiveDefiniteError` (a ``ValueError``) with ``on_breakdown="raise"``; with
    ``"stop"`` that column stops there, keeping its current iterate and residual, flagged in
    ``breakdown``. ``ValueError`` when the operator returns NaN/Inf.
    """
    if on_breakdown not in ("raise", "stop"):
        raise ValueError(f"on_breakdown must be 'raise' or 'stop', got {on_breakdown!r}")
    op = as_operator(op)
    n = op.shape[0]
    if b.ndim not in (1, 2) or b.shape[0] != n:
        raise ValueError(f"b must have shape ({n},) or ({n}, k), got {tuple(b.shape)}")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}")
    vector = b.ndim == 1
    B = b.to(dtype=op.dtype, device=op.device).reshape(n, -1)
    max_iter = 10 * n if max_iter is None else max_iter

    def apply(V: torch.Tensor) -> torch.Tensor:
        return matmat(op, V) + damping * V if damping else matmat(op, V)

    products = 0
    if x0 is None:
        X, R = torch.zeros_like(B), B.clone()
    else:
        X = x0.to(dtype=op.dtype, device=op.device).reshape(n, -1).clone()
        R = B - apply(X)
        products += 1
    P = R.clone()
    rr = (R * R).sum(0, dtype=torch.float64)
    target = tol * (B * B).sum(0, dtype=torch.float64).sqrt()
    active = rr.sqrt() > target
    broken = torch.zeros_like(active)
    it = 0
    while it < max_iter and bool(active.any()):
        AP = apply(P)
        products += 1
        pAp = (P * AP).sum(0, dtype=torch.float64)
        if not bool(torch.isfinite(pAp).all()):
            raise ValueError(f"operator returned non-finite values at iteration {it + 1}")
        bad = active & (pAp <= 0)
        if bool(bad.any()):
            if on_breakdown == "raise":
                raise NotPositiveDefiniteError(
                    "operator is not positive definite along a search direction; add damping"
                )
            broken, active = broken | bad, active & ~bad
            if not bool(active.any()):
                break
        alpha = torch.where(active, rr / torch.where(active, pAp, 1.0), 0.0).to(op.dtype)
        X = X + alpha * P
        R = R - alpha * AP
        rr_new = (R * R).sum(0, dtype=torch.float64)
        beta = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0).to(op.dtype)
        P = R + beta * P
        rr = torch.where(active, rr_new, rr)
        active = active & (rr.sqrt() > target)
        it += 1
    res = rr.sqrt().cpu()
    converged = res <= target.cpu()
    broken = broken.cpu()
    if vector:
        X, R, res, converged, broken = X[:, 0], R[:, 0], res[0], converged[0], broken[0]
    return CGResult(X, res, it, converged, R, broken, products)
