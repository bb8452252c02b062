"""Experiments: the untuned and the KaLM-tuned model of a configuration, with their run store.

This is the top of the library: it loads models (:mod:`kalm.models`), trains them
(:mod:`kalm.train`) and hands out what evaluation needs (:class:`~kalm.encoder.Encoder`, a
:class:`~kalm.runs.Run` for caches and metrics). Evaluation and analysis never import it; the
notebooks do. The model is passed on as the configuration's :class:`~kalm.config.ModelSpec`.
"""

from __future__ import annotations

import time

from peft import PeftModel
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import RunConfig
from kalm.data import load_kg
from kalm.models import load_model
from kalm.runs import Run
from kalm.train import Trainer

__all__ = ["load_base", "train_or_load"]


def _load(cfg: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model(
        cfg.model, precision=cfg.train.precision, load_in_8bit=cfg.train.load_in_8bit
    )


def load_base(cfg: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Run]:
    """The untuned model of ``cfg`` (the "no tuning" rows of the paper) and its cache directory."""
    model, tokenizer = _load(cfg)
    return model, tokenizer, Run.base(cfg)


def train_or_load(
    cfg: RunConfig, *, progress: bool = True
) -> tuple[PeftModel, PreTrainedTokenizerBase, Run]:
    """The KaLM-tuned model of ``cfg``: loaded if its run finished, else trained (resuming).

    Training is the only expensive path; every notebook calls this, so the first one trains and
    the others reuse the adapter.
    """
    run = Run.trained(cfg)
    model, tokenizer = _load(cfg)
    if run.finished:
        tuned = PeftModel.from_pretrained(model, run.adapter_dir)
        tuned.eval()
        return tuned, tokenizer, run
    run.path.mkdir(parents=True, exist_ok=True)
    run.save_config(cfg)
    trainer = Trainer(model, tokenizer, load_kg(cfg.dataset), cfg, run)
    started = time.perf_counter()
    resumed_from = trainer.step_count
    tuned = trainer.fit(progress=progress)
    if trainer.accelerator.is_main_process:
        tuned.save_pretrained(run.adapter_dir)
        run.save_done(
            {
                "steps": trainer.steps,
                "resumed_from": resumed_from,
                "seconds": time.perf_counter() - started,
                "examples": len(trainer.examples),
            }
        )
    return tuned, tokenizer, run
