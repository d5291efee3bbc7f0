"""``/spectrum/<kind>/<target>``: Lanczos eigenpairs, SLQ densities, traces, exact spectra.

One group per (curvature kind, target); ``target`` is ``full``, ``blockdiag`` or a block name
(encoded with :func:`~curvlab.store.schema.encode_name`). Contents (each only when computed)::

    attrs       target, size, complete (bool)
    eigenvalues float64 [k]      Ritz values (top: descending; bottom: ascending; both: top
                                 then bottom, descending)
    residuals   float64 [k]      residual norms |β s| of the Ritz pairs
    converged   bool [k]
    eigenvectors [size, k]       only with --vectors
    alpha, beta float64 [m]      Lanczos recurrence coefficients (of the last cycle after
                                 thick restarts: T = tridiag(beta[:-1], alpha, beta[:-1]) with
                                 `coupling` in row and column l = len(coupling))
    coupling    float64 [l]      only after thick restarts (--basis-size): the arrowhead of T
                attrs: which, tol, reorth, seed, iterations, products, restarts
    density/    nodes, weights float64 [probes, steps] (NaN-padded); grid, values float64 [G]
                (Gaussian-smoothed density, integrates to 1); attrs sigma, probes, steps,
                trace_estimate, trace_stderr, products
    trace/      attrs estimate, stderr, samples, matvecs (Hutch++)
    exact       float64 [size]  all eigenvalues (ascending) of a dense block, by eigvalsh
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from curvlab.store.schema import decode_name, encode_name


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def spectrum_group(file: h5py.File, kind: str, target: str) -> h5py.Group:
    """The (fresh) group ``/spectrum/<kind>/<target>``; an earlier one is replaced."""
    key = f"spectrum/{encode_name(kind)}/{encode_name(target)}"
    if key in file:
        del file[key]
    group = file.require_group(key)
    group.attrs["target"] = target
    group.attrs["complete"] = False
    return group


def write_target_spectrum(file: h5py.File | h5py.Group, kind: str, spec: Any,
                          grid_points: int = 1000) -> None:
    """Write a :class:`curvlab.spectra.TargetSpectrum`; ``complete`` is set last."""
    g = spectrum_group(file, kind, spec.target)
    g.attrs["size"] = np.int64(spec.size)
    if spec.lanczos is not None:
        r = spec.lanczos
        g.create_dataset("eigenvalues", data=_np(r.eigenvalues).astype(np.float64))
        g.create_dataset("residuals", data=_np(r.residual_norms).astype(np.float64))
        g.create_dataset("converged", data=_np(r.converged).astype(bool))
        g.create_dataset("alpha", data=_np(r.alpha).astype(np.float64))
        g.create_dataset("beta", data=_np(r.beta).astype(np.float64))
        if r.eigenvectors is not None:
            g.create_dataset("eigenvectors", data=_np(r.eigenvectors))
        for attr in ("which", "tol"):
            g.attrs[attr] = getattr(r, attr)
        g.attrs["iterations"] = np.int64(r.iterations)
        g.attrs["products"] = np.int64(r.products)
        g.attrs["restarts"] = np.int64(getattr(r, "restarts", 0))
        if getattr(r, "coupling", None) is not None:
            g.create_dataset("coupling", data=_np(r.coupling).astype(np.float64))
    if spec.density is not None:
        d = spec.density
        dg = g.create_group("density")
        steps = max(len(n) for n in d.nodes)
        for name, arrays in (("nodes", d.nodes), ("weights", d.weights)):
            pad = np.full((len(arrays), steps), np.nan)
            for i, a in enumerate(arrays):
                pad[i, : len(a)] = _np(a)
            dg.create_dataset(name, data=pad)
        sigma = d.default_sigma()
        grid = d.grid(grid_points, sigma)
        dg.create_dataset("grid", data=_np(grid).astype(np.float64))
        dg.create_dataset("values", data=_np(d.density(grid, sigma)).astype(np.float64))
        dg.attrs["sigma"] = float(sigma)
        dg.attrs["probes"] = np.int64(d.probes)
        dg.attrs["steps"] = np.int64(d.steps)
        dg.attrs["trace_estimate"] = float(d.trace_estimate)
        dg.attrs["trace_stderr"] = float(d.trace_stderr)
        dg.attrs["products"] = np.int64(d.products)
    if spec.trace is not None:
        tg = g.create_group("trace")
        for attr in ("estimate", "stderr"):
            tg.attrs[attr] = float(getattr(spec.trace, attr))
        for attr in ("samples", "matvecs"):
            tg.attrs[attr] = np.int64(getattr(spec.trace, attr))
    if spec.exact is not None:
        g.create_dataset("exact", data=_np(spec.exact).astype(np.float64))
    g.attrs["complete"] = True
    file.file.flush()  # file: an h5py File or a group in one (step-axis files)


def read_spectra(file: h5py.File) -> dict[str, dict[str, dict[str, Any]]]:
    """``{kind: {target: {name: array or attrs}}}`` of every complete spectrum group."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if "spectrum" not in file:
        return out
    for kkey, kgroup in file["spectrum"].items():
        for tkey, g in kgroup.items():
            if not g.attrs.get("complete", False):
                continue
            entry: dict[str, Any] = {"attrs": dict(g.attrs)}
            for name, item in g.items():
                if isinstance(item, h5py.Dataset):
                    entry[name] = item[()]
                else:
                    entry[name] = {n: ds[()] for n, ds in item.items()}
                    entry[name]["attrs"] = dict(item.attrs)
            out.setdefault(decode_name(kkey), {})[decode_name(tkey)] = entry
    return out
