"""Studies: an arm's budget and settings, and the selection rules stated before the runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from helpers import smollm2_tokenizer, tiny_llama, toy_kg

from kalm import experiment, studies
from kalm.config import ConfigError, RunConfig, resolve
from kalm.results import BOOK_RESULTS, publish
from kalm.studies import arm_config, choose, lambda_arms, lambda_choice, tuning_choice


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


def test_an_arm_never_sees_more_examples_than_the_budget() -> None:
    """A batch larger than the budget is cut to it: one step of ``study_examples`` examples,
    not one step of the arm's batch (the smoke profile's small arms)."""
    cfg = resolve(profile="smoke", study_examples=16)
    arm = arm_config(cfg, studies.STUDY_BASE)  # batch 64
    assert (arm.train.batch_size, arm.train.max_steps) == (16, 1)
    accumulated = arm_config(cfg, {"batch_size": 64, "gradient_accumulation_steps": 4})
    assert accumulated.train.global_batch_size == 16 and accumulated.train.batch_size == 4
    assert arm_config(cfg, {"batch_size": 4}).train.batch_size == 4  # smaller batches stay
    accumulating = {"gradient_accumulation_steps": 2}
    tiny = arm_config(resolve(profile="smoke", study_examples=2), accumulating)
    assert tiny.train.batch_size == 2  # in-batch negatives need two examples


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
    """A tied arm without a tie-break value (NaN, infinite) is never the one the tie-break
    picks; when no tied arm has one, the best MRR among them wins."""
    none = {"a": {"MRR": 0.300, "ppl": math.nan}, "b": {"MRR": 0.305, "ppl": math.nan}}
    assert choose(table(none), tie_break="ppl", tolerance=0.01) == "b"
    some = {
        "a": {"MRR": 0.305, "ppl": math.nan},
        "b": {"MRR": 0.300, "ppl": 1.2},
        "c": {"MRR": 0.302, "ppl": math.inf},
    }
    assert choose(table(some), tie_break="ppl", tolerance=0.01) == "b"


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


def test_arm_config_keeps_a_local_model(llama_dir: Path) -> None:
    """A study of a model directory (no alias of the configuration) runs on that directory."""
    cfg = resolve(model=llama_dir, profile="smoke")
    arm = arm_config(cfg, {"lr": 1e-3})
    assert arm.model == cfg.model and arm.train.lr == 1e-3


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path / "store"))
    return tmp_path / "store"


def test_base_language_is_measured_again_when_its_settings_change(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The untuned model's cached numbers are reused only for the settings they were measured
    with: evaluation sizes and precision; an arm's own sizes do not matter to them."""
    measured = []

    def perplexity(model: object, tokenizer: object, cfg: RunConfig) -> dict[str, float]:
        measured.append(cfg)
        return {"ppl": float(cfg.eval.lm_tokens), "bf16": float(cfg.train.precision == "bf16")}

    def kgqa_tail(model: object, tokenizer: object, cfg: RunConfig) -> dict[str, float]:
        return {"kgqa_questions": cfg.eval.kgqa_questions}

    monkeypatch.setattr(studies, "load_base", lambda cfg: (object(), None, None))
    monkeypatch.setattr(studies, "_perplexity", perplexity)
    monkeypatch.setattr(studies, "_kgqa_tail", kgqa_tail)
    smoke = resolve(profile="smoke")
    first = studies.base_language(smoke)
    assert first == {"ppl": smoke.eval.lm_tokens, "bf16": 0.0, "kgqa_questions": 4}
    smaller = studies.base_language(resolve(profile="smoke", lm_tokens=256, kgqa_questions=2))
    assert smaller == {"ppl": 256.0, "bf16": 0.0, "kgqa_questions": 2}
    assert studies.base_language(resolve(profile="smoke", precision="bf16"))["bf16"] == 1.0
    assert len(measured) == 3
    assert studies.base_language(arm_config(smoke, studies.STUDY_BASE)) == first  # reused
    assert len(measured) == 3


# Every animal eats the next one and resembles the one after; validation asks the same.
TRIPLES = [(i, 0, (i + 1) % 8) for i in range(8)] + [(i, 1, (i + 2) % 8) for i in range(0, 8, 2)]


