"""kalm.evaluate.protocol: query sampling, candidates, the cached entity index, filtered ranking.

The golden test replaces the encoder by hand-made embeddings whose ranks are known; the tiny
random Llama checks the real path end to end (shapes, rank bounds, caching).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ANIMALS, smollm2_tokenizer, tiny_llama, toy_kg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kalm.encoder as encoder_module
from kalm.config import resolve
from kalm.data import KnowledgeGraph, sample_triples
from kalm.encoder import Encoder
from kalm.evaluate.protocol import (
    candidate_set,
    entity_index,
    evaluate_kgc,
    query_entity_effect,
)
from kalm.runs import Run
from kalm.views import ViewBuilder

EATS, RESEMBLES = 0, 1
TEST = [(0, EATS, 1), (2, EATS, 3), (4, EATS, 5)]  # dog eats cat, wolf eats lion, horse eats zebra
TRAIN = [(2, EATS, 6), (1, RESEMBLES, 3), (3, RESEMBLES, 1)]  # wolf also eats eagle
VALID = [(7, RESEMBLES, 6)]


def unit(weights: dict[int, float]) -> torch.Tensor:
    v = torch.zeros(len(ANIMALS))
    for k, w in weights.items():
        v[k] = w
    return F.normalize(v, dim=0)


# Query view -> embedding. Entity k's tail view is the k-th basis vector: cosines are the weights.
QUERIES = {
    "[ dog, eats ]": unit({1: 1.0}),  # gold cat first: rank 1
    "[ wolf, eats ]": unit({3: 0.6, 6: 0.8}),  # eagle beats lion but is a known answer: rank 1
    "[ horse, eats ]": unit({5: 0.6, 7: 0.8}),  # salmon beats zebra: rank 2
    "[ cat, eaten by ]": unit({0: 1.0}),  # rank 1
    "[ lion, eaten by ]": unit({2: 1.0, 5: 1.0}),  # tie with zebra: ranks 1 / 2, realistic 1.5
    "[ zebra, eaten by ]": unit({0: 0.8, 1: 0.5, 4: 0.3}),  # dog and cat ahead: rank 3
}


def fake_encoder(tokenizer: object, calls: list[str]):
    """Stands in for ``encode_ids``: decodes each view and looks its embedding up."""

    def encode_ids(
        model: object, token_ids: Sequence[Sequence[int]], *, desc: str = "", **_: object
    ) -> torch.Tensor:
        calls.append(desc)
        rows = []
        for ids in token_ids:
            text = tokenizer.decode(ids)
            if text.startswith("{"):
                rows.append(unit({ANIMALS.index(text[2:-2]): 1.0}))
            else:
                rows.append(QUERIES[text])
        return torch.stack(rows)

    return encode_ids


def encoder(model: object, tokenizer: object, kg: KnowledgeGraph, cfg: object) -> Encoder:
    """The encoder of ``model`` as a notebook builds it (views and precision from ``cfg``)."""
    return Encoder.from_config(model, ViewBuilder.from_config(kg, tokenizer, cfg), cfg)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return tiny_llama(len(smollm2_tokenizer()))


@pytest.fixture
def smoke_all():
    """The smoke profile, but every test triple and every entity (the graph is tiny)."""
    return resolve(profile="smoke", test_queries=0, valid_queries=0, candidates=0)


def test_golden_ranks_with_hand_made_embeddings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smoke_all, tiny: torch.nn.Module
) -> None:
    tokenizer = smollm2_tokenizer()
    calls: list[str] = []
    monkeypatch.setattr(encoder_module, "encode_ids", fake_encoder(tokenizer, calls))
    kg = toy_kg(TRAIN, VALID, TEST)
    result = evaluate_kgc(
        encoder(tiny, tokenizer, kg, smoke_all), smoke_all, Run(tmp_path), progress=False
    )
    assert result.tail.realistic.tolist() == [1.0, 1.0, 2.0]
    assert result.head.optimistic.tolist() == [1.0, 1.0, 3.0]
    assert result.head.pessimistic.tolist() == [1.0, 2.0, 3.0]
    assert result.head.realistic.tolist() == [1.0, 1.5, 3.0]
    both = result.table_row()
    assert both["MRR"] == pytest.approx((1 + 1 + 1 / 2 + 1 + 1 / 1.5 + 1 / 3) / 6)
    assert both["MR"] == pytest.approx(9.5 / 6)
    assert both["Hits@1"] == pytest.approx(3 / 6) and both["Hits@3"] == 1.0
    assert result.summary["head"]["MRR_optimistic"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert result.num_candidates == len(ANIMALS)
    rows = result.per_relation.set_index("direction")
    assert rows.loc["tail", "relation"] == "eats" and rows.loc["tail", "count"] == 3
    assert rows.loc["tail", "MRR"] == pytest.approx(2.5 / 3)
    assert calls == ["entity index", "tail queries", "head queries"]
    assert result.as_dict()["num_queries"] == 3


def test_validation_is_filtered_without_test_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smoke_all, tiny: torch.nn.Module
) -> None:
    """Tuning on validation never sees the test set: a test answer is not filtered there."""
    tokenizer = smollm2_tokenizer()
    monkeypatch.setattr(encoder_module, "encode_ids", fake_encoder(tokenizer, []))
    # wolf eats lion (validation) and eagle (test); eagle scores 0.8, lion 0.6
    kg = toy_kg([(1, RESEMBLES, 3)], [(2, EATS, 3)], [(2, EATS, 6)])
    run = Run(tmp_path)
    valid = evaluate_kgc(
        encoder(tiny, tokenizer, kg, smoke_all), smoke_all, run, split="valid", progress=False
    )
    assert valid.tail.realistic.tolist() == [2.0]  # eagle, a test answer, still competes
    kg_test = toy_kg([(1, RESEMBLES, 3)], [(2, EATS, 6)], [(2, EATS, 3)])
    test = evaluate_kgc(
        encoder(tiny, tokenizer, kg_test, smoke_all), smoke_all, run, progress=False
    )
    assert test.tail.realistic.tolist() == [1.0]  # on test, the validation answer is filtered


def test_recipe_filter_mode_lets_a_known_answer_compete(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smoke_all, tiny: torch.nn.Module
) -> None:
    """ "simkgc" only subtracts 1 from known answers' cosine; strict filtering drops them."""
    tokenizer = smollm2_tokenizer()
    monkeypatch.setattr(encoder_module, "encode_ids", fake_encoder(tokenizer, []))
    # lion (gold) has cosine -0.30, the six unrelated animals 0, eagle (known) 0.95 - 1 = -0.05
    monkeypatch.setitem(QUERIES, "[ wolf, eats ]", unit({3: -0.3, 6: 0.954}))
    kg = toy_kg(TRAIN, VALID, TEST)
    run = Run(tmp_path)
    strict = evaluate_kgc(encoder(tiny, tokenizer, kg, smoke_all), smoke_all, run, progress=False)
    recipe = evaluate_kgc(
        encoder(tiny, tokenizer, kg, smoke_all), smoke_all, run, mode="simkgc", progress=False
    )
    assert strict.tail.realistic.tolist() == [1.0, 7.0, 2.0]
    assert recipe.tail.realistic.tolist() == [1.0, 8.0, 2.0]


