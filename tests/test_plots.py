"""Figure helpers: labelled axes, legends that name what is drawn, readable long labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from kalm import plots

RELATIONS = [
    "/film/actor/film./film/performance/film",
    "/people/person/nationality",
    "/location/location/contains",
    "hypernym",
]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_loss_curves_label_both_axes_and_name_raw_and_smoothed() -> None:
    rng = np.random.default_rng(0)
    log = pd.DataFrame({"step": range(40), "L_exp": rng.random(40), "L_imp": rng.random(40)})
    fig = plots.loss_curves(log, {"L_exp": "explicit", "L_imp": "implicit"})
    assert len(fig.axes) == 2
    for ax, column in zip(fig.axes, ("L_exp", "L_imp"), strict=True):
        assert ax.get_xlabel() == "optimiser step"
        assert column in ax.get_ylabel()
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["per step (raw)", "rolling mean of 2 steps"]
        smoothed = ax.get_lines()[1].get_ydata()
        assert np.isclose(smoothed[1], log[column].iloc[:2].mean())


def test_loss_curves_names_missing_columns() -> None:
    with pytest.raises(ValueError, match=r"\['L_imp'\]"):
        plots.loss_curves(pd.DataFrame({"step": [0], "L_exp": [1.0]}), {"L_imp": "implicit"})


def test_heatmaps_have_axis_labels() -> None:
    mats = {"untuned": np.eye(4), "KaLM": np.ones((4, 4))}
    fig = plots.similarity_heatmaps(mats, xlabel="tail view", ylabel="head–relation view")
    first, second = fig.axes[1], fig.axes[2]  # fig.axes[0] is the colorbar
    assert (first.get_xlabel(), first.get_ylabel()) == ("tail view", "head–relation view")
    assert (second.get_xlabel(), second.get_ylabel()) == ("tail view", "")
    assert [ax.get_title() for ax in fig.axes[1:]] == ["untuned", "KaLM"]
    assert fig.axes[0].get_ylabel() == "cosine similarity"
    plain = plots.similarity_heatmaps(mats)  # the former call keeps working, labelled generically
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in plain.axes[1:]]
    assert labels == [("column j", "row i"), ("column j", "")]


def test_wrap_labels_breaks_relation_paths_between_components() -> None:
    wrapped = plots.wrap_labels([RELATIONS[0], "hypernym", "x" * 30], width=20)
    assert wrapped[0] == "/film/actor/film./\nfilm/performance/\nfilm"
    assert wrapped[1] == "hypernym"
    assert all(len(line) <= 20 for text in wrapped for line in text.split("\n"))


def test_barh_chart_is_horizontal_with_legend_outside_the_bars() -> None:
    data = pd.DataFrame(
        {"relation": RELATIONS * 2, "direction": ["tail"] * 4 + ["head"] * 4, "MRR": 0.5}
    )
    fig = plots.barh_chart(data, value="MRR", label="relation", hue="direction", wrap=20)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "MRR"
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == plots.wrap_labels(RELATIONS, 20)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1, "the legend overlaps the bars"


def test_large_text_scales_fonts() -> None:
    plots.set_style()
    normal = plt.rcParams["axes.labelsize"]
    with plots.large_text():
        assert plt.rcParams["axes.labelsize"] == pytest.approx(normal * plots.LARGE_TEXT_SCALE)
    assert plt.rcParams["axes.labelsize"] == normal


def test_smoothed_is_the_rolling_mean_that_loss_curves_draws() -> None:
    values = pd.Series([4.0, 2.0, 0.0, 2.0])
    assert list(plots.smoothed(values, 2)) == [4.0, 3.0, 1.0, 1.0]
    log = pd.DataFrame({"step": range(4), "L_imp": values})
    fig = plots.loss_curves(log, {"L_imp": "implicit"}, window=2)
    drawn = fig.axes[0].get_lines()[1].get_ydata()
    assert list(drawn) == list(plots.smoothed(values, 2))


def test_rank_histogram_and_metric_bars_label_axes_and_put_legend_outside() -> None:
    ranks = pd.DataFrame({"rank": [1, 5, 50, 2, 3, 900], "model": ["a"] * 3 + ["b"] * 3})
    ax = plots.rank_histogram(ranks, 1000).axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "share of queries"
    table = pd.DataFrame(
        {"MRR": [0.1, 0.2], "Hits@1": [0.0, 0.1]}, index=pd.Index(["off", "on"], name="arm")
    )
    ax = plots.metric_bars(table, ["MRR", "Hits@1"], ylabel="validation").axes[0]
    legend = ax.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1
    assert [t.get_text() for t in legend.get_texts()] == ["off", "on"]
    with pytest.raises(ValueError, match="lacks"):
        plots.metric_bars(table, ["MR"], ylabel="x")
