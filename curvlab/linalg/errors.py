"""Warning and error types of :mod:`curvlab.linalg`.

Numerical trouble that leaves a usable (if degraded) answer is a warning; a problem that leaves
no answer is an exception with a one-line message.
"""

from __future__ import annotations


class LinalgWarning(UserWarning):
    """Base class of the numerical warnings of :mod:`curvlab.linalg`."""


class ConvergenceWarning(LinalgWarning):
    """An iteration stopped (iteration cap, exhausted Krylov space) before meeting its tolerance."""


class GhostEigenvalueWarning(LinalgWarning):
    """Lanczos without reorthogonalization lost orthogonality; Ritz values may repeat (ghosts)."""


class NotPositiveDefiniteError(ValueError):
    """Conjugate gradients met a direction ``p`` with ``pᵀ (A + λI) p <= 0``."""
