"""Experiment configuration: the root ``_config.yml`` read into frozen, typed dataclasses.

Every experiment is identified by a :class:`RunConfig` (model, dataset, profile, seed and all
hyper-parameters). Validation happens here, once, so that a typo or an out-of-range value in a
papermill parameter fails before any model is loaded, with a message that names the key, the value,
the allowed range and where the value came from. The ranges live in one table, :data:`RULES`,
apart from the dataclasses, and a test requires a rule for every field.
"""

from __future__ import annotations

import dataclasses
import functools
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

__all__ = [
    "NATIVE_BF16_CPU_FLAGS",
    "RULES",
    "Config",
    "ConfigError",
    "EvalConfig",
    "ModelSpec",
    "Range",
    "RunConfig",
    "TrainConfig",
    "config_path",
    "cpu_has_native_bf16",
    "load_config",
    "local_model",
    "native_precision",
    "parameter_count",
    "resolve",
    "weight_files",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """An unknown name, a badly typed or an out-of-range value in the configuration or a notebook
    parameter."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from and which profile it runs by default.

    ``source`` is "gguf-package" (a GGUF file inside a pip package), "hub" (``hub_id`` is a
    hub repository, read from the Hugging Face cache first, or a directory) or "local" (a model
    directory named instead of an alias; ``hub_id`` holds its resolved path).
    The spec is part of the run key, so the fields of existing specs never change.
    """

    alias: str
    source: str
    default_profile: str
    hub_id: str = ""
    package: str = ""
    file: str = ""

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
    # Weights and matmuls of training and of every evaluation: "bf16" keeps the frozen base in
    # bf16 under bf16 autocast, with LoRA weights, optimiser state and loss maths in fp32. A
    # profile may say "auto", which `resolve` turns into `native_precision()` of this machine.
    precision: str = "fp32"
    # Self-negatives with gradient through the head's view (SimKGC) rather than as a constant.
    self_negative_grad: bool = False
    # Micro-batches of `batch_size` that each process accumulates into one optimiser step: one
    # GPU with 4 reproduces the recipe's step over 4 GPUs x 24 examples.
    gradient_accumulation_steps: int = 1
    # Gradient clipping by global L2 norm before each optimiser step (the recipe: 1.0); 0 = none.
    max_grad_norm: float = 0.0
    # Data-parallel processes the run trains on (`accelerate launch`, `torchrun`). No profile
    # sets it: `python -m kalm.train` takes it from the launch. It is part of the run key (when
    # not 1) because it sets the global batch, and a launch of another size refuses the run.
    processes: int = 1

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
    # Studies (self-negatives, tuning, lambda): training examples per arm (steps follow from the
    # arm's batch size, so arms of different batch sizes see as many examples), validation
    # triples and candidates per query.
    study_examples: int
    study_queries: int
    study_candidates: int
    # Theory checks: Theorem 1's negative counts, dimension, queries and pool of negatives, and
    # the size of the gradient-descent experiment (rows, dimension, steps).
    theorem1_negatives: tuple[int, ...]
    theorem1_dim: int
    theorem1_queries: int
    theorem1_pool: int
    descent_rows: int
    descent_dim: int
    descent_steps: int


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


# --- local model directories ---------------------------------------------------------------------

LARGE_MODEL = 1_000_000_000
"""Parameters above which a local model defaults to the ``paper`` profile (else ``cpu``)."""

_BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: safetensors if there are any, else PyTorch
    ``.bin`` files; a sharded checkpoint must hold every shard its index lists."""
    for suffix in ("safetensors", "bin"):
        files = sorted(directory.glob(f"*.{suffix}"))
        index = next(iter(directory.glob(f"*.{suffix}.index.json")), None)
        if index is not None:
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return []
            if not all((directory / shard).is_file() for shard in shards):
                return []
        if files:
            return files
    return []


def _safetensors_parameters(path: Path) -> int:
    """Elements of every tensor of a safetensors file, read from its JSON header alone."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        # Garbage would claim a header of exabytes; read no more than the file holds.
        raw = f.read(size) if size <= path.stat().st_size - 8 else b""
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path.name} holds no valid safetensors header") from err
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def parameter_count(directory: Path) -> int:
    """Parameters of the model in ``directory`` without loading it.

    Safetensors headers give the exact count in milliseconds (building the model on the meta
    device takes seconds for 7B parameters); ``.bin`` weights are estimated from their size and
    the ``torch_dtype`` of ``config.json``.
    """
    files = weight_files(directory)
    if files and files[0].suffix == ".safetensors":
        return sum(_safetensors_parameters(f) for f in files)
    config = json.loads((directory / "config.json").read_text())
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return sum(f.stat().st_size for f in files) // _BYTES_PER_ELEMENT.get(str(dtype), 4)


