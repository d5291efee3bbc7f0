"""Learning-rate schedules, as factors multiplying the base learning rate.

- ``cosine``: one global cosine from 1 to ``final`` over the run, after ``warmup`` linear
  warm-up steps. For GN methods it runs over all inner steps of the run: inner step ``k`` of
  outer step ``t`` is at position ``t·N + k`` of ``T·N`` (the paper's best schedule).
- ``constant``: 1 (after warm-up).
- ``constant+inner-cosine``: GN methods only; constant across outer steps, a cosine from 1 to
  ``final`` inside every inner solve.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant", "constant+inner-cosine")


def cosine(position: float, total: float, final: float = 0.0) -> float:
    """``final + (1 − final)·½(1 + cos(π·position/total))``, clamped to ``[0, total]``."""
    x = min(max(position / total, 0.0), 1.0) if total > 0 else 1.0
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * x))


def lr_factor(schedule: str, step: int, total: int, *, inner: int = 0, inner_steps: int = 1,
              warmup: int = 0, final: float = 0.0) -> float:
    """Factor at outer ``step`` (0-based) of ``total`` and inner step ``inner`` of
    ``inner_steps`` (baselines: ``inner=0, inner_steps=1``)."""
    w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant":
        return w
    if schedule == "cosine":
        position = (step - warmup) * inner_steps + inner
        return w * cosine(position, (total - warmup) * inner_steps, final)
    if schedule == "constant+inner-cosine":
        return w * cosine(inner, inner_steps, final)
    raise ValueError(f"unknown schedule {schedule!r}")
