"""Spectra of curvature operators: Lanczos eigenpairs, SLQ densities, traces, per target.

A *target* names what to analyze on a :class:`~curvlab.curvature.operators.CurvatureOperator`:

- ``"full"``: the operator on the whole partition;
- a block name: that diagonal block ``C_bb``;
- ``"blockdiag"``: the layerwise operator ``blockdiag(C_11, ..., C_bb)`` (its spectrum is the
  union of the blocks', which makes it the natural companion of ``"full"`` in an overlay).

Eigenvalues are of the curvature of the *mean* token cross-entropy (see ``curvlab.ggn``).
"""

from __future__ import annotations

import os
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
from curvlab.linalg.progress import Progress


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
    basis_size: int | None = None,
    basis_device: str | None = None,
    scratch_dir: str | os.PathLike | None = None,
    density: bool = False,
    probes: int = 10,
    steps: int = 80,
    probe_block: int | None = None,
    trace: bool = False,
    trace_matvecs: int = 102,
    return_vectors: bool = False,
    seed: int = 0,
    progress: Callable[[str, Progress], None] | None = None,
) -> list[TargetSpectrum]:
    """Lanczos (``k`` > 0), SLQ density (``density``) and Hutch++ trace (``trace``) per target.

    ``basis_size``/``basis_device``/``scratch_dir`` bound and place the Lanczos (and SLQ)
    basis (:func:`curvlab.linalg.lanczos`: thick restart; ``"cpu"``, ``"disk"``);
    ``probe_block``: probes per block product of SLQ and Hutch++ (default: all SLQ probes, 32
    Hutch++ columns). ``progress(target, report)`` receives every
    :class:`~curvlab.linalg.progress.Progress` report.

    Raises a :class:`CurvlabError` for an unknown target, ``k`` larger than a target's
    dimension, or a bad number (``k < 0``, ``probes``/``steps``/``max_iter`` < 1, ``basis_size``
    < ``k' + 1``). Numerical warnings of :mod:`curvlab.linalg` (ghosts, non-convergence) pass on.
    """
    if which not in ("top", "bottom", "both"):
        raise ConfigError(f"unknown --which {which!r}; expected top, bottom or both")
    check_spectrum_numbers(k=k, which=which, tol=tol, max_iter=max_iter, basis_size=basis_size,
                           density=density, probes=probes, steps=steps,
                           probe_block=probe_block, trace=trace, trace_matvecs=trace_matvecs)
    out = []
    for target in targets:
        sub = target_operator(op, target)
        n = check_target_size(sub, target, k, which)
        tell = None if progress is None else (lambda report, t=target: progress(t, report))
        eig = dens = tr = None
        try:
            if k > 0:
                eig = lanczos(sub, k=k, which=which, tol=tol, reorth=reorth, seed=seed,
                              max_iter=max_iter, return_vectors=return_vectors,
                              basis_size=basis_size, basis_device=basis_device,
                              scratch_dir=scratch_dir, progress=tell)
            if density:
                dens = spectral_density(sub, probes=probes, steps=min(steps, n), seed=seed,
                                        reorth=reorth, basis_device=basis_device,
                                        block_size=probe_block, scratch_dir=scratch_dir,
                                        progress=tell)
            if trace:
                tr = hutchpp(sub, matvecs=trace_matvecs, seed=seed,
                             block_size=probe_block or 32, progress=tell)
        except ValueError as e:  # linalg reports bad numbers as ValueError
            raise CurvlabError(f"target {target!r}: {e}") from None
        out.append(TargetSpectrum(target, n, eig, dens, tr))
    return out


def check_target_size(sub, target: str, k: int, which: str) -> int:
    """The dimension of the target's operator ``sub``; a :class:`CurvlabError` when it has
    fewer than the ``k'`` wanted eigenvalues."""
    n = sub.shape[0]
    need = 2 * k if which == "both" else k
    if need > n:
        raise CurvlabError(
            f"target {target!r} has dimension {n}: cannot compute {need} eigenvalues "
            f"(k={k}, which={which})"
        )
    return n


def check_spectrum_numbers(
    *, k: int, which: str = "top", tol: float = 1e-6, max_iter: int | None = None,
    basis_size: int | None = None, density: bool = False, probes: int = 10, steps: int = 80,
    probe_block: int | None = None, trace: bool = False, trace_matvecs: int = 102,
) -> None:
    """Raise a one-line :class:`ConfigError` (named as the CLI option) for a number that makes
    no sense: ``k < 0``; nothing to compute; ``tol`` not in ``(0, 1)``; ``max_iter``, ``probes``,
    ``steps``, ``probe_block`` < 1; ``trace_matvecs`` < 3; ``basis_size < k' + 1``."""
    if k < 0:
        raise ConfigError(f"--k must be >= 0 (0: no eigenvalues), got {k}")
    if k == 0 and not density and not trace:
        raise ConfigError("--k 0 without --density or --trace computes nothing")
    if not (0 < tol < 1):
        raise ConfigError(f"--tol must be in (0, 1), got {tol:g}")
    for name, value in (("--max-iter", max_iter), ("--probe-block", probe_block)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if density and probes < 1:
        raise ConfigError(f"--probes must be >= 1, got {probes}")
    if density and steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if trace and trace_matvecs < 3:
        raise ConfigError(f"--trace-matvecs must be >= 3, got {trace_matvecs}")
    wanted = 2 * k if which == "both" else k
    if k > 0 and basis_size is not None and basis_size < wanted + 1:
        raise ConfigError(f"--basis-size must be at least k'+1 = {wanted + 1} for --k {k} "
                          f"--which {which}, got {basis_size}")
    if k > 0 and max_iter is not None and max_iter < wanted:
        raise ConfigError(f"--max-iter {max_iter} is smaller than the {wanted} wanted "
                          "eigenvalues")


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
