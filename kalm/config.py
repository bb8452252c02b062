"""Experiment configuration: the root ``_config.yml`` read into frozen, typed dataclasses.

Every experiment is identified by a :class:`RunConfig` (model, dataset, profile, seed and all
hyper-parameters). Validation happens here, once, so that a typo or an out-of-range value in a
papermill parameter fails before any model is loaded, with a message that names the key, the value,
the allowed range and where the value came from. Each field is declared once, with
:func:`setting`: its type, default, allowed values and meaning; :data:`RULES` and the book's
settings table (:data:`kalm.settings.MEANINGS`) are derived from those declarations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from kalm.hardware import native_precision
from kalm.weights import encoder_pooling, parameter_count, weight_files

__all__ = [
    "RULES",
    "Config",
    "ConfigError",
    "EvalConfig",
    "ModelSpec",
    "Range",
    "RunConfig",
    "Session",
    "TrainConfig",
    "config_path",
    "load_config",
    "local_model",
    "resolve",
    "setting",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """An unknown name, a badly typed or an out-of-range value in the configuration or a notebook
    parameter."""


# --- value rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """Finite numbers between ``low`` and ``high`` (None: unbounded), each end in- or excluded.

    Every numeric field has one, because a value outside its range fails late and obscurely: a
    negative batch size hangs the batch sampler, ``tau = 0`` divides by zero after minutes of
    training, an infinite margin turns every loss into NaN.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # what a boundary value means, e.g. "0 = all test queries"

    def admits(self, value: Any) -> bool:
        """True if ``value`` is a finite number inside the range."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """The range in words, e.g. ``a finite value with 0 <= value < 2``, for error messages."""
        below = "<" if self.low_open else "<="
        above = "<" if self.high_open else "<="
        if self.low is not None and self.high is not None:
            text = f"a finite value with {self.low:g} {below} value {above} {self.high:g}"
        elif self.low is not None:
            text = f"a finite value {below.replace('<', '>')} {self.low:g}"
        else:
            text = f"a finite value {above} {self.high:g}"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (booleans, names of dtypes)."""

    values: tuple[Any, ...]

    def admits(self, value: Any) -> bool:
        """True if ``value`` is one of the allowed values (``True`` is not ``1`` here)."""
        return any(type(value) is type(v) and value == v for v in self.values)

    def describe(self) -> str:
        """The allowed values, e.g. ``one of float32, bfloat16``."""
        shown = (str(v).lower() if isinstance(v, bool) else str(v) for v in self.values)
        return "one of " + ", ".join(shown)


@dataclass(frozen=True)
class Names:
    """A non-empty list of distinct, non-empty names (the modules LoRA adapts)."""

    def admits(self, value: Any) -> bool:
        """True if ``value`` is a non-empty tuple of distinct non-empty strings."""
        return bool(value) and all(value) and len(set(value)) == len(value)

    def describe(self) -> str:
        """The rule in words."""
        return "a non-empty list of distinct, non-empty module names"


@dataclass(frozen=True)
class Counts:
    """A non-empty list of integers >= 1 (the negative counts of the Theorem 1 check)."""

    def admits(self, value: Any) -> bool:
        """True if ``value`` is a non-empty tuple of positive integers."""
        return bool(value) and all(v >= 1 for v in value)

    def describe(self) -> str:
        """The rule in words."""
        return "a non-empty list of integers >= 1"


Rule = Range | OneOf | Names | Counts
# Where a key's value came from, in words (empty when the message's prefix already says it).
Origin = Callable[[str], str]

_POSITIVE = Range(0, low_open=True)
_COUNT = Range(1)
_FLAG = OneOf((False, True))


def _all(what: str) -> Range:
    return Range(0, note=f"0 = {what}")


