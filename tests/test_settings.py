"""The settings table is derived from the configuration file: every difference, nothing typed."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from kalm.config import EvalConfig, TrainConfig, config_path, load_config, resolve
from kalm.data import load_kg
from kalm.data.registry import DATASETS
from kalm.settings import MEANINGS, profile_differences


def test_every_field_has_a_one_line_meaning() -> None:
    """Meanings come from the declarations (kalm.config.setting): a field declared without one
    fails here."""
    for cls in (TrainConfig, EvalConfig):
        for field in dataclasses.fields(cls):
            meaning = MEANINGS[field.name]
            assert meaning and "\n" not in meaning, f"{cls.__name__}.{field.name}: no meaning"
            assert meaning == field.metadata["meaning"]


def test_lists_exactly_the_differing_fields() -> None:
    raw = yaml.safe_load(config_path().read_text())["profiles"]
    # a field a profile leaves out takes its declared default
    defaults = {
        section: {f.name: f.default for f in dataclasses.fields(cls)}
        for section, cls in (("train", TrainConfig), ("eval", EvalConfig))
    }
    expected = {
        f"{section}.{key}"
        for section in ("train", "eval")
        for key in {*raw["paper"][section], *raw["cpu"][section]}
        if raw["cpu"][section].get(key, defaults[section][key])
        != raw["paper"][section].get(key, defaults[section][key])
    }
    table = profile_differences("paper", "cpu")
    fields = {s for s in table.index if "." in s}
    assert fields == expected
    assert {"model", "training budget", "test set"} <= set(table.index)
    assert list(table.columns) == ["meaning", "paper", "cpu"]
    assert table.loc["train.lora_dropout", "paper"] == "0.05"
    assert table.loc["train.lm_fraction", "paper"] == "0.167 (4 of 24)"
    # 0 is shown as what its rule says it means
    assert table.loc["eval.test_queries", "paper"] == "every test triple"
    assert table.loc["train.max_grad_norm", "cpu"] == "no clipping"


def test_budget_as_share_of_an_epoch(kg) -> None:
    """WN18RR: 86,835 training triples, 173,670 examples with inverses."""
    cpu = load_config().profiles["cpu"]["train"]
    table = profile_differences("paper", "cpu", dataset="wn18rr")
    seen = cpu["max_steps"] * cpu["batch_size"]
    share = seen / (2 * len(kg.train))
    assert table.loc["training budget", "cpu"] == (
        f"{cpu['max_steps']:,} steps × {cpu['batch_size']} = {seen:,} examples = {share:.1%} "
        f"of one epoch ({2 * len(kg.train):,})"
    )
    assert table.loc["training budget", "paper"] == "20 epochs"
    assert table.loc["test set", "paper"] == f"full ({len(kg.test):,} triples)"
    assert table.loc["test set", "cpu"].startswith("a sample of 1,000 of")


def test_without_data_files_the_share_is_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A book built where the dataset files are not on disk states the share of an epoch as a
    number, not as a formula."""
    monkeypatch.setenv("KALM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KALM_CACHE_DIR", str(tmp_path / "cache"))
    table = profile_differences("paper", "cpu", dataset="wn18rr")
    budget = table.loc["training budget", "cpu"]
    assert re.search(r"= \d+\.\d% of one epoch \(173,670\)$", budget), budget
    assert table.loc["test set", "paper"] == "full (3,134 triples)"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registry_counts_the_triples_of_the_files(name: str) -> None:
    """The registry's split sizes, from which the book states an epoch and the test set, are
    those of the pinned files."""
    kg = load_kg(name, download=False)
    assert DATASETS[name].triples == {s: len(getattr(kg, s)) for s in ("train", "valid", "test")}


def test_same_profile_has_no_differing_field() -> None:
    table = profile_differences("cpu", "cpu")
    assert all("." not in s for s in table.index)


def test_study_examples_are_counted_in_global_batches() -> None:
    """An arm's steps divide its examples by the global batch (batch size × accumulated
    micro-batches × processes), and the setting's meaning says so."""
    from kalm.studies import arm_config

    # a budget of several global batches, so that the arm's batch is not cut to the budget
    cfg = resolve(profile="smoke", gradient_accumulation_steps=2, study_examples=64)
    steps = arm_config(cfg, {}).train.max_steps
    assert steps > 1
    assert steps == cfg.eval.study_examples // cfg.train.global_batch_size
    assert "global batch" in MEANINGS["study_examples"]
