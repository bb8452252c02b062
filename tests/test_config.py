"""kalm.config (the root _config.yml; the recipe of book/method.md) and kalm.paper."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import kalm.config as config
from kalm import weights
from kalm.config import REPO_ROOT, ConfigError, config_path, load_config, resolve
from kalm.paper import read_resource

HUB_IDS = {
    "llama2": "meta-llama/Llama-2-7b-hf",
    "llama3": "meta-llama/Meta-Llama-3-8B",
    "mistral": "mistralai/Mistral-7B-v0.1",
}


@pytest.fixture
def no_profile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test conftest sets KALM_PROFILE=smoke; these tests need the model defaults."""
    monkeypatch.delenv("KALM_PROFILE", raising=False)


def write_config(tmp_path: Path, edit: dict) -> Path:
    """A copy of the repository's _config.yml with ``edit`` applied (nested keys as tuples)."""
    raw = yaml.safe_load((REPO_ROOT / "_config.yml").read_text())
    for keys, value in edit.items():
        node = raw
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- the shipped configuration ---------------------------------------------------------------


def test_models_and_datasets() -> None:
    config = load_config()
    assert config.default_model == "smollm2"
    assert set(config.models) == {"smollm2", "minilm", *HUB_IDS}
    assert config.models["smollm2"].default_profile == "cpu"
    assert config.models["minilm"].is_encoder and not config.models["smollm2"].is_encoder
    for alias, hub_id in HUB_IDS.items():
        spec = config.model(alias)
        assert (spec.source, spec.hub_id, spec.default_profile) == ("hub", hub_id, "paper")
    assert config.datasets == ("wn18rr", "fb15k237")
    assert {"smoke", "cpu", "paper"} <= set(config.profiles)


def test_paper_profile_is_the_published_recipe() -> None:
    cfg = resolve("llama2", "wn18rr", profile="paper")
    t = cfg.train
    assert (t.lora_r, t.lora_alpha, t.lora_dropout) == (8, 16, 0.05)
    assert t.lora_targets == ("gate_proj", "up_proj", "down_proj")
    assert (t.lr, t.weight_decay, t.batch_size, t.epochs) == (1e-4, 0.001, 24, 20.0)
    assert (t.lam, t.tau, t.margin) == (0.01, 0.05, 0.02)
    assert t.lm_examples == 4  # 4 of 24 examples get the triple-completion loss
    assert (t.max_entity_tokens, t.max_prompt_tokens) == (50, 256)
    assert t.load_in_8bit and not t.learnable_tau
    assert t.max_steps == 0 and t.train_subset == 0  # the full 20 epochs on every triple
    # 96 examples per optimiser step, as 4 GPUs x 24 (here 4 micro-batches on one GPU)
    assert (t.gradient_accumulation_steps, t.processes, t.global_batch_size) == (4, 1, 96)
    assert t.max_grad_norm == 1.0  # the recipe's trainer clips gradients
    assert cfg.eval.test_queries == 0 and cfg.eval.candidates == 0  # full protocol


def test_every_profile_resolves_with_consistent_types() -> None:
    for profile in load_config().profiles:
        cfg = resolve(profile=profile)
        assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, float)
        assert isinstance(cfg.train.lora_targets, tuple)
        assert 1 <= cfg.train.lm_examples <= cfg.train.batch_size


def test_fb15k237_spelling_variants_resolve() -> None:
    assert resolve(dataset="FB15k-237").dataset == "fb15k237"
    assert resolve(model="Mistral").model.alias == "mistral"


# --- profile choice ----------------------------------------------------------------------------


@pytest.mark.usefixtures("no_profile_env")
def test_auto_profile_is_the_models_default() -> None:
    assert resolve("smollm2").profile == "cpu"
    assert resolve("llama3").profile == "paper"


