"""kalm.hardware: what the machine computes with, read without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from kalm import hardware


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 fma f16c", False),
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx2 avx512f amx_bf16 amx_tile", True),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n")
    assert hardware.cpu_flags(cpuinfo) == frozenset(flags.split())
    assert hardware.cpu_has_native_bf16(cpuinfo) is native
    assert hardware.cpu_has_native_bf16(tmp_path / "missing") is False


def test_describe_names_the_cores_and_their_bf16() -> None:
    described = hardware.describe()
    assert described.endswith(("native bf16", "no native bf16")) or " x " in described
