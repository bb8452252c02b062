"""Published runs (``book/runs/``): a round trip through publishing, tampering, other keys, the
plan of a fresh store, the size limits, and a run resumed from a published checkpoint.

Every run is a real smoke-profile training of a tiny random Llama on the toy graph (seconds), as
in ``test_store.py``; the published folder is a temporary one, never the book's.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from test_store import _pause, tiny_experiment

from kalm import book_runs, execute, experiment, pages, published
from kalm.config import REPO_ROOT, RunConfig, resolve
from kalm.durable import RunStoreError
from kalm.published import PublishedRun, PublishError, locate, publish
from kalm.runs import Run
from kalm.trainer import Trainer

CFG = {"profile": "smoke", "checkpoint_every": 2}
HARDWARE = "2 CPU cores, no native bf16"


@pytest.fixture
def shelf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary published folder, and a local store of tiny runs."""
    folder = tmp_path / "published"
    monkeypatch.setattr(published, "PUBLISHED_DIR", folder)
    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path / "store"))
    tiny_experiment(monkeypatch)
    return folder


def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training (or resume) an error: loading a published run must not train."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained a run that is published")

    monkeypatch.setattr(experiment, "Trainer", refuse)


def empty_local_store() -> None:
    shutil.rmtree(Run.trained(resolve(**CFG)).path.parent)


def adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def logits(model: torch.nn.Module) -> torch.Tensor:
    """A metric computed from the tuned model: its logits on a fixed input."""
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 9).unsqueeze(0)).logits


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "adapters differ"