def test_excluding_the_query_entity_only_drops_the_query_entity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smoke_all, tiny: torch.nn.Module
) -> None:
    tokenizer = smollm2_tokenizer()
    monkeypatch.setattr(encoder_module, "encode_ids", fake_encoder(tokenizer, []))
    # horse (the query's own entity) 0.9 > zebra (gold) 0.3 > salmon 0.1: rank 2, then rank 1.
    monkeypatch.setitem(QUERIES, "[ horse, eats ]", unit({4: 0.9, 5: 0.3, 7: 0.1}))
    kg = toy_kg(TRAIN, VALID, TEST)
    run = Run(tmp_path)
    strict = evaluate_kgc(encoder(tiny, tokenizer, kg, smoke_all), smoke_all, run, progress=False)
    excluded = evaluate_kgc(
        encoder(tiny, tokenizer, kg, smoke_all),
        smoke_all,
        run,
        exclude_query_entity=True,
        progress=False,
    )
    assert strict.tail.realistic.tolist() == [1.0, 1.0, 2.0]
    assert excluded.tail.realistic.tolist() == [1.0, 1.0, 1.0]
    # zebra's inverse query ranks dog and cat above horse, and zebra itself scores 0: unchanged.
    assert excluded.head.realistic.tolist() == strict.head.realistic.tolist() == [1.0, 1.5, 3.0]
    effect = query_entity_effect(strict, excluded)
    assert effect["query entity outranks gold"] == pytest.approx(1 / 6)  # one of six queries
    assert effect["MRR"] == strict.table_row()["MRR"] and "MR" not in effect
    assert effect["Hits@1, query entity filtered"] == excluded.table_row()["Hits@1"]


