"""Hand-computed values and invariances of kalm.analysis, and the shared figure helpers."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from matplotlib.container import ErrorbarContainer

from kalm import analysis, plots
from kalm.data import KnowledgeGraph
from kalm.encoder import Encoder, encode_texts
from kalm.views import ViewBuilder

finite = st.floats(-3, 3, allow_nan=False, width=32)


def nonzero_rows(min_n: int = 2, max_n: int = 8, d: int = 4):
    """(n, d) arrays whose rows all have a direction."""
    return st.integers(min_n, max_n).flatmap(
        lambda n: arrays(np.float32, (n, d), elements=finite).filter(
            lambda a: bool(np.all(np.linalg.norm(a, axis=1) > 1e-2))
        )
    )


def test_cosine_matrix_hand_value_and_scale_invariance():
    a = np.array([[2.0, 0.0], [0.0, -3.0]])
    b = np.array([[1.0, 1.0]])
    np.testing.assert_allclose(
        analysis.cosine_matrix(a, b), [[1 / math.sqrt(2)], [-1 / math.sqrt(2)]], rtol=1e-6
    )


def test_orthonormal_vectors():
    x = np.eye(5)
    assert analysis.anisotropy(x) == pytest.approx(0.0)
    # every distinct pair is at squared distance 2 -> log exp(-2t)
    assert analysis.uniformity(x, t=2) == pytest.approx(-4.0)
    assert analysis.uniformity(x, t=0.5) == pytest.approx(-1.0)
    np.testing.assert_allclose(analysis.spectrum(x), np.ones(5))
    assert analysis.top_component_share(x) == pytest.approx(1 / 5)
    shifted = np.roll(x, 1, axis=0)  # pairs e_i with another basis vector: squared distance 2
    assert analysis.alignment(x, shifted) == pytest.approx(2.0)
    assert analysis.alignment(x, shifted, alpha=1) == pytest.approx(math.sqrt(2))


def test_identical_vectors():
    x = np.tile([[0.6, 0.8, 0.0]], (4, 1))
    assert analysis.anisotropy(x) == pytest.approx(1.0)
    assert analysis.alignment(x, 3 * x) == pytest.approx(0.0, abs=1e-12)
    assert analysis.uniformity(x) == pytest.approx(0.0, abs=1e-6)
    assert analysis.top_component_share(x) == pytest.approx(1.0)


def test_uniformity_known_configuration():
    # e1, e1, e2: squared distances 0, 2, 2 over the three distinct pairs
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    expected = math.log((1 + 2 * math.exp(-4.0)) / 3)
    assert analysis.uniformity(x, t=2) == pytest.approx(expected, rel=1e-6)
    # antipodal pair: squared distance 4
    assert analysis.uniformity(np.array([[0.0, 1.0], [0.0, -1.0]]), t=2) == pytest.approx(-8.0)


def test_rank_one_matrix_has_top_share_one():
    v = np.array([1.0, -2.0, 0.5, 3.0])
    x = np.outer([1.0, -2.0, 0.3, 5.0], v)  # rows are +- multiples of v
    assert analysis.top_component_share(x) == pytest.approx(1.0)
    s = analysis.spectrum(x)
    assert s[0] == pytest.approx(2.0)  # four unit rows on one line: s1^2 = 4
    np.testing.assert_allclose(s[1:], 0.0, atol=1e-6)


def test_diagonal_gap_hand_value():
    sim = np.array([[1.0, 0.2], [0.4, 0.8]])
    assert analysis.diagonal_gap(sim) == pytest.approx(0.9 - 0.3)


def test_accepts_torch_tensors():
    x = torch.eye(3, requires_grad=True)
    assert analysis.anisotropy(x) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: analysis.anisotropy(np.array([[1.0, 0.0], [0.0, 0.0]])), "all-zero"),
        (lambda: analysis.anisotropy(np.ones(3)), r"\(n, d\) matrix"),
        (lambda: analysis.diagonal_gap(np.ones((2, 3))), "square"),
        (lambda: analysis.alignment(np.eye(3), np.eye(2)), "row-paired"),
        (lambda: analysis.cosine_matrix(np.eye(3), np.eye(2)), "dimension"),
    ],
)
def test_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@settings(max_examples=40, deadline=None)
@given(nonzero_rows())
def test_invariances_and_bounds(x):
    n = x.shape[0]
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
    scaled = x * rng.uniform(0.5, 2.0, size=(n, 1)).astype(np.float32)
    perm = rng.permutation(n)
    for f in (analysis.anisotropy, analysis.uniformity, analysis.top_component_share):
        base = f(x)
        assert f(x @ q) == pytest.approx(base, abs=1e-4)  # rotation
        assert f(scaled) == pytest.approx(base, abs=1e-4)  # row scale
        assert f(x[perm]) == pytest.approx(base, abs=1e-4)  # order
    assert -1 / (n - 1) - 1e-5 <= analysis.anisotropy(x) <= 1 + 1e-5
    assert -8 - 1e-5 <= analysis.uniformity(x) <= 1e-5  # squared distances lie in [0, 4]
    # the top share bounds the mean Gram entry (diagonal included) from above
    gram_mean = (analysis.anisotropy(x) * (n - 1) + 1) / n
    assert analysis.top_component_share(x) >= gram_mean - 1e-5


def test_summary_is_consistent():
    rng = np.random.default_rng(1)
    hr = rng.normal(size=(10, 6))
    t = hr + 0.1 * rng.normal(size=(10, 6))
    out = analysis.summary(hr, t)
    assert out["alignment"] == pytest.approx(analysis.alignment(hr, t))
    assert out["anisotropy_t"] == pytest.approx(analysis.anisotropy(t))
    assert out["diagonal_gap"] > 0.5  # near-copies stand out from the other rows
    assert all(isinstance(v, float) for v in out.values())


def test_similarity_heatmaps_share_one_scale():
    rng = np.random.default_rng(0)
    mats = {
        "base": analysis.cosine_matrix(rng.normal(size=(6, 3)), rng.normal(size=(6, 3))),
        "tuned": np.eye(6),
    }
    fig = plots.similarity_heatmaps(mats, vmin=-0.5, vmax=1.0)
    heat_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in heat_axes] == ["base", "tuned"]
    assert len(fig.axes) == 3  # two panels + one colorbar
    assert all(ax.collections[0].get_clim() == (-0.5, 1.0) for ax in heat_axes)
    plt.close(fig)
    with pytest.raises(ValueError, match="empty"):
        plots.similarity_heatmaps({})
    fig = plots.spectrum_plot({"base": analysis.spectrum(rng.normal(size=(8, 4)))})
    assert fig.axes[0].get_yscale() == "log"
    plt.close(fig)


def test_alignment_uniformity_plot_one_marker_per_row():
    points = pd.DataFrame(
        {
            "model": ["untuned", "untuned", "KaLM", "KaLM"],
            "view": ["hr", "t", "hr", "t"],
            "alignment": [1.2, 1.2, 0.4, 0.4],
            "uniformity": [-0.5, -0.7, -2.0, -2.5],
        }
    )
    fig = plots.alignment_uniformity_plot(points)
    offsets = np.concatenate([c.get_offsets() for c in fig.axes[0].collections])
    assert sorted(map(tuple, offsets.tolist())) == sorted(
        zip(points["alignment"], points["uniformity"], strict=True)
    )
    plt.close(fig)
    with pytest.raises(ValueError, match=r"lacks the columns \['view'\]"):
        plots.alignment_uniformity_plot(points.drop(columns="view"))


def test_kgqa_accuracy_plot_draws_every_bar_with_intervals_for_measurements():
    tasks = {"head": "head prediction", "tail": "tail prediction"}
    paper = {"paper": pd.Series({"tail": 40.0, "head": 20.0})}
    summary = pd.DataFrame(
        {"lenient": [0.5, 0.25], "lenient_lo": [0.3, 0.1], "lenient_hi": [0.7, 0.5]},
        index=pd.Index(["head", "tail"], name="task"),
    )
    fig = plots.kgqa_accuracy_plot(paper, {"ours": summary}, tasks, title="KGQA")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [20.0, 40.0, 50.0, 25.0]  # paper bars first, tasks in the given order
    assert [t.get_text() for t in ax.get_xticklabels()] == list(tasks.values())
    errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(errorbars) == 1  # error bars on the measurements only
    assert ax.get_title() == "KGQA"
    plt.close(fig)


def test_stats_sample_size():
    assert analysis.stats_sample_size(0, 8) == 8
    assert analysis.stats_sample_size(512, 32) == 512
    assert analysis.stats_sample_size(512, 1000) == 1000


def test_statistics_adds_view_means_and_sentence_geometry():
    rng = np.random.default_rng(0)
    hr, t, wiki = (rng.normal(size=(12, 6)) for _ in range(3))
    stats = analysis.statistics(hr, t, wiki)
    assert stats.items() >= analysis.summary(hr, t).items()
    assert stats["anisotropy"] == pytest.approx(
        (stats["anisotropy_hr"] + stats["anisotropy_t"]) / 2
    )
    assert stats["uniformity"] == pytest.approx(
        (stats["uniformity_hr"] + stats["uniformity_t"]) / 2
    )
    assert stats["top_share"] == pytest.approx((stats["top_share_hr"] + stats["top_share_t"]) / 2)
    assert stats["anisotropy_wiki"] == pytest.approx(analysis.anisotropy(wiki))
    assert stats["top_share_wiki"] == pytest.approx(analysis.top_component_share(wiki))


def test_shared_scale_spans_every_matrix():
    mats = {"a": np.array([[0.2, -0.5]]), "b": np.array([[0.9, 0.1]])}
    assert analysis.shared_scale(mats) == (-0.5, 0.9)
    with pytest.raises(ValueError, match="no matrices"):
        analysis.shared_scale({})


def test_check_similarities_rejects_bad_matrices():
    x = np.random.default_rng(1).normal(size=(5, 4))
    good = analysis.cosine_matrix(x, x)
    analysis.check_similarities({"ok": good}, 5, self_similarity=True)
    with pytest.raises(ValueError, match=r"bad: shape \(5, 5\), expected \(4, 4\)"):
        analysis.check_similarities({"bad": good}, 4, self_similarity=False)
    with pytest.raises(ValueError, match="non-finite"):
        analysis.check_similarities({"nan": np.full((5, 5), np.nan)}, 5, self_similarity=False)
    with pytest.raises(ValueError, match=r"\|cosine\|"):
        analysis.check_similarities({"big": good * 2}, 5, self_similarity=False)
    with pytest.raises(ValueError, match="diagonal"):
        analysis.check_similarities({"half": good / 2}, 5, self_similarity=True)
    analysis.check_similarities({"cross": good / 2}, 5, self_similarity=False)


@pytest.fixture(scope="module")
def tiny_views() -> tuple[torch.nn.Module, ViewBuilder]:
    """A one-layer random Llama over a word-level vocabulary, and a 4-entity graph."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[", "]", "{", "}", ",", "<pad>", "cat", "dog", "animal", "pet", "a", "small"]
    words += ["one", "hypernym", "similar", "to"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>")
    no_triples = np.zeros((0, 3), dtype=np.int64)
    kg = KnowledgeGraph(
        name="tiny",
        entity_ids=("0", "1", "2", "3"),
        entity_names=("cat", "dog", "animal", "pet"),
        entity_descriptions=("a small one", "", "", "a small animal"),
        relation_ids=("_hypernym", "_similar_to"),
        relation_texts=("hypernym", "similar to"),
        inverse_relation_texts=("hypernym", "similar to"),
        train=no_triples,
        valid=no_triples,
        test=no_triples,
    )
    model = tiny_llama(len(words), layers=1, pad_token_id=words.index("<pad>"))
    return model, ViewBuilder(kg, tokenizer, max_entity_tokens=8)


def test_triple_embeddings_pairs_rows_with_triples(tiny_views):
    model, views = tiny_views
    triples = np.array([[0, 0, 2], [3, 1, 1], [1, 2, 0], [2, 3, 3]])
    encoder = Encoder(model, views)
    hr, t = analysis.triple_embeddings(encoder, triples, batch_size=2, progress=False)
    assert hr.shape == t.shape == (4, 16)
    torch.testing.assert_close(hr.norm(dim=1), torch.ones(4))
    # row i is the encoding of triple i's own view texts, whatever order the encoder batches in
    texts_hr = [views.hr_text(h, r) for h, r, _ in triples]
    texts_t = [views.tail_text(e) for e in triples[:, 2]]
    torch.testing.assert_close(
        hr, encode_texts(model, views.tokenizer, texts_hr), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(t, encoder.encode_texts(texts_t), atol=1e-5, rtol=0)
    assert not torch.allclose(hr[0], hr[1])  # different texts, different embeddings
    perm = [2, 0, 3, 1]
    hr_p, t_p = analysis.triple_embeddings(encoder, triples[perm], progress=False)
    torch.testing.assert_close(hr_p, hr[perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(t_p, t[perm], atol=1e-5, rtol=0)


def test_triple_embeddings_rejects_non_triples(tiny_views):
    model, views = tiny_views
    with pytest.raises(ValueError, match=r"\(n, 3\).*\(2, 2\)"):
        analysis.triple_embeddings(Encoder(model, views), np.zeros((2, 2), dtype=np.int64))
