"""Numerical linear algebra on operators (``shape``, ``dtype``, ``device``, ``@``); no models.

Free functions with explicit seeds returning frozen dataclasses:

- :func:`lanczos` -> :class:`LanczosResult`: extreme eigenpairs (top, bottom or both).
- :func:`spectral_density`, :func:`block_spectral_densities` -> :class:`SpectralDensity`:
  stochastic Lanczos quadrature.
- :func:`hutchinson`, :func:`hutchpp` -> :class:`TraceEstimate`: randomized traces.
- :func:`cg` -> :class:`CGResult`: damped conjugate gradients.

Long iterations report through an optional ``progress`` callback (:class:`Progress`).

See ``docs/linalg.md``.
"""

from curvlab.linalg.cg import CGResult, cg
from curvlab.linalg.errors import (
    ConvergenceWarning,
    GhostEigenvalueWarning,
    LinalgWarning,
    NotPositiveDefiniteError,
)
from curvlab.linalg.lanczos import LanczosResult, default_basis_size, lanczos
from curvlab.linalg.operator import (
    DenseOperator,
    DiagonallyScaledOperator,
    Operator,
    as_operator,
    check_operator,
    matmat,
)
from curvlab.linalg.progress import Progress, ProgressFn
from curvlab.linalg.slq import SpectralDensity, block_spectral_densities, spectral_density
from curvlab.linalg.trace import TraceEstimate, hutchinson, hutchpp

__all__ = [
    "CGResult",
    "ConvergenceWarning",
    "DenseOperator",
    "DiagonallyScaledOperator",
    "GhostEigenvalueWarning",
    "LanczosResult",
    "LinalgWarning",
    "NotPositiveDefiniteError",
    "Operator",
    "Progress",
    "ProgressFn",
    "SpectralDensity",
    "TraceEstimate",
    "as_operator",
    "block_spectral_densities",
    "cg",
    "check_operator",
    "default_basis_size",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "matmat",
    "spectral_density",
]