def test_kalm_profile_overrides_auto_but_not_an_explicit_profile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KALM_PROFILE", "cpu")
    assert resolve("mistral").profile == "cpu"
    assert resolve("mistral", profile="smoke").profile == "smoke"
    monkeypatch.setenv("KALM_PROFILE", "nonsense")
    with pytest.raises(ConfigError, match=r"unknown profile 'nonsense'.*smoke.*cpu.*paper"):
        resolve()


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"model": "gpt5"},
            r"unknown model 'gpt5'; valid models: smollm2, minilm, llama2, llama3, mistral",
        ),
        ({"dataset": "yago"}, r"unknown dataset 'yago'; valid datasets: wn18rr, fb15k237"),
        ({"profile": "huge"}, r"unknown profile 'huge'; valid profiles: smoke, cpu, paper"),
        ({"lamda": 0.1}, r"unknown parameter\(s\) \['lamda'\]; valid: .*\blam\b"),
        ({"lam": "0.1"}, r"train\.lam must be of type float, got '0\.1' \(str\)"),
        ({"batch_size": 8.5}, r"train\.batch_size must be of type int, got 8\.5"),
        ({"learnable_tau": 1}, r"train\.learnable_tau must be of type bool"),
        ({"test_queries": True}, r"eval\.test_queries must be of type int, got True"),
        ({"lora_targets": "q_proj"}, r"train\.lora_targets must be a list of strings"),
        ({"seed": "1"}, r"seed must be of type int"),
        ({"compile": True}, r"unknown parameter\(s\) \['compile'\]"),
        (
            {"precision": "fp16"},
            r"train\.precision = 'fp16' is invalid: it must be one of fp32, bf16, auto",
        ),
    ],
)
def test_bad_parameters_raise_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(**kwargs)


def test_overrides_reach_the_right_dataclass_and_are_coerced() -> None:
    cfg = resolve(lam=1, batch_size=16.0, test_queries=7, lora_targets=["q_proj"], tau=None)
    assert cfg.train.lam == 1.0 and isinstance(cfg.train.lam, float)
    assert cfg.train.batch_size == 16 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.lora_targets == ("q_proj",)
    assert cfg.eval.test_queries == 7
    assert cfg.train.tau == resolve().train.tau  # None means "not given"
    assert not hasattr(cfg.train, "test_queries") and not hasattr(cfg.eval, "lam")


def test_configs_are_frozen() -> None:
    cfg = resolve()
    for obj, name in (
        (cfg, "seed"),
        (cfg.train, "lam"),
        (cfg.eval, "candidates"),
        (cfg.model, "hub_id"),
    ):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 1)


def test_as_dict_is_plain_json() -> None:
    d = resolve().as_dict()
    assert d["train"]["lora_targets"] == list(resolve().train.lora_targets)
    assert d["model"]["alias"] == "smollm2" and d["profile"] == "smoke"


# --- value ranges (kalm.config.RULES) -----------------------------------------------------------

