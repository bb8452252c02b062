"""The run store under corruption, divergence and concurrent runs, through ``train_or_load``.

Every run here is a real smoke-profile training of a tiny random Llama (seconds), so the files
damaged are the ones training writes. Each damage must end in a named error (or a recovery), and
nothing half-written may stay behind.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import read_only, smollm2_tokenizer, tiny_llama, toy_kg

from kalm import experiment
from kalm.config import RunConfig, resolve
from kalm.durable import RunStoreError, StoreWarning
from kalm.evaluate.protocol import ValidationProbe
from kalm.runs import Run
from kalm.trainer import Trainer, TrainingDiverged
from kalm.views import ViewBuilder

CFG_OVERRIDES = {"checkpoint_every": 2}
CFG = {"profile": "smoke", **CFG_OVERRIDES}


# Every animal eats the next one and resembles the one after: 16 training examples.
TRIPLES = [(i, 0, (i + 1) % 8) for i in range(8)] + [(i, 1, (i + 2) % 8) for i in range(0, 8, 2)]
VALID = [(1, 1, 3), (3, 1, 5)]  # what the learning curve of a smoke run measures


def tiny_load(cfg: RunConfig, precision: str | None = None):
    tokenizer = smollm2_tokenizer()
    return tiny_llama(len(tokenizer)), tokenizer


def tiny_experiment(patch: pytest.MonkeyPatch) -> None:
    """Train a tiny random Llama on the toy graph wherever ``train_or_load`` would load one."""
    patch.setattr(experiment, "_load", tiny_load)
    patch.setattr(experiment, "load_kg", lambda name: toy_kg(TRIPLES, valid=VALID))


def leftovers(root: Path) -> list[str]:
    """Temporary files of atomic writes (``*.part``) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.part"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished smoke run, trained once for the module; tests damage copies of it."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KALM_RUNS_DIR", str(root))
        tiny_experiment(patch)
        _, _, run = experiment.train_or_load(resolve(**CFG), progress=False)
    return run.path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "store"
    monkeypatch.setenv("KALM_RUNS_DIR", str(root))
    tiny_experiment(monkeypatch)
    yield root
    assert leftovers(root) == []


@pytest.fixture
def run(store: Path, finished_run: Path) -> Run:
    """A copy of the finished run in this test's store."""
    target = Run.trained(resolve(**CFG))
    shutil.copytree(finished_run, target.path)
    return target


def test_a_finished_run_records_every_file_and_its_sessions(run: Run) -> None:
    record = run.done()
    assert sorted(record["files"]) == [
        "adapter/README.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "config.json",
        "curve.jsonl",
        "train_log.jsonl",
    ]
    assert not run.checkpoint_path.exists()
    [session] = record["sessions"]
    assert session["resumed_from"] == 0 and session["steps"] == record["steps"] == 4
    assert record["seconds"] == session["seconds"] > 0
    tuned, _, loaded = experiment.train_or_load(resolve(**CFG), progress=False)
    assert loaded == run and not tuned.training


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "truncated adapter": ("adapter/adapter_model.safetensors", _truncate, "truncated or replaced"),
    "zero-length adapter": (
        "adapter/adapter_model.safetensors",
        lambda p: p.write_bytes(b""),
        "has 0 bytes",
    ),
    "deleted adapter": ("adapter/adapter_model.safetensors", Path.unlink, "is missing"),
    "bit-flipped adapter": ("adapter/adapter_model.safetensors", _flip_a_bit, "differs"),
    "invalid adapter_config.json": (
        "adapter/adapter_config.json",
        lambda p: p.write_text("{not json" + " " * (p.stat().st_size - 9)),
        "differs",
    ),
    "invalid done.json": ("done.json", lambda p: p.write_text("{not json"), "is not valid JSON"),
    "invalid train_log.jsonl": ("train_log.jsonl", lambda p: p.write_text("{]\n"), "truncated"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_finished_run_is_an_error_never_a_silent_retrain(run: Run, damage: str) -> None:
    name, harm, problem = DAMAGE[damage]
    harm(run.path / name)
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    with pytest.raises(RunStoreError) as err:
        experiment.train_or_load(resolve(**CFG), progress=False)
    message = str(err.value)
    assert message.startswith(f"{run.path}: file {name} ")
    assert problem in message
    for way in ("train_or_load(cfg, retrain=True)", "-p retrain True", "kalm.execute --retrain"):
        assert way in message
    after = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: b for p, b in before.items() if p.name != ".lock"}  # nothing trained


