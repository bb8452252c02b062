"""bf16 encoding (``eval.encode_dtype: bfloat16``): its speed and what it does to KGC ranks.

This CPU has AVX512-BF16, so a bf16 matmul runs several times faster than the fp32 peak.
Encoding under autocast keeps the fp32 weights and returns fp32 embeddings; the benchmark times
both precisions at the profile's entity batch size and runs the same KGC evaluation (a fixed
sample of test triples against a fixed candidate set) in both, comparing the ranks query by query.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from bench_common import Workload
from bench_encoding import sample_entities, time_encode
from bench_evaluation import evaluate

from kalm.evaluate.protocol import KGCResult
from kalm.flops import forward_flops

DTYPES = ("float32", "bfloat16")


def _ranks(result: KGCResult) -> np.ndarray:
    return torch.cat([result.tail.realistic, result.head.realistic]).numpy()


def run(w: Workload, quick: bool, bf16_peak: float) -> dict[str, Any]:
    """Entities/s per precision, and rank agreement of one evaluation done in both."""
    n = 128 if quick else 2048
    ids = w.views.tail_ids(sample_entities(w.kg.num_entities, n))
    batch = w.cfg.eval.entity_batch_size
    flops = forward_flops(w.model.config, sum(map(len, ids)))
    speed: dict[str, dict[str, float]] = {}
    for name in DTYPES:
        seconds = time_encode(w, ids, batch, 1, dtype=getattr(torch, name))
        peak = w.peak_gflops if name == "float32" else bf16_peak
        speed[name] = {
            "entities_per_s": round(n / seconds, 1),
            "gflops": round(flops / seconds / 1e9, 1),
            "utilisation_of_own_peak": round(flops / seconds / 1e9 / peak, 4),
        }
        print(f"  {name:>8}: {speed[name]['entities_per_s']:7.1f} entities/s")
    speedup = speed["bfloat16"]["entities_per_s"] / speed["float32"]["entities_per_s"]

    queries, candidates = (32, 512) if quick else (500, 4096)
    results = {
        name: evaluate(w, False, test_queries=queries, candidates=candidates, encode_dtype=name)[0]
        for name in DTYPES
    }
    a, b = _ranks(results["float32"]), _ranks(results["bfloat16"])
    moved = np.abs(a - b)
    agreement = {
        "queries": len(a),
        "candidates": results["float32"].num_candidates,
        "identical_ranks": round(float((moved == 0).mean()), 4),
        "median_abs_rank_change": float(np.median(moved)),
        "within_1_percent": round(float((moved <= 0.01 * a).mean()), 4),
        # Spearman's rho: Pearson's correlation of the (tie-averaged) ranks of the ranks.
        "spearman": round(float(pd.Series(a).rank().corr(pd.Series(b).rank())), 5),
        "metrics": {name: res.table_row() for name, res in results.items()},
    }
    print(
        f"  bf16 speed-up {speedup:.2f}x; ranks identical for {agreement['identical_ranks']:.1%}"
        f" of {len(a)} queries, Spearman {agreement['spearman']:.4f}, MRR "
        f"{agreement['metrics']['float32']['MRR']:.4f} (fp32) vs "
        f"{agreement['metrics']['bfloat16']['MRR']:.4f} (bf16)"
    )
    return {
        "batch_size": batch,
        "entities": n,
        "speed": speed,
        "bf16_speedup": round(speedup, 3),
        "bf16_peak_gflops": bf16_peak,
        "agreement": agreement,
    }
