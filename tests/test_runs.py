"""kalm.runs: run directories keyed by the training configuration, metrics and atomic caches."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import read_only
from hypothesis import given
from hypothesis import strategies as st

from kalm.config import REPO_ROOT, Session, resolve
from kalm.durable import RunStoreError, StoreWarning
from kalm.runs import Run, runs_dir


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv("KALM_RUNS_DIR", str(root))
    return root


def test_runs_dir_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store lives in the user cache, outside the working tree, unless KALM_RUNS_DIR says."""
    monkeypatch.delenv("KALM_RUNS_DIR", raising=False)
    monkeypatch.delenv("KALM_CACHE_DIR", raising=False)
    assert runs_dir() == Path.home() / ".cache" / "kalm" / "runs"
    assert not runs_dir().is_relative_to(REPO_ROOT)
    monkeypatch.setenv("KALM_CACHE_DIR", str(tmp_path / "cache"))
    assert runs_dir() == tmp_path / "cache" / "runs"
    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path))
    assert runs_dir() == tmp_path
    cfg = resolve(profile="smoke")
    chosen = replace(cfg, session=Session(runs_dir=tmp_path / "chosen"))
    assert runs_dir(cfg) == tmp_path  # no session setting: the environment's
    assert Run.trained(chosen).path.parent == Run.base(chosen).path.parent == tmp_path / "chosen"


def test_trained_run_path_follows_the_train_key(store: Path) -> None:
    cfg = resolve("smollm2", "wn18rr", profile="smoke", seed=3)
    run = Run.trained(cfg)
    assert run.path == store / f"smollm2-wn18rr-smoke-s3-{cfg.train_key()}"
    assert Run.trained(resolve("smollm2", "wn18rr", profile="smoke", seed=3, test_queries=5)) == run
    assert Run.trained(resolve("smollm2", "wn18rr", profile="smoke", seed=3, lam=0.5)) != run
    assert Run.base(cfg).path == store / "smollm2-base"
    assert Run.base(resolve(dataset="fb15k237", lam=0.5)) == Run.base(cfg)
    assert not run.path.exists()  # naming a run creates nothing


def test_a_run_is_finished_only_when_its_record_verifies(tmp_path: Path) -> None:
    run = Run(tmp_path)
    assert run.finished_record() is None
    (run.adapter_dir).mkdir()
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"weights")
    torch.save({"step": 3}, run.checkpoint_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "later.pt").write_bytes(b"derived")
    run.save_done({"steps": 3})
    record = run.finished_record()
    assert record["steps"] == 3
    # The checkpoint is gone; caches and metrics derive from the run and are not listed.
    assert sorted(record["files"]) == ["adapter/adapter_model.safetensors"]
    assert not run.checkpoint_path.exists()
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"weightz")
    with pytest.raises(RunStoreError, match=r"adapter_model\.safetensors differs") as err:
        run.finished_record()
    assert "retrain=True" in str(err.value) and "--retrain" in str(err.value)


@given(
    metrics=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.integers(-(10**6), 10**6),
            st.dictionaries(st.text(max_size=5), st.floats(allow_nan=False, allow_infinity=False)),
        ),
        max_size=6,
    )
)
def test_metrics_round_trip(tmp_path_factory: pytest.TempPathFactory, metrics: dict) -> None:
    run = Run(tmp_path_factory.mktemp("run"))
    assert run.load_metrics("kgc-test") is None
    path = run.save_metrics("kgc-test", metrics)
    assert path == run.path / "metrics" / "kgc-test.json"
    assert run.load_metrics("kgc-test") == metrics
    assert [p.name for p in path.parent.iterdir()] == ["kgc-test.json"]  # no temporary left


def test_cached_computes_once_and_writes_atomically(tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(6, dtype=torch.float32).reshape(2, 3)

    first = run.cached("entities-x", compute)
    second = run.cached("entities-x", compute)
    assert len(calls) == 1
    torch.testing.assert_close(first, second)
    cache = run.path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "entities-x.json", "entities-x.pt"]
    run.cached("entities-y", compute)
    assert len(calls) == 2
    assert sorted(p.name for p in cache.iterdir()) == [
        ".lock",
        "entities-x.json",
        "entities-x.pt",
        "entities-y.json",
        "entities-y.pt",
    ]


def test_cached_leaves_nothing_when_compute_fails(tmp_path: Path) -> None:
    run = Run(tmp_path)

    def broken() -> torch.Tensor:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run.cached("entities-z", broken)
    assert not (tmp_path / "cache" / "entities-z.pt").exists()


def test_train_log(tmp_path: Path) -> None:
    run = Run(tmp_path)
    assert run.train_log() == []
    records = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run.train_log() == records


def test_run_owns_its_file_names(tmp_path: Path) -> None:
    run = Run(tmp_path)
    assert run.checkpoint_path == tmp_path / "checkpoint.pt"
    assert run.train_log_path == tmp_path / "train_log.jsonl"
    assert run.done_path == tmp_path / "done.json"
    with pytest.raises(FileNotFoundError, match="has not finished"):
        run.done()
    assert run.finished_record() is None
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"weights")
    run.save_done({"steps": 3})
    assert run.done() == run.finished_record()
    assert run.done()["steps"] == 3 and list(run.done()["files"]) == [
        "adapter/adapter_model.safetensors"
    ]
    cfg = resolve("smollm2", "wn18rr", profile="smoke")
    run.save_config(cfg)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.as_dict()


