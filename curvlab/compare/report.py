"""Plain-text tables of comparison results (returned as strings; the CLI prints them).

Columns of the main table (one block of rows per damping λ):

- ``dec@1``: ``−m(d)``, predicted decrease of the undamped GN model at the unit step;
- ``dec@a*``: ``−m(α* d) = ½ (gᵀd)² / dᵀGd``, at the best step along d;
- ``vs full``: ``dec@a*`` divided by full GN's at the same λ;
- ``a*``: ``α* = −gᵀd / dᵀGd``; ``cos``: cosine to the full-GN direction;
- ``val dec``: ``L_val(θ) − min_α L_val(θ + α d)`` over the step grid (times α*);
- ``kappa``: condition number of ``P^{-1/2}(G + λI)P^{-1/2}`` (``>=`` marks a Ritz lower
  bound, ``~`` an unconverged Lanczos estimate, which is a lower bound too);
- ``solve``: how ``P⁻¹ g`` was computed (CG iterations and relative residual when iterative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from curvlab.compare.api import CheckpointComparison, CompareResult
from curvlab.compare.metrics import DirectionMetrics


def _num(x: float, width: int = 9) -> str:
    """``x`` right-aligned in ``width`` characters, always after at least one space."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        text = "-"
    else:
        text = "inf" if math.isinf(x) else f"{x:.4g}"
    return " " + text.rjust(width - 1)


def _kappa(row: DirectionMetrics) -> str:
    s = row.spectrum
    if s is None:
        return "-".rjust(11)
    mark = ">=" if s.method == "ritz" else ("~" if not s.converged else "")
    return (mark + (f"{s.condition:.3g}" if math.isfinite(s.condition) else "inf")).rjust(11)


def _solve(row: DirectionMetrics) -> str:
    s = row.solve
    if s.method in ("cg", "dense+cg"):
        flag = "" if s.converged else " NOT CONVERGED"
        return f"{s.method} {s.iterations} it, res {s.residual:.0e}{flag}"
    return s.method


def format_table(result: CompareResult, *, per_block: bool = False) -> str:
    """The comparison as a text table (module docstring). ``per_block`` adds, per block, the
    share ``c_b(α*) / m(α* d)`` of the model decrease and, in parentheses, the cross-block part
    ``½ α*² d_bᵀ Σ_{c≠b} G_bc d_c`` over ``m(α* d)`` (negative: the cross-block curvature that
    the direction did not account for takes back that fraction of the decrease)."""
    lines = [
        f"loss {result.loss:.4f} ({result.tokens} tokens)   val loss {result.val_loss:.4f} "
        f"({result.val_tokens} tokens)   |g| {result.grad_norm:.3e}   {result.n:,} coordinates "
        f"in {len(result.blocks)} blocks",
    ]
    if result.off_diagonal is not None:
        o = result.off_diagonal
        how = "exact" if o.exact else f"randomized, {o.probes} probes per block"
        lines.append(f"off-diagonal energy |G - BD(G)|_F / |G|_F = {o.value:.4f} ({how})")
    for key, value in result.methods.items():
        lines.append(f"{key}: {value}")
    head = (f"  {'preconditioner':<14}{'dec@1':>10}{'dec@a*':>10}{'vs full':>9}{'a*':>9}"
            f"{'cos':>7}{'val dec':>10}{'kappa':>11}  solve")
    for lam in result.dampings:
        lines.append(f"damping {lam:g}")
        lines.append(head)
        for name in result.preconditioners:
            r = result.row(name, lam)
            lines.append(
                f"  {name:<14}{_num(r.decrease_unit, 10)}{_num(r.decrease_best, 10)}"
                f"{_num(result.ratio(name, lam), 9)}{_num(r.step_best, 9)}"
                f"{_num(r.cosine_full, 7)}{_num(r.val_decrease, 10)}{_kappa(r)}  {_solve(r)}")
        if per_block:
            lines.append(f"  block share of the decrease at a* (cross-block part), damping {lam:g}")
            lines.append("  " + " " * 14 + "".join(f"{b[-16:]:>18}" for b in result.blocks))
            for name in result.preconditioners:
                r = result.row(name, lam)
                total = r.model_change(r.step_best)
                cells = [f"{s:7.3f} ({x / total if total else math.nan:6.3f})"
                         for s, x in zip(r.block_share(), r.block_cross())]
                lines.append(f"  {name:<14}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def format_evolution(comparisons: Sequence[CheckpointComparison]) -> str:
    """One line per checkpoint (by training step): loss, off-diagonal energy and, per damping,
    each preconditioner's ``dec@a*`` relative to full GN; then each preconditioner's
    ``val dec`` (nats; full GN's too, as it may be negative, which makes a ratio
    meaningless)."""
    if not comparisons:
        return ""
    first = comparisons[0].result
    others = [n for n in first.preconditioners if n != "full"]
    lines = []
    for lam in first.dampings:
        lines.append(f"damping {lam:g}: predicted decrease at a* relative to full GN")
        lines.append(f"  {'step':>8}{'loss':>9}{'offdiag':>9}"
                     + "".join(f"{n:>11}" for n in others))
        for c in comparisons:
            r = c.result
            off = r.off_diagonal.value if r.off_diagonal is not None else math.nan
            lines.append(f"  {c.step:>8}{r.loss:9.4f}{_num(off, 9)}"
                         + "".join(_num(r.ratio(n, lam), 11) for n in others))
        lines.append(f"damping {lam:g}: validation-loss decrease at the line-searched step")
        lines.append(f"  {'step':>8}{'val loss':>9}"
                     + "".join(f"{n:>11}" for n in first.preconditioners))
        for c in comparisons:
            r = c.result
            lines.append(f"  {c.step:>8}{r.val_loss:9.4f}" + "".join(
                _num(r.row(n, lam).val_decrease, 11) for n in first.preconditioners))
    return "\n".join(lines)
