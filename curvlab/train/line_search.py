"""Line search along a direction over a fixed grid of step sizes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from curvlab.errors import CurvlabError

DEFAULT_GRID = (1.0, 0.71, 0.5, 0.35, 0.25)


@dataclass(frozen=True)
class LineSearchResult:
    """step: the chosen step size; losses: the score of every candidate (grid order);
    index: position of ``step`` in the grid."""

    step: float
    losses: tuple[float, ...]
    index: int


def line_search(score: Callable[[float], float], grid: Sequence[float] = DEFAULT_GRID
                ) -> LineSearchResult:
    """Score every step size of ``grid`` (e.g. the true loss at ``θ + η Δ`` on fresh
    micro-batches) and take the lowest; ties go to the earlier candidate. NaN or Inf scores
    never win; if every score is NaN or Inf a :class:`CurvlabError` is raised."""
    if not grid:
        raise CurvlabError("line search needs at least one step size")
    losses = tuple(float(score(float(eta))) for eta in grid)
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        raise CurvlabError(f"loss is NaN or Inf at every line-search step {tuple(grid)}")
    best = min(finite, key=lambda i: losses[i])
    return LineSearchResult(float(grid[best]), losses, best)
