"""Experiment configuration: the root ``_config.yml`` read into frozen, typed dataclasses.

Every experiment is identified by a :class:`RunConfig` (model, dataset, profile, seed and all
hyper-parameters). Validation happens here, once, so that a typo in a papermill parameter fails
before any model is loaded, with a message that lists the valid values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "EvalConfig",
    "ModelSpec",
    "RunConfig",
    "TrainConfig",
    "config_path",
    "load_config",
    "resolve",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """An unknown name or a badly typed value in the configuration or a notebook parameter."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from and which profile it runs by default."""

    alias: str
    source: str  # "gguf-package" (a GGUF file inside a pip package) or "hub" (hub id / local dir)
    default_profile: str
    hub_id: str = ""
    package: str = ""
    file: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a KaLM training run (the ``paper`` profile is the published
    recipe, see the book's Method chapter, ``book/method.md``).

    Integer sizes use 0 for "no limit": ``max_steps: 0`` trains for ``epochs`` epochs,
    ``train_subset: 0`` uses every training triple.

    Fields added after runs were stored carry a default that reproduces those runs; at that
    default they are left out of :meth:`RunConfig.train_key`, so stored adapters stay valid.
    """

    lr: float
    weight_decay: float
    batch_size: int
    max_steps: int
    epochs: float
    lm_fraction: float
    lam: float
    tau: float
    margin: float
    learnable_tau: bool
    self_negatives: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: tuple[str, ...]
    max_entity_tokens: int
    max_prompt_tokens: int
    train_subset: int
    gradient_checkpointing: bool
    compile: bool
    gather_negatives: bool
    load_in_8bit: bool
    checkpoint_every: int
    warmup_steps: int = 0  # linear warm-up of the cosine schedule (the recipe uses none)

    @property
    def lm_examples(self) -> int:
        """Examples per batch that also get the triple-completion loss (recipe: 4 of 24)."""
        return round(self.lm_fraction * self.batch_size)


@dataclass(frozen=True)
class EvalConfig:
    """Sizes of every evaluation and analysis. 0 means "everything" (all test queries, all
    entities as candidates)."""

    test_queries: int
    valid_queries: int
    candidates: int
    query_batch_size: int
    entity_batch_size: int
    kgqa_questions: int
    kgqa_shots: int
    kgqa_max_new_tokens: int
    lm_tokens: int
    lm_window: int
    lm_stride: int
    analysis_triples: int
    analysis_sentences: int
    # Batch sizes of KGQA generation and of perplexity windows, and queries ranked per chunk.
    kgqa_batch_size: int
    lm_batch_size: int
    rank_chunk_size: int
    # Representation analysis: sentence truncation (the last kept token is pooled), the least
    # number of rows behind reported statistics (a figure's 32 rows give noisy off-diagonal means;
    # 0 keeps the figure's rows) and the encoding batch size.
    sentence_tokens: int
    stats_min_rows: int
    analysis_batch_size: int
    # Self-negative ablation: optimiser steps per arm, validation triples and candidates.
    ablation_steps: int
    ablation_queries: int
    ablation_candidates: int
    # Theory checks: Theorem 1's negative counts, dimension, queries and pool of negatives, and
    # the size of the gradient-descent experiment (rows, dimension, steps).
    theorem1_negatives: tuple[int, ...]
    theorem1_dim: int
    theorem1_queries: int
    theorem1_pool: int
    descent_rows: int
    descent_dim: int
    descent_steps: int
    # Matmul precision of KGC encoding (entity index and queries): "bfloat16" autocasts the fp32
    # weights, ~3x faster on CPUs with bf16 instructions; ranks move a little (benchmarks/).
    encode_dtype: str = "float32"


@dataclass(frozen=True)
class Config:
    """The whole root ``_config.yml``."""

    default_model: str
    models: Mapping[str, ModelSpec]
    datasets: tuple[str, ...]
    profiles: Mapping[str, Mapping[str, Any]]

    def model(self, alias: str) -> ModelSpec:
        """The spec of a model alias; an unknown alias lists the valid ones."""
        return self.models[_choose(alias, self.models, "model")]


@dataclass(frozen=True)
class RunConfig:
    """A fully resolved experiment: what to train and how to evaluate it."""

    model: ModelSpec
    dataset: str
    profile: str
    seed: int
    train: TrainConfig
    eval: EvalConfig

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (written into every run directory)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def train_key(self) -> str:
        """Hash of everything that determines the trained weights (not the evaluation sizes).

        Training fields at their dataclass default are left out (see :class:`TrainConfig`).
        """
        payload = {k: v for k, v in self.as_dict().items() if k != "eval"}
        payload["train"] = {
            f.name: payload["train"][f.name]
            for f in fields(TrainConfig)
            if f.default is dataclasses.MISSING or getattr(self.train, f.name) != f.default
        }
        payload["revision"] = TRAINING_REVISION
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def config_path() -> Path:
    """The experiment configuration: ``KALM_CONFIG``, else the repository's ``_config.yml``."""
    return Path(os.environ.get("KALM_CONFIG", REPO_ROOT / "_config.yml"))


def _choose(
    name: str, valid: Mapping[str, Any] | tuple[str, ...], what: str, where: str = ""
) -> str:
    key = str(name).lower().replace("-", "")
    options = {str(v).lower().replace("-", ""): v for v in valid}
    if key not in options:
        raise ConfigError(
            f"{where}unknown {what} {name!r}; valid {what}s: {', '.join(map(str, valid))}"
        )
    return options[key]


# Bumped whenever the training code changes what a configuration trains (revision 2: batches
# bucketed by two token lengths), so the run store never serves an adapter of older code.
TRAINING_REVISION = 2

_CHOICES: dict[str, tuple[str, ...]] = {"encode_dtype": ("float32", "bfloat16")}


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Coerce ``value`` to ``hint`` where lossless (int -> float, list -> tuple) or raise."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        ):
            kind = {str: "strings", int: "integers"}[item]
            raise ConfigError(f"{where} must be a list of {kind}, got {value!r}")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where} must be of type {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Construct dataclass ``cls`` from ``data``, checking names and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {', '.join(names)}")
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    for name, valid in _CHOICES.items():
        if name in values:
            values[name] = _choose(values[name], valid, name, f"{where}.{name}: ")
    return cls(**values)


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate the experiment configuration file."""
    path = Path(path) if path is not None else config_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found; set KALM_CONFIG") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    expected = ("default_model", "models", "datasets", "profiles")
    if not isinstance(raw, dict) or any(k not in raw for k in expected):
        raise ConfigError(f"{path} must be a mapping with the keys {', '.join(expected)}")
    for name, prof in raw["profiles"].items():
        if not isinstance(prof, dict) or {"train", "eval"} - set(prof):
            raise ConfigError(f"{path}: profiles.{name} needs a `train` and an `eval` section")
    models = {
        alias: _build(ModelSpec, {"alias": alias, **spec}, f"{path}: models.{alias}")
        for alias, spec in raw["models"].items()
    }
    profiles = raw["profiles"]
    for name, prof in profiles.items():
        _build(TrainConfig, prof["train"], f"{path}: profiles.{name}.train")
        _build(EvalConfig, prof["eval"], f"{path}: profiles.{name}.eval")
    for alias, spec in models.items():
        _choose(
            spec.default_profile, profiles, "profile", f"{path}: models.{alias}.default_profile: "
        )
    config = Config(
        default_model=raw["default_model"],
        models=types.MappingProxyType(models),
        datasets=tuple(raw["datasets"]),
        profiles=types.MappingProxyType(profiles),
    )
    _choose(config.default_model, models, "model", f"{path}: default_model: ")
    return config


def resolve(
    model: str | None = None,
    dataset: str | None = None,
    profile: str = "auto",
    seed: int = 0,
    config: Config | None = None,
    **overrides: Any,
) -> RunConfig:
    """Resolve notebook parameters into a :class:`RunConfig`.

    ``model`` defaults to the configuration's ``default_model`` and ``dataset`` to the first of
    its ``datasets``. ``profile="auto"`` takes ``KALM_PROFILE`` from the environment if set, else
    the model's default profile. ``overrides`` may name any field of :class:`TrainConfig` or
    :class:`EvalConfig` (e.g. ``lam=0.1``); ``None`` values are ignored so notebooks can pass
    optional parameters.
    """
    config = config or load_config()
    spec = config.model(model or config.default_model)
    dataset = _choose(dataset or config.datasets[0], config.datasets, "dataset")
    if profile == "auto":
        profile = os.environ.get("KALM_PROFILE") or spec.default_profile
    profile = _choose(profile, config.profiles, "profile")
    seed = _check_type(seed, int, "seed")
    train_fields = {f.name for f in fields(TrainConfig)}
    eval_fields = {f.name for f in fields(EvalConfig)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - train_fields - eval_fields)
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown}; "
            f"valid: {', '.join(sorted(train_fields | eval_fields))}"
        )
    prof = config.profiles[profile]
    train = {**prof["train"], **{k: v for k, v in overrides.items() if k in train_fields}}
    ev = {**prof["eval"], **{k: v for k, v in overrides.items() if k in eval_fields}}
    return RunConfig(
        model=spec,
        dataset=dataset,
        profile=profile,
        seed=seed,
        train=_build(TrainConfig, train, f"profile {profile}: train"),
        eval=_build(EvalConfig, ev, f"profile {profile}: eval"),
    )
