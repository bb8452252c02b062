"""The run store: one directory per resolved configuration, so notebooks share trained adapters.

``<store>/<model>-<dataset>-<profile>-s<seed>-<hash>/`` (``<model>`` is the alias, or a local
directory's name and a digest of its path) holds ``config.json``, the training log,
``checkpoint.pt`` while training, ``adapter/`` (peft's standard format) and the completion
record ``done.json`` once finished, metrics (``metrics/*.json``) and cached embeddings
(``cache/*.pt``). The untuned model gets a directory of its own (``<model>-base``) for its
caches. :class:`Run` owns every file name of that layout and the naming of metrics; it stores
and loads, and knows nothing of models or training (that is :mod:`kalm.experiment`).

Nothing is trusted as found. ``done.json`` is a manifest (size and sha256 of every file of the
finished run) written last, and a run counts as finished only if it verifies; a damaged part of
a trained run raises :class:`~kalm.durable.RunStoreError` rather than being retrained silently.
Cache entries carry a seal (size, sha256 and what they derive from) and are recomputed, with a
one-line warning, when it does not match. The runs the book ships live in ``book/runs/``
(:mod:`kalm.published`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kalm.config import RunConfig
from kalm.data.files import user_cache
from kalm.durable import (
    RunStoreError,
    StoreWarning,
    atomic_torch_save,
    atomic_write_json,
    lock_directory,
    read_json,
    read_jsonl,
    sha256_file,
    verify_manifest,
    write_manifest,
)

__all__ = ["EVALUATED_WITH", "RETRAIN", "Run", "runs_dir"]

RETRAIN = (
    "A trained run is never retrained silently: retrain it with "
    "`kalm.experiment.train_or_load(cfg, retrain=True)`, the notebook parameter "
    "`-p retrain True`, or `python -m kalm.execute --retrain`."
)
"""What to do about a damaged trained run; every error about one ends with it."""

EVALUATED_WITH = ("precision", "load_in_8bit", "max_entity_tokens")
"""Training settings that also shape every evaluation of a model, the untuned one's too: the
precision its weights and matmuls run in and the truncation of the entity views. Metric names
cover them (see :meth:`Run.metric_name`); a tuned model's other settings are in its directory."""

# Files that change after a run finished (they derive from it) and so are not in its manifest.
_DERIVED = ("cache/*", "metrics/*")


def runs_dir(cfg: RunConfig | None = None) -> Path:
    """Root of the run store: ``cfg.session.runs_dir`` (the page parameter ``runs_dir`` that
    :func:`kalm.pages.execute` injects), else ``KALM_RUNS_DIR``, else ``runs/`` in the user
    cache (``~/.cache/kalm/runs``), outside the working tree so that laying it anew loses no
    run."""
    if cfg is not None and cfg.session.runs_dir is not None:
        return cfg.session.runs_dir
    return Path(os.environ.get("KALM_RUNS_DIR") or user_cache() / "runs")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-40:]


