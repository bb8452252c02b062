"""Does bf16 mixed precision change what KaLM learns? The same ``cpu``-profile run twice.

Both arms train the same steps from the same seed on the same batches, one with fp32 weights and
one with ``train.precision: bf16`` (frozen base in bf16, LoRA and optimiser in fp32). Both
adapters are then evaluated by the same bf16 encoder, on validation queries against every entity
(filtered with train ∪ valid answers only), so the comparison isolates the training precision;
what the encoding precision alone does to ranks is the ``precision`` benchmark's subject.
The report is the largest loss difference along the two curves and the two validation MRRs;
the ``cpu`` profile may switch to bf16 only if the bf16 MRR is within 5% (relative) of fp32.

Each arm runs in a process of its own (accelerate keeps one mixed precision per process), and
through the run store, so a second run of this benchmark only re-reads the results.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import numpy as np

STEPS = 30
QUERIES = 500
TOLERANCE = 0.05


def arm(precision: str, steps: int, queries: int, candidates: int) -> dict[str, Any]:
    """Train (or load) one arm and evaluate it on the validation split; its log and metrics."""
    import torch

    from kalm.config import resolve
    from kalm.evaluate.protocol import evaluate_kgc
    from kalm.experiment import load_encoder

    torch.set_num_threads(2)
    cfg = resolve(
        profile="cpu",
        max_steps=steps,
        precision=precision,
        valid_queries=queries,
        candidates=candidates,
    )
    encoder, run = load_encoder(cfg, precision="bf16")  # the same bf16 encoder for both arms
    result = evaluate_kgc(encoder, cfg, run, split="valid")
    log = run.train_log()
    return {
        "precision": precision,
        "run": run.path.name,
        "log": [{k: r[k] for k in ("step", "L_exp", "L_imp", "total")} for r in log],
        "examples_per_s_median": float(np.median([r["examples_per_s"] for r in log])),
        "valid": result.table_row(),
        "queries": 2 * len(result.triples),
        "candidates": result.num_candidates,
        "entity_seconds": result.timings.get("entity_seconds"),
    }


def _in_process(*args: Any) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(arm, args)


def run(quick: bool) -> dict[str, Any]:
    """Both arms and their comparison."""
    # quick: a few steps, ranked against 1,000 candidates instead of every entity
    steps, queries, candidates = (4, 16, 1000) if quick else (STEPS, QUERIES, 0)
    arms = {p: _in_process(p, steps, queries, candidates) for p in ("fp32", "bf16")}
    curves = {p: {r["step"]: r for r in a["log"]} for p, a in arms.items()}
    common = sorted(set(curves["fp32"]) & set(curves["bf16"]))
    largest = {
        part: max(abs(curves["fp32"][s][part] - curves["bf16"][s][part]) for s in common)
        for part in ("L_exp", "L_imp", "total")
    }
    mrr = {p: a["valid"]["MRR"] for p, a in arms.items()}
    relative = (mrr["bf16"] - mrr["fp32"]) / mrr["fp32"]
    speedup = arms["bf16"]["examples_per_s_median"] / arms["fp32"]["examples_per_s_median"]
    print(
        f"  {steps} steps: largest loss difference {largest['total']:.4f} (total), MRR "
        f"{mrr['fp32']:.4f} (fp32) vs {mrr['bf16']:.4f} (bf16), {relative:+.1%}; "
        f"training {speedup:.2f}x"
    )
    return {
        "steps": steps,
        "arms": arms,
        "largest_loss_difference": largest,
        "valid_mrr": mrr,
        "relative_mrr_difference": relative,
        "within_tolerance": abs(relative) <= TOLERANCE,
        "tolerance": TOLERANCE,
        "training_speedup": speedup,
    }
