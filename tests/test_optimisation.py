"""One optimiser step in detail: gradient clipping, and the preparation of an 8-bit model.

On a tiny random Llama saved as a local directory, with its Llama-style tokenizer, and a toy
graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import toy_kg

from kalm.config import resolve
from kalm.models import load_model
from kalm.runs import Run
from kalm.trainer import Trainer

GRAPH = [(i, 0, (i + 1) % 8) for i in range(8)] + [(i, 1, (i + 3) % 8) for i in range(8)]


def trainer_for(llama_dir: Path, path: Path, precision: str = "fp32", **overrides) -> Trainer:
    cfg = resolve(model=str(llama_dir), profile="smoke", precision=precision, **overrides)
    model, tokenizer = load_model(cfg.model, precision=precision)
    return Trainer(model, tokenizer, toy_kg(GRAPH), cfg, Run(path))


def test_gradients_are_clipped_to_max_grad_norm(llama_dir: Path, tmp_path: Path) -> None:
    """The norm the optimiser sees: as computed without clipping, or ``max_grad_norm``."""
    norms = {}
    for clip in (0.0, 1e-3):
        AcceleratorState._reset_state()
        trainer = trainer_for(llama_dir, tmp_path / str(clip), max_grad_norm=clip)
        step = trainer.optimizer.step

        def spy(step=step, trainer=trainer, clip=clip) -> None:
            grads = [p.grad.flatten() for p in trainer.module.parameters() if p.grad is not None]
            norms[clip] = float(torch.cat(grads).norm())
            step()

        trainer.optimizer.step = spy
        trainer.step(trainer.collate(np.arange(trainer.tcfg.batch_size)))
    assert norms[0.0] > 0.01
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_an_8_bit_model_is_prepared_for_training(llama_dir: Path, tmp_path: Path) -> None:
    """As in the recipe (``prepare_model_for_kbit_training``): the weights that are not int8
    become fp32 and gradient checkpointing is on. The int8 weights themselves need a GPU and
    bitsandbytes; the trainer reads the flag that loading them sets."""
    model, _ = load_model(llama_dir, precision="bf16")
    model.is_loaded_in_8bit = True
    AcceleratorState._reset_state()
    cfg = resolve(
        model=str(llama_dir), profile="smoke", precision="bf16", gradient_checkpointing=True
    )
    _, tokenizer = load_model(llama_dir)
    trainer = Trainer(model, tokenizer, toy_kg(GRAPH), cfg, Run(tmp_path))
    base = trainer.peft_model.get_base_model()
    assert {p.dtype for n, p in base.named_parameters() if "lora_" not in n} == {torch.float32}
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    untouched = trainer_for(llama_dir, tmp_path / "bf16", precision="bf16")  # no flag: bf16 stays
    weights = untouched.peft_model.get_base_model().named_parameters()
    assert {p.dtype for n, p in weights if "lora_" not in n} == {torch.bfloat16}
