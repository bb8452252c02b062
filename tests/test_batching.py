"""kalm.batching: length-bucketed, resumable batch sampling and per-process micro-batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import smollm2_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kalm.batching import bucketed_batches, iterate_batches, micro_batches
from kalm.data import KnowledgeGraph
from kalm.views import ViewBuilder, training_examples

lengths_strategy = arrays(np.int64, st.integers(0, 400), elements=st.integers(1, 60))


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_strategy,
    batch_size=st.integers(1, 16),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
    pool=st.integers(1, 8),
)
def test_bucketed_batches_partition_one_epoch(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, pool: int
) -> None:
    batches = bucketed_batches(lengths, batch_size, seed, epoch, pool=pool)
    assert all(len(b) == batch_size for b in batches)  # full batches only
    seen = np.concatenate([*batches, np.empty(0, dtype=np.int64)])
    assert len(np.unique(seen)) == len(seen)  # each example at most once
    assert set(seen.tolist()) <= set(range(len(lengths)))
    assert len(batches) == len(lengths) // batch_size  # drops fewer than batch_size examples
    again = bucketed_batches(lengths, batch_size, seed, epoch, pool=pool)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_bucketed_batches_vary_with_seed_and_epoch() -> None:
    lengths = np.arange(1, 101)

    def order(seed: int, epoch: int) -> list[int]:
        return np.concatenate(bucketed_batches(lengths, 4, seed, epoch)).tolist()

    assert order(0, 0) == order(0, 0)
    assert len({tuple(order(0, 0)), tuple(order(0, 1)), tuple(order(1, 0))}) == 3


def test_bucketed_batches_have_little_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=4096)
    batch_size = 16

    def mean_spread(batches: list[np.ndarray]) -> float:
        return float(np.mean([lengths[b].max() - lengths[b].min() for b in batches]))

    bucketed = mean_spread(bucketed_batches(lengths, batch_size, seed=0, epoch=0))
    random = mean_spread(list(rng.permutation(len(lengths)).reshape(-1, batch_size)))
    assert bucketed < 0.1 * random


def test_two_length_keys_bucket_both_views() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=(4096, 2))  # two independent view lengths
    batch_size = 16

    def spread(batches: list[np.ndarray], column: int) -> float:
        return float(np.mean([np.ptp(lengths[b, column]) for b in batches]))

    two = bucketed_batches(lengths, batch_size, seed=0, epoch=0)
    one = bucketed_batches(lengths[:, 0], batch_size, seed=0, epoch=0)
    random = list(rng.permutation(len(lengths)).reshape(-1, batch_size))
    assert spread(two, 0) < 0.2 * spread(random, 0)
    assert spread(two, 1) < 0.5 * spread(random, 1)  # a single key leaves this one random
    assert spread(one, 1) > 0.8 * spread(random, 1)
    assert sorted(np.concatenate(two).tolist()) == list(range(len(lengths)))


def test_training_batches_of_wn18rr_pad_under_ten_percent(kg: KnowledgeGraph) -> None:
    views = ViewBuilder(kg, smollm2_tokenizer(), max_entity_tokens=24)
    examples = training_examples(kg.train, kg.num_relations)
    lengths = views.view_lengths(examples)
    real = padded = 0
    for batch in bucketed_batches(lengths, 64, seed=0, epoch=0)[:100]:
        h, r, t = examples[batch].T
        for rows in (views.hr_ids(h, r), views.tail_ids(t), views.tail_ids(h)):
            real += sum(map(len, rows))
            padded += len(rows) * max(map(len, rows))
    assert (padded - real) / padded < 0.10


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 8),
    start=st.integers(0, 40),
    seed=st.integers(0, 5),
)
def test_iterate_batches_resumes_exactly(n: int, batch_size: int, start: int, seed: int) -> None:
    lengths = np.random.default_rng(seed).integers(1, 30, size=max(n, batch_size))
    fresh = list(itertools.islice(iterate_batches(lengths, batch_size, seed), start + 10))
    resumed = list(
        itertools.islice(iterate_batches(lengths, batch_size, seed, start_step=start), 10)
    )
    assert [s for s, _ in fresh] == list(range(start + 10))
    for (s1, b1), (s2, b2) in zip(fresh[start:], resumed, strict=True):
        assert s1 == s2 and np.array_equal(b1, b2)


def test_iterate_batches_walks_through_epochs() -> None:
    lengths = np.arange(10)
    stream = list(itertools.islice(iterate_batches(lengths, 3, seed=1), 6))
    per_epoch = [
        np.concatenate([b for _, b in stream[:3]]),
        np.concatenate([b for _, b in stream[3:]]),
    ]
    for k, epoch in enumerate(per_epoch):
        assert len(set(epoch.tolist())) == 9  # 3 full batches of distinct examples per epoch
        expected = np.concatenate(bucketed_batches(lengths, 3, seed=1, epoch=k))
        np.testing.assert_array_equal(epoch, expected)


def test_iterate_batches_rejects_a_batch_larger_than_the_data() -> None:
    with pytest.raises(ValueError, match="batch size 8 exceeds the 5 training examples"):
        next(iterate_batches(np.ones(5, dtype=np.int64), 8, seed=0))


@settings(max_examples=50, deadline=None)
@given(processes=st.integers(1, 4), accumulation=st.integers(1, 4), batch=st.integers(1, 5))
def test_micro_batches_share_a_global_batch_out(processes: int, accumulation: int, batch: int):
    """Every process gets ``accumulation`` micro-batches of ``batch``; all of them together are
    the global batch, each example once; process-major order."""
    global_batch = np.random.default_rng(0).permutation(100)[: processes * accumulation * batch]
    shares = [
        micro_batches(global_batch, rank=r, processes=processes, accumulation=accumulation)
        for r in range(processes)
    ]
    assert all(len(s) == accumulation and all(len(m) == batch for m in s) for s in shares)
    assert np.concatenate([m for s in shares for m in s]).tolist() == global_batch.tolist()


def test_micro_batches_refuse_an_uneven_split() -> None:
    with pytest.raises(ValueError, match="does not split into 2 processes x 2 micro-batches"):
        micro_batches(np.arange(6), rank=0, processes=2, accumulation=2)
