"""Studies: an arm's budget and settings, and the selection rules stated before the runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from kalm import studies
from kalm.config import ConfigError, resolve
from kalm.results import BOOK_RESULTS, publish
from kalm.studies import Arm, arm_config, choose, lambda_arms, lambda_choice, tuning_choice


def test_arm_config_applies_changes_and_the_study_budget() -> None:
    cfg = resolve(profile="cpu")
    arm = arm_config(cfg, {"batch_size": 32, "lr": 1e-3})
    assert arm.train.batch_size == 32 and arm.train.lr == 1e-3
    assert arm.train.max_steps == cfg.eval.study_examples // 32
    assert arm.eval.valid_queries == cfg.eval.study_queries
    assert arm.eval.candidates == cfg.eval.study_candidates
    assert arm.train.lora_targets == cfg.train.lora_targets  # unchanged fields kept
    paper = resolve(profile="paper")  # 4 accumulated micro-batches per step
    assert arm_config(paper, {}).train.max_steps == (
        paper.eval.study_examples // paper.train.global_batch_size
    )
    same = arm_config(cfg, {"batch_size": 64})
    assert same.train.max_steps * 64 == arm.train.max_steps * 32  # equal examples seen


def test_arm_config_checks_the_changes() -> None:
    with pytest.raises(ConfigError, match="lr"):
        arm_config(resolve(profile="smoke"), {"lr": -1.0})


def test_study_arms_state_every_compared_setting() -> None:
    """Arms do not depend on the profile: adopting a choice in the profile keeps every arm."""
    for arm in (*studies.self_negative_arms(), *studies.tuning_arms()):
        assert set(studies.STUDY_BASE) <= set(arm.changes), arm.label
    a = arm_config(resolve(profile="cpu"), studies.tuning_arms()[0].changes)
    b = arm_config(resolve(profile="cpu", lr=1e-3, lam=0.1), studies.tuning_arms()[0].changes)
    assert a.train_key() == b.train_key()
    labels = [arm.label for arm in lambda_arms(studies.STUDY_BASE)]
    assert labels == [f"λ = {lam:g}" for lam in studies.LAMBDAS]


def table(rows: dict[str, dict[str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows).T


def test_tuning_rule_breaks_ties_by_perplexity() -> None:
    rows = {
        "a": {"MRR": 0.300, "perplexity / base": 1.3},
        "b": {"MRR": 0.295, "perplexity / base": 1.2},  # tied with a (within 0.01): lower ppl
        "c": {"MRR": 0.200, "perplexity / base": 1.0},
    }
    assert tuning_choice(table(rows)) == "b"
    rows["b"]["MRR"] = 0.280  # no longer tied
    assert tuning_choice(table(rows)) == "a"


def test_lambda_rule_prefers_arms_within_the_perplexity_limit() -> None:
    rows = {
        "λ = 0": {"MRR": 0.40, "perplexity / base": 1.50},
        "λ = 0.1": {"MRR": 0.30, "perplexity / base": 1.08},
        "λ = 1": {"MRR": 0.20, "perplexity / base": 1.01},
    }
    assert lambda_choice(table(rows)) == "λ = 0.1"
    for row in rows.values():
        row["perplexity / base"] += 1.0  # none within the limit: the best MRR overall
    assert lambda_choice(table(rows)) == "λ = 0"


def test_choose_ignores_a_missing_tie_break() -> None:
    rows = table({"a": {"MRR": 0.3, "ppl": math.nan}, "b": {"MRR": 0.3, "ppl": math.nan}})
    assert choose(rows, tie_break="ppl", tolerance=0.01) == "a"
    assert Arm("x").changes == {}


def test_tuned_settings_apply_the_rule_to_the_tuning_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lambda study takes the tuning page's published numbers, not a retrained study."""
    monkeypatch.setenv("KALM_RESULTS_DIR", str(tmp_path))
    cfg = resolve(profile="cpu")
    arms = studies.tuning_arms()
    metrics = {
        f"{arm.label}: {column}": (0.1 * i if column == "MRR" else 1.0)
        for i, arm in enumerate(arms)
        for column in studies.TUNING_COLUMNS
    }
    publish("tuning", cfg, {**metrics, "examples_per_arm": cfg.eval.study_examples})
    assert studies.tuned_settings(cfg) == dict(arms[-1].changes)  # the best MRR
    table = studies.tuning_record(cfg)
    assert table is not None and list(table.index) == [arm.label for arm in arms]
    # A record of another profile or budget is not this study's: it is not used.
    assert studies.tuning_record(resolve(profile="smoke")) is None
    publish("tuning", cfg, {**metrics, "examples_per_arm": cfg.eval.study_examples + 1})
    assert studies.tuning_record(cfg) is None


def test_arm_labels_are_the_ones_the_published_records_carry() -> None:
    """Pages read arms by the library's labels, so the labels must stay those of the book's
    records (whose keys are record_key(label, column))."""
    assert [arm.label for arm in studies.self_negative_arms()] == [
        studies.IN_BATCH_ONLY,
        studies.SELF_NEGATIVES_CONSTANT,
        studies.SELF_NEGATIVES_TRAINED,
    ]
    for page, labels in (
        ("lam", [studies.lambda_label(lam) for lam in studies.LAMBDAS]),
        ("tuning", [arm.label for arm in studies.tuning_arms()]),
    ):
        record = json.loads((BOOK_RESULTS / f"{page}.json").read_text())
        for label in labels:
            assert studies.record_key(label, "MRR") in record, (page, label)


def test_arm_record_keys_every_arm_and_column() -> None:
    rows = {"λ = 0": {"MRR": 0.25, "Hits@1": 0.125}, "λ = 1": {"MRR": 0.5, "Hits@1": 0.25}}
    assert studies.arm_record(table(rows), ["MRR"]) == {"λ = 0: MRR": 0.25, "λ = 1: MRR": 0.5}
    assert len(studies.arm_record(table(rows), ["MRR", "Hits@1"])) == 4
