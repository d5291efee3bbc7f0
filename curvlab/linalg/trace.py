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
from dataclasses import dataclass

import torch

from curvlab.linalg.operator import Operator, as_operator, matmat, random_probes


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error (from the sample spread; NaN for one sample),
    the number of random samples in the Hutchinson part and the operator-vector products used."""

    estimate: float
    stderr: float
    samples: int
    matvecs: int


def _blocked(op: Operator, V: torch.Tensor, block_size: int) -> torch.Tensor:
    """``op @ V`` as block products of at most ``block_size`` columns."""
    return torch.cat([matmat(op, B) for B in V.split(block_size, dim=1)], dim=1)


def _quadratic_forms(
    op: Operator, samples: int, gen: torch.Generator, distribution: str, block_size: int,
    project: torch.Tensor | None = None,
) -> torch.Tensor:
    """``zᵀ P A P z`` for ``samples`` probes (``P = I − QQᵀ`` if ``project`` is ``Q``), float64,
    drawing and multiplying ``block_size`` probes at a time."""
    out = []
    for start in range(0, samples, block_size):
        Z = random_probes(op, min(block_size, samples - start), gen, distribution)
        if project is not None:
            Z = Z - project @ (project.T @ Z)
        out.append((Z * matmat(op, Z)).sum(0, dtype=torch.float64))
    values = torch.cat(out).cpu()
    if not torch.isfinite(values).all():
        raise ValueError("operator returned non-finite values")
    return values


def _estimate(values: torch.Tensor, offset: float, matvecs: int) -> TraceEstimate:
    s = values.numel()
    stderr = float(values.std() / math.sqrt(s)) if s > 1 else math.nan
    return TraceEstimate(offset + float(values.mean()), stderr, s, matvecs)


def hutchinson(
    op: Operator | torch.Tensor,
    *,
    samples: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = 32,
) -> TraceEstimate:
    """Hutchinson's estimate ``(1/s) Σ_i z_iᵀ A z_i`` of ``tr A`` with ``s = samples`` probes
    (``"rademacher"`` or ``"gaussian"``, drawn on the CPU with ``seed``), computed with block
    products of ``block_size`` columns. ``stderr`` = sample std / ``√s``."""
    op = as_operator(op)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    return _estimate(_quadratic_forms(op, samples, gen, distribution, block_size), 0.0, samples)


def hutchpp(
    op: Operator | torch.Tensor,
    *,
    matvecs: int = 102,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = 32,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr A`` with at most ``matvecs`` products: ``r = min(matvecs // 3, n)``
    sketch columns ``S``, ``Q = orth(A S)`` (reduced QR), ``tr(Qᵀ A Q)`` from ``r`` more
    products, and Hutchinson with the remaining ``s = matvecs − 2r`` probes projected by
    ``I − QQᵀ``. ``stderr`` is that of the Hutchinson part (0 up to rounding when
    ``rank A <= r``)."""
    op = as_operator(op)
    if matvecs < 3:
        raise ValueError(f"hutchpp needs at least 3 matvecs, got {matvecs}")
    gen = torch.Generator().manual_seed(seed)
    r = min(matvecs // 3, op.shape[0])
    samples = matvecs - 2 * r
    Q = torch.linalg.qr(_blocked(op, random_probes(op, r, gen, distribution), block_size)).Q
    top = float((Q * _blocked(op, Q, block_size)).sum(dtype=torch.float64))
    if not math.isfinite(top):
        raise ValueError("operator returned non-finite values")
    values = _quadratic_forms(op, samples, gen, distribution, block_size, project=Q)
    return _estimate(values, top, matvecs)
