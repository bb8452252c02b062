"""The machine's limit: dense fp32 and bf16 matmul throughput at the model's own shapes.

Shapes are those of SmolLM2-135M's linears (``x @ W.T`` as ``nn.Linear`` computes it) at token
counts typical of an encoding batch and a training batch; the best fp32 shape is the fp32 peak,
and the best of the model's shapes in bf16, at that token count, the bf16 peak. Every MFU of the
run is reported against both.

A large square matmul is measured too, as a reference of what the cores can do at all: the bf16
to fp32 ratio there depends on the CPU (with AMX tiles it is several times larger than with
AVX-512 BF16 alone), and the model's narrow shapes (576 wide) reach less of it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from bench_common import best_time

# (name, d_in, d_out) of SmolLM2-135M: hidden 576, intermediate 1536, 3 KV heads of 64, vocab 49152
SHAPES = (
    ("gate/up 576->1536", 576, 1536),
    ("down 1536->576", 1536, 576),
    ("q/o 576->576", 576, 576),
    ("k/v 576->192", 576, 192),
    ("lm head 576->49152", 576, 49152),
)


def run(quick: bool) -> dict[str, Any]:
    """GFLOP/s of each shape at several token counts; the best one is ``peak_gflops``."""
    token_counts = (512, 2048) if quick else (256, 512, 1024, 2048, 4096)
    repeats = 3 if quick else 7
    rows = []
    for tokens in token_counts:
        for name, d_in, d_out in SHAPES:
            if d_out > 4096 and tokens > 1024:
                continue  # the LM head only ever sees a few hundred response positions
            gflops = _gflops(tokens, d_in, d_out, torch.float32, repeats)
            rows.append({"shape": name, "tokens": tokens, "gflops": gflops})
    best = max(rows, key=lambda r: r["gflops"])
    bf16_rows = [
        {
            "shape": name,
            "tokens": best["tokens"],
            "gflops": _gflops(best["tokens"], d_in, d_out, torch.bfloat16, repeats),
        }
        for name, d_in, d_out in SHAPES
        if d_out <= 4096
    ]
    bf16_best = max(bf16_rows, key=lambda r: r["gflops"])
    reference = {
        dtype: _gflops(REFERENCE, REFERENCE, REFERENCE, getattr(torch, dtype), repeats)
        for dtype in ("float32", "bfloat16")
    }
    return {
        "peak_gflops": best["gflops"],
        "peak_shape": best,
        "shapes": rows,
        "bf16_gflops": bf16_best["gflops"],
        "bf16_shape": bf16_best,
        "bf16_shapes": bf16_rows,
        "reference_shape": f"{REFERENCE} x {REFERENCE} x {REFERENCE}",
        "reference_gflops": reference,
    }


# A large square matmul: what the cores reach when the shape is no limit.
REFERENCE = 4096


def _gflops(tokens: int, d_in: int, d_out: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of ``F.linear`` of ``tokens`` rows from ``d_in`` to ``d_out`` in ``dtype``."""
    x = torch.randn(tokens, d_in, dtype=dtype)
    w = torch.randn(d_out, d_in, dtype=dtype)
    seconds = best_time(lambda: F.linear(x, w), repeats=repeats, min_seconds=0.2)
    gflops = round(2 * tokens * d_in * d_out / seconds / 1e9, 1)
    name = str(dtype).removeprefix("torch.")
    print(f"  {name:>8} {tokens} x {d_in} -> {d_out}: {gflops:7.1f} GFLOP/s")
    return gflops