def test_tiny_llama_end_to_end_and_entity_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny: torch.nn.Module
) -> None:
    tokenizer = smollm2_tokenizer()
    kg = toy_kg(TRAIN, VALID, [*TEST, (5, RESEMBLES, 4), (6, EATS, 7)])
    cfg = resolve(profile="smoke", test_queries=4, candidates=0)
    calls: list[str] = []
    real = encoder_module.encode_ids

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(str(kwargs.get("desc")))
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder_module, "encode_ids", spy)
    run = Run(tmp_path / "run")
    first = evaluate_kgc(encoder(tiny, tokenizer, kg, cfg), cfg, run, progress=False)
    q = 4
    assert len(first.triples) == q and len(first.tail) == len(first.head) == q
    for ranks in (first.tail, first.head):
        for r in (ranks.optimistic, ranks.pessimistic, ranks.realistic):
            assert r.min() >= 1 and r.max() <= len(ANIMALS)
        assert (ranks.optimistic <= ranks.realistic).all()
        assert (ranks.realistic <= ranks.pessimistic).all()
    assert first.summary["both"]["count"] == 2 * q
    assert "entity_seconds" in first.timings and calls[0] == "entity index"
    assert list((run.path / "cache").glob("entities-toy-*.pt"))

    calls.clear()
    second = evaluate_kgc(encoder(tiny, tokenizer, kg, cfg), cfg, run, progress=False)
    assert calls == ["tail queries", "head queries"]  # the entity index came from the cache
    assert second.timings["entity_seconds"] == first.timings["entity_seconds"]  # as measured
    torch.testing.assert_close(second.tail.realistic, first.tail.realistic)


def test_bf16_encoding_keeps_the_ranks_and_a_cache_of_its_own(
    tmp_path: Path, tiny: torch.nn.Module
) -> None:
    """A bf16 copy of the model (``train.precision: bf16``) encodes under bf16 autocast."""
    tokenizer = smollm2_tokenizer()
    kg = toy_kg(TRAIN, VALID, TEST)
    run = Run(tmp_path)
    cfg = resolve(profile="smoke", test_queries=0, candidates=0)
    models = {"float32": tiny, "bfloat16": copy.deepcopy(tiny).to(torch.bfloat16)}
    results = {
        name: evaluate_kgc(encoder(model, tokenizer, kg, cfg), cfg, run, progress=False)
        for name, model in models.items()
    }
    names = sorted(p.name for p in (run.path / "cache").glob("entities-toy-*.pt"))
    assert len(names) == 2 and names[0].endswith("-bfloat16.pt")  # one index per precision
    fp32, bf16 = results["float32"], results["bfloat16"]
    # Rounding can swap near-ties only: ranks move by at most a couple of places.
    for a, b in ((fp32.tail, bf16.tail), (fp32.head, bf16.head)):
        assert (a.realistic - b.realistic).abs().max() <= 2
        assert not torch.equal(a.optimistic, torch.zeros_like(a.optimistic))


