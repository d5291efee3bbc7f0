"""Randomized trace estimators from operator products only.

Hutchinson (1989): for probes ``z`` with ``E[z zᵀ] = I`` (Rademacher or Gaussian),
``E[zᵀ A z] = tr A``; the mean of ``s`` samples has variance ``Var(zᵀ A z)/s``
(``2‖A‖_F² − 2 Σ A_ii²`` for Rademacher, ``2‖A‖_F²`` for Gaussian, ``A`` symmetric).

Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends a third of the products on a sketch
``Q = orth(A S)`` of the top of the spectrum, computes ``tr(Qᵀ A Q)`` exactly and estimates the
rest with Hutchinson on the deflated operator ``(I − QQᵀ) A (I − QQᵀ)``:
``tr A = tr(Qᵀ A Q) + tr((I − QQᵀ) A (I − QQᵀ))``. The variance is that of the deflated part,
which vanishes when ``rank A <= matvecs/3``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from curvlab.linalg.operator import Operator, as_operator, matmat, random_probes
from curvlab.linalg.progress import Progress, ProgressFn


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error (from the sample spread; NaN for one sample),
    the number of random samples in the Hutchinson part and the operator-vector products used."""

    estimate: float
    stderr: float
    samples: int
    matvecs: int


def _quadratic_forms(
    op: Operator, samples: int, gen: torch.Generator, distribution: str, block_size: int,
    project: torch.Tensor | None = None, tell: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``zᵀ P A P z`` for ``samples`` probes (``P = I − QQᵀ`` if ``project`` is ``Q``), float64,
    drawing and multiplying ``block_size`` probes at a time (``tell(columns)`` after each)."""
    out = []
    for start in range(0, samples, block_size):
        Z = random_probes(op, min(block_size, samples - start), gen, distribution)
        if project is not None and project.shape[1]:
            Z = Z - project @ (project.T @ Z)
        out.append((Z * matmat(op, Z)).sum(0, dtype=torch.float64))
        if tell is not None:
            tell(Z.shape[1])
        del Z
    values = torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("operator returned non-finite values")
    return values


def _estimate(values: torch.Tensor, offset: float, matvecs: int) -> TraceEstimate:
    s = values.numel()
    mean = float(values.mean()) if s else 0.0
    stderr = float(values.std() / math.sqrt(s)) if s > 1 else math.nan
    return TraceEstimate(offset + mean, stderr, s, matvecs)


def _counter(task: str, total: int, progress: ProgressFn | None) -> Callable[[int], None]:
    done = 0

    def tell(columns: int) -> None:
        nonlocal done
        done += columns
        if progress is not None:
            progress(Progress(task, done, total))

    return tell


def hutchinson(
    op: Operator | torch.Tensor,
    *,
    samples: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = 32,
    progress: ProgressFn | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate ``(1/s) Σ_i z_iᵀ A z_i`` of ``tr A`` with ``s = samples`` probes
    (``"rademacher"`` or ``"gaussian"``, drawn on the CPU with ``seed``), computed with block
    products of ``block_size`` columns (memory: two blocks). ``stderr`` = sample std / ``√s``.
    ``progress`` gets a :class:`~curvlab.linalg.progress.Progress` after every block."""
    op = as_operator(op)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    gen = torch.Generator().manual_seed(seed)
    tell = _counter("hutchinson", samples, progress)
    return _estimate(_quadratic_forms(op, samples, gen, distribution, block_size, tell=tell),
                     0.0, samples)


def _orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning those of ``Y`` (in place: classical Gram–Schmidt twice per
    column, no second ``n × r`` matrix as a QR factorization would make); a column left with
    less than ``n ε`` of its norm after the projections (``Y`` rank deficient) is set to zero,
    so ``QQᵀ`` stays an orthogonal projector."""
    n, r = Y.shape
    eps = torch.finfo(Y.dtype).eps
    for j in range(r):
        y, Q = Y[:, j], Y[:, :j]
        norm0 = float(y.double().norm())
        for _ in range(2 if j else 0):
            y -= Q @ (Q.T @ y)
        norm = float(y.double().norm())
        if norm <= n * eps * norm0 or norm == 0.0:
            y.zero_()
        else:
            y /= norm
    return Y


def hutchpp(
    op: Operator | torch.Tensor,
    *,
    matvecs: int = 102,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = 32,
    progress: ProgressFn | None = None,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr A`` with at most ``matvecs`` products: ``r = min(matvecs // 3, n)``
    sketch columns ``S``, ``Q = orth(A S)``, ``tr(Qᵀ A Q)`` from ``r`` more products, and
    Hutchinson with the remaining ``s = matvecs − 2r`` probes projected by ``I − QQᵀ``.
    ``stderr`` is that of the Hutchinson part (0 up to rounding when ``rank A <= r``).

    Memory: ``Q`` (``r`` vectors) and two blocks of ``block_size`` columns: the sketch ``A S``
    is formed block by block into ``Q``'s storage and orthonormalized there, and ``tr(Qᵀ A Q)``
    is summed block by block. The sketch columns are drawn a block at a time.
    ``progress`` gets a :class:`~curvlab.linalg.progress.Progress` after every block."""
    op = as_operator(op)
    if matvecs < 3:
        raise ValueError(f"hutchpp needs at least 3 matvecs, got {matvecs}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    gen = torch.Generator().manual_seed(seed)
    n = op.shape[0]
    r = min(matvecs // 3, n)
    samples = matvecs - 2 * r
    tell = _counter("hutchpp", 2 * r + samples, progress)
    Q = torch.empty(n, r, dtype=op.dtype, device=op.device)
    for lo in range(0, r, block_size):
        hi = min(r, lo + block_size)
        Q[:, lo:hi] = matmat(op, random_probes(op, hi - lo, gen, distribution))
        tell(hi - lo)
    _orthonormalize(Q)
    top = 0.0
    for lo in range(0, r, block_size):
        B = Q[:, lo : lo + block_size]
        top += float((B * matmat(op, B)).sum(dtype=torch.float64))
        tell(B.shape[1])
    if not math.isfinite(top):
        raise ValueError("operator returned non-finite values")
    values = _quadratic_forms(op, samples, gen, distribution, block_size, project=Q, tell=tell)
    return _estimate(values, top, matvecs)