# Per rule: values it must reject, and overrides at its boundary that it must accept (resolved
# on the smoke profile, whose lm_window is 128 and lm_stride 64).
RULE_CASES: dict[str, tuple[list, list[dict]]] = {
    "lr": ([0, -1, math.inf, math.nan], [{"lr": 1e-9}]),
    "weight_decay": ([-0.1, math.inf], [{"weight_decay": 0}]),
    "batch_size": ([-8, 0, 1], [{"batch_size": 2}]),
    "max_steps": ([-1], [{"max_steps": 0}]),
    "epochs": ([0, -1.0, math.inf], [{"epochs": 0.5}]),
    "lm_fraction": ([-0.1, 1.5, math.nan], [{"lm_fraction": 0}, {"lm_fraction": 1}]),
    "lam": ([-0.01, math.inf], [{"lam": 0}]),
    "tau": ([0, -0.05, math.inf], [{"tau": 1e-4}]),
    "margin": ([-0.1, 2, math.inf, math.nan], [{"margin": 0}, {"margin": 1.99}]),
    "learnable_tau": ([1, "yes"], [{"learnable_tau": True}]),
    "self_negatives": ([0], [{"self_negatives": False}]),
    "self_negative_grad": (["yes"], [{"self_negative_grad": True}]),
    "lora_r": ([0, -4], [{"lora_r": 1}]),
    "lora_alpha": ([0, -16], [{"lora_alpha": 1}]),
    "lora_dropout": ([-0.1, 1.0, math.nan], [{"lora_dropout": 0.99}]),
    "lora_targets": ([[], ["q_proj", "q_proj"], [""]], [{"lora_targets": ["v_proj"]}]),
    "max_entity_tokens": ([0, -1], [{"max_entity_tokens": 1}]),
    "max_prompt_tokens": ([1, 0], [{"max_prompt_tokens": 2}]),
    "train_subset": ([-1], [{"train_subset": 0}]),
    "gradient_checkpointing": ([1], [{"gradient_checkpointing": True}]),
    "gather_negatives": ([0], [{"gather_negatives": True}]),
    "load_in_8bit": ([1], [{"load_in_8bit": True}]),
    "checkpoint_every": ([0, -2], [{"checkpoint_every": 1}]),
    "test_queries": ([-1], [{"test_queries": 0}]),
    "valid_queries": ([-1], [{"valid_queries": 0}]),
    "candidates": ([-1], [{"candidates": 0}]),
    "query_batch_size": ([-1, 0], [{"query_batch_size": 1}]),
    "entity_batch_size": ([0, -1], [{"entity_batch_size": 1}]),
    "kgqa_questions": ([-1], [{"kgqa_questions": 0}]),
    "kgqa_shots": ([-1], [{"kgqa_shots": 0}]),
    "kgqa_max_new_tokens": ([0], [{"kgqa_max_new_tokens": 1}]),
    "lm_tokens": ([-1], [{"lm_tokens": 0}]),
    "lm_window": ([1, 0, 63], [{"lm_window": 2, "lm_stride": 2}, {"lm_window": 64}]),
    "lm_stride": ([0, 129], [{"lm_stride": 1}, {"lm_stride": 128}]),
    "analysis_triples": ([1, 0], [{"analysis_triples": 2}]),
    "analysis_sentences": ([1], [{"analysis_sentences": 2}]),
    "precision": (["fp16", "BF16", "bfloat16"], [{"precision": "bf16"}, {"precision": "fp32"}]),
    "warmup_steps": ([-1], [{"warmup_steps": 0}]),
    "gradient_accumulation_steps": ([0, -1], [{"gradient_accumulation_steps": 1}]),
    "max_grad_norm": ([-0.1, math.inf, math.nan], [{"max_grad_norm": 0}]),
    "processes": ([0, -2], [{"processes": 1}]),
    "curve_points": ([-1, 1.5], [{"curve_points": 0}]),
    "curve_queries": ([0, -3], [{"curve_queries": 1}]),
    "curve_candidates": ([-1], [{"curve_candidates": 0}]),
    "kgqa_batch_size": ([0], [{"kgqa_batch_size": 1}]),
    "lm_batch_size": ([0, -1], [{"lm_batch_size": 1}]),
    "rank_chunk_size": ([0], [{"rank_chunk_size": 1}]),
    "sentence_tokens": ([0], [{"sentence_tokens": 1}]),
    "stats_min_rows": ([-1], [{"stats_min_rows": 0}]),
    "analysis_batch_size": ([0], [{"analysis_batch_size": 1}]),
    "study_examples": ([0, -2], [{"study_examples": 1}]),
    "study_queries": ([-1], [{"study_queries": 0}]),
    "study_candidates": ([-1], [{"study_candidates": 0}]),
    "theorem1_negatives": ([[], [0, 10]], [{"theorem1_negatives": [1]}]),
    "theorem1_dim": ([1, 0], [{"theorem1_dim": 2}]),
    "theorem1_queries": ([0], [{"theorem1_queries": 1}]),
    "theorem1_pool": ([0], [{"theorem1_pool": 1}]),
    "descent_rows": ([1], [{"descent_rows": 2}]),
    "descent_dim": ([1], [{"descent_dim": 2}]),
    "descent_steps": ([0], [{"descent_steps": 1}]),
    "seed": ([-1], [{"seed": 0}]),
}


