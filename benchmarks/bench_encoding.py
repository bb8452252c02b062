"""Entity encoding throughput: ``kalm.encoder.encode_ids`` on WN18RR tail views.

MFU counts real tokens only (``2 P`` FLOPs each, P = non-embedding parameters), so the FLOPs
spent on padding show up as lost utilisation, as they should.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from bench_common import THREADS, Workload

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
    w: Workload,
    ids: list[list[int]],
    batch_size: int,
    repeats: int,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Best wall time of ``encode_ids`` over ``ids`` (after one warm-up batch)."""
    pad = w.tokenizer.pad_token_id
    encode_ids(w.model, ids[: 2 * batch_size], pad_id=pad, batch_size=batch_size, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        encode_ids(w.model, ids, pad_id=pad, batch_size=batch_size, dtype=dtype)
        best = min(best, time.perf_counter() - started)
    return best


def run(w: Workload, quick: bool) -> dict[str, Any]:
    """Entities/s, MFU and padding per batch size; thread scaling at the best batch size."""
    n = 128 if quick else 2048
    repeats = 1
    entities = sample_entities(w.kg.num_entities, n)
    ids = w.views.tail_ids(entities)
    lengths = [len(r) for r in ids]
    real = sum(lengths)
    flops = forward_flops(w.model.config, real)
    rows = []
    for bs in BATCH_SIZES:
        seconds = time_encode(w, ids, bs, repeats)
        padded = padded_tokens(lengths, bs)
        row = {
            "batch_size": bs,
            "seconds": round(seconds, 3),
            "entities_per_s": round(n / seconds, 1),
            "real_tokens": real,
            "padded_tokens": padded,
            "padding_fraction": round((padded - real) / padded, 4),
            "gflops": round(flops / seconds / 1e9, 1),
            "mfu": round(w.mfu(flops, seconds), 4),
        }
        rows.append(row)
        print(
            f"  batch {bs:>3}: {row['entities_per_s']:7.1f} entities/s  MFU {row['mfu']:.1%}  "
            f"padding {row['padding_fraction']:.1%}"
        )
    best = max(rows, key=lambda r: r["mfu"])
    every = [len(r) for r in w.views.tail_ids(range(w.kg.num_entities))]
    index_padding = {
        str(bs): round(1 - sum(every) / padded_tokens(every, bs), 4) for bs in BATCH_SIZES
    }
    subset = ids[: n // 4]
    threads = {}
    for count in (1, THREADS):
        torch.set_num_threads(count)
        seconds = time_encode(w, subset, best["batch_size"], repeats)
        threads[str(count)] = round(len(subset) / seconds, 1)
        print(f"  {count} thread(s): {threads[str(count)]:7.1f} entities/s")
    torch.set_num_threads(THREADS)
    return {
        "entities": n,
        "mean_tokens": round(real / n, 2),
        "max_entity_tokens": w.cfg.train.max_entity_tokens,
        "batch_sizes": rows,
        "best": best,
        "padding_fraction_all_entities": index_padding,
        "entities_per_s_by_threads": threads,
        "thread_speedup": round(threads[str(THREADS)] / threads["1"], 3),
    }
