"""The learning curve: validation points measured while training, stored with the run, kept out
of its training time, and the same after a resume as in one straight run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_llama

from kalm.config import resolve
from kalm.encoder import Encoder
from kalm.evaluate.protocol import ValidationProbe, candidate_set, rank_both_directions
from kalm.runs import Run
from kalm.trainer import Trainer, curve_steps


def test_curve_steps_are_evenly_spaced_and_start_before_training():
    assert curve_steps(1200, 8) == {0, 150, 300, 450, 600, 750, 900, 1050, 1200}
    assert curve_steps(4, 2) == {0, 2, 4}
    assert curve_steps(2, 8) == {0, 1, 2}  # fewer steps than points: every step
    assert curve_steps(1200, 0) == frozenset()


def test_profiles_measure_at_least_six_points():
    """The book's runs record a curve of at least 6 points beside their last one."""
    cpu = resolve(profile="cpu").train
    assert len(curve_steps(cpu.max_steps, cpu.curve_points)) >= 7


class CountingProbe:
    """A probe whose number depends on the adapter, so a wrong resume changes it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, encoder: Encoder) -> dict[str, float]:
        self.calls += 1
        lora = [p.detach().double().abs().sum() for n, p in encoder.model.named_parameters()]
        return {"MRR": float(sum(lora))}


def _curve(path) -> list[dict]:
    return [json.loads(line) for line in (path / "curve.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_curve_is_recorded_and_survives_a_resume(tokenizer, kg, tmp_path):
    cfg = resolve(profile="smoke", max_steps=4, checkpoint_every=1, curve_points=2)
    straight = Trainer(
        tiny_llama(len(tokenizer)), tokenizer, kg, cfg, Run(tmp_path / "a"), probe=CountingProbe()
    )
    straight.fit(progress=False)
    whole = _curve(tmp_path / "a")
    assert [r["step"] for r in whole] == [0, 2, 4]
    assert [r["examples"] for r in whole] == [0, 2 * cfg.train.batch_size, 4 * cfg.train.batch_size]
    assert len({r["MRR"] for r in whole}) == 3  # the adapter moved between points
    session = straight.sessions()[-1]
    assert session["curve_seconds"] == pytest.approx(sum(r["curve_seconds"] for r in whole))
    assert whole[-1]["train_seconds"] <= session["seconds"] + 1e-6

    probe = CountingProbe()
    first = Trainer(
        tiny_llama(len(tokenizer)), tokenizer, kg, cfg, Run(tmp_path / "b"), probe=probe
    )
    first.fit(stop_after=3, progress=False)
    with (tmp_path / "b" / "curve.jsonl").open("a") as f:  # a point measured after the checkpoint
        f.write(json.dumps({"step": 9, "MRR": 0.0}) + "\n")
    resumed = Trainer(
        tiny_llama(len(tokenizer)), tokenizer, kg, cfg, Run(tmp_path / "b"), probe=probe
    )
    resumed.fit(progress=False)
    parts = _curve(tmp_path / "b")
    assert [r["step"] for r in parts] == [0, 2, 4]
    assert probe.calls == 3  # step 2 was not measured again on resume
    for a, b in zip(whole, parts, strict=True):
        assert a["MRR"] == pytest.approx(b["MRR"], rel=1e-6)


def test_no_probe_no_curve(tokenizer, kg, tmp_path):
    cfg = resolve(profile="smoke", max_steps=1, curve_points=2)
    trainer = Trainer(tiny_llama(len(tokenizer)), tokenizer, kg, cfg, Run(tmp_path))
    trainer.fit(progress=False)
    assert not (tmp_path / "curve.jsonl").exists()
    assert Run(tmp_path).learning_curve() == []


class FixedEncoder:
    """Embeddings chosen by hand: queries and entities as one-hot-ish vectors."""

    def __init__(self, kg, query: dict, entity: dict) -> None:
        self.views = type("Views", (), {"kg": kg})()
        self.query, self.entity = query, entity

    def encode_queries(self, heads, relations, **_) -> torch.Tensor:
        return torch.stack([self.query[(h, r)] for h, r in zip(heads, relations, strict=True)])

    def encode_entities(self, entities) -> torch.Tensor:
        return torch.stack([self.entity[e] for e in entities])


def test_own_entity_share_counts_queries_closer_to_their_own_entity():
    from helpers import toy_kg

    kg = toy_kg(train=[(0, 0, 1), (2, 0, 3)], valid=[(0, 0, 1), (2, 0, 3)])
    basis = torch.eye(8)
    entity = {e: basis[e] for e in range(8)}
    inverse = kg.num_relations
    query = {
        (0, 0): basis[0] + 0.5 * basis[1],  # closer to its own entity 0 than to the gold 1
        (1, inverse): basis[0] + 0.1 * basis[1],  # head query of (0, 0, 1): gold 0 wins
        (2, 0): basis[3],  # the gold 3 wins
        (3, inverse): basis[3] + 0.2 * basis[2],  # own 3 beats the gold 2
    }
    encoder = FixedEncoder(kg, query, entity)
    triples = kg.valid
    candidates = candidate_set(kg, triples, 0, seed=0)
    ranks, wins = rank_both_directions(
        encoder,
        triples,
        candidates,
        encoder.encode_entities(candidates.tolist()),
        kg.known_answers(("train", "valid")),
        chunk_size=4,
    )
    assert wins == pytest.approx(2 / 4)
    assert ranks["tail"].realistic.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="not candidates"):
        rank_both_directions(
            encoder,
            triples,
            np.array([1, 3]),
            torch.eye(2, 8),
            kg.known_answers(("train",)),
            chunk_size=4,
        )


def test_validation_probe_draws_its_queries_once(kg):
    cfg = resolve(profile="smoke", curve_queries=4, curve_candidates=32)
    a, b = ValidationProbe.from_config(kg, cfg), ValidationProbe.from_config(kg, cfg)
    assert len(a.triples) == 4 and len(a.candidates) == 32
    assert np.array_equal(a.triples, b.triples) and np.array_equal(a.candidates, b.candidates)
    assert set(a.triples[:, [0, 2]].ravel()) <= set(a.candidates.tolist())


def test_a_graph_without_validation_triples_has_no_curve():
    from helpers import toy_kg

    with pytest.raises(ValueError, match=r"no validation triples.*curve_points=0"):
        ValidationProbe.from_config(toy_kg([(0, 0, 1)]), resolve(profile="smoke"))