def test_a_finished_run_loads_from_a_read_only_store(
    store: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading needs no write access: no lock is taken for a finished run."""
    with read_only(store, monkeypatch):
        _, _, loaded = experiment.train_or_load(resolve(**CFG), progress=False)
        assert loaded == run and loaded.done()["steps"] == 4


def test_an_edited_completion_record_is_named(run: Run) -> None:
    """A hand edit outside the file list (the step count) breaks the record's seal."""
    record = json.loads(run.done_path.read_text())
    run.done_path.write_text(json.dumps(record | {"steps": 999}))
    with pytest.raises(RunStoreError, match=r"file done\.json does not match its `seal`"):
        experiment.train_or_load(resolve(**CFG), progress=False)


def test_retrain_replaces_a_damaged_run(run: Run) -> None:
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"")
    (run.path / "metrics").mkdir()
    (run.path / "metrics" / "kgc.json").write_text("{}")  # derived from the old adapter
    experiment.train_or_load(resolve(**CFG), retrain=True, progress=False)
    record = run.done()
    assert len(record["sessions"]) == 1 and not (run.path / "metrics").exists()
    assert len(run.train_log()) == 4


def _pause(cfg: RunConfig, steps: int) -> Run:
    """An unfinished run of ``cfg``, trained for ``steps`` steps (checkpoint every 2)."""
    model, tokenizer = tiny_load(cfg)
    run = Run.trained(cfg)
    run.path.mkdir(parents=True)
    kg = toy_kg(TRIPLES, valid=VALID)
    probe = ValidationProbe.from_config(kg, cfg)  # as the experiment trains it
    Trainer(model, tokenizer, kg, cfg, run, probe=probe).fit(stop_after=steps, progress=False)
    return run


def test_a_truncated_checkpoint_is_named_not_resumed(store: Path) -> None:
    cfg = resolve(**CFG)
    run = _pause(cfg, 2)
    _truncate(run.checkpoint_path)
    with pytest.raises(RunStoreError, match=r"file checkpoint\.pt cannot be read") as err:
        experiment.train_or_load(cfg, progress=False)
    assert str(err.value).startswith(str(run.path)) and "retrain=True" in str(err.value)
    assert not run.done_path.exists()


def test_a_resume_drops_a_torn_last_log_line_and_sums_its_sessions(store: Path) -> None:
    cfg = resolve(**CFG)
    run = _pause(cfg, 2)
    with run.train_log_path.open("a") as log:
        log.write('{"step": 3, "L_ex')  # killed while writing step 3's record
    with pytest.warns(StoreWarning, match="dropped a torn last line"):
        experiment.train_or_load(cfg, progress=False)
    assert [r["step"] for r in run.train_log()] == [1, 2, 3, 4]
    record = run.done()
    first, second = record["sessions"]
    assert (first["resumed_from"], first["steps"]) == (0, 2)
    assert (second["resumed_from"], second["steps"]) == (2, 2)
    assert record["seconds"] == pytest.approx(first["seconds"] + second["seconds"])


def test_a_damaged_log_line_of_an_unfinished_run_is_named(store: Path) -> None:
    cfg = resolve(**CFG)
    run = _pause(cfg, 2)
    lines = run.train_log_path.read_text().splitlines()
    run.train_log_path.write_text(f"{lines[0]}\n{{oops\n{lines[1]}\n")
    with pytest.raises(RunStoreError, match=r"file train_log\.jsonl line 2 is not valid JSON"):
        experiment.train_or_load(cfg, progress=False)


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve(**CFG)
    real = Trainer.loss
    calls = []

    def diverging(self: Trainer, batch):  # step 3 goes NaN
        parts = real(self, batch)
        calls.append(1)
        if len(calls) >= 3:
            parts["l_exp"] = parts["l_exp"] * float("nan")
            parts["total"] = parts["l_exp"] + parts["l_imp"]
        return parts

    monkeypatch.setattr(Trainer, "loss", diverging)
    with pytest.raises(
        TrainingDiverged, match=r"diverged at step 3: .*L_exp=nan, L_imp=.*total=nan"
    ):
        experiment.train_or_load(cfg, progress=False)
    run = Run.trained(cfg)
    assert not run.done_path.exists() and not run.adapter_dir.exists()
    state = torch.load(run.checkpoint_path, weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["adapter"].values())
    assert [r["step"] for r in run.train_log()] == [1, 2]