def test_an_interrupted_entity_index_resumes_at_its_first_missing_chunk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny: torch.nn.Module
) -> None:
    tokenizer = smollm2_tokenizer()
    kg = toy_kg(TRAIN, VALID, TEST)
    cfg = resolve(profile="smoke", test_queries=0, candidates=0)
    enc, run = encoder(tiny, tokenizer, kg, cfg), Run(tmp_path)
    candidates = np.arange(kg.num_entities)
    whole, _ = entity_index(enc, run, candidates, progress=False, chunk=len(candidates))
    encoded: list[int] = []
    limit = [6]  # entities encoded before the interruption: two chunks of three
    real = enc.encode_entities

    def interruptible(ids: list[int], **kwargs: object) -> torch.Tensor:
        if len(encoded) >= limit[0]:
            raise KeyboardInterrupt
        encoded.extend(ids)
        return real(ids, **kwargs)

    monkeypatch.setattr(enc, "encode_entities", interruptible)
    with pytest.raises(KeyboardInterrupt):
        entity_index(enc, run, candidates, progress=False, chunk=3)
    assert len(encoded) == 6
    encoded.clear()
    limit[0] = len(candidates)
    resumed, seconds = entity_index(enc, run, candidates, progress=False, chunk=3)
    assert encoded == candidates[6:].tolist()  # the two finished chunks came from the cache
    torch.testing.assert_close(resumed, whole)
    assert seconds > 0


def test_an_entity_index_of_another_batch_size_is_its_own(
    tmp_path: Path, tiny: torch.nn.Module
) -> None:
    """The batch size shapes the padding, and so the rounding, of the embeddings: an index
    encoded in batches of one size is not served to an encoder of another."""
    tokenizer = smollm2_tokenizer()
    kg = toy_kg(TRAIN, VALID, TEST)
    run, candidates = Run(tmp_path), np.arange(kg.num_entities)
    for size in (2, 4):
        cfg = resolve(profile="smoke", entity_batch_size=size)
        entity_index(encoder(tiny, tokenizer, kg, cfg), run, candidates, progress=False)
    assert len(list((run.path / "cache").glob("entities-toy-*.pt"))) == 2


def test_restricted_candidates_bound_the_ranks(tmp_path: Path, tiny: torch.nn.Module) -> None:
    tokenizer = smollm2_tokenizer()
    kg = toy_kg(TRAIN, VALID, TEST[:1])
    cfg = resolve(profile="smoke", test_queries=0, candidates=3)
    result = evaluate_kgc(encoder(tiny, tokenizer, kg, cfg), cfg, Run(tmp_path), progress=False)
    assert result.num_candidates == 3
    assert result.tail.pessimistic.max() <= 3 and result.head.pessimistic.max() <= 3


# --- sampling and candidates -------------------------------------------------------------------

triples_strategy = arrays(
    np.int64, st.tuples(st.integers(1, 50), st.just(3)), elements=st.integers(0, 29)
)


@given(triples=triples_strategy, n=st.integers(0, 60), seed=st.integers(0, 100))
def test_sample_triples_is_a_fixed_subset(triples: np.ndarray, n: int, seed: int) -> None:
    picked = sample_triples(triples, n, seed)
    np.testing.assert_array_equal(picked, sample_triples(triples, n, seed))
    assert len(picked) == (len(triples) if n == 0 or n >= len(triples) else n)
    rows = [tuple(t) for t in triples.tolist()]
    positions = []
    for row in picked.tolist():  # a subset in the original order
        start = positions[-1] + 1 if positions else 0
        positions.append(rows.index(tuple(row), start))
    assert positions == sorted(positions)


def test_sample_triples_depends_on_the_seed() -> None:
    triples = np.arange(300).reshape(100, 3)
    assert not np.array_equal(sample_triples(triples, 10, 0), sample_triples(triples, 10, 1))


@settings(max_examples=60)
@given(triples=triples_strategy, n=st.integers(0, 40), seed=st.integers(0, 100))
def test_candidate_set_holds_every_gold(triples: np.ndarray, n: int, seed: int) -> None:
    kg = SimpleNamespace(num_entities=30)
    cands = candidate_set(kg, triples, n, seed)
    gold = set(triples[:, [0, 2]].flatten().tolist())
    assert gold <= set(cands.tolist())
    assert np.all(np.diff(cands) > 0) and cands.min() >= 0 and cands.max() < 30
    if n <= 0 or n >= 30:
        assert len(cands) == 30
    else:
        assert len(cands) == max(n, len(gold))
    np.testing.assert_array_equal(cands, candidate_set(kg, triples, n, seed))
