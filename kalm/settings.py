"""The settings table: how one profile of the root ``_config.yml`` departs from another.

Why: the book's numbers come from the ``cpu`` profile, the paper's from its recipe (the
``paper`` profile). A reader has to see every way the two differ, and a hand-typed list goes
stale the day a value changes; :func:`profile_differences` derives the table from the
configuration file itself, and the book renders it at build time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from kalm.config import Config, EvalConfig, RunConfig, TrainConfig, load_config, resolve
from kalm.data import DataError, load_kg

__all__ = ["MEANINGS", "profile_differences"]

MEANINGS: dict[str, str] = {
    "lr": "AdamW learning rate (cosine schedule)",
    "weight_decay": "AdamW weight decay",
    "batch_size": "triples per micro-batch, i.e. in-batch negatives per query",
    "gradient_accumulation_steps": "micro-batches accumulated per optimiser step and process",
    "max_grad_norm": "gradient clipping by global norm (0: none)",
    "processes": "data-parallel processes (GPUs) of the launch",
    "max_steps": "optimiser steps (0: train for the given number of epochs)",
    "epochs": "passes over the training examples when max_steps is 0",
    "lm_fraction": "share of each batch that also gets the triple-completion loss L_imp",
    "lam": "weight λ of L_imp in L_exp + λ L_imp",
    "tau": "temperature τ of the contrastive loss",
    "margin": "margin γ subtracted from the positive's cosine",
    "learnable_tau": "whether τ is trained",
    "self_negatives": "the head's own tail view as an extra negative (SimKGC)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling α",
    "lora_dropout": "dropout on the LoRA input",
    "lora_targets": "projections that get LoRA adapters",
    "max_entity_tokens": "tokens kept of an entity's name and description",
    "max_prompt_tokens": "tokens kept of a triple-completion prompt",
    "train_subset": "training triples used (0: all)",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "compile": "torch.compile the model",
    "gather_negatives": "share in-batch negatives across GPUs",
    "load_in_8bit": "base model weights in 8 bit",
    "checkpoint_every": "steps between saved training states",
    "test_queries": "test triples ranked, each in both directions (0: the full test set)",
    "valid_queries": "validation triples ranked (0: all)",
    "candidates": "entities ranked per query (0: every entity)",
    "query_batch_size": "queries encoded per forward pass",
    "entity_batch_size": "entities encoded per forward pass",
    "kgqa_questions": "questions per KGQA task (0: one per test triple)",
    "kgqa_shots": "worked examples in each KGQA prompt",
    "kgqa_max_new_tokens": "tokens generated per KGQA answer",
    "lm_tokens": "WikiText-103 test tokens scored for perplexity (0: all)",
    "lm_window": "context window of the perplexity evaluation",
    "lm_stride": "stride of the perplexity evaluation's sliding window",
    "analysis_triples": "test triples in the similarity heatmaps",
    "analysis_sentences": "WikiText sentences in the similarity heatmaps",
    "precision": "weights and matmuls of training and evaluation (bf16: mixed precision)",
    "warmup_steps": "linear warm-up steps of the learning-rate schedule",
    "kgqa_batch_size": "KGQA prompts generated per batch",
    "lm_batch_size": "perplexity windows per forward pass",
    "rank_chunk_size": "queries ranked against all candidates at once",
    "sentence_tokens": "tokens kept of a WikiText sentence in the similarity analysis",
    "stats_min_rows": "least rows behind a similarity statistic",
    "analysis_batch_size": "texts encoded per forward pass in the similarity analysis",
    "study_examples": "training examples per arm of a study (steps = examples / batch size)",
    "study_queries": "validation triples ranked per study arm (0: all)",
    "study_candidates": "entities ranked per study query, gold included (0: every entity)",
    "self_negative_grad": "self-negatives trained through the head's view (SimKGC), not constant",
    "theorem1_negatives": "negative counts in the numerical check of Theorem 1",
    "theorem1_dim": "embedding dimension of the Theorem 1 check",
    "theorem1_queries": "queries of the Theorem 1 check",
    "theorem1_pool": "pool of random negatives of the Theorem 1 check",
    "descent_rows": "rows optimised in the Theorem 2 descent",
    "descent_dim": "embedding dimension of the Theorem 2 descent",
    "descent_steps": "gradient steps of the Theorem 2 descent",
}
"""One line per configuration field: what it controls (a test checks that none is missing)."""

ALL_IF_ZERO = frozenset(
    {"test_queries", "valid_queries", "candidates", "train_subset", "kgqa_questions", "lm_tokens"}
)
"""Fields for which 0 means "everything"."""


def profile_differences(
    base: str = "paper",
    other: str = "cpu",
    *,
    dataset: str = "wn18rr",
    config: Config | None = None,
) -> pd.DataFrame:
    """Every setting in which profile `other` differs from `base`, with its one-line meaning.

    Besides the differing fields of ``train`` and ``eval``, the table has rows for the models
    that run each profile by default, for the training budget as a share of an epoch of
    `dataset` (its training triples and their inverses), and for the test set (sample or full).
    Epoch and test-set sizes are counted from the dataset files when they are on disk (nothing
    is downloaded); otherwise the budget row states the formula.

    Returns a DataFrame indexed by setting with the columns ``meaning``, `base` and `other`.
    """
    config = config or load_config()
    runs = {
        name: resolve(config.default_model, dataset, name, config=config) for name in (base, other)
    }
    sizes = _dataset_sizes(dataset)
    rows = [
        {
            "setting": "model",
            "meaning": "models that run this profile by default",
            **{name: _models(config, name) for name in runs},
        },
        {
            "setting": "training budget",
            "meaning": f"examples seen, as a share of one epoch of {dataset} (with inverses)",
            **{name: _budget(run, sizes) for name, run in runs.items()},
        },
        {
            "setting": "test set",
            "meaning": "test triples ranked in KG completion (each in both directions)",
            **{name: _test_set(run, sizes) for name, run in runs.items()},
        },
    ]
    for section, cls in (("train", TrainConfig), ("eval", EvalConfig)):
        for field in dataclasses.fields(cls):
            values = {
                name: getattr(getattr(run, section), field.name) for name, run in runs.items()
            }
            if field.name == "precision":  # what the profile says, not this machine's choice
                values = {name: _stated_precision(config, name, v) for name, v in values.items()}
            if values[base] == values[other]:
                continue
            if field.name not in MEANINGS:
                raise KeyError(
                    f"kalm.settings.MEANINGS has no meaning for `{section}.{field.name}`; "
                    f"add a one-line description of it"
                )
            rows.append(
                {
                    "setting": f"{section}.{field.name}",
                    "meaning": MEANINGS[field.name],
                    **{
                        name: _show(field.name, value, runs[name]) for name, value in values.items()
                    },
                }
            )
    return pd.DataFrame(rows).set_index("setting")[["meaning", base, other]]


def _dataset_sizes(dataset: str) -> dict[str, int] | None:
    """Training examples (triples and inverses) and test triples, if the files are on disk."""
    try:
        kg = load_kg(dataset, download=False)
    except DataError:
        return None
    return {"examples": 2 * len(kg.train), "test": len(kg.test)}


def _models(config: Config, profile: str) -> str:
    names = [a for a, spec in config.models.items() if spec.default_profile == profile]
    return ", ".join(names) or "–"


def _budget(run: RunConfig, sizes: dict[str, int] | None) -> str:
    t = run.train
    if t.max_steps == 0:
        return f"{t.epochs:g} epochs"
    seen = t.max_steps * t.global_batch_size
    per_step = f"{t.batch_size}"
    if t.gradient_accumulation_steps > 1:
        per_step += f" × {t.gradient_accumulation_steps} micro-batches"
    if t.processes > 1:
        per_step += f" × {t.processes} processes"
    text = f"{t.max_steps:,} steps × {per_step} = {seen:,} examples"
    if sizes is None:
        return f"{text}; share of an epoch = steps × batch / (2 × training triples)"
    return f"{text} = {seen / sizes['examples']:.1%} of one epoch ({sizes['examples']:,})"


def _test_set(run: RunConfig, sizes: dict[str, int] | None) -> str:
    n = run.eval.test_queries
    total = f" of {sizes['test']:,}" if sizes else ""
    if n == 0 or (sizes is not None and n >= sizes["test"]):
        return f"full ({sizes['test']:,} triples)" if sizes else "full"
    return f"a sample of {n:,}{total} (fixed seed)"


def _stated_precision(config: Config, profile: str, resolved: str) -> str:
    """A profile's own ``train.precision``: ``auto`` stays ``auto`` (resolved per machine, see
    :func:`kalm.hardware.native_precision`), so the table does not depend on where it is built."""
    stated = config.profiles[profile]["train"].get("precision", resolved)
    return "auto (bf16 with native bf16 hardware, else fp32)" if stated == "auto" else resolved


def _show(field: str, value: Any, run: RunConfig) -> str:
    if field == "lm_fraction":
        return f"{value:.3g} ({run.train.lm_examples} of {run.train.batch_size})"
    if field in ALL_IF_ZERO and value == 0:
        return "all"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ", ".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