def setting(meaning: str, rule: Rule, default: Any = dataclasses.MISSING) -> Any:
    """Declare a configuration field once: its type (the annotation), its ``default`` (only for
    fields added after runs were stored, see :class:`TrainConfig`), its allowed values and its
    meaning.

    The rule and the meaning go into the field's metadata, from which :data:`RULES` (checked on
    every load and resolve) and :data:`kalm.settings.MEANINGS` (the book's settings table) are
    derived, so a new field is one line here plus the profiles that set it.
    """
    return dataclasses.field(default=default, metadata={"meaning": meaning, "rule": rule})


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a KaLM training run (the ``paper`` profile is the published
    recipe, see the book's Method chapter, ``book/method.md``).

    Integer sizes use 0 for "no limit": ``max_steps: 0`` trains for ``epochs`` epochs,
    ``train_subset: 0`` uses every training triple.

    Fields added after runs were stored carry a default that reproduces those runs; at that
    default they are left out of :meth:`RunConfig.train_key`, so stored adapters stay valid.
    """

    lr: float = setting("AdamW learning rate (cosine schedule)", _POSITIVE)
    weight_decay: float = setting("AdamW weight decay", Range(0))
    batch_size: int = setting(
        "triples per micro-batch, i.e. in-batch negatives per query",
        Range(2, note="in-batch negatives need a second example"),
    )
    max_steps: int = setting(
        "optimiser steps (0: train for the given number of epochs)",
        _all("as many as the epochs take"),
    )
    epochs: float = setting("passes over the training examples when max_steps is 0", _POSITIVE)
    lm_fraction: float = setting(
        "share of each batch that also gets the triple-completion loss L_imp", Range(0, 1)
    )
    lam: float = setting("weight λ of L_imp in L_exp + λ L_imp", Range(0))
    tau: float = setting("temperature τ of the contrastive loss", _POSITIVE)
    margin: float = setting(
        "margin γ subtracted from the positive's cosine",
        Range(0, 2, high_open=True, note="cosine scores differ by at most 2"),
    )
    learnable_tau: bool = setting("whether τ is trained", _FLAG)
    self_negatives: bool = setting("the head's own tail view as an extra negative (SimKGC)", _FLAG)
    lora_r: int = setting("LoRA rank", _COUNT)
    lora_alpha: int = setting("LoRA scaling α", _POSITIVE)
    lora_dropout: float = setting("dropout on the LoRA input", Range(0, 1, high_open=True))
    lora_targets: tuple[str, ...] = setting("projections that get LoRA adapters", Names())
    max_entity_tokens: int = setting("tokens kept of an entity's name and description", _COUNT)
    max_prompt_tokens: int = setting(
        "tokens kept of a triple-completion prompt",
        Range(2, note="one prompt token and one response token at least"),
    )
    train_subset: int = setting("training triples used (0: all)", _all("every training triple"))
    gradient_checkpointing: bool = setting(
        "recompute activations in the backward pass to save memory", _FLAG
    )
    gather_negatives: bool = setting("share in-batch negatives across GPUs", _FLAG)
    load_in_8bit: bool = setting("base model weights in 8 bit", _FLAG)
    checkpoint_every: int = setting("steps between saved training states", _COUNT)
    # Linear warm-up of the cosine schedule (the recipe uses none).
    warmup_steps: int = setting("linear warm-up steps of the learning-rate schedule", Range(0), 0)
    # Weights and matmuls of training and of every evaluation: "bf16" keeps the frozen base in
    # bf16 under bf16 autocast, with LoRA weights, optimiser state and loss maths in fp32. A
    # profile may say "auto", which `resolve` turns into `native_precision()` of this machine.
    precision: str = setting(
        "weights and matmuls of training and evaluation (bf16: mixed precision)",
        OneOf(("fp32", "bf16", "auto")),
        "fp32",
    )
    # Self-negatives with gradient through the head's view (SimKGC) rather than as a constant.
    self_negative_grad: bool = setting(
        "self-negatives trained through the head's view (SimKGC), not constant", _FLAG, False
    )
    # Micro-batches of `batch_size` that each process accumulates into one optimiser step: one
    # GPU with 4 reproduces the recipe's step over 4 GPUs x 24 examples.
    gradient_accumulation_steps: int = setting(
        "micro-batches accumulated per optimiser step and process", _COUNT, 1
    )
    # Gradient clipping by global L2 norm before each optimiser step (the recipe: 1.0).
    max_grad_norm: float = setting(
        "gradient clipping by global norm (0: none)", Range(0, note="0 = no clipping"), 0.0
    )
    # Data-parallel processes the run trains on (`accelerate launch`, `torchrun`). No profile
    # sets it: `python -m kalm.train` takes it from the launch. It is part of the run key (when
    # not 1) because it sets the global batch, and a launch of another size refuses the run.
    processes: int = setting("data-parallel processes (GPUs) of the launch", _COUNT, 1)
    # The learning curve, measured while training and stored with the run (curve.jsonl): the
    # validation protocol of the studies at `curve_points` evenly spaced example counts (and
    # before the first step). Its sizes are training settings because the curve is part of what
    # the run publishes; at 0 points a run measures none and keeps its earlier key.
    curve_points: int = setting(
        "learning-curve points measured while training (0: none)", Range(0, note="0 = none"), 0
    )
    curve_queries: int = setting("validation triples of each learning-curve point", _COUNT, 300)
    curve_candidates: int = setting(
        "entities ranked at each learning-curve point (0: every entity)",
        _all("every entity"),
        2000,
    )

    @property
    def lm_examples(self) -> int:
        """Examples per micro-batch that also get the triple-completion loss (recipe: 4 of 24)."""
        return round(self.lm_fraction * self.batch_size)

    @property
    def global_batch_size(self) -> int:
        """Examples per optimiser step over all processes and accumulated micro-batches.

        Steps, epochs and the learning-rate schedule count in these; in-batch negatives come
        from one micro-batch of ``batch_size`` (or, with ``gather_negatives``, from the
        micro-batches of all processes at once).
        """
        return self.batch_size * self.gradient_accumulation_steps * self.processes


_TWO_ROWS = Range(2, note="similarity statistics need two rows")
_SPHERE = Range(2, note="a sphere of dimension 1 has two points")


@dataclass(frozen=True)
class EvalConfig:
    """Sizes of every evaluation and analysis. 0 means "everything" (all test queries, all
    entities as candidates)."""

    test_queries: int = setting(
        "test triples ranked, each in both directions (0: the full test set)",
        _all("every test triple"),
    )
    valid_queries: int = setting(
        "validation triples ranked (0: all)", _all("every validation triple")
    )
    candidates: int = setting("entities ranked per query (0: every entity)", _all("every entity"))
    query_batch_size: int = setting("queries encoded per forward pass", _COUNT)
    entity_batch_size: int = setting("entities encoded per forward pass", _COUNT)
    kgqa_questions: int = setting(
        "questions per KGQA task (0: one per test triple)", _all("every test triple")
    )
    kgqa_shots: int = setting("worked examples in each KGQA prompt", Range(0))
    kgqa_max_new_tokens: int = setting("tokens generated per KGQA answer", _COUNT)
    lm_tokens: int = setting(
        "WikiText-103 test tokens scored for perplexity (0: all)", _all("the whole test text")
    )
    lm_window: int = setting(
        "context window of the perplexity evaluation",
        Range(2, note="a window predicts its tokens after the first"),
    )
    lm_stride: int = setting("stride of the perplexity evaluation's sliding window", _COUNT)
    analysis_triples: int = setting("test triples in the similarity heatmaps", _TWO_ROWS)
    analysis_sentences: int = setting("WikiText sentences in the similarity heatmaps", _TWO_ROWS)
    kgqa_batch_size: int = setting("KGQA prompts generated per batch", _COUNT)
    lm_batch_size: int = setting("perplexity windows per forward pass", _COUNT)
    rank_chunk_size: int = setting("queries ranked against all candidates at once", _COUNT)
    # Representation analysis: the last kept token of a truncated sentence is pooled, and a
    # figure's 32 rows give noisy off-diagonal means, hence a least number of rows behind the
    # reported statistics (0 keeps the figure's rows).
    sentence_tokens: int = setting(
        "tokens kept of a WikiText sentence in the similarity analysis", _COUNT
    )
    stats_min_rows: int = setting(
        "least rows behind a similarity statistic", Range(0, note="0 = no minimum")
    )
    analysis_batch_size: int = setting(
        "texts encoded per forward pass in the similarity analysis", _COUNT
    )
    # Studies (self-negatives, tuning, lambda): training examples per arm (steps follow from the
    # arm's global batch, so arms of different batch sizes see as many examples), validation
    # triples and candidates per query.
    study_examples: int = setting(
        "training examples per arm of a study (steps = examples / global batch, i.e. batch size "
        "× accumulated micro-batches × processes)",
        _COUNT,
    )
    study_queries: int = setting(
        "validation triples ranked per study arm (0: all)", _all("every validation triple")
    )
    study_candidates: int = setting(
        "entities ranked per study query, gold included (0: every entity)", _all("every entity")
    )
    theorem1_negatives: tuple[int, ...] = setting(
        "negative counts in the numerical check of Theorem 1", Counts()
    )
    theorem1_dim: int = setting("embedding dimension of the Theorem 1 check", _SPHERE)
    theorem1_queries: int = setting("queries of the Theorem 1 check", _COUNT)
    theorem1_pool: int = setting("pool of random negatives of the Theorem 1 check", _COUNT)
    descent_rows: int = setting(
        "rows optimised in the Theorem 2 descent",
        Range(2, note="a contrastive loss needs a second row"),
    )
    descent_dim: int = setting("embedding dimension of the Theorem 2 descent", _SPHERE)
    descent_steps: int = setting("gradient steps of the Theorem 2 descent", _COUNT)


# --- the configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from and which profile it runs by default.

    ``source`` is "gguf-package" (a GGUF file inside a pip package), "package" (a model
    directory, ``file``, inside the pip package ``package``, read like a local directory),
    "hub" (``hub_id`` is a hub repository, read from the Hugging Face cache first, or a
    directory) or "local" (a model directory named instead of an alias; ``hub_id`` holds its
    resolved path). ``kind`` is "causal" (a causal LM, pooled at its last token) or "encoder"
    (a bidirectional bi-encoder, pooled as its sentence-transformers configuration says).
    The spec is part of the run key, so the fields of existing specs never change; fields
    added later are left out of the key at their default (see :meth:`RunConfig.train_key`).
    """

    alias: str
    source: str
    default_profile: str
    hub_id: str = ""
    package: str = ""
    file: str = ""
    kind: str = dataclasses.field(default="causal", metadata={"added": True})

    @property
    def is_encoder(self) -> bool:
        """Whether the model is a bidirectional encoder (no LM head, SimKGC's views)."""
        return self.kind == "encoder"

    @property
    def store_name(self) -> str:
        """The model's part of run-store directory names.

        A configured model is named by its alias. A local directory is named by its own name
        and a digest of its resolved path: two directories called ``Llama-2-7b-hf`` in
        different places hold different weights and must not share the untuned model's caches.
        """
        if self.source != "local":
            return self.alias
        return f"{self.alias}-{hashlib.sha256(self.hub_id.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Config:
    """The whole root ``_config.yml``."""

    default_model: str
    models: Mapping[str, ModelSpec]
    datasets: tuple[str, ...]
    profiles: Mapping[str, Mapping[str, Any]]
    path: Path  # the file it was read from, named in errors about its values

    def model(self, name: str | Path) -> ModelSpec:
        """The spec of a model alias or of a local model directory (one holding
        ``config.json``, as ``save_pretrained`` writes it); an alias wins over a directory of
        the same name. An unknown name lists the aliases and says what a directory needs."""
        key = str(name).lower().replace("-", "")
        aliases = {a.lower().replace("-", ""): a for a in self.models}
        if isinstance(name, str) and key in aliases:
            return self.models[aliases[key]]
        path = Path(name).expanduser()
        if path.is_dir():
            return local_model(path)
        missing = f" ({path} does not exist)" if any(c in str(name) for c in "/\\~.") else ""
        raise ConfigError(
            f"unknown model {str(name)!r}; valid models: {', '.join(self.models)}, or a local "
            f"directory holding config.json and the weights{missing}"
        )


@dataclass(frozen=True, eq=False)
class Session:
    """What a notebook's parameters ask of the process running it, beyond the run itself.

    It travels with the configuration (:attr:`RunConfig.session`, kept by
    ``dataclasses.replace`` and by the study arms) so that every library call of the notebook
    sees it without a module global; it is no part of the run's identity, file or equality.
    ``retrain`` trains anew every run the session loads, each once (``retrained`` holds the run
    directories already retrained); ``results_dir`` is where the pages publish their records
    (None: ``KALM_RESULTS_DIR``, else ``book/results``); ``runs_dir`` is the run store (None:
    see :func:`kalm.runs.runs_dir`).
    """

    retrain: bool = False
    results_dir: Path | None = None
    runs_dir: Path | None = None
    retrained: set[Path] = dataclasses.field(default_factory=set)


@dataclass(frozen=True)
class RunConfig:
    """A fully resolved experiment: what to train and how to evaluate it, and the
    :class:`Session` that asked for it."""

    model: ModelSpec
    dataset: str
    profile: str
    seed: int = setting(
        "seed of sampling and initialisation", Range(0, note="numpy seeds are non-negative")
    )
    train: TrainConfig
    eval: EvalConfig
    session: Session = dataclasses.field(default_factory=Session, compare=False, repr=False)

    def __post_init__(self) -> None:
        """Refuse a run the model cannot train: L_imp needs an LM head, which an encoder lacks."""
        if self.model.is_encoder and self.train.lam != 0:
            raise ConfigError(
                f"train.lam = {self.train.lam!r} (profile {self.profile}) is invalid for model "
                f"{self.model.alias!r}: an encoder has no LM head, so it trains without the "
                "triple-completion loss L_imp. Set lam=0 (the profiles' `encoder_train` "
                "sections do)"
            )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (written into every run directory), without the session."""
        plain = dataclasses.asdict(dataclasses.replace(self, session=Session()))
        del plain["session"]
        return json.loads(json.dumps(plain))

    def train_key(self) -> str:
        """Hash of everything that determines the trained weights (not the evaluation sizes).

        Training fields at their dataclass default are left out (see :class:`TrainConfig`), and
        so are fields added to :class:`ModelSpec` after runs were stored.
        """
        payload = {k: v for k, v in self.as_dict().items() if k != "eval"}
        payload["train"] = {
            f.name: payload["train"][f.name]
            for f in fields(TrainConfig)
            if f.default is dataclasses.MISSING or getattr(self.train, f.name) != f.default
        }
        payload["model"] = {
            f.name: payload["model"][f.name]
            for f in fields(ModelSpec)
            if not f.metadata.get("added") or getattr(self.model, f.name) != f.default
        }
        payload["revision"] = TRAINING_REVISION
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# The allowed value of every field of TrainConfig and EvalConfig, and of the seed, read from their
# declarations (a test requires one for every field).
RULES: Mapping[str, Rule] = types.MappingProxyType(
    {
        f.name: f.metadata["rule"]
        for cls in (TrainConfig, EvalConfig, RunConfig)
        for f in fields(cls)
        if "rule" in f.metadata
    }
)

# Pairs (a, b) that must satisfy a <= b when both belong to one section.
AT_MOST: tuple[tuple[str, str], ...] = (("lm_stride", "lm_window"),)


def config_path() -> Path:
    """The experiment configuration: ``KALM_CONFIG``, else the repository's ``_config.yml``."""
    return Path(os.environ.get("KALM_CONFIG", REPO_ROOT / "_config.yml"))


# --- local model directories ---------------------------------------------------------------------

LARGE_MODEL = 1_000_000_000
"""Parameters above which a local model defaults to the ``paper`` profile (else ``cpu``)."""


def local_model(directory: Path) -> ModelSpec:
    """The spec of a model directory: named after it, identified by its resolved path, with
    the ``paper`` profile by default above :data:`LARGE_MODEL` parameters, else ``cpu``; an
    encoder if it is a sentence-transformers directory (``modules.json`` with a pooling).

    The resolved path (not a hash of the weights, which would read gigabytes on every resolve)
    makes the run key: the same directory finds its runs again, another one trains its own. A
    model replaced in place keeps its key, so retrain its runs (``--retrain``).
    """
    path = directory.expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} holds no config.json, so it is not a model directory; pass the directory "
            "that save_pretrained wrote (config.json, weights, tokenizer files)"
        )
    if not weight_files(path):
        raise ConfigError(
            f"{path} holds config.json but no complete set of weights (*.safetensors or *.bin, "
            "every shard of a sharded checkpoint); copy the weights into it"
        )
    try:
        large = parameter_count(path) > LARGE_MODEL
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path}: cannot read the size of the weights ({type(err).__name__}: {err}); the "
            "files look damaged, download them again"
        ) from err
    try:
        encoder = encoder_pooling(path) is not None
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return ModelSpec(
        alias=path.name,
        source="local",
        default_profile="paper" if large else "cpu",
        hub_id=str(path),
        kind="encoder" if encoder else "causal",
    )


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


