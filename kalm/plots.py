"""Figure helpers with one consistent style, so every figure of the book looks alike."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

PALETTE = "colorblind"
"""Seaborn palette used for every categorical colour in the book."""

HEATMAP_CMAP = "rocket_r"
"""Sequential colour map for similarity matrices (dark = similar)."""


def set_style() -> None:
    """Apply the book's plotting style: seaborn whitegrid, notebook context, fixed palette."""
    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "savefig.bbox": "tight"})


LARGE_TEXT_SCALE = 1.3
"""Font scale of charts read at a glance from a distance (accuracy bars, ablation bars)."""


def large_text() -> AbstractContextManager[None]:
    """Context in which figures are drawn with larger text (``with plots.large_text(): ...``).

    Why: grouped bar charts carry their message in tick labels, legend and values; at the
    notebook's default size these were too small to read on the page.
    """
    return sns.plotting_context("notebook", font_scale=LARGE_TEXT_SCALE)


def wrap_labels(labels: Sequence[str], width: int = 28) -> list[str]:
    """Break long tick labels (e.g. FB15k-237 relation paths) into lines of at most `width`.

    Words longer than `width`, such as ``/people/person/nationality``, are split at slashes,
    dots and underscores first, so that a line break falls between path components.
    """
    return [_wrap_label(str(label), width) for label in labels]


def _wrap_label(label: str, width: int) -> str:
    # Pieces end after a space or a path separator; a line takes pieces while they fit.
    pieces = [p for p in re.split(r"(?<=[ /._])", label) if p]
    lines, line = [], ""
    for piece in pieces:
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        while len(piece) > width:  # a single piece longer than a line is cut
            lines.append(piece[:width])
            piece = piece[width:]
        line += piece
    lines.append(line.rstrip())
    return "\n".join(lines)


def legend_outside(ax: Axes, *, title: str | None = None) -> None:
    """Move the axes' legend to the right of the plot area, where it cannot cover any bar."""
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(
            handles,
            labels,
            title=title,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            frameon=False,
        )


def smoothing_window(n: int) -> int:
    """Default rolling-mean window of a training log of `n` steps: a twentieth of the run."""
    return max(1, n // 20)


def smoothed(values: pd.Series, window: int | None = None) -> pd.Series:
    """Rolling mean over `window` steps (default :func:`smoothing_window`), as drawn by
    :func:`loss_curves`; the first values average the steps seen so far."""
    return values.rolling(window or smoothing_window(len(values)), min_periods=1).mean()


def loss_curves(
    log: pd.DataFrame,
    panels: Mapping[str, str],
    *,
    step: str = "step",
    window: int | None = None,
) -> Figure:
    """One panel per loss column of a training log: the raw per-step loss and its rolling mean.

    `panels` maps a column of `log` to its panel title. The raw values are noisy (one batch per
    step), so the smoothed curve, a rolling mean over `window` steps (default: a twentieth of
    the run), is what the eye should follow; both are in the legend.
    """
    missing = sorted({step, *panels} - set(log.columns))
    if missing:
        raise ValueError(
            f"loss_curves: the log lacks the columns {missing}; it has {list(log.columns)}"
        )
    window = window or smoothing_window(len(log))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 3.4), layout="constrained", squeeze=False
    )
    for ax, (column, title) in zip(axes[0], panels.items(), strict=True):
        ax.plot(log[step], log[column], alpha=0.3, color="C0", label="per step (raw)")
        smooth = smoothed(log[column], window)
        ax.plot(log[step], smooth, color="C0", lw=2, label=f"rolling mean of {window} steps")
        ax.set(xlabel="optimiser step", ylabel=f"{column} (loss)", title=title)
        ax.legend(fontsize="small")
    return fig


