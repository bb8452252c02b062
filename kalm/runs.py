"""The run store: one directory per resolved configuration, so notebooks share trained adapters.

``runs/<model>-<dataset>-<profile>-s<seed>-<hash>/`` holds ``config.json``, the training log,
``checkpoint.pt`` while training, ``adapter/`` (peft's standard format) and the completion
record ``done.json`` once finished, metrics (``metrics/*.json``) and cached embeddings
(``cache/*.pt``). The untuned model gets a directory of its own (``<model>-base``) for its
caches. :class:`Run` owns every file name of that layout and the naming of metrics; it stores
and loads, and knows nothing of models or training (that is :mod:`kalm.experiment`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kalm.config import REPO_ROOT, RunConfig

__all__ = ["Run", "runs_dir"]


def runs_dir() -> Path:
    """Root of the run store: ``KALM_RUNS_DIR`` or ``runs/`` in the repository."""
    return Path(os.environ.get("KALM_RUNS_DIR", REPO_ROOT / "runs"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-40:]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Run:
    """A run directory and what it stores."""

    path: Path

    @classmethod
    def trained(cls, cfg: RunConfig) -> Run:
        """The directory of the KaLM-tuned model of ``cfg``."""
        name = f"{_slug(cfg.model.alias)}-{cfg.dataset}-{cfg.profile}-s{cfg.seed}-{cfg.train_key()}"
        return cls(runs_dir() / name)

    @classmethod
    def base(cls, cfg: RunConfig) -> Run:
        """The directory holding caches of the untuned model of ``cfg``."""
        return cls(runs_dir() / f"{_slug(cfg.model.alias)}-base")

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
    def done_path(self) -> Path:
        """The completion record, written last."""
        return self.path / "done.json"

    @property
    def finished(self) -> bool:
        """True once training completed and the adapter was saved."""
        return self.done_path.is_file() and self.adapter_dir.is_dir()

    def save_config(self, cfg: RunConfig) -> None:
        """Write the run's configuration as ``config.json`` (atomically)."""
        _atomic_write_text(
            self.path / "config.json", json.dumps(cfg.as_dict(), indent=2, sort_keys=True)
        )

    def save_done(self, record: dict[str, Any]) -> None:
        """Write the completion record (steps, seconds …) atomically."""
        _atomic_write_text(self.done_path, json.dumps(record, indent=2))

    def done(self) -> dict[str, Any]:
        """The completion record of a finished run."""
        if not self.done_path.is_file():
            raise FileNotFoundError(f"{self.done_path} not found: the run has not finished")
        return json.loads(self.done_path.read_text())

    def train_log(self) -> list[dict[str, Any]]:
        """Records of the training log (one per optimiser step)."""
        if not self.train_log_path.is_file():
            return []
        return [json.loads(line) for line in self.train_log_path.read_text().splitlines()]

    # -------------------------------------------------------------------------------- metrics
    @staticmethod
    def metric_name(task: str, cfg: RunConfig, split: str | None = None) -> str:
        """The one naming scheme of metrics: ``<task>-<dataset>-<profile>[-<split>]``.

        Dataset and profile are part of the name because the base model's directory is shared
        by every dataset and profile.
        """
        return "-".join([task, cfg.dataset, cfg.profile, *([split] if split else [])])

    def save_metrics(self, name: str, metrics: dict[str, Any]) -> Path:
        """Write ``metrics/<name>.json`` (atomically)."""
        path = self.path / "metrics" / f"{name}.json"
        _atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True))
        return path

    def load_metrics(self, name: str) -> dict[str, Any] | None:
        """Metrics saved under ``name``, or None."""
        path = self.path / "metrics" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # --------------------------------------------------------------------------------- caches
    def cached(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``cache/<name>.pt`` if present, else ``compute()`` saved there (atomically)."""
        path = self.path / "cache" / f"{name}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(value, tmp)
        os.replace(tmp, path)
        return value

    def cached_timed(
        self, name: str, compute: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, float]:
        """:meth:`cached`, plus the seconds ``compute`` took when the cache entry was made.

        The time is kept beside the entry (``metrics/timing-<name>.json``), so a throughput
        reported from it stays the same when the value comes from the cache.
        """
        timing = f"timing-{name}"

        def timed() -> torch.Tensor:
            started = time.perf_counter()
            value = compute()
            self.save_metrics(
                timing, {"seconds": time.perf_counter() - started, "rows": len(value)}
            )
            return value

        value = self.cached(name, timed)
        return value, float((self.load_metrics(timing) or {"seconds": 0.0})["seconds"])
