"""Errors of :mod:`curvlab.compare` (user errors: one-line messages)."""

from __future__ import annotations

from curvlab.errors import CurvlabError


class CompareError(CurvlabError):
    """A comparison cannot run as asked (singular preconditioner, mismatched checkpoints, ...)."""


class SingularPreconditionerError(CompareError):
    """``P`` (with the given damping) is singular, so ``P⁻¹ g`` is undefined."""