def test_a_published_run_loads_bitwise_without_training(
    shelf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve(**CFG)
    tuned, _, local = experiment.train_or_load(cfg, progress=False)
    trained, metric = adapter(tuned), logits(tuned)
    steps = local.done()["steps"]
    line = publish(cfg, hardware=HARDWARE, commit="0123abc")
    assert line.startswith(f"{local.path.name}: published the finished run (4 steps")
    folder = shelf / local.path.name
    record = json.loads((folder / "done.json").read_text())
    assert sorted(record["files"]) == [
        "adapter/README.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "config.json",
        "curve.jsonl",
        "train_log.jsonl",
    ]  # no checkpoint, optimiser state, caches or metrics
    assert (record["examples_seen"], record["precision"]) == (steps * 8, "fp32")
    assert (record["hardware"], record["commit"]) == (HARDWARE, "0123abc")
    assert record["seconds"] > 0
    assert publish(cfg, hardware=HARDWARE) == f"{local.path.name}: already published, unchanged"

    empty_local_store()
    no_training(monkeypatch)
    before = snapshot(folder)
    tuned, _, run = experiment.train_or_load(cfg, progress=False)
    assert isinstance(run, PublishedRun) and run.path == local.path
    assert_bitwise_equal(adapter(tuned), trained)
    assert torch.equal(logits(tuned), metric)
    assert run.done()["steps"] == steps and len(run.train_log()) == steps
    # Caches and metrics derived from it go to the local store; the published folder is only read.
    cached = run.cached("logits", lambda: logits(tuned))
    assert torch.equal(cached, metric)
    assert run.save_metrics("kgc-test", {"MRR": 0.5}).is_relative_to(local.path)
    assert (local.path / "cache" / "logits.pt").is_file()
    assert snapshot(folder) == before


def test_a_tampered_published_file_is_named(shelf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = resolve(**CFG)
    experiment.train_or_load(cfg, progress=False)
    publish(cfg, hardware=HARDWARE, commit="0123abc")
    empty_local_store()
    no_training(monkeypatch)
    weights = shelf / Run.trained(cfg).path.name / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(RunStoreError) as err:
        experiment.train_or_load(cfg, progress=False)
    message = str(err.value)
    assert message.startswith(f"{weights.parent.parent}: file adapter/adapter_model.safetensors")
    assert "differs from its sha256 in done.json" in message and "git checkout" in message
    with pytest.raises(RunStoreError, match=r"adapter_model\.safetensors differs"):
        pages.training_plan(cfg)  # a regeneration stops before its first page


def test_a_different_key_never_matches(shelf: Path) -> None:
    cfg = resolve(**CFG)
    experiment.train_or_load(cfg, progress=False)
    publish(cfg, hardware=HARDWARE, commit="0123abc")
    empty_local_store()
    assert isinstance(locate(Run.trained(cfg)), PublishedRun)
    other = Run.trained(resolve(**CFG, lam=0.5))
    assert other.path.name != Run.trained(cfg).path.name
    assert type(locate(other)) is Run and published.run_state(other) == ("none", None)


def test_plan_of_a_fresh_store_names_the_published_runs(
    shelf: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kgc = next(e for e in pages.BOOK_EXPERIMENTS if e.page == "kgc")
    cfg = pages.page_config(kgc, profile="smoke")
    experiment.train_or_load(cfg, progress=False)
    name = Run.trained(cfg).path.name
    assert execute.main(["--publish", "kgc", "kgc_fb15k237", "--profile", "smoke"]) == 0
    published_line, skipped = capsys.readouterr()
    assert published_line.startswith(f"kgc: {name}: published the finished run (4 steps")
    assert "kgc_fb15k237: not published: " in skipped and "nor a checkpoint" in skipped
    shutil.rmtree(Run.trained(cfg).path.parent)
    monkeypatch.setattr(experiment, "_load", lambda cfg: pytest.fail("--plan loaded a model"))
    assert execute.main(["--plan", "--profile", "smoke"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["kgc"].startswith(f"{name}: published in {shelf / name} (4 steps, 32 examples")
    assert lines["similarity"] == f"{name}: the run of the page kgc (above)"
    assert "to be trained: 4 steps of 8 examples in fp32, no estimate" in lines["kgc_fb15k237"]
    assert not Run.trained(cfg).path.exists()  # the plan wrote nothing
    assert pages.training_plan(cfg) == f"   loads the published run {shelf / name}"


def test_the_plan_estimates_from_the_runs_own_log(shelf: Path) -> None:
    cfg = resolve(**CFG)
    run = _pause(cfg, 2)
    rate = statistics.median(r["examples_per_s"] for r in run.train_log())
    assert published.plan_line("kgc", cfg) == (
        f"kgc: {run.path.name}: in the local store at step 2 of 4; to be trained: 2 steps of 8 "
        f"examples in fp32, about {2 * 8 / rate / 60:,.0f} min at {rate:.2f} examples/s "
        "(recorded in the run's log in the local store)"
    )


def test_the_published_runs_of_the_book_keep_their_size_limits() -> None:
    """Every folder of book/runs/: a finished run of at most 25 MB holding nothing but its
    adapter, log, configuration and manifest, or a checkpoint of at most 75 MB."""
    assert REPO_ROOT / "book" / "runs" == published.PUBLISHED_DIR
    for folder in published.published_runs():
        checkpoint = folder / published.CHECKPOINT
        if checkpoint.is_dir():
            assert published.folder_size(checkpoint) <= published.CHECKPOINT_LIMIT, checkpoint
        if (folder / "done.json").exists():
            assert not checkpoint.exists(), f"{folder}: a finished run keeps no checkpoint"
            files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
            assert files == {*json.loads((folder / "done.json").read_text())["files"], "done.json"}
            assert published.folder_size(folder) <= published.RUN_LIMIT, folder


def test_publishing_refuses_a_run_over_its_limit(
    shelf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve(**CFG)
    _pause(cfg, 2)
    monkeypatch.setattr(published, "CHECKPOINT_LIMIT", 1000)
    with pytest.raises(PublishError, match=r"bytes to publish exceed the limit of 1,000"):
        publish(cfg, hardware=HARDWARE, commit="0123abc")
    experiment.train_or_load(cfg, progress=False)
    monkeypatch.setattr(published, "RUN_LIMIT", 1000)
    with pytest.raises(PublishError, match=r"exceed the limit of 1,000"):
        publish(cfg, hardware=HARDWARE, commit="0123abc")
    assert not shelf.exists() or list(shelf.rglob("*")) == [shelf / Run.trained(cfg).path.name]


def _uninterrupted(cfg: RunConfig, root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("KALM_RUNS_DIR", str(root))
    tuned, _, _ = experiment.train_or_load(cfg, progress=False)
    return adapter(tuned)


def test_a_published_checkpoint_resumes_bitwise_in_an_empty_store(
    shelf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve(**CFG, lora_dropout=0.1)  # dropout draws from the RNG the checkpoint keeps
    straight = _uninterrupted(cfg, tmp_path / "straight", monkeypatch)

    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path / "first machine"))
    run = _pause(cfg, 2)
    line = publish(cfg, hardware=HARDWARE, commit="0123abc")
    assert line == f"{run.path.name}: published its checkpoint at step 2"
    folder = shelf / run.path.name / published.CHECKPOINT
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "curve.jsonl",
        "manifest.json",
        "train_log.jsonl",
    ]
    assert published.folder_size(folder) <= published.CHECKPOINT_LIMIT

    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path / "second machine"))
    fresh = Run.trained(cfg)
    assert published.run_state(fresh) == ("published checkpoint", 2)
    assert "resuming at step 2 of its published checkpoint" in pages.training_plan(cfg)
    fits: list[int] = []
    real = Trainer.fit

    def fit(self: Trainer, **kwargs: object):
        fits.append(self.step_count)
        return real(self, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    tuned, _, resumed = experiment.train_or_load(cfg, progress=False)
    assert resumed == fresh and fits == [0]
    assert [r["step"] for r in resumed.train_log()] == [1, 2, 3, 4]
    first, second = resumed.done()["sessions"]
    assert (first["resumed_from"], second["resumed_from"]) == (0, 2)
    assert_bitwise_equal(adapter(tuned), straight)

    # Publishing the finished run replaces the checkpoint.
    publish(cfg, hardware=HARDWARE, commit="0123abc")
    assert not folder.exists() and (shelf / run.path.name / "done.json").is_file()


def test_a_local_checkpoint_wins_over_a_published_one(
    shelf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve(**CFG)
    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path / "first machine"))
    _pause(cfg, 2)
    publish(cfg, hardware=HARDWARE, commit="0123abc")
    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path / "second machine"))
    run = Run.trained(cfg)
    run.path.mkdir(parents=True)
    torch.save({"step": 1}, run.checkpoint_path)  # this machine's own progress
    before = run.checkpoint_path.read_bytes()
    assert published.restore_checkpoint(run) is None
    assert run.checkpoint_path.read_bytes() == before
    assert published.run_state(run) == ("checkpoint", 1)


def test_a_tampered_published_checkpoint_is_named(
    shelf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve(**CFG)
    run = _pause(cfg, 2)
    publish(cfg, hardware=HARDWARE, commit="0123abc")
    shutil.rmtree(run.path.parent)
    log = shelf / run.path.name / published.CHECKPOINT / "train_log.jsonl"
    log.write_text(log.read_text().replace('"step": 2', '"step": 9'))
    no_training(monkeypatch)
    with pytest.raises(RunStoreError, match=r"file train_log\.jsonl differs from its sha256"):
        experiment.train_or_load(cfg, progress=False)
    assert not run.checkpoint_path.exists()


def test_a_run_keeps_the_precision_it_started_in(
    shelf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``precision: auto``, a configuration follows a run of the other precision that is
    further along (here a bf16 checkpoint on a machine whose auto is fp32); at equal progress,
    and for an explicit precision, this machine's precision stays."""
    monkeypatch.setattr("kalm.config.native_precision", lambda: "fp32")
    cfg = resolve(profile="cpu")
    assert cfg.train.precision == "fp32"
    assert published.keep_precision(cfg) == cfg  # nothing exists: this machine's precision
    bf16 = resolve(profile="cpu", precision="bf16")
    run = Run.trained(bf16)
    run.path.mkdir(parents=True)
    torch.save({"step": 3}, run.checkpoint_path)
    assert published.keep_precision(cfg) == bf16
    kept = experiment.notebook_config(
        {"model": "smollm2", "dataset": "wn18rr", "profile": "cpu", "seed": 0}
        | {"retrain": False, "overrides": {}, "In": []}
    )
    assert kept == bf16
    line = published.plan_line("kgc", kept)
    assert f"in the local store at step 3 of {cfg.train.max_steps:,}" in line
    assert line.endswith(
        "kept in bf16, the precision the run started in, although this "
        "machine's `precision: auto` is fp32: slower here"
    )
    explicit = resolve(profile="smoke")  # the smoke profile says fp32, not auto
    assert published.keep_precision(explicit) == explicit
    Run.trained(cfg).path.mkdir(parents=True)
    torch.save({"step": 1}, Run.trained(cfg).checkpoint_path)
    assert published.keep_precision(cfg) == cfg  # equal progress: this machine's precision


def glued(**numbers: object) -> str:
    """An executed page whose only outputs are glued values (as myst-nb stores them)."""
    prefix = "application/papermill.record/"
    outputs = [
        {
            "output_type": "display_data",
            "metadata": {"scrapbook": {"mime_prefix": prefix, "name": name}},
            "data": {f"{prefix}text/plain": repr(value)},
        }
        for name, value in numbers.items()
    ]
    return json.dumps({"cells": [{"cell_type": "code", "outputs": outputs}]})


def test_verify_compares_every_number_within_the_stated_tolerance(
    shelf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The page's record and the numbers glued into its executed copy are compared with the
    book's; glued speeds measure the machine and are left out."""
    kgc = next(e for e in pages.BOOK_EXPERIMENTS if e.page == "kgc")
    cfg = pages.page_config(kgc, profile="smoke")
    book = {"reference": tmp_path / "results", "executed": tmp_path / "pages"}
    for folder in book.values():
        folder.mkdir()
    record = f"{kgc.record}.json"  # the page's record: kgc_wn18rr.json
    (book["reference"] / record).write_text(json.dumps({"model": "smollm2", "MRR": 0.5}))
    (book["executed"] / "kgc.ipynb").write_text(glued(kgc_mrr=0.5, kgc_n=10, kgc_ex_per_s=3.0))
    assert book_runs.verify([kgc], profile="smoke", **book) == 1
    assert "not published, so not verifiable without training" in capsys.readouterr().err
    experiment.train_or_load(cfg, progress=False)
    publish(cfg, hardware=HARDWARE, commit="0123abc")
    rerun = {"mrr": 0.505, "n": 10}

    def execute_page(page: pages.Experiment, **kwargs: object) -> Path:
        out = kwargs["results_dir"]
        assert isinstance(out, Path) and out == kwargs["executed"]
        assert kwargs["runs_dir"] == out / "runs"  # an empty store
        (out / record).write_text(json.dumps({"model": "smollm2", "MRR": rerun["mrr"]}))
        notebook = glued(kgc_mrr=rerun["mrr"], kgc_n=rerun["n"], kgc_ex_per_s=9.0)
        (out / "kgc.ipynb").write_text(notebook)
        return out / "kgc.ipynb"

    monkeypatch.setattr(book_runs, "execute", execute_page)
    assert book_runs.verify([kgc], profile="smoke", **book) == 0
    out = capsys.readouterr().out
    assert "within 2.0% (relative)" in out and "kgc: agrees (" in out
    rerun["mrr"] = 0.6
    assert book_runs.verify([kgc], profile="smoke", **book) == 1
    out = capsys.readouterr().out
    assert "kgc_wn18rr.json: MRR: 0.5 in the book, 0.6 in the rerun (16.67%)" in out
    assert "kgc.ipynb: kgc_mrr: 0.5 in the book, 0.6 in the rerun (16.67%)" in out
    assert book_runs.verify([kgc], profile="smoke", **book, tolerance=0.2) == 0
    rerun["n"] = 11
    assert book_runs.verify([kgc], profile="smoke", **book, tolerance=0.2) == 0  # 9.1%
    assert book_runs.verify([kgc], profile="smoke", **book) == 1
    assert "kgc.ipynb: kgc_n: 10 in the book, 11 in the rerun" in capsys.readouterr().out


def test_glued_numbers_of_an_executed_page() -> None:
    numbers = book_runs.glued_numbers(REPO_ROOT / "book" / "experiments" / "kgc.ipynb")
    assert {"kgc_wn18rr_mrr_kalm", "kgc_wn18rr_steps", "kgc_wn18rr_train_minutes"} <= set(numbers)
    assert not [name for name in numbers if name.endswith("_per_s")]
    assert all(isinstance(v, int | float) for v in numbers.values())
