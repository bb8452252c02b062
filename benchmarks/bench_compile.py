"""torch.compile vs eager on one encoding batch (run in a subprocess with a time limit).

Run as a script it prints one JSON line; ``run`` starts it and kills it when compilation takes
longer than the limit, so a compiler that hangs on this CPU cannot stall the whole benchmark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import THREADS, Workload, best_time
from bench_encoding import sample_entities

from kalm.flops import forward_flops
from kalm.models import decoder_of
from kalm.views import pad_batch


def measure(batch_size: int, repeats: int) -> dict[str, Any]:
    """Eager and compiled seconds per batch, compile time of the first and of a second width."""
    torch.set_num_threads(THREADS)
    w = Workload(peaks={})
    ids = sorted(w.views.tail_ids(sample_entities(w.kg.num_entities, 4 * batch_size)), key=len)
    middle = ids[len(ids) // 2 - batch_size // 2 :][:batch_size]
    other = ids[:batch_size]  # the shortest rows: a different width, as the next batch would be
    pad = w.tokenizer.pad_token_id
    first, second = pad_batch(middle, pad), pad_batch(other, pad)
    x, mask = first.input_ids, first.attention_mask
    x2, mask2 = second.input_ids, second.attention_mask
    decoder = decoder_of(w.model("fp32"))
    with torch.inference_mode():
        eager = best_time(lambda: decoder(input_ids=x, attention_mask=mask), repeats=repeats)
        compiled = torch.compile(decoder)
        started = time.perf_counter()
        compiled(input_ids=x, attention_mask=mask)
        compile_first = time.perf_counter() - started
        started = time.perf_counter()
        compiled(input_ids=x2, attention_mask=mask2)
        compile_second = time.perf_counter() - started
        fast = best_time(lambda: compiled(input_ids=x, attention_mask=mask), repeats=repeats)
    real = sum(len(r) for r in middle)
    return {
        "batch_shape": list(x.shape),
        "real_tokens": real,
        "eager_seconds": round(eager, 4),
        "compiled_seconds": round(fast, 4),
        "speedup": round(eager / fast, 3),
        "compile_seconds_first_shape": round(compile_first, 1),
        "compile_seconds_second_shape": round(compile_second, 1),
        "eager_gflops": round(forward_flops(w.model("fp32").config, real) / eager / 1e9, 1),
        "compiled_gflops": round(forward_flops(w.model("fp32").config, real) / fast / 1e9, 1),
    }


def run(batch_size: int, quick: bool, limit_seconds: float) -> dict[str, Any]:
    """Run :func:`measure` in a subprocess; report a failure or a time-out instead of raising."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--batch-size",
        str(batch_size),
        "--repeats",
        "2" if quick else "5",
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=limit_seconds, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "limit_seconds": limit_seconds}
    if done.returncode != 0:
        return {"status": "failed", "stderr_tail": done.stderr[-2000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  eager {result['eager_seconds']:.3f} s, compiled {result['compiled_seconds']:.3f} s "
        f"(x{result['speedup']}), compile {result['compile_seconds_first_shape']} s "
        f"+ {result['compile_seconds_second_shape']} s for a second width"
    )
    return {"status": "ok", **result}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.batch_size, args.repeats)))
