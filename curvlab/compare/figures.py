"""Standard figures of a comparison (from results in memory or read back from ``/compare``).

- ``compare_decrease``: per damping, each preconditioner's predicted decrease at the best step
  relative to full GN (bar chart); with several checkpoints ``compare_decrease_lam<λ>``: the
  same ratio against the training step, one line per preconditioner;
- ``compare_condition``: condition numbers of ``P^{-1/2}(G + λI)P^{-1/2}`` (log bars; hatched:
  Rayleigh–Ritz lower bounds), of the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from curvlab.compare.api import CheckpointComparison, CompareResult

if TYPE_CHECKING:  # matplotlib is imported on first use, not with curvlab.compare
    from matplotlib.figure import Figure


def _grid(result: CompareResult, fn) -> np.ndarray:
    return np.array([[fn(result, n, lam) for lam in result.dampings]
                     for n in result.preconditioners], dtype=float)


def compare_figures(comparisons: Sequence[CheckpointComparison] | CompareResult,
                    context: str | None = None) -> Iterator[tuple[str, Figure]]:
    """``(stem, figure)`` pairs for the module docstring's figures."""
    from curvlab import plot

    if isinstance(comparisons, CompareResult):
        comparisons = [CheckpointComparison("", 0, comparisons)]
    last = comparisons[-1].result
    names, lams = last.preconditioners, last.dampings
    if "full" in names:
        if len(comparisons) == 1:
            ratio = _grid(last, lambda r, n, lam: r.ratio(n, lam))
            yield "compare_decrease", plot.figure_compare_decrease(names, lams, ratio,
                                                                   context=context)
        else:
            steps = [c.step for c in comparisons]
            for lam in lams:
                values = np.array([[c.result.ratio(n, lam) for n in names]
                                   for c in comparisons])
                yield f"compare_decrease_lam{lam:g}", plot.figure_compare_vs_step(
                    steps, names, values, damping=lam, context=context)

    def cond(r, n, lam):
        s = r.row(n, lam).spectrum
        return np.nan if s is None else s.condition

    kappa = _grid(last, cond)
    if np.isfinite(kappa).any():
        ritz = _grid(last, lambda r, n, lam: (s := r.row(n, lam).spectrum) is not None
                     and s.method == "ritz")
        yield "compare_condition", plot.figure_condition_numbers(
            names, lams, kappa, lower_bound=ritz.astype(bool), context=context)
