"""Spectra of curvature operators: Lanczos eigenpairs, SLQ densities, traces, per target.

A *target* names what to analyze on a :class:`~curvlab.curvature.operators.CurvatureOperator`:

- ``"full"``: the operator on the whole partition;
- a block name: that diagonal block ``C_bb``;
- ``"blockdiag"``: the layerwise operator ``blockdiag(C_11, ..., C_bb)`` (its spectrum is the
  union of the blocks', which makes it the natural companion of ``"full"`` in an overlay).

Eigenvalues are of the curvature of the *mean* token cross-entropy (see ``curvlab.ggn``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from curvlab.curvature.operators import CurvatureOperator
from curvlab.errors import ConfigError, CurvlabError
from curvlab.linalg import (
    LanczosResult,
    SpectralDensity,
    TraceEstimate,
    hutchpp,
    lanczos,
    spectral_density,
)


@dataclass(frozen=True)
class TargetSpectrum:
    """Everything computed for one target (absent parts are ``None``)."""

    target: str
    size: int
    lanczos: LanczosResult | None = None
    density: SpectralDensity | None = None
    trace: TraceEstimate | None = None
    exact: torch.Tensor | None = None  # all eigenvalues (ascending) of a dense block


def target_operator(op: CurvatureOperator, target: str):
    """The operator a target names (see module docstring)."""
    if target == "full":
        return op
    if target == "blockdiag":
        return op.block_diagonal()
    return op.block(target)


def compute_spectra(
    op: CurvatureOperator,
    targets: Sequence[str] = ("full",),
    *,
    k: int = 20,
    which: str = "top",
    tol: float = 1e-6,
    reorth: str = "full",
    max_iter: int | None = None,
    density: bool = False,
    probes: int = 10,
    steps: int = 80,
    trace: bool = False,
    trace_matvecs: int = 102,
    return_vectors: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[TargetSpectrum]:
    """Lanczos (``k`` > 0), SLQ density (``density``) and Hutch++ trace (``trace``) per target.

    Raises a :class:`CurvlabError` for an unknown target or ``k`` larger than a target's
    dimension. Numerical warnings of :mod:`curvlab.linalg` (ghosts, non-convergence) pass on.
    """
    if which not in ("top", "bottom", "both"):
        raise ConfigError(f"unknown --which {which!r}; expected top, bottom or both")
    out = []
    for target in targets:
        sub = target_operator(op, target)
        n = sub.shape[0]
        need = 2 * k if which == "both" else k
        if need > n:
            raise CurvlabError(
                f"target {target!r} has dimension {n}: cannot compute {need} eigenvalues "
                f"(k={k}, which={which})"
            )
        if progress:
            progress(target)
        eig = dens = tr = None
        try:
            if k > 0:
                eig = lanczos(sub, k=k, which=which, tol=tol, reorth=reorth, seed=seed,
                              max_iter=max_iter, return_vectors=return_vectors)
            if density:
                dens = spectral_density(sub, probes=probes, steps=min(steps, n), seed=seed,
                                        reorth=reorth)
            if trace:
                tr = hutchpp(sub, matvecs=trace_matvecs, seed=seed)
        except ValueError as e:  # linalg reports bad numbers as ValueError
            raise CurvlabError(f"target {target!r}: {e}") from None
        out.append(TargetSpectrum(target, n, eig, dens, tr))
    return out


def exact_eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """All eigenvalues (ascending, float64) of a dense symmetric block."""
    m = matrix.double()
    if m.shape[0] != m.shape[1]:
        raise CurvlabError(f"exact eigenvalues need a square block, got {tuple(m.shape)}")
    asym = (m - m.T).abs().max() / m.abs().max().clamp_min(1e-300)
    if asym > 1e-6:
        warnings.warn(f"block is not symmetric (relative asymmetry {asym:.1e}); symmetrizing",
                      stacklevel=2)
    return torch.linalg.eigvalsh((m + m.T) / 2)
