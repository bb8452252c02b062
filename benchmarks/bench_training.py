"""A full KaLM training step in the ``cpu`` profile in fp32 and in bf16 (``train.precision``), and
its work compared with the recipe.

FLOPs follow :mod:`kalm.flops`: every pass costs ``2 P`` per real token forward; passes with
gradient (hr view, tail view, LM prompt) cost the same again for input gradients through the
frozen base weights; the self-negative view runs without gradient; the LM head runs at response
positions only (forward + input gradient); LoRA adapters are counted separately (3x forward
with gradient).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from bench_common import (
    PRECISIONS,
    SPEEDUP_TARGET,
    TRAINING_MFU_TARGET,
    Workload,
    high_water_mb,
    reset_high_water,
)
from bench_profile import top_ops

from kalm.batching import iterate_batches
from kalm.config import resolve
from kalm.flops import PassTokens, StepFlops, kalm_step_flops, recipe_step_flops
from kalm.trainer import Trainer
from kalm.views import Batch, KaLMBatch

MEMORY_GB = 16.0


def pass_tokens(batch: KaLMBatch) -> tuple[PassTokens, PassTokens, int]:
    """Real token counts of each pass of one step as this library runs it, the same for full
    prompts (as the recipe runs them), and the padded total actually computed."""
    passes = [p for p in (batch.hr, batch.tail, batch.self_negative, batch.lm) if p is not None]
    prefix = 0 if batch.lm_prefix is None else batch.lm_prefix.shape[1]
    padded = prefix + sum(p.attention_mask.numel() for p in passes)

    def real(view: Batch | None) -> int:
        return 0 if view is None else int(view.attention_mask.sum())

    rows = [] if batch.lm is None else batch.lm.attention_mask.sum(1).tolist()
    plens = [] if batch.prompt_lengths is None else batch.prompt_lengths.tolist()
    ours = PassTokens(
        hr=real(batch.hr),
        tail=real(batch.tail),
        self_negative=real(batch.self_negative),
        lm=prefix + sum(rows),
        response=sum(r - p for r, p in zip(rows, plens, strict=True)),
    )
    return ours, replace(ours, lm=sum(prefix + r for r in rows)), padded


def _step_flops(trainer: Trainer, tokens: PassTokens, recipe: bool = False) -> StepFlops:
    tcfg = trainer.tcfg
    config = trainer.peft_model.config
    if recipe:
        return recipe_step_flops(config, tokens, tcfg.lora_targets, tcfg.lora_r)
    return kalm_step_flops(
        config,
        tokens,
        tcfg.lora_targets,
        tcfg.lora_r,
        self_negative_grad=tcfg.self_negative_grad,
    )


def _available_gb() -> float:
    """MemAvailable of the machine (the training step needs ~2.5 MB per token with gradient)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def measure(w: Workload, precision: str, batch_size: int, steps: int) -> dict[str, Any]:
    """Seconds, MFU (against both peaks) and memory of ``steps`` steps in ``precision`` after one
    warm-up step; the batches are the profile's first ones, the same in every precision."""
    trainer = w.trainer(precision, batch_size)
    trainer.module.train()
    batches = iterate_batches(trainer.lengths, batch_size, trainer.cfg.seed)
    reset_high_water()
    trainer.step(trainer.collate(next(batches)[1]))
    rows = []
    for _ in range(steps):
        batch = trainer.collate(next(batches)[1])
        tokens, _, padded = pass_tokens(batch)
        seconds = trainer.step(batch).seconds
        flops = _step_flops(trainer, tokens)
        rows.append(
            {
                "triples": len(batch),
                "seconds": {k: round(v, 3) for k, v in seconds.items()},
                "tokens": vars(tokens),
                "padded_tokens": padded,
                "flops": {"body": flops.body, "lm_head": flops.lm_head, "lora": flops.lora},
                "mfu": w.mfu(flops.total, seconds["total"]),
            }
        )
        print(
            f"  {precision} step: {seconds['total']:.2f} s (fwd {seconds['forward']:.2f}, "
            f"bwd {seconds['backward']:.2f}, opt {seconds['optimizer']:.2f}), MFU "
            f"{rows[-1]['mfu']['fp32']:.1%} of fp32 peak, {rows[-1]['mfu']['bf16']:.1%} of bf16"
        )
    seconds = sum(r["seconds"]["total"] for r in rows)
    triples = sum(r["triples"] for r in rows)
    flops_all = sum(sum(r["flops"].values()) for r in rows)
    flops_no_lora = sum(r["flops"]["body"] + r["flops"]["lm_head"] for r in rows)
    real = sum(sum(r["tokens"][k] for k in ("hr", "tail", "self_negative", "lm")) for r in rows)
    padded = sum(r["padded_tokens"] for r in rows)
    return {
        "steps": rows,
        "triples_per_s": round(triples / seconds, 2),
        "mfu": w.mfu(flops_all, seconds),
        "mfu_without_lora": w.mfu(flops_no_lora, seconds),
        "padding_fraction": round((padded - real) / padded, 4),
        "peak_rss_mb": round(high_water_mb(), 1),
    }


