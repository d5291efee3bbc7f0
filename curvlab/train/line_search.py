"""Line search along a direction over a fixed grid of step sizes.

The grid is the reference's (natalieabreu/full-gauss-newton, ``EasyLM/models/llama/
llama_train_gn.py``, outer loop): ``1/sqrt(2)**i for i in range(ls_range)``, every candidate
scored by the true loss on fresh batches, ``min`` over the scores (ties to the first, i.e. the
larger step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from curvlab.errors import CurvlabError


def reference_grid(count: int) -> tuple[float, ...]:
    """``(1/√2^0, 1/√2^1, …, 1/√2^(count−1))``: ``1, 0.7071…, 0.5, 0.3536…, 0.25, …``
    (computed as ``2^(−i/2)``, so the even powers are exact)."""
    if count < 1:
        raise CurvlabError(f"line-search range must be >= 1, got {count}")
    return tuple(2.0 ** (-i / 2) for i in range(count))


DEFAULT_GRID = reference_grid(5)


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
    micro-batches) and take the lowest; ties go to the larger step. NaN or Inf scores never
    win; if every score is NaN or Inf a :class:`CurvlabError` is raised."""
    if not grid:
        raise CurvlabError("line search needs at least one step size")
    losses = tuple(float(score(float(eta))) for eta in grid)
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        raise CurvlabError(f"loss is NaN or Inf at every line-search step {tuple(grid)}")
    best = min(finite, key=lambda i: (losses[i], -float(grid[i])))
    return LineSearchResult(float(grid[best]), losses, best)