def test_a_non_finite_adapter_is_never_checkpointed(store: Path) -> None:
    cfg = resolve(**CFG)
    run = _pause(cfg, 2)
    before = run.checkpoint_path.read_bytes()
    model, tokenizer = tiny_load(cfg)
    trainer = Trainer(model, tokenizer, toy_kg(TRIPLES), cfg, run)
    trainer.load_checkpoint()
    with torch.no_grad():
        next(p for n, p in trainer.peft_model.named_parameters() if "lora_B" in n).fill_(
            float("inf")
        )
    with pytest.raises(TrainingDiverged, match=r"adapter tensors .* hold NaN or inf"):
        trainer.save_checkpoint()
    assert run.checkpoint_path.read_bytes() == before


# --- two processes, one configuration -----------------------------------------------------------


def _train_concurrently(root: str, start, results) -> None:
    import os

    os.environ["KALM_RUNS_DIR"] = root
    tiny_experiment(pytest.MonkeyPatch())
    fits = []
    real_fit = Trainer.fit

    def counted(self, **kwargs):
        fits.append(1)
        return real_fit(self, **kwargs)

    Trainer.fit = counted
    start.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        experiment.train_or_load(resolve(**CFG), progress=False)
    waited = any("is locked by" in str(w.message) for w in caught)
    results.put((os.getpid(), len(fits), waited))


@pytest.mark.slow
def test_two_processes_of_one_configuration_train_once(store: Path) -> None:
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_train_concurrently, args=(str(store), start, results)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(fits for _, fits, _ in outcomes) == [0, 1]  # one trained, one loaded
    assert [waited for _, fits, waited in outcomes if fits == 0] == [True]
    run = Run.trained(resolve(**CFG))
    assert [r["step"] for r in run.train_log()] == [1, 2, 3, 4]
    assert len(run.done()["sessions"]) == 1
    assert json.loads(run.done_path.read_text())["steps"] == 4


def test_the_retrain_parameter_retrains_each_run_once(run: Run) -> None:
    """Once per notebook session (the configuration notebook_config returned and its copies);
    a new session with ``retrain=True`` retrains again, one with ``retrain=False`` loads."""
    marker = run.path / "metrics" / "marker.json"
    names = {"model": "smollm2", "dataset": "wn18rr", "profile": "smoke", "seed": 0}

    def session(retrain: bool) -> RunConfig:
        return experiment.notebook_config({**names, "retrain": retrain, "overrides": CFG_OVERRIDES})

    first = session(True)
    calls = ((first, True), (first, False), (session(False), False), (session(True), True))
    for cfg, retrained in calls:
        marker.parent.mkdir(exist_ok=True)
        marker.write_text("{}")
        experiment.train_or_load(cfg, progress=False)
        assert marker.exists() is not retrained
    assert len(run.done()["sessions"]) == 1


def test_load_encoder_hands_out_the_runs_encoder(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """One call gives the tuned (or untuned) model's encoder with the run's views and batch
    sizes, and its run; ``precision`` puts the same adapter on weights of another dtype."""

    def load(cfg: RunConfig, precision: str | None = None):
        model, tokenizer = tiny_load(cfg)
        return model.to(torch.bfloat16 if precision == "bf16" else torch.float32), tokenizer

    monkeypatch.setattr(experiment, "_load", load)
    cfg = resolve(**CFG, query_batch_size=3, entity_batch_size=5)
    encoder, got = experiment.load_encoder(cfg, progress=False)
    assert got.path == run.path and hasattr(encoder.model, "peft_config")
    views = ViewBuilder.from_config(toy_kg(TRIPLES), smollm2_tokenizer(), cfg)
    assert encoder.views.tail_ids(range(8)) == views.tail_ids(range(8))
    assert (encoder.query_batch_size, encoder.entity_batch_size) == (3, 5)
    assert encoder.views.kg.num_entities == 8 and encoder.dtype == torch.float32
    bf16, _ = experiment.load_encoder(cfg, precision="bf16", progress=False)
    assert hasattr(bf16.model, "peft_config") and bf16.dtype == torch.bfloat16
    base, base_run = experiment.load_encoder(cfg, tuned=False, progress=False)
    assert base_run.path == Run.base(cfg).path and not hasattr(base.model, "peft_config")
    assert len(run.done()["sessions"]) == 1  # loaded, never retrained
