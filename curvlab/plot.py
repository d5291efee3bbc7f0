"""Matplotlib figures of curvature results (headless: the Agg backend).

Each ``figure_*`` function takes plain arrays and returns a labelled
:class:`matplotlib.figure.Figure` (axes, units, and a ``context`` line such as model and step),
so that a figure stands alone in a paper. :func:`render_file` draws every standard figure an
HDF5 result file supports; :func:`compare_figures` draws a comparison's from results in
memory. This module imports the result modules, never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

if TYPE_CHECKING:  # results know no figures: curvlab.compare never imports this module
    from curvlab.compare.api import CheckpointComparison, CompareResult

KIND_LABELS = {"ggn": "Gauss-Newton", "hessian": "Hessian", "efisher": "empirical Fisher",
               "mcfisher": "Monte-Carlo Fisher"}


def _title(fig: Figure, title: str, context: str | None) -> None:
    fig.suptitle(title if not context else f"{title}\n{context}", fontsize=10)


def figure_density(
    densities: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    kind: str = "ggn",
    context: str | None = None,
) -> Figure:
    """Spectral densities (linear and log scale side by side); ``densities[label] = (grid,
    values)`` with values in 1/(unit of eigenvalue), integrating to 1."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for label, (grid, values) in densities.items():
        for ax in axes:
            ax.plot(grid, values, label=label, lw=1.2)
    floor = min((v[v > 0].min() for _, v in densities.values() if np.any(v > 0)), default=1e-12)
    axes[1].set_yscale("log")
    axes[1].set_ylim(bottom=max(floor, 1e-12 * max(v.max() for _, v in densities.values())))
    for ax, scale in zip(axes, ("linear", "log")):
        ax.set_xlabel(f"eigenvalue of the {KIND_LABELS.get(kind, kind)} (mean-loss scale)")
        ax.set_ylabel(f"spectral density ({scale} scale)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _title(fig, f"{KIND_LABELS.get(kind, kind)} spectral density (SLQ)", context)
    return fig


def figure_top_eigenvalues(
    eigenvalues: Mapping[str, np.ndarray], *, kind: str = "ggn", context: str | None = None
) -> Figure:
    """Top eigenvalues per block: one column of points per block, log scale."""
    names = list(eigenvalues)
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(names) + 2), 4), constrained_layout=True)
    for i, name in enumerate(names):
        ev = np.sort(np.asarray(eigenvalues[name]))[::-1]
        pos = ev[ev > 0]
        ax.scatter(np.full(len(pos), i), pos, s=14, alpha=0.8)
        if len(pos):
            ax.scatter([i], [pos[0]], s=40, marker="_", color="k")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("eigenvalue (mean-loss scale, log)")
    ax.grid(alpha=0.3, axis="y")
    _title(fig, f"Top eigenvalues of each {KIND_LABELS.get(kind, kind)} block (Lanczos)", context)
    return fig


