"""The training loop: adapters move, the loss falls, resume is exact, global negatives are right."""

from __future__ import annotations

import dataclasses
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.state import AcceleratorState
from helpers import tiny_llama

from kalm.config import resolve
from kalm.losses import explicit_loss
from kalm.models import PRECISIONS, load_model
from kalm.runs import Run
from kalm.trainer import Trainer, gather_with_grad, total_steps


def smoke_cfg(**overrides):
    return resolve(profile="smoke", **overrides)


def model_for(cfg, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama whose weights have the dtype of ``cfg.train.precision``."""
    return tiny_llama(len(tokenizer), seed=seed).to(PRECISIONS[cfg.train.precision])


def adapter_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.peft_model.named_parameters() if "lora_" in n}


def test_total_steps_from_epochs_or_max_steps():
    cfg = smoke_cfg().train
    assert total_steps(cfg, 1000) == cfg.max_steps
    by_epochs = dataclasses.replace(cfg, max_steps=0, epochs=2.0, batch_size=10)
    assert total_steps(by_epochs, 1005) == 200


def test_lora_weights_change_after_one_step(tokenizer, kg, tmp_path):
    trainer = Trainer(tiny_llama(len(tokenizer)), tokenizer, kg, smoke_cfg(), Run(tmp_path))
    before = adapter_weights(trainer)
    assert before, "no LoRA parameters were attached"
    trainer.fit(stop_after=1, progress=False)
    after = adapter_weights(trainer)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    # Every LoRA B matrix starts at zero and must move; A matrices move once B is non-zero.
    assert {n for n in before if "lora_B" in n} <= set(moved)
    frozen = [
        n for n, p in trainer.peft_model.named_parameters() if p.requires_grad and "lora_" not in n
    ]
    assert frozen == []


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(tokenizer, kg, tmp_path, precision):
    cfg = smoke_cfg(lora_dropout=0.1, checkpoint_every=1, max_steps=4, precision=precision)
    straight = Trainer(model_for(cfg, tokenizer), tokenizer, kg, cfg, Run(tmp_path / "a"))
    straight.fit(progress=False)

    first = Trainer(model_for(cfg, tokenizer), tokenizer, kg, cfg, Run(tmp_path / "b"))
    first.fit(stop_after=2, progress=False)
    assert first.step_count == 2
    resumed = Trainer(model_for(cfg, tokenizer), tokenizer, kg, cfg, Run(tmp_path / "b"))
    resumed.fit(progress=False)
    assert resumed.step_count == 4

    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    log = [line for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines() if line]
    assert len(log) == 4  # steps re-run after the checkpoint are not logged twice


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_mixed_precision_step(tokenizer, kg, tmp_path, checkpointing):
    """bf16 base weights, fp32 LoRA and optimiser, L_imp on: the step runs and trains.

    This is the path of every GPU run (bf16 weights, ``Accelerator(mixed_precision="bf16")``);
    before it existed, the LM head met fp32 hidden states outside autocast and crashed.
    """
    cfg = smoke_cfg(precision="bf16", lam=0.5, gradient_checkpointing=checkpointing)
    trainer = Trainer(model_for(cfg, tokenizer), tokenizer, kg, cfg, Run(tmp_path))
    assert trainer.accelerator.mixed_precision == "bf16"
    before = adapter_weights(trainer)
    assert {w.dtype for w in before.values()} == {torch.float32}  # adapters stay fp32
    result = trainer.step(trainer.collate(np.arange(cfg.train.batch_size)))
    losses = {k: float(v) for k, v in result.losses.items()}
    assert all(np.isfinite(v) for v in losses.values()), losses
    assert losses["l_imp"] > 0  # the LM prompts ran through the bf16 LM head
    assert result.losses["total"].dtype == torch.float32  # loss maths in fp32
    after = adapter_weights(trainer)
    assert {w.dtype for w in after.values()} == {torch.float32}
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    state = trainer.optimizer.state_dict()["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.float32}


def test_bf16_and_fp32_losses_agree(tokenizer, kg, tmp_path):
    """One batch, the same weights in fp32 and in bf16 mixed precision: the loss parts agree
    to bf16 rounding (about 3 significant digits per matmul, amplified by 1/tau = 20)."""
    parts = {}
    for precision in ("fp32", "bf16"):
        AcceleratorState._reset_state()  # one mixed precision per process otherwise
        cfg = smoke_cfg(precision=precision, lam=0.5)
        trainer = Trainer(model_for(cfg, tokenizer), tokenizer, kg, cfg, Run(tmp_path / precision))
        with torch.no_grad():
            parts[precision] = trainer.loss(trainer.collate(np.arange(cfg.train.batch_size)))
    for name in ("l_exp", "l_imp", "total"):
        a, b = float(parts["fp32"][name]), float(parts["bf16"][name])
        assert abs(a - b) <= 0.02 * abs(a) + 0.02, (name, a, b)


def test_shared_prompt_prefix_gives_the_same_loss_and_gradients(tokenizer, kg, tmp_path):
    cfg = smoke_cfg(lam=1.0, lm_fraction=0.5)
    trainer = Trainer(tiny_llama(len(tokenizer), layers=3), tokenizer, kg, cfg, Run(tmp_path))
    torch.manual_seed(1)
    for name, p in trainer.peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters a non-trivial state
            torch.nn.init.normal_(p, std=0.1)
    batch = np.arange(cfg.train.batch_size)

    def loss_and_grads(share: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainer.collator.share_prefix = share
        trainer.optimizer.zero_grad(set_to_none=True)
        parts = trainer.loss(trainer.collate(batch))
        parts["l_imp"].backward()
        grads = {
            n: p.grad.clone()
            for n, p in trainer.peft_model.named_parameters()
            if p.requires_grad and p.grad is not None
        }
        return parts["l_imp"].detach(), grads

    shared, shared_grads = loss_and_grads(True)
    full, full_grads = loss_and_grads(False)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) > 0
    for name in full_grads:
        torch.testing.assert_close(shared_grads[name], full_grads[name], atol=1e-5, rtol=1e-4)


def test_collate_builds_views_masks_and_prompts(tokenizer, kg, tmp_path):
    cfg = smoke_cfg(lm_fraction=0.5)
    trainer = Trainer(tiny_llama(len(tokenizer)), tokenizer, kg, cfg, Run(tmp_path))
    indices = np.arange(cfg.train.batch_size)
    batch = trainer.collate(indices)
    heads, _, tails = trainer.examples[indices].T
    n, b = kg.num_entities, len(indices)
    assert len(batch) == b and batch.heads.tolist() == heads.tolist()
    assert batch.hr.input_ids.shape[0] == batch.tail.input_ids.shape[0] == b
    assert batch.tail.attention_mask.sum(1).tolist() == [
        len(ids) for ids in trainer.views.tail_ids(tails.tolist())
    ]
    assert batch.known.shape == (b, n) and batch.false_negative_mask.shape == (b, b)
    assert not batch.false_negative_mask.diagonal().any()
    assert batch.self_negative is not None and batch.self_negative_mask.shape == (b,)
    assert batch.lm is not None and len(batch.lm.input_ids) == cfg.train.lm_examples
    assert batch.lm_prefix is not None and batch.lm_prefix.shape[0] == 1  # shared preamble
    assert len(batch.prompt_lengths) == cfg.train.lm_examples
    off = Trainer(
        tiny_llama(len(tokenizer)),
        tokenizer,
        kg,
        smoke_cfg(lam=0.0, self_negatives=False),
        Run(tmp_path / "off"),
    ).collate(indices)
    assert off.lm is None and off.self_negative is None and off.self_negative_mask is None


def test_step_is_one_optimiser_step(tokenizer, kg, tmp_path):
    trainer = Trainer(tiny_llama(len(tokenizer)), tokenizer, kg, smoke_cfg(), Run(tmp_path))
    before = adapter_weights(trainer)
    result = trainer.step(trainer.collate(np.arange(trainer.tcfg.batch_size)))
    assert trainer.step_count == 1 and trainer.scheduler.last_epoch == 1
    assert set(result.losses) == {"l_exp", "l_imp", "total", "tau"}
    assert set(result.seconds) == {"forward", "backward", "optimizer", "total"}
    after = adapter_weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.peft_model.parameters())  # gradients cleared


@pytest.mark.slow
def test_smoke_profile_lowers_the_loss_of_smollm2(kg, tmp_path):
    model, tokenizer = load_model("smollm2")
    cfg = smoke_cfg(max_steps=6, lora_dropout=0.0, train_subset=16, lm_fraction=0.25)
    trainer = Trainer(model, tokenizer, kg, cfg, Run(tmp_path))
    batch = np.arange(cfg.train.batch_size)
    trainer.module.eval()
    with torch.no_grad():
        before = trainer.loss(trainer.collate(batch))["total"].item()
    trainer.fit(progress=False)
    with torch.no_grad():
        after = trainer.loss(trainer.collate(batch))["total"].item()
    assert after < before
    records = [line for line in (tmp_path / "train_log.jsonl").read_text().splitlines() if line]
    assert len(records) == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_worker(rank: int, world: int, port: int, hr: torch.Tensor, t: torch.Tensor, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        part = slice(rank * len(hr) // world, (rank + 1) * len(hr) // world)
        local_hr = hr[part].clone().requires_grad_(True)
        local_t = t[part].clone().requires_grad_(True)
        loss = explicit_loss(
            gather_with_grad(local_hr), gather_with_grad(local_t), tau=0.05, margin=0.02
        )
        loss.backward()
        # DDP averages gradients over processes; all_gather's backward sums them.
        out[rank] = (loss.detach(), local_hr.grad / world, local_t.grad / world)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_negatives_match_one_process_on_the_whole_batch():
    torch.manual_seed(0)
    hr, t = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    full_hr, full_t = hr.clone().requires_grad_(True), t.clone().requires_grad_(True)
    expected = explicit_loss(full_hr, full_t, tau=0.05, margin=0.02)
    expected.backward()

    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gathered_worker, args=(world, _free_port(), hr, t, out), nprocs=world)
        results = dict(out)
    for rank in range(world):
        loss, g_hr, g_t = results[rank]
        part = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(loss, expected.detach())
        torch.testing.assert_close(g_hr, full_hr.grad[part])
        torch.testing.assert_close(g_t, full_t.grad[part])


@pytest.mark.slow
def test_trained_self_negatives_change_the_gradient_not_the_loss(tokenizer, kg, tmp_path):
    """Trained through (SimKGC), the head's view gets a gradient; as a constant it does not.
    Both compute the same loss, and both log the self-negative diagnostics."""
    grads, losses = {}, {}
    for grad in (False, True):
        cfg = smoke_cfg(self_negatives=True, self_negative_grad=grad, lam=0.0)
        trainer = Trainer(tiny_llama(len(tokenizer)), tokenizer, kg, cfg, Run(tmp_path / str(grad)))
        batch = trainer.collate(np.arange(cfg.train.batch_size))
        parts = trainer.loss(batch)
        parts["total"].backward()
        losses[grad] = float(parts["l_exp"])
        grads[grad] = {
            n: p.grad.clone()
            for n, p in trainer.peft_model.named_parameters()
            if p.grad is not None
        }
        assert set(trainer.diagnostics) == {"self_negative_mass", "head_wins"}
        assert 0 < trainer.diagnostics["self_negative_mass"] < 1
    assert losses[False] == pytest.approx(losses[True], abs=1e-5)
    assert grads[False].keys() == grads[True].keys()
    assert any(not torch.allclose(grads[False][n], grads[True][n]) for n in grads[False])


def test_training_log_records_self_negative_diagnostics(tokenizer, kg, tmp_path):
    cfg = smoke_cfg(self_negatives=True, max_steps=2)
    Trainer(tiny_llama(len(tokenizer)), tokenizer, kg, cfg, Run(tmp_path)).fit(progress=False)
    log = Run(tmp_path).train_log()
    assert len(log) == 2
    assert all(0 <= r["head_wins"] <= 1 and 0 < r["self_negative_mass"] < 1 for r in log)


def test_the_logged_learning_rate_is_the_one_the_step_used(tokenizer, kg, tmp_path):
    """Linear warmup over 2 steps: step 1 runs at lr 0, step 2 at half the rate."""
    cfg = smoke_cfg(warmup_steps=2, max_steps=3, lr=1e-3)
    Trainer(tiny_llama(len(tokenizer)), tokenizer, kg, cfg, Run(tmp_path)).fit(progress=False)
    rates = [r["lr"] for r in Run(tmp_path).train_log()]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3])


def _loss_and_grads(trainer: Trainer, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    trainer.optimizer.zero_grad(set_to_none=True)
    parts = trainer.loss(batch)
    parts["total"].backward()
    grads = {
        n: p.grad.clone() for n, p in trainer.peft_model.named_parameters() if p.grad is not None
    }
    return {k: float(v.detach()) for k, v in parts.items()}, grads


def _fast_path_trainer(tokenizer, kg, tmp_path, **overrides) -> Trainer:
    """Self-negatives trained through and L_imp on (every pass of a step), adapters non-zero."""
    cfg = smoke_cfg(lam=1.0, lm_fraction=0.5, self_negative_grad=True, **overrides)
    trainer = Trainer(model_for(cfg, tokenizer), tokenizer, kg, cfg, Run(tmp_path))
    torch.manual_seed(1)
    for name, p in trainer.peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return trainer


def test_merged_views_give_the_same_losses_and_gradients(tokenizer, kg, tmp_path):
    """hr, tail and self-negative views in one forward: the losses and adapter gradients of
    three forwards, within fp32 rounding."""
    trainer = _fast_path_trainer(tokenizer, kg, tmp_path)
    trainer.module.merge_views = True
    batch = trainer.collate(np.arange(trainer.tcfg.batch_size))
    merged, merged_grads = _loss_and_grads(trainer, batch)
    trainer.module.merge_views = False
    separate, separate_grads = _loss_and_grads(trainer, batch)
    assert merged == pytest.approx(separate, abs=1e-5)
    assert merged_grads.keys() == separate_grads.keys() and merged_grads
    for name in merged_grads:
        torch.testing.assert_close(merged_grads[name], separate_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eager_attention_of_a_cpu_step_gives_the_same_losses(tokenizer, kg, tmp_path, precision):
    """A CPU training step runs eager attention (then gives the model back its own): the losses
    of sdpa within fp32 rounding in fp32, within the bf16 tolerance of
    test_bf16_and_fp32_losses_agree in bf16."""
    trainer = _fast_path_trainer(tokenizer, kg, tmp_path, precision=precision)
    config = trainer.peft_model.get_base_model().config
    assert trainer.attention == "eager" and config._attn_implementation == "sdpa"
    seen = []
    layer = trainer.peft_model.get_base_model().model.layers[0].self_attn
    layer.register_forward_pre_hook(lambda *_: seen.append(config._attn_implementation))
    batch = trainer.collate(np.arange(trainer.tcfg.batch_size))
    eager, _ = _loss_and_grads(trainer, batch)
    assert set(seen) == {"eager"} and config._attn_implementation == "sdpa"
    trainer.attention = None
    sdpa, _ = _loss_and_grads(trainer, batch)
    assert set(seen[-1:]) == {"sdpa"}
    for name in ("l_exp", "l_imp", "total"):
        a, b = sdpa[name], eager[name]
        if precision == "fp32":
            assert a == pytest.approx(b, abs=1e-5), name
        else:
            assert abs(a - b) <= 0.02 * abs(a) + 0.02, (name, a, b)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fast_step_keeps_the_loss_curve_of_30_steps(tokenizer, kg, tmp_path, precision):
    """30 steps from the same seed with merged views and eager attention, and with neither: the
    curves agree within the bf16 tolerance of test_bf16_and_fp32_losses_agree."""
    curves = {}
    for fast in (True, False):
        AcceleratorState._reset_state()
        cfg = smoke_cfg(
            precision=precision,
            max_steps=30,
            checkpoint_every=30,
            lam=1.0,
            lm_fraction=0.5,
            self_negative_grad=True,
        )
        run = Run(tmp_path / f"{precision}-{fast}")
        trainer = Trainer(model_for(cfg, tokenizer), tokenizer, kg, cfg, run)
        trainer.module.merge_views = fast
        trainer.attention = trainer.attention if fast else None
        trainer.fit(progress=False)
        curves[fast] = run.train_log()
    assert [r["step"] for r in curves[True]] == list(range(1, 31))
    for fast, slow in zip(curves[True], curves[False], strict=True):
        for name in ("L_exp", "L_imp", "total"):
            assert abs(fast[name] - slow[name]) <= 0.02 * abs(slow[name]) + 0.02, (fast, slow)
