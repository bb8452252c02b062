"""What bf16 (``train.precision: bf16``) does to KGC ranks: the same evaluation in both precisions.

A fixed sample of test triples is ranked against a fixed candidate set by the model with its
weights in fp32 and in bf16 (embeddings are fp32 either way), and the ranks are compared query by
query. The speed of the two precisions is :mod:`bench_encoding`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from bench_common import PRECISIONS, Workload
from bench_evaluation import evaluate

from kalm.evaluate.protocol import KGCResult


def _ranks(result: KGCResult) -> np.ndarray:
    return torch.cat([result.tail.realistic, result.head.realistic]).numpy()


def run(w: Workload, quick: bool) -> dict[str, Any]:
    """Rank agreement of one evaluation done in fp32 and in bf16."""
    queries, candidates = (32, 512) if quick else (500, 4096)
    results = {
        p: evaluate(w, p, False, test_queries=queries, candidates=candidates)[0] for p in PRECISIONS
    }
    a, b = _ranks(results["fp32"]), _ranks(results["bf16"])
    moved = np.abs(a - b)
    agreement = {
        "queries": len(a),
        "candidates": results["fp32"].num_candidates,
        "identical_ranks": round(float((moved == 0).mean()), 4),
        "median_abs_rank_change": float(np.median(moved)),
        "within_1_percent": round(float((moved <= 0.01 * a).mean()), 4),
        # Spearman's rho: Pearson's correlation of the (tie-averaged) ranks of the ranks.
        "spearman": round(float(pd.Series(a).rank().corr(pd.Series(b).rank())), 5),
        "metrics": {p: res.table_row() for p, res in results.items()},
    }
    print(
        f"  ranks identical for {agreement['identical_ranks']:.1%} of {len(a)} queries, "
        f"Spearman {agreement['spearman']:.4f}, MRR {agreement['metrics']['fp32']['MRR']:.4f} "
        f"(fp32) vs {agreement['metrics']['bf16']['MRR']:.4f} (bf16)"
    )
    return {"precisions": list(PRECISIONS), "agreement": agreement}
