"""torch.profiler summaries: where the time of a workload that misses its target goes.

:func:`top_ops` lists operators by self time; :func:`step_shares` sorts every operator call of
one training step into the parts of a KaLM step (base linears, LoRA, attention, LM head and
``L_imp``, contrastive loss, optimiser, casts and copies, other element-wise work) by its name,
its input shapes and the optimiser scope around it, and takes the rest of the step's wall time
as Python and framework overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

MATMULS = frozenset(
    {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
)
ATTENTION = ("scaled_dot_product", "softmax")
COPIES = frozenset(
    {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat"}
)
PARTS = (
    "base_linears",
    "lora",
    "attention",
    "lm_head_and_l_imp",
    "contrastive_loss",
    "optimiser",
    "casts_copies",
    "other_elementwise",
    "python_overhead",
)


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


def _in_optimiser(event: FunctionEvent) -> bool:
    parent: FunctionEvent | None = event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return True
        parent = parent.cpu_parent
    return False


def classify(event: FunctionEvent, *, vocab: int, rank: int, batch: int) -> str:
    """The part of a KaLM step that one operator call belongs to.

    Matmuls are told apart by shape: the vocabulary (LM head), the LoRA rank (adapters),
    batched 3-d operands (attention scores and values), else a base linear. Any operator on a
    vocabulary-wide tensor is the LM head's loss; one whose tensors are all at most ``batch + 1``
    rows of at most two dimensions (pooled embeddings, the (B, B + 1) logits, scalars) is the
    contrastive loss. The forward and backward of each are classified alike. Calls without a
    tensor argument (the autograd engine's own work, allocations) count as overhead.
    """
    if _in_optimiser(event):
        return "optimiser"
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, list | tuple)]
    dims = [d for s in shapes for d in s if isinstance(d, int)]
    name = event.name
    if vocab in dims:
        return "lm_head_and_l_imp"
    if name in MATMULS:
        if name in ("aten::bmm", "aten::baddbmm"):
            return "attention"
        return "lora" if rank in dims else "base_linears"
    if any(part in name for part in ATTENTION):
        return "attention"
    if "dropout" in name:
        return "lora"
    tensors = [s for s in shapes if len(s) > 0]
    if not tensors:  # the autograd engine's and the dispatcher's own bookkeeping
        return "python_overhead"
    if all(len(s) <= 2 and s[0] <= batch + 1 for s in tensors):
        return "contrastive_loss"
    return "casts_copies" if name in COPIES else "other_elementwise"


def step_shares(
    fn: Callable[[], object], wall_seconds: float, *, vocab: int, rank: int, batch: int
) -> dict[str, Any]:
    """Shares of one call of ``fn`` (a training step) by part, against ``wall_seconds`` (the
    step's time without the profiler); Python overhead is what the operators leave of it.

    The profiler's own cost per operator call inflates the operators' times a little, so the
    overhead is, if anything, understated.
    """
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    seconds = dict.fromkeys(PARTS, 0.0)
    calls = 0
    for event in prof.events():
        if event.self_cpu_time_total <= 0:
            continue
        calls += 1
        part = classify(event, vocab=vocab, rank=rank, batch=batch)
        seconds[part] += event.self_cpu_time_total / 1e6
    in_ops = sum(seconds.values())
    seconds["python_overhead"] += max(0.0, wall_seconds - in_ops)
    total = max(wall_seconds, in_ops)
    shares = {part: round(s / total, 4) for part, s in seconds.items()}
    for part, share in shares.items():
        print(f"    {share:6.1%}  {part}")
    return {
        "shares": shares,
        "seconds": {p: round(s, 3) for p, s in seconds.items()},
        "wall_seconds": round(wall_seconds, 3),
        "operator_calls": calls,
    }