def figure_coupling(
    names: Sequence[str], frobenius: np.ndarray, *, kind: str = "ggn",
    context: str | None = None,
) -> Figure:
    """Heatmap of block Frobenius norms ``‖C_rc‖_F`` (log colour scale)."""
    f = np.asarray(frobenius, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * len(names) + 2.5),) * 2,
                           constrained_layout=True)
    positive = f[f > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    im = ax.imshow(np.where(f > 0, f, np.nan), cmap="viridis", norm=norm)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("column block")
    ax.set_ylabel("row block")
    fig.colorbar(im, ax=ax, label="Frobenius norm of the block")
    off = f.copy()
    np.fill_diagonal(off, 0)
    energy = np.sqrt((off**2).sum() / max((f**2).sum(), 1e-300))
    _title(fig, f"{KIND_LABELS.get(kind, kind)} block coupling "
                f"(off-diagonal energy {energy:.3f})", context)
    return fig


def figure_full_vs_blockdiag(
    full: tuple[np.ndarray, np.ndarray],
    blockdiag: tuple[np.ndarray, np.ndarray],
    *,
    kind: str = "ggn",
    context: str | None = None,
) -> Figure:
    """Full vs block-diagonal (layerwise) spectral densities overlaid (log density)."""
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for label, (grid, values) in (("full", full), ("block-diagonal (layerwise)", blockdiag)):
        ax.plot(grid, np.clip(values, 1e-300, None), label=label, lw=1.3)
    ax.set_yscale("log")
    top = max(full[1].max(), blockdiag[1].max())
    ax.set_ylim(bottom=1e-8 * top)
    ax.set_xlabel(f"eigenvalue of the {KIND_LABELS.get(kind, kind)} (mean-loss scale)")
    ax.set_ylabel("spectral density (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _title(fig, "Full vs block-diagonal spectrum", context)
    return fig


def save(fig: Figure, path_stem: str, formats: Sequence[str] = ("png",)) -> list[str]:
    """Save ``fig`` as ``path_stem.<fmt>`` for each format; returns the paths."""
    paths = []
    for fmt in formats:
        path = f"{path_stem}.{fmt}"
        fig.savefig(path, dpi=150)
        paths.append(path)
    plt.close(fig)
    return paths


# -- preconditioner comparison (curvlab compare) ------------------------------------------------

def _grouped_bars(ax, groups: Sequence[str], labels: Sequence[str], values: np.ndarray) -> None:
    """Bars ``values[label, group]``, one cluster per group (NaN bars are left out)."""
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(groups))
    for i, label in enumerate(labels):
        v = np.asarray(values[i], dtype=float)
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, np.where(np.isfinite(v), v, 0), width,
               label=label)
    ax.set_xticks(x, groups)


def figure_compare_decrease(
    preconditioners: Sequence[str],
    dampings: Sequence[float],
    values: np.ndarray,
    *,
    ylabel: str = "predicted decrease at the best step, relative to full GN",
    context: str | None = None,
) -> Figure:
    """Grouped bar chart of a per-preconditioner metric ``values[p, j]`` (preconditioner p,
    damping j), e.g. ``−m(α* d)`` of each preconditioner divided by full GN's."""
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 * len(dampings) * len(preconditioners) / 3 + 3),
                                    4), constrained_layout=True)
    _grouped_bars(ax, [f"λ = {d:g}" for d in dampings], preconditioners, np.asarray(values))
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("damping λ")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _title(fig, "Gauss-Newton model decrease per preconditioner", context)
    return fig


def figure_compare_vs_step(
    steps: Sequence[int],
    preconditioners: Sequence[str],
    values: np.ndarray,
    *,
    damping: float,
    ylabel: str = "predicted decrease at the best step, relative to full GN",
    log: bool = False,
    context: str | None = None,
) -> Figure:
    """A metric ``values[k, p]`` per checkpoint k (x: training step) and preconditioner p at one
    damping: how the gap between preconditioners evolves through training."""
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    v = np.asarray(values, dtype=float)
    for i, name in enumerate(preconditioners):
        ax.plot(steps, v[:, i], marker="o", ms=4, lw=1.3, label=name)
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _title(fig, f"Preconditioners through training (λ = {damping:g})", context)
    return fig


