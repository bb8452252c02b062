"""What this machine computes with: CUDA, the CPU's bf16 instructions, and a line saying so.

Why a module of its own: the configuration turns ``precision: auto`` into this machine's
precision, the model loader warns about emulated bf16, and the executed pages record the
machine that ran them. All three ask the same questions, so the answers live here, in a leaf
that imports no other ``kalm`` module (``tests/test_layering.py`` checks that).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = [
    "NATIVE_BF16_CPU_FLAGS",
    "cpu_flags",
    "cpu_has_native_bf16",
    "describe",
    "native_precision",
]

NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (``/proc/cpuinfo``) of instructions that multiply bf16 matrices in hardware."""

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The flags of the first CPU in ``cpuinfo``; empty where they cannot be read (no
    ``/proc/cpuinfo`` outside Linux), which every caller takes as "no special instructions"."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    lines = (line for line in text.splitlines() if line.startswith("flags"))
    return frozenset(next((line.split(":", 1)[1].split() for line in lines), []))


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16).

    Read once per process: every resolved configuration and every loaded model asks.

    Without either, PyTorch emulates bf16 matmuls on the CPU, which is not a little slower than
    fp32 but orders of magnitude slower (``benchmarks/bench_peak.py`` measures both). A CPU
    whose flags cannot be read counts as without.
    """
    return not cpu_flags(cpuinfo).isdisjoint(NATIVE_BF16_CPU_FLAGS)


def native_precision() -> str:
    """What ``precision: auto`` means on this machine: ``"bf16"`` where matmuls run natively in
    it (a CUDA GPU that supports bf16, else a CPU with :data:`NATIVE_BF16_CPU_FLAGS`), else
    ``"fp32"``.

    bf16 mixed precision is the fast path wherever the hardware has it, and agrees with fp32
    within the book's tolerance (the reproducing chapter's bf16 check); where it is emulated,
    fp32 is the fast path. The choice is made when a configuration is resolved, so the run key
    records the precision a run was actually trained in.
    """
    import torch  # here, not at the top: reading a configuration needs no torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def describe() -> str:
    """What computed a page, in the terms that decide its speed and precision: the GPU, else the
    CPU cores and whether they multiply bf16 natively (``precision: auto`` follows that)."""
    import torch  # here, not at the top: the command line starts without torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{os.cpu_count()} CPU cores, {bf16}"
