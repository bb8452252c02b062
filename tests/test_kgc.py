"""Golden and property tests for kalm.evaluate.kgc (the protocol of book/method.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.evaluate.kgc import Ranks, metrics, metrics_by_direction, per_relation, rank, rank_queries


def as_lists(r: Ranks) -> tuple[list[float], list[float], list[float]]:
    return r.optimistic.tolist(), r.pessimistic.tolist(), r.realistic.tolist()


def test_ties_separate_optimistic_and_pessimistic() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5]])
    # one strictly better (0.9); 0.5 three times including the gold
    assert as_lists(rank(scores, torch.tensor([0]))) == ([2.0], [4.0], [3.0])


def test_filtered_entries_are_strictly_excluded() -> None:
    scores = torch.tensor([[0.2, 0.9, 0.8, 0.3]])
    gold = torch.tensor([0])
    assert as_lists(rank(scores, gold)) == ([4.0], [4.0], [4.0])
    only_1 = torch.tensor([[False, True, False, False]])
    assert as_lists(rank(scores, gold, only_1)) == ([3.0], [3.0], [3.0])
    # A filtered tie with the gold is not counted either.
    tied = torch.tensor([[0.2, 0.2, 0.8, 0.3]])
    assert as_lists(rank(tied, gold, only_1)) == ([3.0], [3.0], [3.0])


def test_gold_inside_the_filter_mask_is_kept() -> None:
    scores = torch.tensor([[0.2, 0.9, 0.8, 0.3]])
    gold_and_1 = torch.tensor([[True, True, False, False]])
    assert as_lists(rank(scores, torch.tensor([0]), gold_and_1)) == ([3.0], [3.0], [3.0])
    everything = torch.ones(1, 4, dtype=torch.bool)
    assert as_lists(rank(scores, torch.tensor([3]), everything)) == ([1.0], [1.0], [1.0])


def test_nan_scores_raise() -> None:
    scores = torch.tensor([[0.1, 0.2], [float("nan"), 0.3]])
    with pytest.raises(ValueError, match=r"NaN scores in query rows \[1\]"):
        rank(scores, torch.tensor([0, 1]))


def test_simkgc_mode_is_not_strict() -> None:
    scores = torch.tensor([[-0.5, 0.9, -0.7, 0.2, 0.3]])
    gold = torch.tensor([0])
    known = torch.tensor([[False, True, False, False, True]])
    # strict: 0.9 and 0.3 are filtered; only 0.2 beats the gold
    assert as_lists(rank(scores, gold, known)) == ([2.0], [2.0], [2.0])
    # recipe: 0.9 - 1 = -0.1 still beats -0.5, 0.3 - 1 = -0.7 does not; 0.2 beats it too
    assert as_lists(rank(scores, gold, known, mode="simkgc")) == ([3.0], [3.0], [3.0])
    with pytest.raises(ValueError, match="mode"):
        rank(scores, gold, known, mode="raw")  # type: ignore[arg-type]


def test_pykeen_conventions_hand_example() -> None:
    """PyKEEN: optimistic = 1 + #greater, pessimistic = #greater_equal, realistic = mean.

    Filtered candidates are dropped before counting; the gold itself is never filtered.
    """
    scores = torch.tensor(
        [
            [0.3, 0.3, 0.3, 0.3],  # all tied
            [0.9, 0.1, 0.5, 0.9],  # gold 2: two greater, one filtered (3)
            [0.0, -0.2, 0.4, 0.0],  # gold 0: 0.4 is filtered, one tie (3)
        ]
    )
    gold = torch.tensor([1, 2, 0])
    filt = torch.tensor(
        [
            [False, True, False, False],  # gold's own entry: ignored
            [False, False, False, True],
            [False, False, True, False],  # the greater 0.4 is a known answer
        ]
    )
    # row 0: greater 0, greater_equal 4        -> 1, 4, 2.5
    # row 1: greater {0.9@0}, ge {0.9@0, 0.5}  -> 2, 2, 2
    # row 2: greater {}, ge {0.0@0, 0.0@3}     -> 1, 2, 1.5
    assert as_lists(rank(scores, gold, filt)) == ([1.0, 2.0, 1.0], [4.0, 2.0, 2.0], [2.5, 2.0, 1.5])


def test_metrics_hand_example() -> None:
    got = metrics(torch.tensor([1.0, 2.5, 3.5, 10.0, 20.0]))
    assert got["MR"] == pytest.approx(37.0 / 5)
    assert got["MRR"] == pytest.approx((1 + 1 / 2.5 + 1 / 3.5 + 1 / 10 + 1 / 20) / 5)
    assert got["Hits@1"] == pytest.approx(1 / 5)
    assert got["Hits@3"] == pytest.approx(2 / 5)  # 3.5 is not within 3
    assert got["Hits@10"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError):
        metrics(torch.tensor([]))


def make_ranks(values: list[float], spread: float = 0.0) -> Ranks:
    realistic = torch.tensor(values)
    return Ranks(realistic - spread, realistic + spread, realistic)


def test_metrics_by_direction_and_both() -> None:
    tail, head = make_ranks([1.0, 2.0], spread=0.0), make_ranks([4.0, 1.0], spread=0.0)
    out = metrics_by_direction(tail, head)
    assert out["tail"]["MRR"] == pytest.approx(0.75)
    assert out["head"]["MRR"] == pytest.approx(0.625)
    assert out["both"]["MRR"] == pytest.approx((0.75 + 0.625) / 2)
    assert out["both"]["MR"] == pytest.approx(2.0)
    assert out["both"]["count"] == 4
    # unequal counts: "both" pools all queries
    out = metrics_by_direction(make_ranks([1.0]), make_ranks([2.0, 4.0]))
    assert out["both"]["MRR"] == pytest.approx((1 + 0.5 + 0.25) / 3)


def test_metrics_by_direction_report_optimistic_and_pessimistic_mrr() -> None:
    ranks = Ranks(torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0]))
    out = metrics_by_direction(ranks, ranks)["tail"]
    assert out["MRR"] == pytest.approx(0.5)
    assert out["MRR_optimistic"] == pytest.approx(1.0)
    assert out["MRR_pessimistic"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("mode", ["strict", "simkgc"])
@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_chunked_ranking_equals_unchunked(chunk_size: int, mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    queries, entities = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)
    gold = torch.randint(0, 50, (37,), generator=g)
    known = torch.rand(37, 50, generator=g) < 0.2
    got = rank_queries(
        queries,
        entities,
        gold,
        lambda s: known[s],
        chunk_size=chunk_size,
        mode=mode,
        progress=False,
    )
    full = F.normalize(queries, dim=-1) @ F.normalize(entities, dim=-1).T
    want = rank(full, gold, known, mode=mode)
    assert len(got) == 37
    for a, b in zip(as_lists(got), as_lists(want), strict=True):
        assert a == b


def test_rank_queries_casts_bf16_to_fp32() -> None:
    entities = torch.eye(3, dtype=torch.bfloat16)
    queries = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.bfloat16)
    got = rank_queries(queries, entities, torch.tensor([1]), progress=False)
    assert as_lists(got) == ([2.0], [2.0], [2.0])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 12),
    seed=st.integers(0, 10_000),
    levels=st.integers(2, 5),
)
def test_strict_filter_equals_deleting_the_filtered_columns(n: int, seed: int, levels: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (1, n), generator=g).float() / levels  # many ties
    gold = torch.randint(0, n, (1,), generator=g)
    known = torch.rand(1, n, generator=g) < 0.4
    got = rank(scores, gold, known)
    keep = ~known[0]
    keep[gold] = True
    kept_gold = int(keep[: gold.item()].sum())
    want = rank(scores[:, keep], torch.tensor([kept_gold]))
    assert as_lists(got) == as_lists(want)
    assert got.optimistic.item() <= got.realistic.item() <= got.pessimistic.item()
    # permuting the candidates leaves the ranks unchanged
    perm = torch.randperm(n, generator=g)
    inverse = torch.argsort(perm)
    permuted = rank(scores[:, perm], inverse[gold], known[:, perm])
    assert as_lists(permuted) == as_lists(got)


def test_per_relation_hand_example() -> None:
    df = per_relation(
        torch.tensor([1.0, 2.0, 4.0]),
        torch.tensor([1.0, 1.0, 10.0]),
        torch.tensor([0, 1, 0]),
        ["a", "b"],
    )
    table = df.set_index(["relation", "direction"])
    assert table.loc[("a", "tail")].tolist() == pytest.approx([2, 0.625, 1.0])
    assert table.loc[("b", "tail")].tolist() == pytest.approx([1, 0.5, 1.0])
    assert table.loc[("a", "head")].tolist() == pytest.approx([2, 0.55, 1.0])  # 10 <= 10
    assert table.loc[("b", "head")].tolist() == pytest.approx([1, 1.0, 1.0])
    assert list(df.columns) == ["relation", "direction", "count", "MRR", "Hits@10"]


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        rank(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="filter_mask"):
        rank(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2).bool())
    with pytest.raises(ValueError, match="entity_emb"):
        rank_queries(torch.zeros(2, 3), torch.zeros(4, 5), torch.zeros(2, dtype=torch.long))