def test_every_field_has_a_rule_and_a_test() -> None:
    """A new field of TrainConfig or EvalConfig fails here until RULES gives its range."""
    names = {f.name for cls in (config.TrainConfig, config.EvalConfig) for f in fields(cls)}
    names.add("seed")
    assert set(config.RULES) == names, "declare every field with kalm.config.setting and a rule"
    assert set(RULE_CASES) == names


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, (bad, _) in RULE_CASES.items() for v in bad]
)
def test_rule_rejects_an_override(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(profile="smoke", **{key: value})
    message = str(err.value)
    assert f"{key} = " in message or f"{key} must be" in message
    assert f"override {key}={value!r}" in message or key == "seed"
    if "is invalid" in message and key not in ("lm_stride", "lm_window"):
        assert config.RULES[key].describe() in message


@pytest.mark.parametrize(
    "override", [o for _, (_, good) in RULE_CASES.items() for o in good], ids=str
)
def test_rule_accepts_its_boundary(override: dict) -> None:
    cfg = resolve(profile="smoke", **override)
    key, value = next(iter(override.items()))
    got = cfg.seed if key == "seed" else getattr(getattr(cfg, _section(key)), key)
    assert got == (tuple(value) if isinstance(value, list) else value)


FLOAT_FIELDS = {
    f.name
    for cls in (config.TrainConfig, config.EvalConfig)
    for f in fields(cls)
    if f.type == "float"
}


def _section(key: str) -> str:
    return "train" if key in {f.name for f in fields(config.TrainConfig)} else "eval"


# The probes of issue 15: each failed late (a hang, a ZeroDivisionError, NaN scores, silent runs).
@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("batch_size", -8, "a finite value >= 2"),
        ("test_queries", -1, "a finite value >= 0 (0 = every test triple)"),
        ("tau", 0, "a finite value > 0"),
        ("lr", -1, "a finite value > 0"),
        ("margin", math.inf, "a finite value with 0 <= value < 2"),
        ("checkpoint_every", 0, "a finite value >= 1"),
        ("query_batch_size", -1, "a finite value >= 1"),
        ("query_batch_size", 0, "a finite value >= 1"),
        ("max_entity_tokens", 0, "a finite value >= 1"),
        ("entity_batch_size", 0, "a finite value >= 1"),
    ],
)
def test_probes_fail_at_resolve_naming_key_value_range_and_origin(
    key: str, value: float, allowed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KALM_PROFILE", "cpu")
    with pytest.raises(ConfigError) as err:
        resolve(**{key: value}, candidates=300 if key == "test_queries" else None)
    shown = float(value) if key in FLOAT_FIELDS else value
    assert str(err.value).startswith(f"profile cpu: {_section(key)}.{key} = {shown!r} is invalid")
    assert allowed in str(err.value)
    assert f"from the override {key}={value!r}" in str(err.value)


def test_a_pair_rule_names_both_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KALM_PROFILE", "cpu")
    with pytest.raises(ConfigError) as err:
        resolve(lm_stride=999)
    message = str(err.value)
    assert message.startswith(
        "profile cpu: eval.lm_stride = 999 is invalid: it must be <= lm_window"
    )
    assert "from the override lm_stride=999" in message
    assert f"from {config_path()}: profiles.cpu.eval.lm_window" in message
    assert "(profile chosen by KALM_PROFILE='cpu')" in message


def test_an_unknown_profile_from_the_environment_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KALM_PROFILE", "gpu")
    with pytest.raises(ConfigError, match=r"^KALM_PROFILE: unknown profile 'gpu'"):
        resolve()


@pytest.mark.parametrize(
    ("profile", "section", "key", "value"),
    [
        ("cpu", "train", "lr", -1.0),
        ("paper", "train", "margin", math.inf),
        ("smoke", "train", "checkpoint_every", 0),
        ("smoke", "eval", "query_batch_size", 0),
        ("cpu", "eval", "lm_stride", 999),
        ("paper", "train", "lora_targets", []),
    ],
)
def test_config_file_values_are_checked_on_load(
    tmp_path: Path, profile: str, section: str, key: str, value: object
) -> None:
    path = write_config(tmp_path, {("profiles", profile, section, key): value})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    shown = tuple(value) if isinstance(value, list) else value
    assert str(err.value).startswith(
        f"{path}: profiles.{profile}.{section}.{key} = {shown!r} is invalid: it must be"
    )


def test_an_invalid_kalm_config_fails_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, {("profiles", "paper", "train", "tau"): 0.0})
    monkeypatch.setenv("KALM_CONFIG", str(path))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: profiles\.paper\.train\.tau"):
        resolve(profile="smoke")  # the whole file is checked, not only the profile in use


