"""The machine's limit: dense fp32 and bf16 matmul throughput at the model's own shapes.

Shapes are those of SmolLM2-135M's linears (``x @ W.T`` as ``nn.Linear`` computes it) at token
counts typical of an encoding batch and a training batch; the best fp32 shape is the fp32 peak,
and the same shape in bf16 the bf16 peak. Every MFU of the run is reported against both.
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
            x = torch.randn(tokens, d_in)
            w = torch.randn(d_out, d_in)
            seconds = best_time(lambda x=x, w=w: F.linear(x, w), repeats=repeats, min_seconds=0.2)
            gflops = 2 * tokens * d_in * d_out / seconds / 1e9
            rows.append({"shape": name, "tokens": tokens, "gflops": round(gflops, 1)})
            print(f"  {name:>20} x {tokens:>4} tokens: {gflops:7.1f} GFLOP/s")
    best = max(rows, key=lambda r: r["gflops"])
    return {
        "peak_gflops": best["gflops"],
        "peak_shape": best,
        "shapes": rows,
        "bf16_gflops": bf16(best, repeats),
    }


def bf16(best: dict[str, Any], repeats: int) -> float:
    """bf16 throughput at the fp32 peak's shape: the limit of a model whose weights are bf16
    (``train.precision: bf16``), which every MFU is also reported against."""
    name, d_in, d_out = next(s for s in SHAPES if s[0] == best["shape"])
    x = torch.randn(best["tokens"], d_in, dtype=torch.bfloat16)
    w = torch.randn(d_out, d_in, dtype=torch.bfloat16)
    seconds = best_time(lambda: F.linear(x, w), repeats=repeats, min_seconds=0.2)
    gflops = 2 * best["tokens"] * d_in * d_out / seconds / 1e9
    print(f"  bf16 {name} x {best['tokens']} tokens: {gflops:7.1f} GFLOP/s")
    return round(gflops, 1)