def local_model(directory: Path) -> ModelSpec:
    """The spec of a model directory: named after it, identified by its resolved path, with
    the ``paper`` profile by default above :data:`LARGE_MODEL` parameters, else ``cpu``.

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
    return ModelSpec(
        alias=path.name,
        source="local",
        default_profile="paper" if large else "cpu",
        hub_id=str(path),
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


# The allowed value of every field of TrainConfig and EvalConfig, and of the seed. A test fails
# when a field has no rule, so a new hyper-parameter cannot skip validation.
RULES: Mapping[str, Rule] = types.MappingProxyType(
    {
        # train
        "lr": _POSITIVE,
        "weight_decay": Range(0),
        "batch_size": Range(2, note="in-batch negatives need a second example"),
        "max_steps": _all("train for `epochs` epochs"),
        "epochs": _POSITIVE,
        "lm_fraction": Range(0, 1),
        "lam": Range(0),
        "tau": _POSITIVE,
        "margin": Range(0, 2, high_open=True, note="cosine scores differ by at most 2"),
        "learnable_tau": _FLAG,
        "self_negatives": _FLAG,
        "lora_r": _COUNT,
        "lora_alpha": _POSITIVE,
        "lora_dropout": Range(0, 1, high_open=True),
        "lora_targets": Names(),
        "max_entity_tokens": _COUNT,
        "max_prompt_tokens": Range(2, note="one prompt token and one response token at least"),
        "train_subset": _all("every training triple"),
        "gradient_checkpointing": _FLAG,
        "compile": _FLAG,
        "gather_negatives": _FLAG,
        "load_in_8bit": _FLAG,
        "checkpoint_every": _COUNT,
        "warmup_steps": Range(0),
        "precision": OneOf(("fp32", "bf16", "auto")),
        "self_negative_grad": _FLAG,
        "gradient_accumulation_steps": _COUNT,
        "max_grad_norm": Range(0, note="0 = no clipping"),
        "processes": _COUNT,
        # eval
        "test_queries": _all("every test triple"),
        "valid_queries": _all("every validation triple"),
        "candidates": _all("every entity"),
        "query_batch_size": _COUNT,
        "entity_batch_size": _COUNT,
        "kgqa_questions": _all("every test triple"),
        "kgqa_shots": Range(0),
        "kgqa_max_new_tokens": _COUNT,
        "lm_tokens": _all("the whole test text"),
        "lm_window": Range(2, note="a window predicts its tokens after the first"),
        "lm_stride": _COUNT,
        "analysis_triples": Range(2, note="similarity statistics need two rows"),
        "analysis_sentences": Range(2, note="similarity statistics need two rows"),
        "kgqa_batch_size": _COUNT,
        "lm_batch_size": _COUNT,
        "rank_chunk_size": _COUNT,
        "sentence_tokens": _COUNT,
        "stats_min_rows": Range(0, note="0 = no minimum"),
        "analysis_batch_size": _COUNT,
        "study_examples": _COUNT,
        "study_queries": _all("every validation triple"),
        "study_candidates": _all("every entity"),
        "theorem1_negatives": Counts(),
        "theorem1_dim": Range(2, note="a sphere of dimension 1 has two points"),
        "theorem1_queries": _COUNT,
        "theorem1_pool": _COUNT,
        "descent_rows": Range(2, note="a contrastive loss needs a second row"),
        "descent_dim": Range(2, note="a sphere of dimension 1 has two points"),
        "descent_steps": _COUNT,
        # run
        "seed": Range(0, note="numpy seeds are non-negative"),
    }
)

# Pairs (a, b) that must satisfy a <= b when both belong to one section.
AT_MOST: tuple[tuple[str, str], ...] = (("lm_stride", "lm_window"),)


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


NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (``/proc/cpuinfo``) of instructions that multiply bf16 matrices in hardware."""


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16).

    Read once per process: every resolved configuration and every loaded model asks.

    Without either, PyTorch emulates bf16 matmuls on the CPU, which is not a little slower than
    fp32 but orders of magnitude slower (``benchmarks/bench_peak.py`` measures both). A CPU
    whose flags cannot be read (no ``/proc/cpuinfo``) counts as without.
    """
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    lines = (line for line in text.splitlines() if line.startswith("flags"))
    flags = next((line.split(":", 1)[1].split() for line in lines), [])
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def native_precision() -> str:
    """What ``precision: auto`` means on this machine: ``"bf16"`` where matmuls run natively in
    it (a CUDA GPU that supports bf16, else a CPU with :data:`NATIVE_BF16_CPU_FLAGS`), else
    ``"fp32"``.

    bf16 mixed precision is the fast path wherever the hardware has it, and agrees with fp32
    within the book's tolerance (the reproducing chapter's bf16 check); where it is emulated,
    fp32 is the fast path. The choice is made when a configuration is resolved, so the run key
    records the precision a run was actually trained in.
    """
    import torch  # here, not at the top: reading a configuration needs no torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


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
    train = {**prof["train"], **{k: v for k, v in overrides.items() if k in train_fields}}
    if train.get("precision") == "auto":
        train["precision"] = native_precision()
    ev = {**prof["eval"], **{k: v for k, v in overrides.items() if k in eval_fields}}

    def origin(section: str) -> Origin:
        def told(key: str) -> str:
            if key in overrides:
                return (
                    f"from the override {key}={overrides[key]!r} "
                    "(a notebook parameter or keyword argument of resolve)"
                )
            return f"from {config.path}: profiles.{profile}.{section}.{key}{chosen_by}"

        return told

    return RunConfig(
        model=spec,
        dataset=dataset,
        profile=profile,
        seed=seed,
        train=_build(TrainConfig, train, f"profile {profile}: train", origin("train")),
        eval=_build(EvalConfig, ev, f"profile {profile}: eval", origin("eval")),
    )
