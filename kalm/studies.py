"""Studies: short training runs ("arms") at one budget, compared on the validation split only.

The self-negative, tuning and lambda studies of the book share this: an arm is the notebook's
configuration with a few fields changed, trained on ``study_examples`` examples (the steps follow
from the arm's global batch, so arms of different batch sizes see as many examples) and ranked on
``study_queries`` validation triples against ``study_candidates`` entities, every gold entity
among them. Validation answers are filtered with train and valid only; no study touches the test
set. Every arm's numbers are cached in its run directory, so a study reruns in seconds and two
studies that share an arm train it once.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kalm.analysis import head_outranks_gold
from kalm.config import RunConfig, resolve
from kalm.data import load_kg, load_wikitext
from kalm.durable import read_json
from kalm.evaluate import kgqa, lm
from kalm.evaluate.protocol import evaluate_kgc
from kalm.experiment import load_base, load_encoder
from kalm.published import locate
from kalm.results import labels, results_dir
from kalm.runs import Run

__all__ = [
    "ABLATION_COLUMNS",
    "IN_BATCH_ONLY",
    "LAMBDAS",
    "LANGUAGE_SETTINGS",
    "PERPLEXITY_LIMIT",
    "SELF_NEGATIVES_CONSTANT",
    "SELF_NEGATIVES_TRAINED",
    "STUDY_BASE",
    "TIE",
    "TUNING_COLUMNS",
    "Arm",
    "arm_config",
    "arm_record",
    "arm_table",
    "base_language",
    "choose",
    "evaluate_arm",
    "lambda_arms",
    "lambda_choice",
    "lambda_label",
    "record_key",
    "run_study",
    "seed_label",
    "seed_noise",
    "self_negative_arms",
    "self_negative_choice",
    "self_negative_table",
    "tuned_settings",
    "tuning_arms",
    "tuning_choice",
    "tuning_record",
]

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_ONLY = ("gate_proj", "up_proj", "down_proj")

STUDY_BASE: dict[str, Any] = {
    "lr": 5e-4,
    "batch_size": 64,
    "lora_targets": list(ALL_LINEAR),
    "lora_r": 16,
    "lora_alpha": 32,
    "lam": 0.01,
    "self_negatives": True,
    "self_negative_grad": True,
}
"""Every setting the studies compare, stated in full: an arm changes some of them and keeps the
rest, whatever the profile says, so an arm (and its cached run) stays the same when the profile
later adopts a study's choice."""

TIE = 0.01
"""Validation MRRs closer than this count as tied (about one standard error of an MRR over 600
queries); the tuning study breaks ties by the smaller perplexity."""

PERPLEXITY_LIMIT = 1.10
"""The lambda study chooses among arms whose perplexity is at most this times the untuned one."""

LAMBDAS = (0.0, 0.01, 0.1, 1.0)
"""The weights of ``L_imp`` the lambda study compares."""

IN_BATCH_ONLY = "in-batch negatives only"
SELF_NEGATIVES_CONSTANT = "self-negatives, constant"
SELF_NEGATIVES_TRAINED = "self-negatives, trained through"
"""The labels of the self-negative study's arms (:func:`self_negative_arms`), by which its page
reads the table's rows."""


@dataclass(frozen=True)
class Arm:
    """One arm of a study: a label and the profile fields it changes."""

    label: str
    changes: Mapping[str, Any] = field(default_factory=dict)


