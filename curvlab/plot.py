"""Matplotlib figures of curvature results (headless: the Agg backend).

Each ``figure_*`` function takes plain arrays and returns a labelled
:class:`matplotlib.figure.Figure` (axes, units, and a ``context`` line such as model and step),
so that a figure stands alone in a paper. :func:`render_file` draws every standard figure an
HDF5 result file supports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

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