def arm_curves(
    logs: Mapping[str, pd.DataFrame],
    panels: Mapping[str, str],
    *,
    step: str = "step",
    ylabels: Mapping[str, str] | None = None,
) -> Figure:
    """The training logs of a study's arms side by side: one panel per column of `panels`
    (column -> title), one smoothed curve per arm (rolling mean over a twentieth of the run).

    An arm whose log lacks a column (self-negative diagnostics of an arm without them) is left
    out of that panel.
    """
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 3.4), layout="constrained", squeeze=False
    )
    for ax, (column, title) in zip(axes[0], panels.items(), strict=True):
        for i, (arm, log) in enumerate(logs.items()):
            if column in log.columns and log[column].notna().any():
                ax.plot(log[step], smoothed(log[column]), color=f"C{i}", lw=2, label=arm)
        ylabel = (ylabels or {}).get(column, column)
        ax.set(xlabel="optimiser step", ylabel=ylabel, title=title)
    legend_outside(axes[0][-1], title="arm")
    return fig


def tradeoff_plot(
    table: pd.DataFrame, *, x: str, y: str, limit: float | None = None, limit_label: str = ""
) -> Figure:
    """One labelled point per row of `table` (index = label): `y` against `x`, e.g. validation
    MRR against perplexity relative to the untuned model, with an optional vertical `limit`."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8), layout="constrained")
    ax.scatter(table[x], table[y], s=60, color="C0", zorder=3)
    for label, row in table.iterrows():
        ax.annotate(
            str(label), (row[x], row[y]), xytext=(6, 4), textcoords="offset points", fontsize=9
        )
    if limit is not None:
        ax.axvline(limit, color="grey", ls="--", lw=1, label=limit_label or None)
        if limit_label:
            ax.legend(fontsize="small", loc="lower right")
    ax.set(xlabel=x, ylabel=y)
    ax.margins(0.2)
    return fig


def barh_chart(
    data: pd.DataFrame,
    *,
    value: str,
    label: str,
    hue: str | None = None,
    order: Sequence[str] | None = None,
    xlabel: str | None = None,
    wrap: int = 28,
) -> Figure:
    """Horizontal bars for categories with long names (e.g. per-relation MRR).

    Labels are wrapped to `wrap` characters, the figure grows with the number of categories
    and label lines, and the legend sits outside the bars.
    """
    missing = sorted({value, label, *([hue] if hue else [])} - set(data.columns))
    if missing:
        raise ValueError(
            f"barh_chart: `data` lacks the columns {missing}; it has {list(data.columns)}"
        )
    order = list(order) if order is not None else list(dict.fromkeys(data[label]))
    labels = wrap_labels(order, wrap)
    lines = sum(text.count("\n") + 1 for text in labels)
    n_hue = data[hue].nunique() if hue else 1
    height = 1.0 + 0.22 * max(lines, len(order) * n_hue * 0.8)
    fig, ax = plt.subplots(figsize=(8.0, height), layout="constrained")
    sns.barplot(data, y=label, x=value, hue=hue, order=order, orient="y", ax=ax)
    ax.set_yticks(range(len(order)), labels)
    ax.set(xlabel=xlabel or value, ylabel="")
    if hue:
        legend_outside(ax, title=hue)
    return fig


def rank_histogram(ranks: pd.DataFrame, num_candidates: int, *, bins: int = 30) -> Figure:
    """Share of queries per (log-spaced) rank of the gold entity, one step line per model.

    `ranks` needs the columns ``rank`` and ``model``; each model is normalised on its own, so
    models with equally many queries compare directly.
    """
    missing = sorted({"rank", "model"} - set(ranks.columns))
    if missing:
        raise ValueError(f"rank_histogram: `ranks` lacks the columns {missing}")
    fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    edges = np.logspace(0, np.log10(num_candidates + 1), bins)
    sns.histplot(
        ranks,
        x="rank",
        hue="model",
        bins=edges,
        element="step",
        stat="proportion",
        common_norm=False,
        ax=ax,
    )
    ax.set(
        xscale="log",
        xlabel="rank of the gold entity (realistic, log scale)",
        ylabel="share of queries",
    )
    legend_outside(ax, title="model")
    return fig


def metric_bars(table: pd.DataFrame, metrics: Sequence[str], *, ylabel: str) -> Figure:
    """Grouped bars: one group per metric (x), one bar per row of `table` (the arms compared),
    the legend outside the bars. Draw inside :func:`large_text` for a page figure."""
    missing = sorted(set(metrics) - set(table.columns))
    if missing:
        raise ValueError(f"metric_bars: `table` lacks the columns {missing}")
    arm = table.index.name or "arm"
    long = (
        table[list(metrics)]
        .rename_axis(arm)
        .reset_index()
        .melt(id_vars=arm, var_name="metric", value_name="value")
    )
    fig, ax = plt.subplots(figsize=(7.5, 3.4), layout="constrained")
    sns.barplot(long, x="metric", y="value", hue=arm, ax=ax)
    ax.set(ylabel=ylabel, xlabel="")
    legend_outside(ax, title=arm)
    return fig


def value_bars(
    values: Mapping[str, float], *, ylabel: str, title: str, fmt: str = "{:.1f}"
) -> Figure:
    """One bar per named value, each annotated with its value (e.g. perplexity per model)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2), layout="constrained")
    names = list(values)
    ax.bar(names, [values[n] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax.set(ylabel=ylabel, title=title)
    for i, name in enumerate(names):
        ax.annotate(fmt.format(values[name]), (i, values[name]), ha="center", va="bottom")
    return fig


def convergence_plot(gaps: Mapping[str, pd.DataFrame], *, reference: str) -> Figure:
    """The absolute gap to a limit against the sample size N (log-log), with 2-standard-error
    bars.

    Each table of `gaps` (one per legend label) needs the columns ``N``, ``gap`` and
    ``stderr``; a dashed ``∝ 1/N`` line through the first point of `reference` shows the
    predicted rate.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for label, table in gaps.items():
        ax.errorbar(
            table["N"],
            table["gap"].abs(),
            yerr=2 * table["stderr"],
            marker="o",
            capsize=3,
            label=label,
        )
    first = gaps[reference]
    ns = first["N"].to_numpy()
    ax.plot(ns, abs(first["gap"].iloc[0]) * ns[0] / ns, ls="--", color="grey", label="∝ 1/N")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="negatives N",
        ylabel="|E[ℓ_N] − log N − limit|",
        title="Theorem 1: gap to the limit",
    )
    ax.legend()
    return fig


def descent_plot(descent: pd.DataFrame) -> Figure:
    """Loss (left, log scale) and geometry (right) along gradient descent on the explicit
    loss: mean similarity, scaled top singular value and top component share per step."""
    fig, (ax_loss, ax_geo) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    ax_loss.plot(descent["step"], descent["loss"])
    ax_loss.set(xlabel="step", ylabel="explicit loss", yscale="log", title="loss")
    for column, label, style in (
        ("mean_similarity", "Sum(W) / n²", "-"),
        ("top_singular_value", "σ_max(W) / n", "--"),
        ("top_share", "top component share", ":"),
    ):
        ax_geo.plot(descent["step"], descent[column], ls=style, lw=2, label=label)
    ax_geo.set(xlabel="step", ylabel="value", title="geometry")
    ax_geo.legend()
    return fig


def similarity_heatmaps(
    mats: Mapping[str, np.ndarray],
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    cmap: str = HEATMAP_CMAP,
    suptitle: str | None = None,
    panel_size: float = 3.4,
    xlabel: str = "column j",
    ylabel: str = "row i",
) -> Figure:
    """Side-by-side heatmaps of similarity matrices sharing ONE colour scale and ONE colorbar.

    A shared scale is what makes "base vs aligned" panels comparable at a glance; the keys of
    `mats` are the panel titles. `xlabel` and `ylabel` name what the columns and rows are
    (e.g. "tail view t_j" and "head–relation view hr_i"); the y label is on the first panel.
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
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel if i == 0 else "")
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
