"""Published runs: the book's trained runs, shipped in the repository under ``book/runs/``.

The run store (:mod:`kalm.runs`) lives on one machine, so without this a finished run is lost
with its machine, every page that shares a run retrains it on a fresh one, and a reader cannot
check a number of the book without training. A LoRA adapter of the book's model is a few MB to
~20 MB, so the book ships its runs:

* ``book/runs/<run name>/`` (the run store's directory name, so the same configuration key)
  holds a finished run: ``adapter/`` (safetensors and its peft configuration), ``config.json``,
  ``train_log.jsonl`` and ``done.json``, a manifest with the size and sha256 of every file, the
  examples seen (steps x global batch), the training seconds, the precision, the hardware and
  the git commit it was published from. No optimiser state, no caches: at most
  :data:`RUN_LIMIT` bytes.
* ``book/runs/<run name>/checkpoint/`` holds the latest checkpoint of an unfinished run
  (``checkpoint.pt``: adapter, optimiser, scheduler, RNG, step; the log so far and
  ``config.json``) with its manifest ``manifest.json``, at most :data:`CHECKPOINT_LIMIT` bytes,
  so that another machine resumes it; publishing the finished run removes it.

A published run is read-only. :func:`locate` finds a finished run in the local store first and
then here; a published run's adapter, log and completion record are read in place, while the
caches and metrics computed from it go to the local store's directory of the same name. Its files
are verified before use: one that does not match its manifest is an error naming it, never
reused or retrained silently. :func:`restore_checkpoint` copies a published checkpoint into the
local store, where training resumes from it as from its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import shutil
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kalm.config import REPO_ROOT, RunConfig, load_config
from kalm.durable import (
    RunStoreError,
    atomic_write_json,
    atomic_writer,
    read_json,
    read_jsonl,
    verify_manifest,
    write_manifest,
)
from kalm.runs import RETRAIN, Run

__all__ = [
    "BENCHMARK",
    "CHECKPOINT",
    "CHECKPOINT_LIMIT",
    "CHECKPOINT_MANIFEST",
    "PUBLISHED_DIR",
    "REMEDY",
    "RUN_LIMIT",
    "VERIFY_TOLERANCE",
    "PublishError",
    "PublishedRun",
    "RunState",
    "checkpoint_step",
    "compare_records",
    "describe",
    "folder_size",
    "git_commit",
    "is_published",
    "keep_precision",
    "locate",
    "plan_line",
    "publish",
    "published_runs",
    "restore_checkpoint",
    "run_state",
]

PUBLISHED_DIR = REPO_ROOT / "book" / "runs"
"""The published runs (a module attribute, read at every call, so tests point it elsewhere)."""

RUN_LIMIT = 25_000_000
"""Bytes a published finished run may take (adapter, log, configuration, manifest)."""

CHECKPOINT_LIMIT = 75_000_000
"""Bytes a published checkpoint may take (it also holds the optimiser's two moments)."""

CHECKPOINT = "checkpoint"
"""The folder of a published run that holds the checkpoint of an unfinished run."""

CHECKPOINT_MANIFEST = "manifest.json"
"""The manifest of a published checkpoint (size and sha256 of its files, step, provenance)."""

_DONE = "done.json"  # the manifest of a finished run, as in the run store
# Files of a local checkpoint that are published beside the configuration; the checkpoint goes
# last, so that an interrupted copy into a local store leaves nothing to resume from.
# The learning curve exists only for runs that measure one.
_CHECKPOINT_FILES = ("train_log.jsonl", "curve.jsonl", "checkpoint.pt")

REMEDY = (
    "A published run is never reused or retrained silently: restore it with "
    "`git checkout -- book/runs/`, or delete its folder to train the run in the local store."
)
"""What to do about a published file that does not verify; every such error ends with it."""


class PublishError(RuntimeError):
    """A run cannot be published (unfinished, too large, or nothing to publish)."""


def _folder(run: Run) -> Path:
    """The published folder of ``run`` (named as its local directory, so by its key)."""
    return PUBLISHED_DIR / run.path.name


def is_published(run: Run) -> bool:
    """Whether the book publishes ``run`` finished (its files are verified when it is loaded)."""
    return (_folder(run) / _DONE).exists()


@dataclass(frozen=True)
class PublishedRun(Run):
    """A finished run read from its published folder ``source``; ``path`` stays the local
    store's directory of the same name, where its caches and metrics go."""

    source: Path

    @property
    def adapter_dir(self) -> Path:
        return self.source / "adapter"

    @property
    def train_log_path(self) -> Path:
        return self.source / "train_log.jsonl"

    @property
    def curve_path(self) -> Path:
        return self.source / "curve.jsonl"

    @property
    def done_path(self) -> Path:
        return self.source / _DONE

    def finished_record(self) -> dict[str, Any]:
        """The published record, after every file it lists was checked (size and sha256)."""
        return verify_manifest(self.source, self.done_path.name, remedy=REMEDY)

    def train_log(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """The published training log; it is read-only, so ``repair`` is ignored."""
        return read_jsonl(self.train_log_path, directory=self.source, remedy=REMEDY)

    def learning_curve(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """The published learning curve (none for a run trained without one); read-only."""
        if not self.curve_path.exists():
            return []
        return read_jsonl(self.curve_path, directory=self.source, remedy=REMEDY)

    def discard(self) -> None:
        """A published run is read-only: a retrain trains the local run instead."""
        raise PublishError(f"{self.source} is a published run and is never deleted by training")


def locate(run: Run) -> Run:
    """``run`` if the local store holds it finished, else its verified published copy if there
    is one, else ``run`` (to be trained or resumed).

    Raises :class:`~kalm.durable.RunStoreError` naming the file when the local or the published
    run does not verify.
    """
    if run.finished_record() is not None:
        return run
    if not is_published(run):
        return run
    published = PublishedRun(run.path, _folder(run))
    published.finished_record()
    return published


def restore_checkpoint(run: Run) -> int | None:
    """Copy the published checkpoint of ``run`` into the local store and return its step, when
    the local store holds neither a checkpoint nor the finished run; else None.

    The published files are verified first (an error names the one that does not match) and the
    checkpoint is copied last, so an interrupted copy leaves nothing to resume from.
    """
    if run.checkpoint_path.exists() or run.done_path.exists():
        return None
    if is_published(run):  # the finished run is published: nothing resumes
        return None
    source = _folder(run) / CHECKPOINT
    if not (source / CHECKPOINT_MANIFEST).exists():
        return None
    record = verify_manifest(source, CHECKPOINT_MANIFEST, remedy=REMEDY)
    for name in ("config.json", *_CHECKPOINT_FILES):
        if (source / name).exists():
            _copy(source / name, run.path / name)
    return int(record["step"])


def _copy(source: Path, target: Path) -> None:
    with source.open("rb") as src, atomic_writer(target, "wb") as out:
        shutil.copyfileobj(src, out)


# ------------------------------------------------------------------------------- what exists
RunState = Literal["published", "finished", "published checkpoint", "checkpoint", "none"]


def run_state(run: Run) -> tuple[RunState, int | None]:
    """Where ``run`` stands, without verifying or loading anything: finished in the local store,
    published, or a checkpoint (local before published) with its step; ``("none", None)``."""
    if run.done_path.exists():
        return "finished", None
    folder = _folder(run)
    if is_published(run):
        return "published", None
    if run.checkpoint_path.exists():
        return "checkpoint", checkpoint_step(run.checkpoint_path)
    manifest = folder / CHECKPOINT / CHECKPOINT_MANIFEST
    if manifest.exists():
        try:
            return "published checkpoint", int(read_json(manifest)["step"])
        except (RunStoreError, KeyError, TypeError, ValueError):
            return "published checkpoint", None
    return "none", None


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint file, or None when it cannot be read (resuming names the
    problem)."""
    import torch  # here: planning a regeneration imports no torch until a checkpoint is read

    try:
        # Memory-mapped: only the step is read, the tensors stay on disk.
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"])
    except Exception:  # a plan never stops on a damaged checkpoint; training names it
        return None


def _progress(cfg: RunConfig) -> int:
    state, _ = run_state(Run.trained(cfg))
    return 2 if state in ("finished", "published") else 1 if state != "none" else 0


def _auto(cfg: RunConfig) -> bool:
    """Whether the profile of ``cfg`` leaves the precision to the machine (``auto``)."""
    return load_config().profiles[cfg.profile]["train"].get("precision") == "auto"


def keep_precision(cfg: RunConfig) -> RunConfig:
    """``cfg``, or ``cfg`` in the other precision when its profile says ``precision: auto`` and
    the other precision's run of the same configuration is further along (finished against not
    finished, a checkpoint against nothing), locally or published.

    A run keeps the precision it started in: a bf16 run continues in bf16 on a machine without
    native bf16 (slower there) rather than being trained again in fp32 under another key. At
    equal progress this machine's precision wins. A precision set explicitly is kept as is.
    """
    if not _auto(cfg):
        return cfg
    other = "fp32" if cfg.train.precision == "bf16" else "bf16"
    alternative = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=other))
    return alternative if _progress(alternative) > _progress(cfg) else cfg


# -------------------------------------------------------------------------------- publishing
def git_commit() -> str:
    """The commit of the working tree (``+dirty`` when it has uncommitted changes outside
    ``book/runs/``), or ``unknown`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # publishing itself changes book/runs/: not counted
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(exclude)book/runs"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def publish(cfg: RunConfig, *, hardware: str, commit: str | None = None) -> str:
    """Publish the local run of ``cfg``: the finished run (removing a published checkpoint),
    else its latest checkpoint; return what was done, as one line.

    ``hardware`` describes the machine the run trained on (the publishing one, whose run store
    holds it). Raises :class:`PublishError` when the run exceeds its size limit or the local
    store holds nothing to publish, and RunStoreError when the local run does not verify.
    """
    run = Run.trained(cfg)
    commit = commit or git_commit()
    provenance = {"precision": cfg.train.precision, "hardware": hardware, "commit": commit}
    record = run.finished_record()
    target = _folder(run)
    if record is not None:
        files = record.pop("files")
        if _published_files(target) == files:
            return f"{run.path.name}: already published, unchanged"
        record |= provenance | {"examples_seen": record["steps"] * cfg.train.global_batch_size}
        with _staged(target) as stage:
            for name in files:  # adapter, log and configuration: never checkpoints or caches
                _copy(run.path / name, stage / name)
            write_manifest(stage, _DONE, record)
            _check_size(stage, RUN_LIMIT, run)
        return f"{run.path.name}: published the finished run ({describe(record)})"
    if run.checkpoint_path.exists():
        if is_published(run):
            raise PublishError(
                f"{target} holds the finished run; the local checkpoint {run.checkpoint_path} "
                "is of a retraining: finish it, then publish"
            )
        checkpoint = target / CHECKPOINT
        with _staged(checkpoint) as stage:
            atomic_write_json(stage / "config.json", cfg.as_dict())
            for name in _CHECKPOINT_FILES:
                if (run.path / name).exists():
                    _copy(run.path / name, stage / name)
            step = checkpoint_step(stage / "checkpoint.pt")
            if step is None:
                raise RunStoreError(run.path, run.checkpoint_path, "cannot be read", RETRAIN)
            write_manifest(stage, CHECKPOINT_MANIFEST, provenance | {"step": step})
            _check_size(stage, CHECKPOINT_LIMIT, run)
        return f"{run.path.name}: published its checkpoint at step {step:,}"
    raise PublishError(f"{run.path} holds neither a finished run nor a checkpoint to publish")


def _published_files(folder: Path) -> dict[str, Any] | None:
    """The files a published run's manifest lists, or None (not published, or unreadable)."""
    try:
        return read_json(folder / _DONE).get("files")
    except (RunStoreError, AttributeError):
        return None


def _check_size(folder: Path, limit: int, run: Run) -> None:
    size = folder_size(folder)
    if size > limit:
        raise PublishError(
            f"{run.path.name}: {size:,} bytes to publish exceed the limit of {limit:,}; "
            "a published run holds the adapter, log and configuration only (check the LoRA "
            "rank and targets of its profile)"
        )


def folder_size(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A folder next to ``target``, swapped in for it on a clean exit, so that a failed
    publication leaves the published folder as it was (a finished run's swap also removes its
    published checkpoint, which lives inside its folder)."""
    stage = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    stage.mkdir(parents=True)
    try:
        yield stage
        old = stage.with_name(f"{stage.name}.old")
        if target.exists():
            target.rename(old)
        stage.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def published_runs() -> Iterator[Path]:
    """Every folder of :data:`PUBLISHED_DIR` (finished runs and checkpoints)."""
    if PUBLISHED_DIR.is_dir():
        yield from sorted(
            p for p in PUBLISHED_DIR.iterdir() if p.is_dir() and not p.name.startswith(".")
        )


def describe(record: dict[str, Any]) -> str:
    """One line of a published record: steps, examples seen, minutes, precision, hardware."""
    return (
        f"{record.get('steps', '?')} steps, {record.get('examples_seen', '?')} examples, "
        f"{float(record.get('seconds', 0)) / 60:.1f} min in {record.get('precision', '?')} on "
        f"{record.get('hardware', '?')}, commit {str(record.get('commit', '?'))[:12]}"
    )


# ---------------------------------------------------------------------------------- planning
BENCHMARK = REPO_ROOT / "benchmarks" / "results" / "training.json"
"""The measured training step of the ``cpu`` profile in both precisions (``make bench``)."""


def plan_line(page: str, cfg: RunConfig) -> str:
    """Where the run of ``cfg`` that ``page`` uses stands, as one line: published, in the local
    store (finished or at step N), or to be trained, with an estimate of the minutes and its
    source. Reads manifests and logs only: no model, no sha256, no training."""
    run = Run.trained(cfg)
    state, step = run_state(run)
    folder = _folder(run)
    head = f"{page}: {run.path.name}"
    note = _precision_note(cfg)
    if state == "finished":
        return f"{head}: in the local store, finished{note}"
    if state == "published":
        try:
            about = describe(read_json(folder / _DONE))
        except RunStoreError as err:
            about = f"its done.json is unreadable: {err.problem}"
        return f"{head}: published in {folder} ({about}){note}"
    t = cfg.train
    if not t.max_steps:
        todo = f"{t.epochs:g} epochs of {t.global_batch_size} examples in {t.precision}"
        return f"{head}: to be trained: {todo}; no estimate (its steps follow from the data)"
    done = step or 0
    where = {
        "checkpoint": f"in the local store at step {done:,} of {t.max_steps:,}; ",
        "published checkpoint": f"published checkpoint at step {done:,} of {t.max_steps:,} "
        "(copied into the local store to resume); ",
        "none": "",
    }[state]
    remaining = t.max_steps - done
    todo = f"{remaining:,} steps of {t.global_batch_size} examples in {t.precision}"
    return f"{head}: {where}to be trained: {todo}, {_estimate(cfg, run, remaining)}{note}"


def _estimate(cfg: RunConfig, run: Run, steps: int) -> str:
    """About how many minutes ``steps`` steps take, and where the examples/s come from: the
    run's own log, the log of its published checkpoint, else the benchmark of the ``cpu``
    profile's step (``benchmarks/results/training.json``)."""
    logs = (
        (run.train_log_path, "recorded in the run's log in the local store"),
        (_folder(run) / CHECKPOINT / "train_log.jsonl", "recorded in its published log"),
    )
    found: tuple[float, str] | None = None
    for path, source in logs:
        try:
            rates = [float(r["examples_per_s"]) for r in read_jsonl(path) if "examples_per_s" in r]
        except (RunStoreError, KeyError, TypeError, ValueError):
            rates = []
        if rates:
            found = (statistics.median(rates), source)
            break
    if found is None and cfg.profile == "cpu" and BENCHMARK.is_file():
        with contextlib.suppress(RunStoreError, KeyError, TypeError, ValueError):
            bench = read_json(BENCHMARK)
            rate = float(bench[cfg.train.precision]["triples_per_s"])
            cores = bench.get("environment", {}).get("cpu_count", "?")
            found = (
                rate,
                f"measured by {BENCHMARK.relative_to(REPO_ROOT)} on {cores} CPU cores "
                f"on {str(bench.get('time', '?'))[:10]}",
            )
    if found is None:
        return (
            f"no estimate (no recorded or measured examples/s for the {cfg.profile} profile "
            f"in {cfg.train.precision})"
        )
    rate, source = found
    minutes = steps * cfg.train.global_batch_size / rate / 60
    return f"about {minutes:,.0f} min at {rate:.2f} examples/s ({source})"


def _precision_note(cfg: RunConfig) -> str:
    """Said when ``cfg`` keeps another precision than this machine's ``auto`` would choose."""
    from kalm.config import native_precision

    native = native_precision()
    if cfg.train.precision == native or not _auto(cfg):
        return ""
    return (
        f"; kept in {cfg.train.precision}, the precision the run started in, although this "
        f"machine's `precision: auto` is {native}: slower here"
    )


# -------------------------------------------------------------------------------- verifying
VERIFY_TOLERANCE = 0.02
"""Relative difference allowed between a re-executed number and the book's: pages executed in
bf16 and in fp32, or on CPUs with other bf16 kernels, rank a few queries differently."""


def compare_records(book: dict[str, Any], rerun: dict[str, Any], tolerance: float) -> list[str]:
    """The mismatches between a page's committed record and a re-execution's: a label (model,
    profile, dataset) or number that differs beyond ``tolerance`` (relative), or a number
    present in one record only. Empty when they agree."""
    problems = []
    for key in sorted(set(book) | set(rerun)):
        old, new = book.get(key), rerun.get(key)
        if old is None or new is None:
            problems.append(f"{key}: {'missing in the rerun' if new is None else 'new'}")
        elif isinstance(old, str) or isinstance(new, str):
            if old != new:
                problems.append(f"{key}: {old!r} in the book, {new!r} in the rerun")
        elif not math.isclose(float(old), float(new), rel_tol=tolerance, abs_tol=1e-12):
            relative = abs(new - old) / max(abs(old), abs(new))
            problems.append(f"{key}: {old:g} in the book, {new:g} in the rerun ({relative:.2%})")
    return problems