# --- the training key ---------------------------------------------------------------------------

EVAL_FIELDS = [f.name for f in dataclasses.fields(type(resolve().eval)) if f.type == "int"]


@settings(max_examples=30, deadline=None)
@given(field=st.sampled_from(EVAL_FIELDS), value=st.integers(2, 10_000))
def test_train_key_ignores_evaluation_sizes(field: str, value: int) -> None:
    wide = {"lm_window": 10_000, "lm_stride": 1}  # any size in range keeps lm_stride <= lm_window
    assert resolve(**{**wide, field: value}).train_key() == resolve().train_key()


def test_train_key_follows_precision() -> None:
    """bf16 training gives other weights, so its adapter is stored apart; fp32 keeps its key."""
    assert resolve(precision="bf16").train_key() != resolve(precision="fp32").train_key()


@pytest.mark.parametrize("native", ["fp32", "bf16"])
def test_auto_precision_is_resolved_to_the_machines(
    monkeypatch: pytest.MonkeyPatch, native: str
) -> None:
    """``auto`` never reaches a run: it becomes this machine's precision, and the run key is
    that of the precision stated outright, so a run trained in bf16 is found either way."""
    monkeypatch.setattr(config, "native_precision", lambda: native)
    auto = resolve(precision="auto")
    assert auto.train.precision == native
    assert auto.train_key() == resolve(precision=native).train_key()


@settings(max_examples=30, deadline=None)
@given(lam=st.floats(0.0, 1.0), other=st.floats(0.0, 1.0))
def test_train_key_follows_train_hyper_parameters(lam: float, other: float) -> None:
    same = resolve(lam=lam).train_key() == resolve(lam=other).train_key()
    assert same == (lam == other)


def test_train_key_follows_the_training_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    before = resolve().train_key()
    monkeypatch.setattr(config, "TRAINING_REVISION", config.TRAINING_REVISION + 1)
    assert resolve().train_key() != before


def test_train_key_follows_model_dataset_and_seed() -> None:
    base = resolve().train_key()
    assert (
        len(
            {
                base,
                resolve(seed=1).train_key(),
                resolve(dataset="fb15k237").train_key(),
                resolve(model="llama2").train_key(),
                resolve(max_steps=5).train_key(),
            }
        )
        == 5
    )
    assert resolve().train_key() == base  # stable across calls


# --- a broken KALM_CONFIG ----------------------------------------------------------------------


def test_kalm_config_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {("profiles", "smoke", "train", "lam"): 0.5})
    monkeypatch.setenv("KALM_CONFIG", str(path))
    assert config_path() == path
    assert resolve(profile="smoke").train.lam == 0.5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {("models", "llama2", "default_profile"): "gpu"},
            r"models\.llama2\.default_profile: unknown profile 'gpu'; valid profiles: smoke, cpu",
        ),
        (
            {("profiles", "cpu", "train", "batch_size"): "large"},
            r"profiles\.cpu\.train\.batch_size must be of type int, got 'large'",
        ),
        (
            {("profiles", "smoke", "eval", "candidate"): 3},
            r"profiles\.smoke\.eval: unknown field\(s\) \['candidate'\]; valid fields: test_",
        ),
        ({("models", "llama3", "hubid"): "x"}, r"models\.llama3: unknown field\(s\) \['hubid'\]"),
        (
            {("default_model",): "gpt2"},
            r"default_model: unknown model 'gpt2'; valid models: smollm2",
        ),
    ],
)
def test_broken_config_file_names_the_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: dict, message: str
) -> None:
    path = write_config(tmp_path, edit)
    monkeypatch.setenv("KALM_CONFIG", str(path))
    with pytest.raises(ConfigError, match=message) as err:
        load_config()
    if "profiles." in message or "models." in message:
        assert str(path) in str(err.value)


