"""A full KaLM training step in the ``cpu`` profile in fp32 and in bf16 (``train.precision``), and
its work compared with the recipe.

FLOPs follow :mod:`kalm.flops`: every pass costs ``2 P`` per real token forward; passes with
gradient (hr view, tail view, LM prompt) cost the same again for input gradients through the
frozen base weights; the self-negative view runs without gradient; the LM head runs at response
positions only (forward + input gradient); LoRA adapters are counted separately (3x forward
with gradient).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench_common import (
    PRECISIONS,
    Workload,
    high_water_mb,
    reset_high_water,
)
from bench_profile import step_shares

from kalm.batching import iterate_batches
from kalm.config import resolve
from kalm.flops import PassTokens, StepFlops, kalm_step_flops, recipe_step_flops
from kalm.hardware import cpu_has_native_bf16
from kalm.trainer import Trainer
from kalm.views import Batch, KaLMBatch


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


SETTINGS: dict[str, Any] = {
    "batch_size": 32,
    "lam": 1.0,
    "self_negatives": True,
    "self_negative_grad": True,
}
"""The settings the studies chose (batch 32, ``lam = 1``, self-negatives trained through), on
top of the ``cpu`` profile (LoRA r16 on every linear, no LoRA dropout)."""

BEFORE_COMMIT = "cc6eddf"
"""main before the fast training step (views in one forward, eager attention on a CPU): the code
``speedup_vs_before`` runs side by side with this tree."""

LOSS_TOLERANCE = (0.02, 0.02)
"""``|a - b| <= rel * |a| + abs``: the bf16 tolerance of tests/test_train.py's
test_bf16_and_fp32_losses_agree, which the curves of the fast and the old step must keep."""

ROOT = Path(__file__).resolve().parent.parent


def measure(w: Workload, precision: str, steps: int) -> dict[str, Any]:
    """Seconds, MFU (against both peaks) and memory of ``steps`` steps in ``precision`` after one
    warm-up step; the batches are the first ones of the seed, the same in every precision."""
    trainer = w.trainer(precision, **SETTINGS)
    trainer.module.train()
    batch_size = trainer.tcfg.batch_size
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


def choices(w: Workload, precision: str, steps: int) -> dict[str, Any]:
    """Each choice of the fast step against its alternative, side by side on the same batches:
    eager vs the model's ``sdpa`` attention, and one forward per view vs one for all views.

    The arms alternate over two rounds and each keeps its faster round (the one less disturbed
    by other jobs); the ratios are examples/s of the fast step over the arm.
    """
    trainer = w.trainer(precision, **SETTINGS)
    module = trainer.accelerator.unwrap_model(trainer.module)
    batches = iterate_batches(trainer.lengths, trainer.tcfg.batch_size, trainer.cfg.seed)
    fixed = [trainer.collate(next(batches)[1]) for _ in range(steps)]
    trainer.step(fixed[0])
    attention, merged = trainer.attention, module.merge_views
    arms = {
        "fast": (attention, merged),
        "sdpa_attention": (None, merged),
        "merged_views" if not merged else "separate_views": (attention, not merged),
    }
    best = dict.fromkeys(arms, float("inf"))
    for _ in range(2):
        for name, (attn, merge) in arms.items():
            trainer.attention, module.merge_views = attn, merge
            seconds = sum(trainer.step(b).seconds["total"] for b in fixed)
            best[name] = min(best[name], seconds)
    trainer.attention, module.merge_views = attention, merged
    examples = sum(len(b) for b in fixed)
    rates = {name: round(examples / s, 3) for name, s in best.items()}
    print(f"  {precision} examples/s by choice: {rates}")
    return {
        "examples_per_s": rates,
        "fast_over": {n: round(rates["fast"] / r, 3) for n, r in rates.items() if n != "fast"},
    }


def profile(w: Workload) -> dict[str, Any]:
    """Shares of one bf16 step by part (:func:`bench_profile.step_shares`), against the same
    step's time without the profiler; the self-negative views' share of the body's work is
    their share of the tokens of the passes with gradient."""
    trainer = w.trainer("bf16", **SETTINGS)
    batch = trainer.collate(
        next(iterate_batches(trainer.lengths, trainer.tcfg.batch_size, trainer.cfg.seed))[1]
    )
    wall = trainer.step(batch).seconds["total"]
    config = trainer.peft_model.config
    print(f"  one bf16 step of {len(batch)} triples ({wall:.2f} s), by part:")
    result = step_shares(
        lambda: trainer.step(batch),
        wall,
        vocab=config.vocab_size,
        rank=trainer.tcfg.lora_r,
        batch=len(batch),
    )
    views = [v for v in (batch.hr, batch.tail, batch.self_negative, batch.lm) if v is not None]
    tokens = sum(v.input_ids.numel() for v in views)
    if trainer.accelerator.unwrap_model(trainer.module).merge_views:
        width = max(v.input_ids.shape[1] for v in views[:3])
        tokens = sum(len(v.input_ids) * width for v in views[:3]) + views[-1].input_ids.numel()
    tokens += 0 if batch.lm_prefix is None else batch.lm_prefix.numel()
    head = 0 if batch.self_negative is None else batch.self_negative.input_ids.numel()
    body = sum(result["shares"][p] for p in ("base_linears", "lora", "attention"))
    result["self_negative_pass"] = round(body * head / tokens, 4)
    print(f"    {result['self_negative_pass']:6.1%}  of which the self-negative views (est.)")
    return result


def _before_tree(directory: Path) -> Path:
    """The library and its configuration as they were at :data:`BEFORE_COMMIT`, exported (no
    worktree is made)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BEFORE_COMMIT, "kalm", "_config.yml"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def _train(tree: Path, run_dir: Path, steps: int, settings: dict[str, Any]) -> list[dict]:
    """``steps`` more steps of the run in ``run_dir``, in a subprocess importing ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("train_worker.py")),
            str(run_dir),
            str(steps),
            "bf16",
            json.dumps(settings),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"train_worker.py with {tree} failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    if not record["kalm"].startswith(str(tree)):
        raise RuntimeError(f"train_worker.py imported {record['kalm']}, not the one in {tree}")
    return record["log"]


def speedup_vs_before(quick: bool) -> dict[str, Any]:
    """bf16 examples/s of this tree over :data:`BEFORE_COMMIT` at :data:`SETTINGS`, and their
    loss curves over the same steps from the same seed.

    Each side trains in rounds of steps, the sides alternating (and which goes first), so
    both see the same load; every round resumes its side's run directory, so the rounds make
    one curve of ``rounds x steps`` steps. Examples/s is over all steps of a side.
    """
    rounds, steps = (1, 2) if quick else (2, 4)
    settings = {**SETTINGS, "max_steps": rounds * steps}
    with tempfile.TemporaryDirectory(prefix="kalm-before-") as tmp:
        trees = {"before": _before_tree(Path(tmp)), "after": ROOT}
        logs: dict[str, list[dict]] = {"before": [], "after": []}
        for i in range(rounds):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for side in order:
                logs[side] += _train(trees[side], Path(tmp) / f"run-{side}", steps, settings)
    rates = {
        side: len(log)
        * SETTINGS["batch_size"]
        / sum(SETTINGS["batch_size"] / r["examples_per_s"] for r in log)
        for side, log in logs.items()
    }
    rel, tol = LOSS_TOLERANCE
    largest = {
        part: max(
            abs(a[part] - b[part]) for a, b in zip(logs["after"], logs["before"], strict=True)
        )
        for part in ("L_exp", "L_imp", "total")
    }
    within = all(
        abs(a[part] - b[part]) <= rel * abs(b[part]) + tol
        for a, b in zip(logs["after"], logs["before"], strict=True)
        for part in ("L_exp", "L_imp", "total")
    )
    speedup = rates["after"] / rates["before"]
    print(
        f"  bf16 examples/s: {rates['after']:.2f} now vs {rates['before']:.2f} at "
        f"{BEFORE_COMMIT} ({speedup:.2f}x); largest loss difference over {len(logs['after'])} "
        f"steps {largest['total']:.4f} (within tolerance: {within})"
    )
    return {
        "commit": BEFORE_COMMIT,
        "precision": "bf16",
        "steps": len(logs["after"]),
        "examples_per_s": {k: round(v, 3) for k, v in rates.items()},
        "speedup": round(speedup, 3),
        "largest_loss_difference": {k: round(v, 5) for k, v in largest.items()},
        "loss_tolerance": f"|a - b| <= {rel} |a| + {tol}",
        "curves_within_tolerance": within,
        "logs": {
            side: [
                {k: r[k] for k in ("step", "L_exp", "L_imp", "total", "examples_per_s")}
                for r in log
            ]
            for side, log in logs.items()
        },
    }


def run(w: Workload, quick: bool) -> dict[str, Any]:
    """At :data:`SETTINGS`: examples/s and MFU of the same steps in fp32 and bf16, each choice of
    the fast step on and off, a by-part profile of one bf16 step, and the speed-up over the
    code before the fast step (with the two loss curves)."""
    before = speedup_vs_before(quick)
    steps = 1 if quick else 2
    arms = {p: measure(w, p, steps) for p in PRECISIONS}
    speedup = arms["bf16"]["triples_per_s"] / arms["fp32"]["triples_per_s"]
    print(f"  bf16 / fp32: {speedup:.2f}x triples/s")
    shares = profile(w)
    picked = {p: choices(w, p, 1) for p in PRECISIONS}
    return {
        "settings": {**SETTINGS, "precision": "bf16 and fp32 (profile: bf16)"},
        "native_bf16": cpu_has_native_bf16(),
        "batch_size": SETTINGS["batch_size"],
        "profile_batch_size": w.cfg.train.batch_size,
        "lm_examples_per_batch": w.trainer("bf16", **SETTINGS).tcfg.lm_examples,
        "precisions": list(PRECISIONS),
        **arms,
        "bf16_speedup": round(speedup, 3),
        "choices": picked,
        "profile": shares["shares"],
        "profile_detail": shares,
        "speedup_vs_before": before["speedup"],
        "before": before,
        "flops_formula": (__doc__ or "").split("\n\n")[1].replace("\n", " "),
    }


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