def test_an_arm_counts_the_examples_of_its_global_batch(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Examples seen are steps x the global batch (accumulated micro-batches of every
    process): arms of different batch shapes report the same study budget."""
    tokenizer = smollm2_tokenizer()
    kg = toy_kg(TRIPLES, valid=TRIPLES[:4])
    monkeypatch.setattr(
        experiment, "_load", lambda cfg, precision=None: (tiny_llama(len(tokenizer)), tokenizer)
    )
    monkeypatch.setattr(experiment, "load_kg", lambda name: kg)
    monkeypatch.setattr(studies, "load_kg", lambda name: kg)
    cfg = resolve(profile="smoke", gradient_accumulation_steps=2, study_examples=16)
    arm = arm_config(cfg, {"batch_size": 4})
    metrics = studies.evaluate_arm(arm, progress=False)
    assert metrics["steps"] == 2
    assert metrics["examples"] == metrics["steps"] * 8 == cfg.eval.study_examples


def seeds(mrr: dict[tuple[str, int], float]) -> dict[str, float]:
    """A self-negative record of several seeds (:func:`studies.seed_label`) with these MRRs."""
    return {
        studies.record_key(studies.seed_label(arm, seed), column): value
        for (arm, seed), m in mrr.items()
        for column, value in (("MRR", m), ("Hits@1", m / 2), ("head outranks gold", 0.5))
    }


def test_self_negative_table_reads_both_record_layouts() -> None:
    one_seed = json.loads((BOOK_RESULTS / "ablation.json").read_text())
    table = studies.self_negative_table(one_seed)
    assert table.loc[(studies.IN_BATCH_ONLY, 0), "MRR"] == one_seed["off_mrr"]
    assert table.loc[(studies.SELF_NEGATIVES_TRAINED, 0), "Hits@1"] == one_seed["trained_hits1"]
    assert len(table) == 3
    record = seeds({(studies.IN_BATCH_ONLY, 0): 0.2, (studies.IN_BATCH_ONLY, 1): 0.25})
    assert "in-batch negatives only, seed 1: MRR" in record
    table = studies.self_negative_table({"model": "smollm2", **record})
    assert list(table.index) == [(studies.IN_BATCH_ONLY, 0), (studies.IN_BATCH_ONLY, 1)]
    assert table.loc[(studies.IN_BATCH_ONLY, 1), "MRR"] == 0.25
    with pytest.raises(ValueError, match="off_mrr"):
        studies.self_negative_table({"model": "smollm2"})


def test_self_negative_rule_with_one_seed_needs_the_dearer_arm_better() -> None:
    cheap, dear = studies.IN_BATCH_ONLY, studies.SELF_NEGATIVES_TRAINED

    def choice(a: float, b: float) -> str:
        return studies.self_negative_choice(
            studies.self_negative_table(seeds({(cheap, 0): a, (dear, 0): b}))
        )

    assert choice(0.20, 0.21) == dear
    assert choice(0.20, 0.20) == cheap  # a tie keeps the cheaper arm
    assert choice(0.21, 0.20) == cheap


def test_self_negative_rule_needs_more_than_the_noise_between_seeds() -> None:
    cheap, dear = studies.IN_BATCH_ONLY, studies.SELF_NEGATIVES_TRAINED
    # seeds of the cheaper arm differ by 0.04: a gain of 0.03 in the mean is noise
    noisy = {(cheap, 0): 0.20, (cheap, 1): 0.24, (dear, 0): 0.25, (dear, 1): 0.25}
    table = studies.self_negative_table(seeds(noisy))
    assert studies.seed_noise(table, [cheap, dear]) == pytest.approx(0.04)
    assert studies.self_negative_choice(table) == cheap
    clear = {**noisy, (dear, 0): 0.27, (dear, 1): 0.28}  # a gain of 0.055 > 0.04
    assert studies.self_negative_choice(studies.self_negative_table(seeds(clear))) == dear
    # the noise of the dearer arm counts as well
    spread = {(cheap, 0): 0.20, (cheap, 1): 0.20, (dear, 0): 0.21, (dear, 1): 0.29}
    assert studies.self_negative_choice(studies.self_negative_table(seeds(spread))) == cheap


def test_cpu_profile_takes_the_choices_of_the_studies_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The studies' rules applied to the book's records (book/results/) choose the settings
    of the `cpu` profile: learning rate, batch size and LoRA from the tuning study, λ from the
    λ study, the negatives from the self-negative study."""
    monkeypatch.setenv("KALM_RESULTS_DIR", str(BOOK_RESULTS))
    cfg = resolve(profile="cpu")
    tuning = studies.tuning_record(cfg)
    assert tuning is not None, (
        f"{BOOK_RESULTS / 'tuning.json'} is not the tuning record of the cpu profile's model, "
        f"dataset and budget of {cfg.eval.study_examples} examples per arm: run `make studies`"
    )
    tuned = next(a for a in studies.tuning_arms() if a.label == studies.tuning_choice(tuning))
    for name in ("lr", "batch_size", "lora_targets", "lora_r", "lora_alpha"):
        chosen = tuned.changes[name]
        value = getattr(cfg.train, name)
        assert (list(value) if isinstance(chosen, list) else value) == chosen, (
            f"cpu profile: train.{name} = {value!r}, the tuning study chose {chosen!r} "
            f"({tuned.label}); set it in _config.yml"
        )
    lam = json.loads((BOOK_RESULTS / "lam.json").read_text())
    labels = {studies.lambda_label(x): x for x in studies.LAMBDAS}
    lam_table = studies.arm_table(lam, list(labels), studies.TUNING_COLUMNS)
    assert lam_table is not None, f"{BOOK_RESULTS / 'lam.json'} lacks an arm of {list(labels)}"
    assert cfg.train.lam == labels[studies.lambda_choice(lam_table)], (
        f"cpu profile: train.lam = {cfg.train.lam}, the λ study chose "
        f"{studies.lambda_choice(lam_table)}; set it in _config.yml"
    )
    ablation = json.loads((BOOK_RESULTS / "ablation.json").read_text())
    negatives = studies.self_negative_choice(studies.self_negative_table(ablation))
    arm = next(a for a in studies.self_negative_arms() if a.label == negatives)
    assert cfg.train.self_negatives == arm.changes["self_negatives"], (
        f"cpu profile: train.self_negatives = {cfg.train.self_negatives}, the self-negative "
        f"study chose {negatives}; set it in _config.yml"
    )
    if arm.changes["self_negatives"]:
        assert cfg.train.self_negative_grad == arm.changes["self_negative_grad"]