def figure_condition_numbers(
    preconditioners: Sequence[str],
    dampings: Sequence[float],
    condition: np.ndarray,
    *,
    lower_bound: np.ndarray | None = None,
    context: str | None = None,
) -> Figure:
    """Condition numbers ``condition[p, j]`` of ``P^{-1/2}(G + λI)P^{-1/2}`` (log scale);
    hatched bars are lower bounds (``lower_bound[p, j]``, Rayleigh–Ritz estimates)."""
    c = np.asarray(condition, dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 * len(dampings) * len(preconditioners) / 3 + 3),
                                    4), constrained_layout=True)
    width = 0.8 / max(1, len(preconditioners))
    x = np.arange(len(dampings))
    for i, name in enumerate(preconditioners):
        v = np.where(np.isfinite(c[i]), c[i], np.nan)
        bars = ax.bar(x + (i - (len(preconditioners) - 1) / 2) * width, v, width, label=name)
        if lower_bound is not None:
            for bar, lb in zip(bars, np.asarray(lower_bound)[i]):
                if lb:
                    bar.set_hatch("//")
    ax.set_xticks(x, [f"λ = {d:g}" for d in dampings])
    ax.set_yscale("log")
    ax.set_xlabel("damping λ" + ("   (hatched: lower bounds)" if lower_bound is not None
                                 and np.asarray(lower_bound).any() else ""))
    ax.set_ylabel("condition number of P^-1/2 (G + λI) P^-1/2 (log)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _title(fig, "Conditioning of the preconditioned Gauss-Newton matrix", context)
    return fig


def _context(attrs: Mapping) -> str:
    model = attrs.get("model", {})
    if isinstance(model, str):
        import json

        model = json.loads(model)
    parts = [str(model.get("family", "model"))]
    if "d_model" in model:
        parts.append(f"d={model['d_model']}, L={model['n_layers']}")
    ckpt = str(attrs.get("checkpoint", ""))
    if ckpt:
        parts.append(ckpt.rsplit("/", 1)[-1])
    data = attrs.get("data", {})
    if isinstance(data, str):
        import json

        data = json.loads(data)
    if data.get("tokens"):
        parts.append(f"{data['tokens']:,} tokens")
    return ", ".join(parts)


def _compare_grid(result, fn) -> np.ndarray:
    return np.array([[fn(result, n, lam) for lam in result.dampings]
                     for n in result.preconditioners], dtype=float)


def compare_figures(comparisons: Sequence[CheckpointComparison] | CompareResult,
                    context: str | None = None) -> Iterator[tuple[str, Figure]]:
    """``(stem, figure)`` pairs of a comparison's standard figures:

    - ``compare_decrease``: per damping, each preconditioner's predicted decrease at the best
      step relative to full GN (bar chart); with several checkpoints
      ``compare_decrease_lam<λ>``: the same ratio against the training step, one line per
      preconditioner;
    - ``compare_condition``: condition numbers of ``P^{-1/2}(G + λI)P^{-1/2}`` (log bars;
      hatched: Rayleigh–Ritz lower bounds), of the last checkpoint.
    """
    from curvlab.compare.api import CheckpointComparison, CompareResult

    if isinstance(comparisons, CompareResult):
        comparisons = [CheckpointComparison("", 0, comparisons)]
    last = comparisons[-1].result
    names, lams = last.preconditioners, last.dampings
    if "full" in names:
        if len(comparisons) == 1:
            ratio = _compare_grid(last, lambda r, n, lam: r.ratio(n, lam))
            yield "compare_decrease", figure_compare_decrease(names, lams, ratio,
                                                                   context=context)
        else:
            steps = [c.step for c in comparisons]
            for lam in lams:
                values = np.array([[c.result.ratio(n, lam) for n in names]
                                   for c in comparisons])
                yield f"compare_decrease_lam{lam:g}", figure_compare_vs_step(
                    steps, names, values, damping=lam, context=context)

    def cond(r, n, lam):
        s = r.row(n, lam).spectrum
        return np.nan if s is None else s.condition

    kappa = _compare_grid(last, cond)
    if np.isfinite(kappa).any():
        ritz = _compare_grid(last, lambda r, n, lam: (s := r.row(n, lam).spectrum) is not None
                     and s.method == "ritz")
        yield "compare_condition", figure_condition_numbers(
            names, lams, kappa, lower_bound=ritz.astype(bool), context=context)


def _figures(path: str):
    """(stem, figure) for every standard figure the file supports."""
    import h5py

    from curvlab import store
    from curvlab.store.spectrum import read_spectra

    res = store.read(path)
    context = _context(res.attrs)
    with h5py.File(path, "r", locking=False) as f:
        spectra, has_compare = read_spectra(f), "compare" in f
    for kind, targets in spectra.items():
        dens = {t: (e["density"]["grid"], e["density"]["values"])
                for t, e in targets.items() if "density" in e}
        if dens:
            yield f"density_{kind}", figure_density(dens, kind=kind, context=context)
        if "full" in dens and "blockdiag" in dens:
            yield f"full_vs_blockdiag_{kind}", figure_full_vs_blockdiag(
                dens["full"], dens["blockdiag"], kind=kind, context=context)
        tops = {t: e.get("eigenvalues", e.get("exact")) for t, e in targets.items()
                if t not in ("full", "blockdiag") and ("eigenvalues" in e or "exact" in e)}
        if tops:
            yield f"top_eigenvalues_{kind}", figure_top_eigenvalues(tops, kind=kind,
                                                                    context=context)
        elif "full" in targets and "eigenvalues" in targets["full"]:
            yield f"top_eigenvalues_{kind}", figure_top_eigenvalues(
                {"full": targets["full"]["eigenvalues"]}, kind=kind, context=context)
    if has_compare:
        from curvlab.compare import read_compare

        yield from compare_figures(read_compare(path), context)
    for kind in res.coupling_kinds:
        cm = res.coupling(kind)
        yield f"coupling_{kind}", figure_coupling(list(cm.names), cm.frobenius.numpy(),
                                                  kind=kind, context=context)


def render_file(path: str, out_dir: str, formats: Sequence[str] = ("png",)) -> list[str]:
    """Draw every standard figure ``path`` supports into ``out_dir``; returns the files."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, fig in _figures(path):
        written += save(fig, os.path.join(out_dir, stem), formats)
    return written


def render_spectra(path: str, plot_path: str) -> list[str]:
    """The main spectrum figure of ``path`` (density if stored, else top eigenvalues)."""
    import os

    chosen = None  # a density wins over a top-eigenvalue figure, which is kept meanwhile
    for name, fig in _figures(path):  # drawn one at a time; stop at the first density
        if name.startswith("density"):
            if chosen is not None:
                plt.close(chosen)
            chosen = fig
            break
        if chosen is None and name.startswith("top_eigenvalues"):
            chosen = fig
        else:
            plt.close(fig)
    if chosen is None:
        return []
    stem, ext = os.path.splitext(plot_path)
    return save(chosen, stem, [ext.lstrip(".") or "png"])


# -- curvature along training (step-axis files of curvlab spectrum RUN_DIR) ---------------------

STEP_QUANTITIES = {  # series name: (y label, title)
    "lambda_max": ("λ_max of the {kind} (mean loss, log)",
                   "Top {kind} eigenvalue along training"),
    "gradient_share": ("share of the gradient in the top-k eigenspace ‖V_kᵀg‖²/‖g‖²",
                       "Gradient share of the top-k {kind} eigenspace"),
    "step_share": ("share of the step θ_(t+1) − θ_t in the top-k eigenspace",
                   "Step share of the top-k {kind} eigenspace"),
}


def _run_labels(trajectories: Sequence) -> list[str]:
    """Legend labels: each run's optimizer (with its learning rate when that tells runs of one
    optimizer apart, and the file name where labels still collide)."""
    import os

    def opt(t, with_lr: bool) -> str:
        o = t.optimizers[-1] if t.optimizers else {}
        label = str(o.get("name", "?"))
        lr = (o.get("hparams") or {}).get("lr")
        return f"{label} (lr {lr:g})" if with_lr and isinstance(lr, (int, float)) else label

    labels = [opt(t, False) for t in trajectories]
    if len(set(labels)) < len(labels):
        labels = [opt(t, True) for t in trajectories]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}, {os.path.basename(t.path)}" for lab, t in zip(labels, trajectories)]
    return labels


def figure_along(
    steps: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    ylabel: str,
    thresholds: Sequence[np.ndarray | None] | None = None,
    threshold_label: str = "stability threshold",
    log: bool = False,
    title: str = "",
    context: str | None = None,
) -> Figure:
    """One quantity against the training step, one line per run (``steps[r]``,
    ``values[r]``); ``thresholds[r]`` (same length) is drawn dashed in the run's colour."""
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for r, (x, y, label) in enumerate(zip(steps, values, labels)):
        line, = ax.plot(x, y, marker="o", ms=4, lw=1.3, label=label)
        th = thresholds[r] if thresholds is not None else None
        if th is not None and np.isfinite(th).any():
            ax.plot(x, th, ls="--", lw=1.1, color=line.get_color(),
                    label=f"{threshold_label} ({label})")
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _title(fig, title, context)
    return fig


