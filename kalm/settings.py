"""The settings table: how one profile of the root ``_config.yml`` departs from another.

Why: the book's numbers come from the ``cpu`` profile, the paper's from its recipe (the
``paper`` profile). A reader has to see every way the two differ, and a hand-typed list goes
stale the day a value changes; :func:`profile_differences` derives the table from the
configuration file itself, and the book renders it at build time.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import pandas as pd

from kalm.config import (
    RULES,
    Config,
    EvalConfig,
    Range,
    RunConfig,
    TrainConfig,
    load_config,
    resolve,
)
from kalm.data.registry import get_dataset

__all__ = ["MEANINGS", "profile_differences"]

MEANINGS: Mapping[str, str] = types.MappingProxyType(
    {
        field.name: field.metadata.get("meaning", "")
        for cls in (TrainConfig, EvalConfig)
        for field in dataclasses.fields(cls)
    }
)
"""One line per configuration field: what it controls, as declared with
:func:`kalm.config.setting`."""


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
    Epoch and test-set sizes come from the dataset registry's counts of the pinned files
    (:attr:`kalm.data.registry.DatasetSpec.triples`), so nothing is read or downloaded.

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


def _zero_means(field: str) -> str:
    """What 0 means for ``field`` ("every test triple", "no clipping"), as its rule says it in
    error messages, or ``""`` where 0 is an ordinary value."""
    rule = RULES[field]
    if isinstance(rule, Range) and rule.note.startswith("0 = "):
        return rule.note.removeprefix("0 = ")
    return ""


def _dataset_sizes(dataset: str) -> dict[str, int]:
    """Training examples (triples and inverses) and test triples, from the dataset registry's
    counts (pinned with the files' hashes), so the table is the same whether or not the files
    are on the machine that builds the book."""
    triples = get_dataset(dataset).triples
    return {"examples": 2 * triples["train"], "test": triples["test"]}


def _models(config: Config, profile: str) -> str:
    names = [a for a, spec in config.models.items() if spec.default_profile == profile]
    return ", ".join(names) or "–"


def _budget(run: RunConfig, sizes: dict[str, int]) -> str:
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
    return f"{text} = {seen / sizes['examples']:.1%} of one epoch ({sizes['examples']:,})"


def _test_set(run: RunConfig, sizes: dict[str, int]) -> str:
    n = run.eval.test_queries
    if n == 0 or n >= sizes["test"]:
        return f"full ({sizes['test']:,} triples)"
    return f"a sample of {n:,} of {sizes['test']:,} (fixed seed)"


def _stated_precision(config: Config, profile: str, resolved: str) -> str:
    """A profile's own ``train.precision``: ``auto`` stays ``auto`` (resolved per machine, see
    :func:`kalm.hardware.native_precision`), so the table does not depend on where it is built."""
    stated = config.profiles[profile]["train"].get("precision", resolved)
    return "auto (bf16 with native bf16 hardware, else fp32)" if stated == "auto" else resolved


def _show(field: str, value: Any, run: RunConfig) -> str:
    if field == "lm_fraction":
        return f"{value:.3g} ({run.train.lm_examples} of {run.train.batch_size})"
    zero = _zero_means(field)
    if zero and value == 0 and not isinstance(value, bool):
        return zero
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ", ".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