def test_missing_field_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {})
    raw = yaml.safe_load(path.read_text())
    del raw["profiles"]["paper"]["train"]["tau"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("KALM_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"profiles\.paper\.train: missing field\(s\) \['tau'\]"):
        load_config()


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KALM_CONFIG", str(tmp_path / "nope.yml"))
    with pytest.raises(ConfigError, match=r"nope\.yml not found; set KALM_CONFIG"):
        resolve()


# --- published numbers (kalm.paper) --------------------------------------------------------------


def test_paper_table1() -> None:
    table = read_resource("paper_table1.csv")
    assert table.groupby("dataset")["method"].nunique().to_dict() == {"wn18rr": 10, "fb15k237": 10}
    row = table.query("method == 'Llama-2-7B + KaLM' and dataset == 'wn18rr'").iloc[0]
    assert row["MRR"] == pytest.approx(0.596)
    assert row["Hits@10"] == pytest.approx(0.856)
    assert table["MRR"].between(0, 1).all()
    assert table.loc[table["method"] == "SimKGC", "MR"].isna().all()  # "-" in the paper


def test_unknown_resource_lists_the_available_ones() -> None:
    with pytest.raises(
        FileNotFoundError, match=r"no resource 'table9\.csv'; available: .*paper_table1\.csv"
    ):
        read_resource("table9.csv")


# --- defaults and sizes from the file ------------------------------------------------------------


def test_model_and_dataset_default_to_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve().model == load_config().model(load_config().default_model)
    assert resolve().dataset == load_config().datasets[0]
    path = write_config(tmp_path, {("default_model",): "mistral", ("datasets",): ["fb15k237"]})
    monkeypatch.setenv("KALM_CONFIG", str(path))
    cfg = resolve()
    assert (cfg.model.alias, cfg.dataset) == ("mistral", "fb15k237")


def test_fields_at_their_default_keep_the_training_key() -> None:
    """Fields added with a default that reproduces older runs leave their key unchanged."""
    cfg = resolve(profile="smoke")
    assert cfg.train.warmup_steps == 0 and cfg.train.precision == "fp32"
    later = ("self_negative_grad", "gradient_accumulation_steps", "max_grad_norm", "processes")
    assert [getattr(cfg.train, name) for name in later] == [False, 1, 0.0, 1]
    payload = {k: v for k, v in cfg.as_dict().items() if k != "eval"}
    del payload["train"]["warmup_steps"], payload["train"]["precision"]
    for name in later:
        del payload["train"][name]
    del payload["model"]["kind"]  # a field of ModelSpec added later, likewise
    payload["revision"] = config.TRAINING_REVISION
    blob = json.dumps(payload, sort_keys=True).encode()
    assert cfg.train_key() == hashlib.sha256(blob).hexdigest()[:12]
    assert resolve(profile="smoke", warmup_steps=3).train_key() != cfg.train_key()
    for change in ({"gradient_accumulation_steps": 2}, {"max_grad_norm": 1.0}, {"processes": 2}):
        assert resolve(profile="smoke", **change).train_key() != cfg.train_key()


def test_profile_sizes_are_integers_and_lists_are_checked(tmp_path: Path) -> None:
    for profile in load_config().profiles:
        ev = resolve(profile=profile).eval
        assert all(isinstance(n, int) for n in ev.theorem1_negatives)
        assert ev.study_examples > resolve(profile=profile).train.batch_size or profile == "smoke"
    path = write_config(tmp_path, {("profiles", "cpu", "eval", "theorem1_negatives"): ["10"]})
    with pytest.raises(ConfigError, match=r"theorem1_negatives must be a list of integers"):
        load_config(path)


# --- local model directories -------------------------------------------------------------------


@pytest.mark.usefixtures("no_profile_env")
def test_a_local_directory_is_a_model(llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = resolve(model=str(llama_dir))
    spec = cfg.model
    assert (spec.alias, spec.source, spec.hub_id) == (llama_dir.name, "local", str(llama_dir))
    assert spec.default_profile == cfg.profile == "cpu"  # a few thousand parameters
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert weights.parameter_count(llama_dir) == sum(p.numel() for p in model.parameters())
    assert resolve(model=llama_dir).train_key() == cfg.train_key()  # a Path works too
    assert spec.store_name.startswith(f"{llama_dir.name}-") and spec.store_name != spec.alias


@pytest.mark.usefixtures("no_profile_env")
def test_a_large_local_model_defaults_to_the_paper_profile(tmp_path: Path) -> None:
    """Counted from the safetensors header alone: a file that declares 1.3B parameters."""
    (tmp_path / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [32000, 40960], "data_offsets": [0, 0]}})
    blob = len(header).to_bytes(8, "little") + header.encode()
    (tmp_path / "model.safetensors").write_bytes(blob)
    assert weights.parameter_count(tmp_path) == 32000 * 40960
    assert resolve(model=str(tmp_path)).profile == "paper"


def test_what_is_not_a_model_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds no config\.json, so it is not a model"):
        resolve(model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ConfigError, match=r"no complete set of weights"):
        resolve(model=str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown model .*or a local directory.*does not exist"):
        resolve(model=str(tmp_path / "Llama-2-7b-hf"))


# --- every field is read -------------------------------------------------------------------------

# Where fields are read: the library, the notebooks' code and the benchmarks. kalm/settings.py
# shows every field in the book's table, so its reads prove nothing. kalm/config.py stays in:
# it declares and validates fields by name (no attribute is read), so an attribute read there is
# a use (`resolve` reads a model's `default_profile`, `lm_examples` reads `lm_fraction`).
READERS = sorted(
    [
        *(p for p in (REPO_ROOT / "kalm").rglob("*.py") if p.name != "settings.py"),
        *(REPO_ROOT / "benchmarks").glob("*.py"),
        *(REPO_ROOT / "notebooks").glob("*.ipynb"),
    ]
)


def python_source(path: Path) -> str:
    """A module's text, or a notebook's code cells without IPython's ``%`` and ``!`` lines."""
    if path.suffix != ".ipynb":
        return path.read_text(encoding="utf-8")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = ("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    lines = (line for text in code for line in text.splitlines())
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def attribute_reads(source: str) -> set[str]:
    """Every name read as an attribute (``cfg.train.lr`` reads ``train`` and ``lr``), except
    attributes of an imported name: ``torch.compile`` is no read of a field called ``compile``."""
    tree = ast.parse(source)
    imported = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Load)
        and not (isinstance(node.value, ast.Name) and node.value.id in imported)
    }


def unread_fields(classes: tuple[type, ...], sources: list[str]) -> list[str]:
    """``Class.field`` of every field that no source reads as an attribute."""
    reads = set().union(*map(attribute_reads, sources))
    return [
        f"{cls.__name__}.{f.name}" for cls in classes for f in fields(cls) if f.name not in reads
    ]


def test_every_configuration_field_is_read() -> None:
    """A field nobody reads is a setting that changes nothing but the run key: remove it."""
    sources = [python_source(p) for p in READERS]
    classes = (config.TrainConfig, config.EvalConfig, config.ModelSpec)
    assert not unread_fields(classes, sources), "configuration fields that no code reads"


def test_the_read_check_finds_an_unread_field() -> None:
    """The check above can fail: a field that is declared, validated and shown, but read only
    as a module's attribute of the same name, is reported."""

    @dataclasses.dataclass
    class Synthetic:
        lr: float
        compile: bool

    used = "import torch\n\ndef fit(cfg):\n    return torch.compile(cfg.train.lr)\n"
    assert unread_fields((Synthetic,), [used]) == ["Synthetic.compile"]
    assert unread_fields((Synthetic,), [used, "step = run.train.compile\n"]) == []


def test_an_encoders_key_follows_its_kind() -> None:
    """A spec's ``kind`` is left out of the key only at its default (see the test above)."""
    encoder = resolve(model="minilm", profile="smoke")
    as_causal = dataclasses.replace(
        encoder, model=dataclasses.replace(encoder.model, kind="causal")
    )
    assert encoder.train_key() != as_causal.train_key()