def figures_along(paths: Sequence[str]) -> Iterator[tuple[str, Figure]]:
    """``(stem, figure)`` for every quantity stored in the step-axis files ``paths`` (one line
    per file, labelled by the run's optimizer): ``lambda_max_<target>``,
    ``gradient_share_<target>``, ``step_share_<target>``, ``sharpness`` (λ_max(P⁻¹H) for
    AdamW, λ_max(H) otherwise, thresholds 38/η-formula or 2/η dashed), ``block_lambda_max`` and
    ``block_trace`` (per block; one panel per run), ``heterogeneity`` (mean pairwise
    Jensen-Shannon distance of the block densities)."""
    from curvlab.trajectory import read_trajectory

    runs = [read_trajectory(p) for p in paths]
    labels = _run_labels(runs)
    kind = runs[0].kind
    klabel = KIND_LABELS.get(kind, kind)
    context = _context(runs[0].attrs) if len(runs) == 1 else \
        f"{len(runs)} runs, {runs[0].attrs.get('model', {}).get('family', 'model')}"
    keys = list(dict.fromkeys(k for r in runs for k in r.series))
    for quantity, (ylabel, title) in STEP_QUANTITIES.items():
        for key in [k for k in keys if k.startswith(quantity + "/")]:
            target = key.split("/", 1)[1]
            have = [(r, lab) for r, lab in zip(runs, labels) if key in r.series]
            yield f"{quantity}_{target}".replace("/", "_"), figure_along(
                [r.steps for r, _ in have], [r.series[key] for r, _ in have],
                [lab for _, lab in have], ylabel=ylabel.format(kind=klabel),
                log=quantity == "lambda_max",
                title=f"{title.format(kind=klabel)}: {target}", context=context)
    have = [(r, lab) for r, lab in zip(runs, labels) if "sharpness" in r.series]
    if have:
        yield "sharpness", figure_along(
            [r.steps for r, _ in have], [r.series["sharpness"] for r, _ in have],
            [lab for _, lab in have],
            thresholds=[r.series["sharpness_threshold"] for r, _ in have],
            ylabel="λ_max(P⁻¹H) (AdamW), λ_max(H) (others)", log=True,
            title="Sharpness against the stability threshold",
            context=f"{context}; dashed: (2 + 2β₁)/((1 − β₁)η) for AdamW, 2/η otherwise")
    for key, ylabel in (("block_lambda_max", f"top eigenvalue of each {klabel} block"),
                        ("block_trace", f"trace of each {klabel} block")):
        have = [(r, lab) for r, lab in zip(runs, labels) if key in r.series]
        if not have:
            continue
        fig, axes = plt.subplots(1, len(have), figsize=(5.5 * len(have), 4), squeeze=False,
                                 constrained_layout=True, sharey=True)
        for ax, (r, lab) in zip(axes[0], have):
            for j, name in enumerate(r.block_names):
                ax.plot(r.steps, r.series[key][:, j], marker="o", ms=3, lw=1.1, label=name)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("training step")
            ax.set_title(lab, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel + " (log)")
        axes[0][-1].legend(fontsize=7)
        _title(fig, ylabel.capitalize() + " along training", context)
        yield key, fig
    have = [(r, lab) for r, lab in zip(runs, labels) if "js_distance" in r.series]
    if have:
        def mean_off(js: np.ndarray) -> np.ndarray:
            b = js.shape[-1]
            mask = ~np.eye(b, dtype=bool)
            return np.array([m[mask].mean() for m in js])

        yield "heterogeneity", figure_along(
            [r.steps for r, _ in have], [mean_off(r.series["js_distance"]) for r, _ in have],
            [lab for _, lab in have],
            ylabel="mean pairwise Jensen-Shannon distance of block densities",
            title="Block heterogeneity along training", context=context)


def render_along(paths: Sequence[str], out_dir: str, formats: Sequence[str] = ("png",)
                 ) -> list[str]:
    """Draw :func:`figures_along` of the step-axis files ``paths`` into ``out_dir``."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, fig in figures_along(paths):
        written += save(fig, os.path.join(out_dir, stem), formats)
    return written