def run(w: Workload, quick: bool) -> dict[str, Any]:
    """Triples/s and MFU of the same steps in fp32 and in bf16, and their ratio.

    The profile's batch of 64 holds ~9-12 GB of activations; on a machine with less memory free
    the step runs at batch 16 instead (MFU per triple barely depends on it) and says so. When the
    bf16 step misses its speed-up or MFU target, the result keeps its profile by operator.
    """
    steps = 1 if quick else 5
    batch_size = w.cfg.train.batch_size
    available = _available_gb()
    if quick or available < MEMORY_GB:
        batch_size = 16
    arms = {p: measure(w, p, batch_size, steps) for p in PRECISIONS}
    speedup = arms["bf16"]["triples_per_s"] / arms["fp32"]["triples_per_s"]
    print(f"  bf16 / fp32: {speedup:.2f}x triples/s")
    result = {
        "batch_size": batch_size,
        "profile_batch_size": w.cfg.train.batch_size,
        "lm_examples_per_batch": w.trainer("bf16", batch_size).tcfg.lm_examples,
        "memory_available_gb_before": round(available, 1),
        "precisions": list(PRECISIONS),
        **arms,
        "bf16_speedup": round(speedup, 3),
        "flops_formula": (__doc__ or "").split("\n\n")[1].replace("\n", " "),
    }
    if speedup < SPEEDUP_TARGET or arms["bf16"]["mfu"]["bf16"] < TRAINING_MFU_TARGET:
        trainer = w.trainer("bf16", batch_size)
        batch = trainer.collate(
            next(iterate_batches(trainer.lengths, batch_size, trainer.cfg.seed))[1]
        )
        print(f"  one bf16 step of {len(batch)} triples, by operator:")
        result["bf16_step_profile"] = top_ops(lambda: trainer.step(batch))
    return result


def recipe(w: Workload, quick: bool) -> dict[str, Any]:
    """FLOPs per triple of this library's step vs the released recipe's, on the same batches."""
    trainer = w.trainer("bf16")  # FLOPs do not depend on the precision
    count = 5 if quick else 50
    batches = iterate_batches(trainer.lengths, trainer.tcfg.batch_size, trainer.cfg.seed)
    paper = resolve(profile="paper").train
    ours = theirs = no_self = no_prefix = paper_lora = 0
    ours_parts = {"body": 0, "lm_head": 0, "lora": 0}
    theirs_parts = dict(ours_parts)
    triples = real = padded = 0
    for _ in range(count):
        batch = trainer.collate(next(batches)[1])
        tokens, full, computed = pass_tokens(batch)
        real += tokens.hr + tokens.tail + tokens.self_negative + tokens.lm
        padded += computed
        a, b = _step_flops(trainer, tokens), _step_flops(trainer, full, recipe=True)
        ours, theirs, triples = ours + a.total, theirs + b.total, triples + len(batch)
        no_self += _step_flops(trainer, replace(tokens, self_negative=0)).total
        no_prefix += _step_flops(trainer, full).total
        paper_lora += recipe_step_flops(
            trainer.peft_model.config, full, paper.lora_targets, paper.lora_r
        ).total
        for part in ours_parts:
            ours_parts[part] += getattr(a, part)
            theirs_parts[part] += getattr(b, part)
    ratio = ours / theirs
    print(
        f"  per triple: ours {ours / triples / 1e9:.2f} GFLOP, "
        f"recipe {theirs / triples / 1e9:.2f} GFLOP, ratio {ratio:.3f}"
    )
    return {
        "batches": count,
        "triples": triples,
        "gflop_per_triple": round(ours / triples / 1e9, 3),
        "recipe_gflop_per_triple": round(theirs / triples / 1e9, 3),
        "ratio": round(ratio, 4),
        "padding_fraction": round((padded - real) / padded, 4),
        "what_if": {
            "ratio_if_self_negatives_came_from_a_cache": round(no_self / theirs, 4),
            "ratio_without_the_shared_prompt_prefix": round(no_prefix / theirs, 4),
            "ratio_vs_recipe_with_its_own_lora_r8_mlp": round(ours / paper_lora, 4),
        },
        "gflop_per_triple_by_part": {k: round(v / triples / 1e9, 3) for k, v in ours_parts.items()},
        "recipe_gflop_per_triple_by_part": {
            k: round(v / triples / 1e9, 3) for k, v in theirs_parts.items()
        },
        "note": (
            "same batches, same LM-example count and LoRA configuration for both; the recipe runs "
            "the head-only view with gradient, every LM prompt in full (here their shared "
            "preamble runs once per step), and computes vocabulary logits at every position "
            "of every pass (backward through them only for the LM prompt)"
        ),
    }
