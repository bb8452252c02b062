"""The run store: one directory per resolved configuration, so notebooks share trained adapters.

``runs/<model>-<dataset>-<profile>-s<seed>-<hash>/`` holds ``config.json``, the training log,
``checkpoint.pt`` while training, ``adapter/`` (peft's standard format) once finished, metrics
(``metrics/*.json``) and cached embeddings (``cache/*.pt``). The untuned model gets a directory
of its own (``<model>-base``) for its caches.
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
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import REPO_ROOT, RunConfig
from kalm.data import load_kg
from kalm.models import load_model

__all__ = ["Run", "load_base", "runs_dir", "train_or_load"]


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

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def finished(self) -> bool:
        """True once training completed and the adapter was saved."""
        return (self.path / "done.json").is_file() and self.adapter_dir.is_dir()

    def save_metrics(self, name: str, metrics: dict[str, Any]) -> Path:
        """Write ``metrics/<name>.json`` (atomically)."""
        path = self.path / "metrics" / f"{name}.json"
        _atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True))
        return path

    def load_metrics(self, name: str) -> dict[str, Any] | None:
        """Metrics saved under ``name``, or None."""
        path = self.path / "metrics" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

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

    def train_log(self) -> list[dict[str, Any]]:
        """Records of ``train_log.jsonl`` (one per optimiser step)."""
        path = self.path / "train_log.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


def load_base(cfg: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Run]:
    """The untuned model of ``cfg`` (the "no tuning" rows of the paper) and its cache directory."""
    model, tokenizer = load_model(cfg.model.alias, load_in_8bit=cfg.train.load_in_8bit)
    return model, tokenizer, Run.base(cfg)


def train_or_load(
    cfg: RunConfig, *, progress: bool = True
) -> tuple[PeftModel, PreTrainedTokenizerBase, Run]:
    """The KaLM-tuned model of ``cfg``: loaded if its run finished, else trained (resuming).

    Training is the only expensive path; every notebook calls this, so the first one trains and
    the others reuse the adapter.
    """
    from kalm.train import Trainer

    run = Run.trained(cfg)
    model, tokenizer = load_model(cfg.model.alias, load_in_8bit=cfg.train.load_in_8bit)
    if run.finished:
        tuned = PeftModel.from_pretrained(model, run.adapter_dir)
        tuned.eval()
        return tuned, tokenizer, run
    run.path.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(
        run.path / "config.json", json.dumps(cfg.as_dict(), indent=2, sort_keys=True)
    )
    trainer = Trainer(model, tokenizer, load_kg(cfg.dataset), cfg, run.path)
    started = time.perf_counter()
    resumed_from = trainer.step
    tuned = trainer.fit(progress=progress)
    if trainer.accelerator.is_main_process:
        tuned.save_pretrained(run.adapter_dir)
        done = {
            "steps": trainer.steps,
            "resumed_from": resumed_from,
            "seconds": time.perf_counter() - started,
            "examples": len(trainer.examples),
        }
        _atomic_write_text(run.path / "done.json", json.dumps(done, indent=2))
    return tuned, tokenizer, run
