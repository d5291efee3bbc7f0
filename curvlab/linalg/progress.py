"""Progress reports of the long iterations (Lanczos, SLQ, trace estimators).

The algorithms never print: they call an optional ``progress`` callback with a frozen
:class:`Progress` after every block product, and the caller (the CLI) decides how to show it.
Reports carry no timing; a caller computes rates and ETAs from its own clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Progress:
    """Where an iteration stands.

    task: ``"lanczos"``, ``"slq"``, ``"hutchpp"`` or ``"hutchinson"``.
    done: operator-vector products (columns) so far. total: the most it will take (for
        Lanczos an upper bound: ``max_iter``; it usually stops earlier).
    values: the wanted Ritz values at the last check (float64, ordered as the result will be),
        or ``None`` before the first check and for the other tasks.
    residuals: their relative residual bounds ``|β_{m−1} s_{m−1}| / max|θ|`` (``None`` likewise).
    converged: how many of them meet the tolerance. restarts: thick restarts so far.
    """

    task: str
    done: int
    total: int
    values: np.ndarray | None = None
    residuals: np.ndarray | None = None
    converged: int = 0
    restarts: int = 0


ProgressFn = Callable[[Progress], None]
