"""Full filtered KGC evaluation of WN18RR (all entities, every test triple both ways).

By default an *estimate*: each stage of ``kalm.evaluate.protocol.evaluate_kgc`` is timed on a
sample and scaled to the full sizes. ``--full-eval`` runs the real thing once, in bf16. Both
precisions of ``train.precision`` are reported: the model's weights in fp32, and in bf16.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import PRECISIONS, Workload
from bench_encoding import sample_entities, time_encode

from kalm.evaluate.kgc import rank_queries
from kalm.evaluate.protocol import KGCResult, evaluate_kgc
from kalm.experiment import load_encoder
from kalm.flops import forward_flops
from kalm.runs import Run
from kalm.views import ViewBuilder


def _queries(w: Workload) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entity, relation, gold) of every test query: tail queries, then inverse (head) ones."""
    h, r, t = w.kg.test.T
    return (
        np.concatenate([h, t]),
        np.concatenate([r, r + w.kg.num_relations]),
        np.concatenate([t, h]),
    )


def run(w: Workload, quick: bool, full_eval: bool) -> dict[str, Any]:
    """fp32 and bf16 evaluation times: estimated, or (``full_eval``) measured for bf16."""
    return {
        "precisions": list(PRECISIONS),
        "fp32": estimate(w, quick, "fp32"),
        "bf16": full(w, "bf16") if full_eval else estimate(w, quick, "bf16"),
    }


def estimate(w: Workload, quick: bool, precision: str) -> dict[str, Any]:
    """Seconds of each stage at full size, from rates measured on samples."""
    n = 128 if quick else 1024
    ev = w.cfg.eval
    started = time.perf_counter()
    views = ViewBuilder.from_config(w.kg, w.tokenizer, w.cfg)
    view_seconds = time.perf_counter() - started
    started = time.perf_counter()
    known = w.kg.known_answers()
    known_seconds = time.perf_counter() - started

    entity_ids = views.tail_ids(range(w.kg.num_entities))
    sample = [entity_ids[e] for e in sample_entities(w.kg.num_entities, n)]
    entity_rate = n / time_encode(w, sample, ev.entity_batch_size, 1, precision)
    e, r, gold = _queries(w)
    query_ids = views.hr_ids(e.tolist(), r.tolist())
    pick = np.random.default_rng(0).choice(len(query_ids), size=n, replace=False)
    query_rate = n / time_encode(w, [query_ids[i] for i in pick], ev.query_batch_size, 1, precision)

    # Ranking cost does not depend on the embeddings' values: random unit vectors, real masks.
    config = w.model(precision).config
    dim = config.hidden_size
    entities = torch.nn.functional.normalize(torch.randn(w.kg.num_entities, dim), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1)
    part = pick

    def mask(s: slice) -> torch.Tensor:
        return known.mask(e[part][s], r[part][s], w.kg.num_entities)

    started = time.perf_counter()
    rank_queries(
        queries, entities, torch.from_numpy(gold[part]), mask, chunk_size=256, progress=False
    )
    rank_rate = n / (time.perf_counter() - started)

    num_q = len(query_ids)
    stages = {
        "view_builder": view_seconds,
        "known_answers": known_seconds,
        "entity_index": w.kg.num_entities / entity_rate,
        "query_encoding": num_q / query_rate,
        "ranking": num_q / rank_rate,
    }
    total = sum(stages.values())
    tokens = sum(map(len, entity_ids)) + sum(map(len, query_ids))
    bound = forward_flops(config, tokens) / (w.peaks[precision] * 1e9)
    print(
        f"  estimated full evaluation, {precision}: {total / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())}); "
        f"at 100% of the {precision} peak the encoding alone takes {bound / 60:.1f} min"
    )
    return {
        "kind": "estimate",
        "precision": precision,
        "entities": w.kg.num_entities,
        "queries": num_q,
        "entities_per_s": round(entity_rate, 1),
        "queries_per_s": round(query_rate, 1),
        "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
        "minutes": round(total / 60, 2),
        "real_tokens": tokens,
        "minutes_at_100pct_mfu": round(bound / 60, 2),
        "minutes_at_75pct_mfu": round(bound / 0.75 / 60, 2),
    }


def evaluate(
    w: Workload, precision: str, progress: bool, **eval_overrides: Any
) -> tuple[KGCResult, float]:
    """``evaluate_kgc`` of the workload's untuned model in ``precision`` with ``cfg.eval``
    fields overridden, in a fresh run directory (no cached index), and its wall time from
    loading the model (as a fresh process evaluating a run does)."""
    cfg = replace(w.cfg, eval=replace(w.cfg.eval, **eval_overrides))
    run = Run(Path(tempfile.mkdtemp(prefix="kalm-bench-eval-")))
    started = time.perf_counter()
    encoder, _ = load_encoder(cfg, tuned=False, precision=precision)
    result = evaluate_kgc(encoder, cfg, run, progress=progress)
    return result, time.perf_counter() - started


def full(w: Workload, precision: str) -> dict[str, Any]:
    """Run ``evaluate_kgc`` on every test triple against every entity, without caches."""
    result, seconds = evaluate(w, precision, True, test_queries=0, candidates=0)
    print(f"  full evaluation, {precision}: {seconds / 60:.1f} min")
    return {
        "kind": "measured",
        "precision": precision,
        "entities": result.num_candidates,
        "queries": 2 * len(result.triples),
        "minutes": round(seconds / 60, 2),
        "timings": result.timings,
        "metrics": result.table_row(),
    }
