"""torch.profiler summaries: where the time of a workload that misses its target goes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile


def top_ops(fn: Callable[[], object], *, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` operators by self CPU time over one call of ``fn``, with their share."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": round(e.self_cpu_time_total / 1e3, 1),
            "share": round(e.self_cpu_time_total / total, 4),
        }
        for e in events[:top]
    ]
    for row in rows:
        print(f"    {row['share']:6.1%} {row['self_ms']:9.1f} ms {row['calls']:6d}x  {row['op']}")
    return rows