def arm_config(cfg: RunConfig, changes: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with ``changes`` and the study budget: ``study_examples`` in steps of the global
    batch, and the validation sizes of the study (checked like any override).

    A global batch never exceeds the budget: an arm whose batch is larger than
    ``study_examples`` trains one step of a batch cut to the budget (the smoke profile's budget
    of one small batch keeps its arms small), rather than one step that sees more examples
    than the study allows.
    """
    fields = {**dataclasses.asdict(cfg.train), **dataclasses.asdict(cfg.eval), **changes}
    fields["lora_targets"] = list(fields["lora_targets"])
    fields["theorem1_negatives"] = list(fields["theorem1_negatives"])
    # Steps count global batches (accumulated micro-batches of every process).
    micro_batches = fields["gradient_accumulation_steps"] * fields["processes"]
    budget = cfg.eval.study_examples
    # In-batch negatives need two examples per micro-batch, whatever the budget.
    fields["batch_size"] = max(2, min(fields["batch_size"], budget // micro_batches))
    fields["max_steps"] = max(1, budget // (fields["batch_size"] * micro_batches))
    fields["valid_queries"] = cfg.eval.study_queries
    fields["candidates"] = cfg.eval.study_candidates
    fields["curve_points"] = 0  # an arm is measured once, at its end
    # A local model is named by its directory (a Path is never read as an alias).
    model = Path(cfg.model.hub_id) if cfg.model.source == "local" else cfg.model.alias
    arm = resolve(model=model, dataset=cfg.dataset, profile=cfg.profile, seed=cfg.seed, **fields)
    return dataclasses.replace(arm, session=cfg.session)  # a retrain reaches the arms


LANGUAGE_SETTINGS = (
    "lm_tokens",
    "lm_window",
    "lm_stride",
    "lm_batch_size",
    "kgqa_questions",
    "kgqa_shots",
    "kgqa_max_new_tokens",
    "kgqa_batch_size",
)
"""The evaluation sizes :func:`base_language` reads (by :func:`_perplexity` and
:func:`_kgqa_tail`): its cached numbers are named by them, so every arm of a study shares them
while a change of any of them measures again."""


def base_language(cfg: RunConfig) -> dict[str, float]:
    """The untuned model's WikiText-103 perplexity (``ppl``) and KGQA tail-prediction accuracy
    on validation triples, the references of the arms (cached in the base model's directory)."""
    name = Run.metric_name("study-language", cfg, "valid", reads=LANGUAGE_SETTINGS)
    base_run = Run.base(cfg)
    cached = base_run.load_metrics(name)
    if cached is None:
        model, tokenizer, _ = load_base(cfg)
        cached = {**_perplexity(model, tokenizer, cfg), **_kgqa_tail(model, tokenizer, cfg)}
        base_run.save_metrics(name, cached)
        del model
        gc.collect()
    return cached


def _perplexity(model: Any, tokenizer: Any, cfg: RunConfig) -> dict[str, float]:
    ev = cfg.eval
    return lm.perplexity(
        model,
        tokenizer,
        load_wikitext("test"),
        max_tokens=ev.lm_tokens,
        window=ev.lm_window,
        stride=ev.lm_stride,
        batch_size=ev.lm_batch_size,
        progress=False,
    )


def _kgqa_tail(model: Any, tokenizer: Any, cfg: RunConfig) -> dict[str, float]:
    """Tail-prediction accuracy (lenient) with its Wilson 95 % interval, on validation triples."""
    kg = load_kg(cfg.dataset)
    answers = kgqa.run_kgqa(model, tokenizer, kg, cfg, tasks=("tail",), split="valid")
    row = kgqa.summarise(answers).loc["tail"]
    return {
        "kgqa_tail": float(row["lenient"]),
        "kgqa_tail_lo": float(row["lenient_lo"]),
        "kgqa_tail_hi": float(row["lenient_hi"]),
        "kgqa_questions": int(row["n"]),
    }


def evaluate_arm(
    cfg: RunConfig, *, language: bool = False, progress: bool = True
) -> dict[str, float]:
    """Train (or load) the arm ``cfg`` and measure it on the validation split.

    Always: MRR, Hits@1/3/10, the share of tail queries whose own head outranks the gold, the
    training minutes and the last logged losses and self-negative diagnostics. With
    ``language``: WikiText-103 perplexity (and its ratio to the untuned model's) and KGQA
    tail-prediction accuracy on validation triples. Cached in the arm's run directory.
    """
    name = Run.metric_name("study", cfg, "valid") + ("-language" if language else "")
    finished = locate(Run.trained(cfg))
    cached = finished.load_metrics(name) if finished.finished_record() is not None else None
    if cached is not None:  # a rerun of a study loads no model
        return cached
    encoder, run = load_encoder(cfg, progress=progress)
    tuned, tokenizer = encoder.model, encoder.views.tokenizer
    result = evaluate_kgc(encoder, cfg, run, split="valid", progress=progress)
    head_wins = head_outranks_gold(encoder, result.triples, batch_size=cfg.eval.analysis_batch_size)
    log = run.train_log()
    done = run.done()
    metrics: dict[str, float] = {
        **result.table_row(),
        "head outranks gold": head_wins,
        "queries": len(result.triples),
        "candidates": result.num_candidates,
        "steps": done["steps"],
        "examples": done["steps"] * cfg.train.global_batch_size,
        "train minutes": done["seconds"] / 60,
        "L_exp (last 10 steps)": float(np.mean([r["L_exp"] for r in log[-10:]])),
        "L_imp (last 10 steps)": float(np.mean([r["L_imp"] for r in log[-10:]])),
    }
    if language:
        ppl = _perplexity(tuned, tokenizer, cfg)["ppl"]
        metrics |= {
            "perplexity": ppl,
            "perplexity / base": ppl / base_language(cfg)["ppl"],
            **_kgqa_tail(tuned, tokenizer, cfg),
        }
    run.save_metrics(name, metrics)
    del tuned, encoder
    gc.collect()
    return metrics


def run_study(
    cfg: RunConfig, arms: Sequence[Arm], *, language: bool = False, progress: bool = True
) -> tuple[pd.DataFrame, dict[str, Run]]:
    """Every arm of a study: one row of :func:`evaluate_arm` per arm label, and the arms' runs
    (whose training logs the notebooks plot)."""
    rows, runs = {}, {}
    for arm in arms:
        arm_cfg = arm_config(cfg, arm.changes)
        rows[arm.label] = evaluate_arm(arm_cfg, language=language, progress=progress)
        runs[arm.label] = locate(Run.trained(arm_cfg))
    return pd.DataFrame(rows).T.astype(float).rename_axis("arm"), runs


def choose(
    table: pd.DataFrame,
    *,
    admissible: Callable[[pd.Series], bool] = lambda row: True,
    tie_break: str | None = None,
    tolerance: float = 0.0,
) -> str:
    """The arm a pre-stated rule picks: the best validation MRR among ``admissible`` rows.

    Arms within ``tolerance`` of the best MRR count as tied; a tie goes to the smallest
    ``tie_break`` column (e.g. perplexity). With no admissible arm, every arm is admissible.
    """
    rows = table[[bool(admissible(row)) for _, row in table.iterrows()]]
    if rows.empty:
        rows = table
    best = rows["MRR"].max()
    tied = rows[rows["MRR"] >= best - tolerance]
    if tie_break is None or len(tied) == 1 or tied[tie_break].isna().all():
        return str(tied["MRR"].idxmax())
    values = tied[tie_break].astype(float).where(lambda s: s.map(math.isfinite))
    return str(values.idxmin())


def self_negative_arms() -> tuple[Arm, ...]:
    """In-batch negatives only; the head's view as a constant extra negative; the same trained
    through (SimKGC). Otherwise :data:`STUDY_BASE`."""
    return (
        Arm(IN_BATCH_ONLY, {**STUDY_BASE, "self_negatives": False}),
        Arm(SELF_NEGATIVES_CONSTANT, {**STUDY_BASE, "self_negative_grad": False}),
        Arm(SELF_NEGATIVES_TRAINED, dict(STUDY_BASE)),
    )


def tuning_arms() -> tuple[Arm, ...]:
    """:data:`STUDY_BASE`, then one change each: two more learning rates, half the batch (at
    equal examples seen) and the recipe's LoRA (MLP only, rank 8)."""
    base = dict(STUDY_BASE)
    return (
        Arm("lr 5e-4, batch 64, all linear r16", base),
        Arm("lr 2e-4", {**base, "lr": 2e-4}),
        Arm("lr 1e-3", {**base, "lr": 1e-3}),
        Arm("batch 32", {**base, "batch_size": 32}),
        Arm(
            "MLP only, r8 (recipe)",
            {**base, "lora_targets": list(MLP_ONLY), "lora_r": 8, "lora_alpha": 16},
        ),
    )


def tuning_choice(table: pd.DataFrame) -> str:
    """The tuning rule, fixed before the runs: the best validation MRR, ties (within
    :data:`TIE`) broken by the smaller perplexity (relative to the untuned model's, which
    ranks the arms as the perplexity itself does)."""
    return choose(table, tie_break="perplexity / base", tolerance=TIE)


TUNING_COLUMNS = ("MRR", "Hits@1", "perplexity / base", "kgqa_tail")
"""The per-arm numbers the tuning page publishes (:func:`record_key`)."""


def record_key(label: str, column: str) -> str:
    """The key of one arm's number in a study page's record: ``"<arm label>: <column>"``."""
    return f"{label}: {column}"


def arm_record(table: pd.DataFrame, columns: Sequence[str]) -> dict[str, float]:
    """The numbers of ``columns`` for every arm of a study table (:func:`run_study`), keyed by
    :func:`record_key`: what a study page publishes per arm."""
    return {
        record_key(str(label), column): float(table.loc[label, column])
        for label in table.index
        for column in columns
    }


def arm_table(
    record: Mapping[str, Any], labels: Sequence[str], columns: Sequence[str]
) -> pd.DataFrame | None:
    """The numbers of ``columns`` for the arms ``labels`` of a study page's record (keyed by
    :func:`record_key`), one row per arm; None when the record lacks one of them."""
    try:
        rows = {
            label: {c: float(record[record_key(label, c)]) for c in columns} for label in labels
        }
    except KeyError:
        return None
    return pd.DataFrame(rows).T


def tuning_record(cfg: RunConfig) -> pd.DataFrame | None:
    """The tuning study's per-arm numbers from the tuning page's record
    (``<results>/tuning.json``), or None when there is none for ``cfg``'s model, profile,
    dataset and study budget (or it lacks an arm of :func:`tuning_arms`)."""
    path = results_dir(cfg) / "tuning.json"
    if not path.is_file():
        return None
    record = read_json(path)
    expected = {**labels(cfg), "examples_per_arm": cfg.eval.study_examples}
    if any(record.get(key) != value for key, value in expected.items()):
        return None
    return arm_table(record, [arm.label for arm in tuning_arms()], TUNING_COLUMNS)


def tuned_settings(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """The settings the tuning study chooses, by :func:`tuning_choice` applied to the tuning
    page's published numbers when they exist for ``cfg`` (so the lambda study does not retrain
    the tuning arms on a fresh run store), else to the study itself (run, or read from its
    cached arms)."""
    table = tuning_record(cfg)
    if table is None:
        table, _ = run_study(cfg, tuning_arms(), language=True, progress=progress)
    label = tuning_choice(table)
    return dict(next(arm for arm in tuning_arms() if arm.label == label).changes)


def lambda_label(lam: float) -> str:
    """The label of the lambda study's arm of weight ``lam`` (``λ = 0.01``)."""
    return f"λ = {lam:g}"


def lambda_arms(tuned: Mapping[str, Any]) -> tuple[Arm, ...]:
    """The tuned settings at each weight of :data:`LAMBDAS`."""
    return tuple(Arm(lambda_label(lam), {**tuned, "lam": lam}) for lam in LAMBDAS)


def lambda_choice(table: pd.DataFrame) -> str:
    """The lambda rule, fixed before the runs: the best validation MRR among arms whose
    perplexity is at most :data:`PERPLEXITY_LIMIT` times the untuned model's (any arm if none)."""
    return choose(table, admissible=lambda row: row["perplexity / base"] <= PERPLEXITY_LIMIT)


ABLATION_COLUMNS = {"MRR": "mrr", "Hits@1": "hits1", "head outranks gold": "head_outranks_gold"}
"""The per-arm numbers of the self-negative page's record, with the key of each in the record
of one seed (``off_mrr``, ``trained_hits1`` …)."""

_ONE_SEED_KEYS = {
    IN_BATCH_ONLY: "off",
    SELF_NEGATIVES_CONSTANT: "constant",
    SELF_NEGATIVES_TRAINED: "trained",
}
_SEED_LABEL = re.compile(r"^(?P<arm>.+), seed (?P<seed>\d+)$")


def seed_label(arm: str, seed: int) -> str:
    """The label of one seed of an arm in a record of several seeds: its numbers are keyed
    ``record_key(seed_label(arm, seed), column)``, e.g. ``"in-batch negatives only, seed 1:
    MRR"``."""
    return f"{arm}, seed {seed}"


def self_negative_table(record: Mapping[str, Any], *, seed: int = 0) -> pd.DataFrame:
    """The self-negative study's numbers (:data:`ABLATION_COLUMNS`) from its page's record,
    one row per arm and seed (index levels ``arm``, ``seed``).

    Two layouts are read: keys of :func:`seed_label` (any number of seeds per arm), and the
    record of one seed (``off_mrr``, ``constant_mrr``, ``trained_mrr`` …), whose rows get
    ``seed``. A record with neither is refused with its keys named.
    """
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for key, value in record.items():
        label, _, column = str(key).rpartition(": ")
        match = _SEED_LABEL.match(label)
        if match and column in ABLATION_COLUMNS:
            rows.setdefault((match["arm"], int(match["seed"])), {})[column] = float(value)
    if not rows:
        for arm, prefix in _ONE_SEED_KEYS.items():
            numbers = {c: record.get(f"{prefix}_{k}") for c, k in ABLATION_COLUMNS.items()}
            if all(v is not None for v in numbers.values()):
                rows[(arm, seed)] = {c: float(v) for c, v in numbers.items()}
    if not rows:
        raise ValueError(
            f"the self-negative record has no arm's numbers (keys {sorted(record)}): expected "
            f"'{record_key(seed_label(IN_BATCH_ONLY, 0), 'MRR')}' or 'off_mrr' and the like"
        )
    table = pd.DataFrame(rows).T
    table.index = table.index.set_names(["arm", "seed"])
    return table.sort_index()


def seed_noise(table: pd.DataFrame, arms: Sequence[str]) -> float:
    """The noise between seeds of ``arms`` in a table of :func:`self_negative_table`: the
    largest difference of validation MRR between two seeds of one arm (0 when no arm has two
    seeds, which is no estimate of the noise)."""
    spread = table.loc[list(arms), "MRR"].groupby(level="arm").agg(lambda s: s.max() - s.min())
    return float(spread.max())


def self_negative_choice(table: pd.DataFrame) -> str:
    """The self-negative rule, fixed before the runs: keep the cheaper arm, in-batch negatives
    only, unless the dearer one, self-negatives trained through (one more encoder pass per row,
    with gradient), has a higher mean validation MRR over its seeds by more than the noise
    between seeds (:func:`seed_noise`). Every arm sees the same number of examples, so the
    arms differ only in their negatives. With one seed per arm there is no noise estimate and
    the dearer arm must simply be better."""
    pair = [IN_BATCH_ONLY, SELF_NEGATIVES_TRAINED]
    missing = [arm for arm in pair if arm not in table.index.get_level_values("arm")]
    if missing:
        raise ValueError(f"the self-negative table lacks the arm(s) {missing}")
    mean = table.loc[pair, "MRR"].groupby(level="arm").mean()
    gain = mean[SELF_NEGATIVES_TRAINED] - mean[IN_BATCH_ONLY]
    return SELF_NEGATIVES_TRAINED if gain > seed_noise(table, pair) else IN_BATCH_ONLY