MODEL_KINDS = ("causal", "encoder")
MODEL_SOURCES = ("gguf-package", "package", "hub", "local")

ENCODER_SECTION = "encoder_train"
"""The section of a profile whose training settings replace those of its ``train`` section for
an encoder model (``lam: 0``, BERT's LoRA targets, SimKGC's batch and learning rate): one
profile name (``smoke``, ``cpu``) serves both kinds of model."""


def _encoder_train(profile: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings of ``profile`` for an encoder: its ``train`` section updated by
    its :data:`ENCODER_SECTION`."""
    return {**profile["train"], **profile.get(ENCODER_SECTION, {})}


def _check_rules(values: Mapping[str, Any], where: str, origin: Origin) -> None:
    """Raise ConfigError for the first value outside its rule or pair of :data:`AT_MOST`."""
    prefix = f"{where}." if where else ""
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is not None and not rule.admits(value):
            raise ConfigError(
                f"{prefix}{name} = {value!r} is invalid: it must be {rule.describe()}"
                f"{_from(origin, name)}"
            )
    for small, large in AT_MOST:
        if small in values and large in values and values[small] > values[large]:
            raise ConfigError(
                f"{prefix}{small} = {values[small]!r} is invalid: it must be <= "
                f"{large} = {values[large]!r}{_from(origin, small, large)}"
            )


def _from(origin: Origin, *names: str) -> str:
    """``"; <where name came from>"`` for error messages, or nothing if the origin is known."""
    said = dict.fromkeys(origin(n) for n in names if origin(n))
    return "".join(f"; {text}" for text in said)


def _check_type(value: Any, hint: Any, where: str, source: str = "") -> Any:
    """Coerce ``value`` to ``hint`` where lossless (int -> float, list -> tuple) or raise.

    ``source`` ends the error message: where the value came from (``"; from the override …"``).
    """
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        ):
            kind = {str: "strings", int: "integers"}[item]
            raise ConfigError(f"{where} must be a list of {kind}, got {value!r}{source}")
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
            f"{source}"
        )
    return value


def _build(cls: type, data: Mapping[str, Any], where: str, origin: Origin = lambda _: "") -> Any:
    """Construct dataclass ``cls`` from ``data``, checking names, types and :data:`RULES`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {', '.join(names)}")
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    values = {
        k: _check_type(v, hints[k], f"{where}.{k}", _from(origin, k)) for k, v in data.items()
    }
    _check_rules(values, where, origin)
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
        extra = sorted(set(prof) - {"train", "eval", ENCODER_SECTION})
        if extra:
            raise ConfigError(
                f"{path}: profiles.{name} has the unknown section(s) {extra}; valid sections: "
                f"train, eval, {ENCODER_SECTION}"
            )
    models = {
        alias: _build(ModelSpec, {"alias": alias, **spec}, f"{path}: models.{alias}")
        for alias, spec in raw["models"].items()
    }
    profiles = raw["profiles"]
    for name, prof in profiles.items():
        for cls, section in ((TrainConfig, "train"), (EvalConfig, "eval")):
            if not isinstance(prof[section], dict):
                raise ConfigError(f"{path}: profiles.{name}.{section} must be a mapping")
            _build(cls, prof[section], f"{path}: profiles.{name}.{section}")
        if ENCODER_SECTION in prof:
            if not isinstance(prof[ENCODER_SECTION], dict):
                raise ConfigError(f"{path}: profiles.{name}.{ENCODER_SECTION} must be a mapping")
            where = f"{path}: profiles.{name}.{ENCODER_SECTION}"
            _build(TrainConfig, _encoder_train(prof), where)
    for alias, spec in models.items():
        _choose(spec.kind, MODEL_KINDS, "model kind", f"{path}: models.{alias}.kind: ")
        _choose(spec.source, MODEL_SOURCES, "model source", f"{path}: models.{alias}.source: ")
    for alias, spec in models.items():
        _choose(
            spec.default_profile, profiles, "profile", f"{path}: models.{alias}.default_profile: "
        )
    config = Config(
        default_model=raw["default_model"],
        models=types.MappingProxyType(models),
        datasets=tuple(raw["datasets"]),
        profiles=types.MappingProxyType(profiles),
        path=path,
    )
    _choose(config.default_model, models, "model", f"{path}: default_model: ")
    return config


def resolve(
    model: str | Path | None = None,
    dataset: str | None = None,
    profile: str = "auto",
    seed: int = 0,
    config: Config | None = None,
    **overrides: Any,
) -> RunConfig:
    """Resolve notebook parameters into a :class:`RunConfig`.

    ``model`` is an alias of the configuration or a local model directory (see
    :meth:`Config.model`); it defaults to the configuration's ``default_model``, and ``dataset``
    to the first of its ``datasets``. ``profile="auto"`` takes ``KALM_PROFILE`` from the
    environment if set, else the model's default profile. ``overrides`` may name any field of
    :class:`TrainConfig` or :class:`EvalConfig` (e.g. ``lam=0.1``); ``None`` values are ignored
    so notebooks can pass optional parameters. Every value is checked against :data:`RULES`; an
    error says whether the value came from an override or from the configuration file's profile
    (and whether ``KALM_PROFILE`` chose it).
    """
    config = config or load_config()
    spec = config.model(model or config.default_model)  # an alias or a local directory
    dataset = _choose(dataset or config.datasets[0], config.datasets, "dataset")
    env_profile = os.environ.get("KALM_PROFILE") if profile == "auto" else None
    if profile == "auto":
        profile = env_profile or spec.default_profile
    chosen_by = f" (profile chosen by KALM_PROFILE={env_profile!r})" if env_profile else ""
    profile = _choose(profile, config.profiles, "profile", "KALM_PROFILE: " if env_profile else "")
    seed_origin = "from the seed argument (a notebook parameter or keyword argument of resolve)"
    seed = _check_type(seed, int, "seed", f"; {seed_origin}")
    _check_rules({"seed": seed}, "", lambda _: seed_origin)
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
    settings = _encoder_train(prof) if spec.is_encoder else prof["train"]
    train = {**settings, **{k: v for k, v in overrides.items() if k in train_fields}}
    if train.get("precision") == "auto":
        train["precision"] = native_precision()
    ev = {**prof["eval"], **{k: v for k, v in overrides.items() if k in eval_fields}}

    def origin(section: str) -> Origin:
        def told(key: str) -> str:
            where = section
            if spec.is_encoder and section == "train" and key in prof.get(ENCODER_SECTION, {}):
                where = ENCODER_SECTION
            if key in overrides:
                return (
                    f"from the override {key}={overrides[key]!r} "
                    "(a notebook parameter or keyword argument of resolve)"
                )
            return f"from {config.path}: profiles.{profile}.{where}.{key}{chosen_by}"

        return told

    return RunConfig(
        model=spec,
        dataset=dataset,
        profile=profile,
        seed=seed,
        train=_build(TrainConfig, train, f"profile {profile}: train", origin("train")),
        eval=_build(EvalConfig, ev, f"profile {profile}: eval", origin("eval")),
    )
