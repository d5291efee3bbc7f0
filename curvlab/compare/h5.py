"""``/compare`` in a curvlab results file (layout in docs/compare.md and docs/hdf5.md).

    /compare                 attrs: preconditioners [P] str, dampings [D] float64, blocks [B] str,
                             block_sizes [B] int64, step_grid [S] float64, options (JSON),
                             count (int64: number of checkpoint groups)
    /compare/<k>             k = 0, 1, ...: one group per checkpoint, in training-step order;
                             attrs: checkpoint, checkpoint_sha256, step, loss, val_loss, grad_norm,
                             tokens, val_tokens, n, products, methods (JSON),
                             off_diagonal_energy (NaN if not computed), off_diagonal_exact,
                             off_diagonal_probes
    /compare/<k>/<metric>    [P, D] float64 (see METRICS), [P, D] int64 cg_iterations,
                             [P, D] bool solve_converged / spectrum_converged,
                             [P, D] str solve_method / spectrum_method ("" = not computed),
                             [P, D, S] val_steps / val_losses,
                             [P, D, B] block_grad_dot / block_curvature / block_own_curvature
    /compare/<k>/diagonals/<q>  q = ggn (diag G: diag, kfac) / efisher (diag F: adam, shampoo,
                             soap, muon), where used: [B] str estimators (dense / exact / mc),
                             [B] float64 rel_errors; attrs samples (MC labels per token, 0 if
                             none), pullbacks (per-token VJPs)

Row p, column j of every [P, D] array is preconditioner ``preconditioners[p]`` at damping
``dampings[j]``. Only :mod:`h5py` and numpy are needed to read it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from curvlab.compare.api import CheckpointComparison, CompareResult
from curvlab.compare.directions import SolveInfo
from curvlab.compare.errors import CompareError
from curvlab.compare.metrics import DirectionMetrics, OffDiagonalEnergy, Spectrum
from curvlab.compare.per_token import DiagonalInfo

STR = h5py.string_dtype()
# [P, D] float64 datasets: name -> how it is computed from a DirectionMetrics
METRICS = {
    "grad_dot": lambda r: r.grad_dot,
    "curvature": lambda r: r.curvature,
    "norm": lambda r: r.norm,
    "step_best": lambda r: r.step_best,
    "cosine_full": lambda r: r.cosine_full,
    "decrease_unit": lambda r: r.decrease_unit,
    "decrease_best": lambda r: r.decrease_best,
    "val_loss_best": lambda r: r.val_loss_best,
    "val_step": lambda r: r.val_step,
    "val_decrease": lambda r: r.val_decrease,
    "eig_top": lambda r: r.spectrum.top if r.spectrum else math.nan,
    "eig_bottom": lambda r: r.spectrum.bottom if r.spectrum else math.nan,
    "condition": lambda r: r.spectrum.condition if r.spectrum else math.nan,
    "cg_residual": lambda r: r.solve.residual,
}
PER_BLOCK = ("block_grad_dot", "block_curvature", "block_own_curvature")


def _comparisons(results: Any) -> list[CheckpointComparison]:
    if isinstance(results, CompareResult):
        return [CheckpointComparison("", 0, results)]
    if isinstance(results, CheckpointComparison):
        return [results]
    out = list(results)
    if not out or not all(isinstance(c, CheckpointComparison) for c in out):
        raise CompareError("write_compare takes a CompareResult or CheckpointComparison(s)")
    return out


def _grid(result: CompareResult, fn) -> np.ndarray:
    return np.array([[fn(result.row(p, d)) for d in result.dampings]
                     for p in result.preconditioners])


def write_compare(target: Any, results: CompareResult | CheckpointComparison
                  | Sequence[CheckpointComparison]) -> None:
    """Write ``/compare`` (module docstring) into ``target``: a :class:`curvlab.store.Writer`
    (its file; flushed afterwards), an open :class:`h5py.File` or a group. An existing
    ``/compare`` is replaced. All results must share preconditioners, dampings and blocks."""
    from curvlab.store import sha256_file

    comps = _comparisons(results)
    f = target if isinstance(target, h5py.Group) else target.file  # h5py.File is a Group
    first = comps[0].result
    for c in comps[1:]:
        r = c.result
        if (r.preconditioners, r.dampings, r.blocks) != (first.preconditioners, first.dampings,
                                                         first.blocks):
            raise CompareError("results to write must share preconditioners, dampings and blocks")
    if "compare" in f:
        del f["compare"]
    root = f.create_group("compare")
    root.attrs.create("preconditioners", np.array(first.preconditioners, dtype=object), dtype=STR)
    root.attrs["dampings"] = np.array(first.dampings, dtype=np.float64)
    root.attrs.create("blocks", np.array(first.blocks, dtype=object), dtype=STR)
    root.attrs["block_sizes"] = np.array(first.block_sizes, dtype=np.int64)
    root.attrs["step_grid"] = np.array(first.step_grid, dtype=np.float64)
    root.attrs["options"] = json.dumps(first.options, sort_keys=True)
    root.attrs["count"] = np.int64(len(comps))
    for k, c in enumerate(comps):
        r = c.result
        g = root.create_group(str(k))
        sha = sha256_file(c.checkpoint) if c.checkpoint and os.path.exists(c.checkpoint) else ""
        g.attrs.update(checkpoint=c.checkpoint, checkpoint_sha256=sha, step=np.int64(c.step),
                       loss=r.loss, val_loss=r.val_loss, grad_norm=r.grad_norm,
                       tokens=np.int64(r.tokens), val_tokens=np.int64(r.val_tokens),
                       n=np.int64(r.n), products=np.int64(r.products),
                       methods=json.dumps(r.methods, sort_keys=True))
        off = r.off_diagonal
        g.attrs["off_diagonal_energy"] = off.value if off else math.nan
        g.attrs["off_diagonal_exact"] = bool(off.exact) if off else False
        g.attrs["off_diagonal_probes"] = np.int64(off.probes if off else 0)
        for name, fn in METRICS.items():
            g.create_dataset(name, data=_grid(r, fn).astype(np.float64))
        g.create_dataset("cg_iterations", data=_grid(r, lambda x: x.solve.iterations)
                         .astype(np.int64))
        g.create_dataset("solve_converged", data=_grid(r, lambda x: x.solve.converged)
                         .astype(bool))
        g.create_dataset("spectrum_converged", data=_grid(
            r, lambda x: x.spectrum.converged if x.spectrum else False).astype(bool))
        g.create_dataset("spectrum_steps", data=_grid(
            r, lambda x: x.spectrum.steps if x.spectrum else 0).astype(np.int64))
        for name, fn in (("solve_method", lambda x: x.solve.method),
                         ("spectrum_method", lambda x: x.spectrum.method if x.spectrum else "")):
            g.create_dataset(name, data=_grid(r, fn).astype(object), dtype=STR)
        for name in ("val_steps", "val_losses", *PER_BLOCK):
            g.create_dataset(name, data=_grid(r, lambda x, n=name: list(getattr(x, n)))
                             .astype(np.float64))
        for q, info in r.diagonals.items():
            d = g.create_group(f"diagonals/{q}")
            d.create_dataset("estimators", data=np.array(info.estimators, dtype=object),
                             dtype=STR)
            d.create_dataset("rel_errors", data=np.array(info.rel_errors, dtype=np.float64))
            d.attrs.update(samples=np.int64(info.samples), pullbacks=np.int64(info.pullbacks))
    if hasattr(target, "flush"):
        target.flush()
    elif hasattr(f, "flush"):
        f.flush()


def read_compare(source: str | os.PathLike | h5py.File | h5py.Group
                 ) -> tuple[CheckpointComparison, ...]:
    """Read ``/compare`` back into :class:`CheckpointComparison` objects (a file path, or an
    open file / group containing ``compare``)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            with h5py.File(path, "r", locking=False) as f:
                return read_compare(f)
        except OSError as e:
            raise CompareError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if "compare" not in source:
        raise CompareError("the file holds no /compare results")
    root = source["compare"]
    names = tuple(str(x) for x in root.attrs["preconditioners"])
    dampings = tuple(float(x) for x in root.attrs["dampings"])
    blocks = tuple(str(x) for x in root.attrs["blocks"])
    sizes = tuple(int(x) for x in root.attrs["block_sizes"])
    grid = tuple(float(x) for x in root.attrs["step_grid"])
    options = json.loads(root.attrs["options"])
    out = []
    for k in range(int(root.attrs["count"])):
        g = root[str(k)]
        a = {key: g[key][()] for key in g if isinstance(g[key], h5py.Dataset)}
        diagonals = {q: DiagonalInfo(tuple(str(x) for x in d["estimators"].asstr()[()]),
                                     tuple(float(x) for x in d["rel_errors"][()]),
                                     int(d.attrs["samples"]), int(d.attrs["pullbacks"]))
                     for q, d in g.get("diagonals", {}).items()}
        smeth = g["spectrum_method"].asstr()[()]
        vmeth = g["solve_method"].asstr()[()]
        rows = []
        for j, lam in enumerate(dampings):
            for p, name in enumerate(names):
                spec = None
                if smeth[p, j]:
                    spec = Spectrum(float(a["eig_top"][p, j]), float(a["eig_bottom"][p, j]),
                                    str(smeth[p, j]), bool(a["spectrum_converged"][p, j]),
                                    int(a["spectrum_steps"][p, j]))
                solve = SolveInfo(str(vmeth[p, j]), int(a["cg_iterations"][p, j]),
                                  float(a["cg_residual"][p, j]), bool(a["solve_converged"][p, j]))
                rows.append(DirectionMetrics(
                    name, lam, float(a["grad_dot"][p, j]), float(a["curvature"][p, j]),
                    float(a["norm"][p, j]), float(a["step_best"][p, j]),
                    float(a["cosine_full"][p, j]),
                    *(tuple(float(x) for x in a[n][p, j]) for n in PER_BLOCK),
                    tuple(float(x) for x in a["val_steps"][p, j]),
                    tuple(float(x) for x in a["val_losses"][p, j]),
                    float(g.attrs["val_loss"]), spec, solve))
        e = float(g.attrs["off_diagonal_energy"])
        off = None if math.isnan(e) else OffDiagonalEnergy(
            e, bool(g.attrs["off_diagonal_exact"]), int(g.attrs["off_diagonal_probes"]))
        result = CompareResult(
            blocks, sizes, names, dampings, tuple(rows), float(g.attrs["loss"]),
            float(g.attrs["val_loss"]), float(g.attrs["grad_norm"]), int(g.attrs["tokens"]),
            int(g.attrs["val_tokens"]), int(g.attrs["n"]), off, grid,
            json.loads(g.attrs["methods"]), diagonals, options, int(g.attrs["products"]))
        out.append(CheckpointComparison(str(g.attrs["checkpoint"]), int(g.attrs["step"]), result))
    return tuple(out)
