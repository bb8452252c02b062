"""Entity encoding throughput: ``kalm.encoder.encode_ids`` on WN18RR tail views, with the
model in fp32 and in bf16 (``train.precision``), on the same entities.

MFU is reported against both matmul peaks of the run. It counts real tokens only (``2 P`` FLOPs
each, P = non-embedding parameters), so the FLOPs spent on padding show up as lost utilisation,
as they should.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from bench_common import ENCODING_MFU_TARGET, PRECISIONS, SPEEDUP_TARGET, THREADS, Workload
from bench_profile import top_ops

from kalm.encoder import encode_ids
from kalm.flops import forward_flops

BATCH_SIZES = (32, 64, 128, 256)


def padded_tokens(lengths: Sequence[int], batch_size: int) -> int:
    """Tokens ``encode_ids`` computes: it sorts by length (descending) and pads each run."""
    ordered = sorted(lengths, reverse=True)
    return sum(
        len(ordered[i : i + batch_size]) * ordered[i] for i in range(0, len(ordered), batch_size)
    )


def sample_entities(num_entities: int, n: int, seed: int = 0) -> list[int]:
    """A fixed random subset of entity ids (the benchmark's workload)."""
    return np.random.default_rng(seed).choice(num_entities, size=n, replace=False).tolist()


def time_encode(
    w: Workload, ids: list[list[int]], batch_size: int, repeats: int, precision: str
) -> float:
    """Best wall time of ``encode_ids`` over ``ids`` with the model in ``precision`` (after one
    warm-up of two batches)."""
    model, pad = w.model(precision), w.tokenizer.pad_token_id
    encode_ids(model, ids[: 2 * batch_size], pad_id=pad, batch_size=batch_size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        encode_ids(model, ids, pad_id=pad, batch_size=batch_size)
        best = min(best, time.perf_counter() - started)
    return best


def run(w: Workload, quick: bool) -> dict[str, Any]:
    """Entities/s, MFU (against both peaks) and padding per batch size in fp32 and bf16; their
    ratio at the profile's entity batch size; thread scaling of bf16 at that batch size."""
    n = 128 if quick else 2048
    repeats = 1
    entities = sample_entities(w.kg.num_entities, n)
    ids = w.views.tail_ids(entities)
    lengths = [len(r) for r in ids]
    real = sum(lengths)
    flops = forward_flops(w.model("fp32").config, real)
    batch = w.cfg.eval.entity_batch_size
    sizes = sorted({*BATCH_SIZES, batch})
    rows: dict[str, list[dict[str, Any]]] = {p: [] for p in PRECISIONS}
    for precision in PRECISIONS:
        for bs in sizes:
            seconds = time_encode(w, ids, bs, repeats, precision)
            padded = padded_tokens(lengths, bs)
            row = {
                "batch_size": bs,
                "seconds": round(seconds, 3),
                "entities_per_s": round(n / seconds, 1),
                "real_tokens": real,
                "padded_tokens": padded,
                "padding_fraction": round((padded - real) / padded, 4),
                "gflops": round(flops / seconds / 1e9, 1),
                "mfu": w.mfu(flops, seconds),
            }
            rows[precision].append(row)
            print(
                f"  {precision} batch {bs:>3}: {row['entities_per_s']:7.1f} entities/s  "
                f"MFU {row['mfu']['fp32']:.1%} of fp32 peak, {row['mfu']['bf16']:.1%} of bf16 "
                f"peak  padding {row['padding_fraction']:.1%}"
            )
    at_batch = {p: next(r for r in rows[p] if r["batch_size"] == batch) for p in PRECISIONS}
    speedup = at_batch["bf16"]["entities_per_s"] / at_batch["fp32"]["entities_per_s"]
    print(f"  bf16 / fp32 at batch {batch}: {speedup:.2f}x")
    every = [len(r) for r in w.views.tail_ids(range(w.kg.num_entities))]
    index_padding = {str(bs): round(1 - sum(every) / padded_tokens(every, bs), 4) for bs in sizes}
    subset = ids[: n // 4]
    threads = {}
    for count in (1, THREADS):
        torch.set_num_threads(count)
        seconds = time_encode(w, subset, batch, repeats, "bf16")
        threads[str(count)] = round(len(subset) / seconds, 1)
        print(f"  bf16, {count} thread(s): {threads[str(count)]:7.1f} entities/s")
    torch.set_num_threads(THREADS)
    result = {
        "precisions": list(PRECISIONS),
        "entities": n,
        "mean_tokens": round(real / n, 2),
        "max_entity_tokens": w.cfg.train.max_entity_tokens,
        "batch_size": batch,
        "batch_sizes": rows,
        "at_batch_size": at_batch,
        "best": {p: max(rows[p], key=lambda r: r["entities_per_s"]) for p in PRECISIONS},
        "bf16_speedup": round(speedup, 3),
        "padding_fraction_all_entities": index_padding,
        "bf16_entities_per_s_by_threads": threads,
        "thread_speedup": round(threads[str(THREADS)] / threads["1"], 3),
    }
    if speedup < SPEEDUP_TARGET or at_batch["bf16"]["mfu"]["bf16"] < ENCODING_MFU_TARGET:
        print(f"  bf16 encoding of {2 * batch} entities, by operator:")
        model, pad = w.model("bf16"), w.tokenizer.pad_token_id
        result["bf16_profile"] = top_ops(
            lambda: encode_ids(model, ids[: 2 * batch], pad_id=pad, batch_size=batch)
        )
    return result
