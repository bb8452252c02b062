"""Figure helpers with one consistent style, so every figure of the book looks alike."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

PALETTE = "colorblind"
"""Seaborn palette used for every categorical colour in the book."""

HEATMAP_CMAP = "rocket_r"
"""Sequential colour map for similarity matrices (dark = similar)."""


def set_style() -> None:
    """Apply the book's plotting style: seaborn whitegrid, notebook context, fixed palette."""
    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "savefig.bbox": "tight"})


def similarity_heatmaps(
    mats: Mapping[str, np.ndarray],
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    cmap: str = HEATMAP_CMAP,
    suptitle: str | None = None,
    panel_size: float = 3.4,
) -> Figure:
    """Side-by-side heatmaps of similarity matrices sharing ONE colour scale and ONE colorbar.

    A shared scale is what makes "base vs aligned" panels comparable at a glance; the keys of
    `mats` are the panel titles.
    """
    if not mats:
        raise ValueError("similarity_heatmaps: `mats` is empty; pass at least one named matrix.")
    n = len(mats)
    fig = plt.figure(figsize=(panel_size * n + 0.6, panel_size), layout="constrained")
    grid = fig.add_gridspec(1, n + 1, width_ratios=[1.0] * n + [0.05])
    cax = fig.add_subplot(grid[0, n])
    for i, (title, mat) in enumerate(mats.items()):
        ax = fig.add_subplot(grid[0, i])
        sns.heatmap(
            np.asarray(mat, dtype=np.float32),
            ax=ax,
            vmin=vmin,
            vmax=vmax,
            cmap=cmap,
            square=True,
            cbar=i == n - 1,
            cbar_ax=cax if i == n - 1 else None,
            xticklabels=False,
            yticklabels=False,
        )
        ax.set_title(title)
    cax.set_ylabel("cosine similarity")
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def spectrum_plot(spectra: Mapping[str, np.ndarray], *, top: int = 50) -> Figure:
    """Normalised singular-value spectra (s_k / s_1, log scale) of several embedding sets.

    A steep drop after the first value is the signature of anisotropy (one dominant direction);
    a flatter curve means the representation uses more directions.
    """
    fig, ax = plt.subplots(figsize=(5.0, 3.4), layout="constrained")
    for name, s in spectra.items():
        s = np.asarray(s, dtype=np.float64)[:top]
        ax.plot(np.arange(1, len(s) + 1), s / s[0], marker=".", label=name)
    ax.set(xlabel="component k", ylabel="$s_k / s_1$", yscale="log")
    ax.legend()
    return fig


def alignment_uniformity_plot(points: pd.DataFrame) -> Figure:
    """Wang & Isola alignment (x) against uniformity (y), one marker per row of `points`.

    `points` needs the columns ``model``, ``view``, ``alignment`` and ``uniformity``; colour
    encodes the model and marker shape the view. Both quantities are "lower is better", so a
    representation that improves moves towards the lower left corner (marked by an arrow).
    """
    missing = {"model", "view", "alignment", "uniformity"} - set(points.columns)
    if missing:
        raise ValueError(
            f"alignment_uniformity_plot: `points` lacks the columns {sorted(missing)}; "
            f"it has {list(points.columns)}."
        )
    fig, ax = plt.subplots(figsize=(5.0, 3.8), layout="constrained")
    sns.scatterplot(
        data=points, x="alignment", y="uniformity", hue="model", style="view", s=90, ax=ax
    )
    ax.annotate(
        "better",
        xy=(0.04, 0.06),
        xytext=(0.24, 0.26),
        xycoords="axes fraction",
        arrowprops={"arrowstyle": "->", "color": "grey"},
        color="grey",
    )
    ax.set(xlabel="alignment (lower = positives closer)", ylabel="uniformity (lower = spread)")
    ax.margins(0.25)
    return fig


def kgqa_accuracy_plot(
    paper: Mapping[str, pd.Series],
    measured: Mapping[str, pd.DataFrame],
    task_labels: Mapping[str, str],
    *,
    title: str,
    width: float = 0.2,
) -> Figure:
    """KGQA accuracy per task: published bars (hatched, pale) beside this project's measurements.

    ``paper`` maps a bar label to accuracies in % indexed by task; ``measured`` maps a bar label
    to a ``kalm.evaluate.kgqa.summarise`` table (fractions), drawn with its Wilson 95 % interval
    as error bar. Bars alternate two colours (untuned, KaLM); ``task_labels`` orders and names
    the tasks on the x axis.
    """
    tasks = list(task_labels)
    bars: list[tuple[str, np.ndarray, np.ndarray | None]] = [
        (name, acc.reindex(tasks).to_numpy(), None) for name, acc in paper.items()
    ]
    for name, summary in measured.items():
        heights = 100 * summary["lenient"].reindex(tasks).to_numpy()
        lo = 100 * summary["lenient_lo"].reindex(tasks).to_numpy()
        hi = 100 * summary["lenient_hi"].reindex(tasks).to_numpy()
        bars.append((name, heights, np.stack([heights - lo, hi - heights])))
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    for i, (name, heights, err) in enumerate(bars):
        published = err is None
        ax.bar(
            x + (i - (len(bars) - 1) / 2) * width,
            heights,
            width,
            yerr=err,
            capsize=3,
            label=name,
            color=f"C{i % 2}",
            hatch="//" if published else None,
            alpha=0.55 if published else 1.0,
        )
    ax.set_xticks(x, [task_labels[t] for t in tasks])
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=title)
    ax.legend(fontsize="small", ncol=len(bars), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return fig