def test_metric_names_follow_one_scheme() -> None:
    cfg = resolve("smollm2", "fb15k237", profile="smoke")
    digest = "[0-9a-f]{12}"
    assert re.fullmatch(f"kgc-fb15k237-smoke-test-{digest}", Run.metric_name("kgc", cfg, "test"))
    assert re.fullmatch(f"similarity-fb15k237-smoke-{digest}", Run.metric_name("similarity", cfg))
    assert Run.metric_name("kgc", cfg, "test") == Run.metric_name("kgc", resolve(**SMOKE), "test")


SMOKE = {"model": "smollm2", "dataset": "fb15k237", "profile": "smoke"}


@pytest.mark.parametrize(
    "change",
    [
        {"test_queries": 5},
        {"candidates": 100},
        {"precision": "bf16"},
        {"max_entity_tokens": 16},
        {"seed": 1},
        {"dataset": "wn18rr"},
        {"model": "llama2"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_metric_name_covers_what_the_metric_depends_on(change: dict) -> None:
    """Metrics are loaded back by name: another size, precision, seed, dataset or model is
    another name, never the first configuration's numbers."""
    name = Run.metric_name("kgc", resolve(**SMOKE), "test")
    assert Run.metric_name("kgc", resolve(**(SMOKE | change)), "test") != name


def test_a_metric_name_covers_only_the_sizes_it_reads() -> None:
    cfg = resolve(**SMOKE)
    reads = ("lm_tokens",)
    name = Run.metric_name("lm", cfg, reads=reads)
    assert Run.metric_name("lm", resolve(**SMOKE, test_queries=5), reads=reads) == name
    assert Run.metric_name("lm", resolve(**SMOKE, lm_tokens=256), reads=reads) != name
    assert Run.metric_name("lm", resolve(**SMOKE, precision="bf16"), reads=reads) != name


def test_cached_timed_keeps_the_first_measurement(tmp_path: Path) -> None:
    run = Run(tmp_path)
    value, seconds = run.cached_timed("x", lambda: torch.ones(3))
    again, same = run.cached_timed("x", lambda: torch.zeros(3))
    torch.testing.assert_close(again, value)
    assert same == seconds >= 0
    assert json.loads((tmp_path / "cache" / "x.json").read_text())["rows"] == 3


def _entry(run: Run, name: str) -> Path:
    return run.path / "cache" / f"{name}.pt"


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: torch.save({"not": "a tensor"}, p), "does not match the size and sha256"),
        (lambda p: p.write_bytes(p.read_bytes()[:20]), "does not match the size and sha256"),
        (lambda p: p.with_suffix(".json").write_text("{"), "has no readable seal"),
        (lambda p: p.unlink(), "cannot be read"),
    ],
    ids=["replaced by a dict", "truncated", "torn seal", "deleted entry"],
)
def test_a_damaged_cache_entry_is_recomputed_with_a_warning(
    tmp_path: Path, damage, problem: str
) -> None:
    run = Run(tmp_path)
    run.cached("entities-x", lambda: torch.ones(2, 3))
    damage(_entry(run, "entities-x"))
    with pytest.warns(StoreWarning) as caught:
        value = run.cached("entities-x", lambda: torch.zeros(2, 3))
    [warning] = [str(w.message) for w in caught]
    assert warning.startswith(f"{tmp_path}: file cache/entities-x.pt {problem}")
    assert warning.endswith("Computing it again.") and "\n" not in warning
    torch.testing.assert_close(value, torch.zeros(2, 3))
    assert run.cached("entities-x", lambda: torch.ones(1)).shape == (2, 3)  # stored again
    assert not list((tmp_path / "cache").glob("*.part"))


def test_a_cache_entry_is_read_from_a_read_only_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Run(tmp_path / "run")
    run.cached("entities-x", lambda: torch.ones(2))
    with read_only(tmp_path, monkeypatch):
        value = run.cached("entities-x", lambda: torch.zeros(2))
        with pytest.raises(OSError, match="Read-only file system"):  # a new entry needs writing
            run.cached("entities-y", lambda: torch.zeros(2))
    torch.testing.assert_close(value, torch.ones(2))


def test_a_cache_of_another_adapter_is_recomputed(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"first")
    run.save_done({"steps": 1})
    run.cached("entities-x", lambda: torch.ones(2))
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"other")
    run.save_done({"steps": 1})  # the adapter was replaced
    with pytest.warns(StoreWarning, match="derives from another model state"):
        torch.testing.assert_close(run.cached("entities-x", lambda: torch.zeros(2)), torch.zeros(2))


def test_unreadable_metrics_are_named(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.save_metrics("kgc-test", {"MRR": 0.5})
    (tmp_path / "metrics" / "kgc-test.json").write_text('{"MRR": 0.')
    with pytest.raises(RunStoreError, match=r"file metrics/kgc-test\.json is not valid JSON"):
        run.load_metrics("kgc-test")