@dataclass(frozen=True)
class Run:
    """A run directory and what it stores."""

    path: Path

    @classmethod
    def trained(cls, cfg: RunConfig, root: Path | None = None) -> Run:
        """The directory of the KaLM-tuned model of ``cfg`` in the run store ``root`` (by
        default ``runs_dir(cfg)``, see :func:`runs_dir`)."""
        model = _slug(cfg.model.store_name)
        name = f"{model}-{cfg.dataset}-{cfg.profile}-s{cfg.seed}-{cfg.train_key()}"
        return cls((root or runs_dir(cfg)) / name)

    @classmethod
    def base(cls, cfg: RunConfig) -> Run:
        """The directory holding caches of the untuned model of ``cfg``."""
        return cls(runs_dir(cfg) / f"{_slug(cfg.model.store_name)}-base")

    # ------------------------------------------------------------------------- training files
    @property
    def adapter_dir(self) -> Path:
        """The trained LoRA adapter (peft's ``save_pretrained`` format)."""
        return self.path / "adapter"

    @property
    def checkpoint_path(self) -> Path:
        """The training state while a run is unfinished (for an exact resume)."""
        return self.path / "checkpoint.pt"

    @property
    def train_log_path(self) -> Path:
        """One JSON record per optimiser step."""
        return self.path / "train_log.jsonl"

    @property
    def curve_path(self) -> Path:
        """The learning curve: one JSON record per validation point measured while training."""
        return self.path / "curve.jsonl"

    @property
    def done_path(self) -> Path:
        """The completion record, written last."""
        return self.path / "done.json"

    def save_config(self, cfg: RunConfig) -> None:
        """Write the run's configuration as ``config.json`` (atomically)."""
        atomic_write_json(self.path / "config.json", cfg.as_dict())

    def save_done(self, record: dict[str, Any]) -> None:
        """Finish the run: write ``record`` plus the size and sha256 of every file (adapter,
        log, configuration) as ``done.json``, last and atomically; then drop the checkpoint,
        which only an unfinished run resumes from."""
        ignore = (*_DERIVED, self.checkpoint_path.name)
        write_manifest(self.path, self.done_path.name, record, ignore=ignore)
        self.checkpoint_path.unlink(missing_ok=True)

    def finished_record(self) -> dict[str, Any] | None:
        """The completion record if the run finished, None while it is unfinished.

        The record is returned only after its seal and every file it lists were checked (size
        and sha256): a missing, truncated or changed file, or an unreadable, edited or empty
        ``done.json``, raises :class:`~kalm.durable.RunStoreError` naming the file. Reading
        needs no write access, so a finished run loads from a read-only store.
        """
        if not self.done_path.exists():
            return None
        return verify_manifest(self.path, self.done_path.name, remedy=RETRAIN)

    def done(self) -> dict[str, Any]:
        """The verified completion record of a run that must have finished: an unfinished run
        raises FileNotFoundError (see :meth:`finished_record`, which returns None instead)."""
        record = self.finished_record()
        if record is None:
            raise FileNotFoundError(f"{self.done_path} not found: the run has not finished")
        return record

    def discard(self) -> None:
        """Delete what training produced and everything derived from it, before a retrain.

        ``done.json`` goes first, so an interruption leaves an unfinished run, never a finished
        one with missing parts.
        """
        self.done_path.unlink(missing_ok=True)
        for path in (self.checkpoint_path, self.train_log_path, self.curve_path):
            path.unlink(missing_ok=True)
        for folder in (self.adapter_dir, self.path / "cache", self.path / "metrics"):
            shutil.rmtree(folder, ignore_errors=True)

    def train_log(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """Records of the training log (one per optimiser step).

        A torn last line (a kill during its write) is dropped with a warning, and cut from the
        file with ``repair=True`` (only the process training the run may do that).
        """
        return read_jsonl(self.train_log_path, repair=repair, directory=self.path, remedy=RETRAIN)

    def learning_curve(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """The points of the run's learning curve (none for a run trained without one); a torn
        last line is handled as in :meth:`train_log`."""
        if not self.curve_path.exists():
            return []
        return read_jsonl(self.curve_path, repair=repair, directory=self.path, remedy=RETRAIN)

    def fingerprint(self) -> str:
        """What this run's caches derive from: the sha256 of its verified adapter files, or ""
        for a directory without a completion record (the untuned model's)."""
        record = self.finished_record()
        if record is None:
            return ""
        adapter = {k: v for k, v in record["files"].items() if k.startswith("adapter/")}
        return hashlib.sha256(json.dumps(adapter, sort_keys=True).encode()).hexdigest()

    # -------------------------------------------------------------------------------- metrics
    @staticmethod
    def metric_name(
        task: str, cfg: RunConfig, split: str | None = None, *, reads: Sequence[str] | None = None
    ) -> str:
        """The one naming scheme of metrics: ``<task>-<dataset>-<profile>[-<split>]-<digest>``.

        A metric is loaded back by its name, so the name covers everything the value depends
        on beyond the run directory's model state: the model, dataset and seed (the base
        model's directory is shared by every dataset, profile and seed), the evaluation sizes
        (``reads``: the :class:`~kalm.config.EvalConfig` fields the computation reads, default
        all of them) and the training settings every evaluation runs with
        (:data:`EVALUATED_WITH`). The digest is a hash of those resolved values; dataset,
        profile and split stay readable in front of it.
        """
        evaluation = dataclasses.asdict(cfg.eval)
        settings = {
            "model": dataclasses.asdict(cfg.model),
            "dataset": cfg.dataset,
            "seed": cfg.seed,
            "eval": {k: evaluation[k] for k in (evaluation if reads is None else reads)},
            "train": {k: getattr(cfg.train, k) for k in EVALUATED_WITH},
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        return "-".join([task, cfg.dataset, cfg.profile, *([split] if split else []), digest])

    def save_metrics(self, name: str, metrics: dict[str, Any]) -> Path:
        """Write ``metrics/<name>.json`` (atomically)."""
        path = self.path / "metrics" / f"{name}.json"
        atomic_write_json(path, metrics)
        return path

    def load_metrics(self, name: str) -> dict[str, Any] | None:
        """Metrics saved under ``name``, or None; an unreadable file raises RunStoreError."""
        path = self.path / "metrics" / f"{name}.json"
        if not path.is_file():
            return None
        return read_json(
            path,
            directory=self.path,
            remedy="Delete it; the notebook that computes these metrics writes them again.",
        )

    # --------------------------------------------------------------------------------- caches
    def cached(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``cache/<name>.pt`` if it verifies, else ``compute()`` saved there (atomically)."""
        return self._cached(name, compute)[0]

    def cached_timed(
        self, name: str, compute: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        """:meth:`cached`, plus the seconds ``compute`` took when the cache entry was made.

        The time is kept in the entry's seal, so a throughput reported from it stays the same
        when the value comes from the cache.
        """
        value, seal = self._cached(name, compute)
        return value, float(seal["seconds"])

    def _cached(
        self, name: str, compute: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The entry ``name`` and its seal; computed, if missing, under the cache's lock.

        A sealed entry is read without the lock: it is replaced only by atomic renames, and a
        read-only store serves its caches. The lock makes a second process wait for the first
        one's computation and then read it, instead of computing it again beside it.
        """
        path = self.path / "cache" / f"{name}.pt"
        seal_path = path.with_suffix(".json")
        source = self.fingerprint()
        found = self._read_cache(path, seal_path, source, warn=False)
        if found is not None:
            return found
        with lock_directory(path.parent, purpose=f"compute the cache entry {name}"):
            found = self._read_cache(path, seal_path, source, warn=True)
            if found is not None:
                return found
            started = time.perf_counter()
            value = compute()
            seconds = time.perf_counter() - started
            atomic_torch_save(value, path)
            seal = {
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
                "source": source,
                "seconds": seconds,
                "rows": len(value),
            }
            atomic_write_json(seal_path, seal)
        return value, seal

    def _read_cache(
        self, path: Path, seal_path: Path, source: str, *, warn: bool
    ) -> tuple[torch.Tensor, dict[str, Any]] | None:
        """The entry at ``path`` if its seal matches; else None, after a one-line warning with
        ``warn`` (the read under the lock, whose caller then computes the entry again)."""
        if not path.exists() and not seal_path.exists():
            return None
        try:
            seal = read_json(seal_path, directory=self.path)
            if not isinstance(seal, dict) or seal.get("source") != source:
                problem = "derives from another model state than the run's"
            elif path.stat().st_size != seal.get("size") or sha256_file(path) != seal["sha256"]:
                problem = "does not match the size and sha256 in its seal"
            else:
                value = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(value, torch.Tensor):
                    return value, seal
                problem = f"holds a {type(value).__name__}, not a tensor"
        except RunStoreError as err:
            problem = f"has no readable seal ({err.problem})"
        except (OSError, RuntimeError, ValueError) as err:  # a missing or unloadable file
            problem = f"cannot be read ({type(err).__name__}: {err})"
        if not warn:
            return None
        warnings.warn(
            str(RunStoreError(self.path, path, problem, "Computing it again.")),
            StoreWarning,
            stacklevel=4,
        )
        return None
