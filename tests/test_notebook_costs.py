"""The notebook cost report of an ``--nbval`` run (the root conftest.py): the peak resident
memory of a notebook's kernel and its time, and the summary naming the largest and the slowest."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import pytest

from kalm.config import REPO_ROOT

MIB = 2**20


@pytest.fixture
def costs(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of the root conftest.py, so its record of notebooks starts empty."""
    spec = importlib.util.spec_from_file_location("root_conftest", REPO_ROOT / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def kernel() -> Iterator[subprocess.Popen[str]]:
    """A child process holding 200 MiB it has written (so they are resident), like a kernel."""
    code = "import sys; x = b'1' * (200 * 2**20); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    yield child
    child.communicate("")


def report(nodeid: str, when: str, duration: float) -> SimpleNamespace:
    return SimpleNamespace(nodeid=nodeid, when=when, duration=duration)


def test_a_notebook_is_charged_its_kernel_peak_and_its_time(
    costs: ModuleType, kernel: subprocess.Popen[str]
) -> None:
    assert kernel.pid in costs._descendants(os.getpid())
    assert costs._peak_resident_bytes(kernel.pid) >= 200 * MIB
    costs.pytest_runtest_logreport(report("tests/test_x.py::test_y", "call", 100.0))  # not one
    costs.pytest_runtest_logreport(report("notebooks/big.ipynb::Cell 0", "setup", 1.0))
    costs.pytest_runtest_logreport(report("notebooks/big.ipynb::Cell 0", "call", 2.0))
    kernel.communicate("")  # the next notebook's kernel is another process
    costs.pytest_runtest_logreport(report("notebooks/slow.ipynb::Cell 0", "call", 9.0))
    assert set(costs._notebooks) == {"notebooks/big.ipynb", "notebooks/slow.ipynb"}
    assert costs._notebooks["notebooks/big.ipynb"].seconds == 3.0
    assert costs._notebooks["notebooks/big.ipynb"].peak_bytes >= 200 * MIB
    assert costs._notebooks["notebooks/slow.ipynb"].peak_bytes < 200 * MIB
    lines: list[str] = []
    terminal = SimpleNamespace(section=lambda title: lines.append(title), write_line=lines.append)
    costs.pytest_terminal_summary(terminal)
    assert lines[0] == "notebook costs"
    assert lines[1].startswith("largest peak resident memory: notebooks/big.ipynb (0.")
    assert lines[2] == "longest: notebooks/slow.ipynb (9 s, setup to teardown)"


def test_no_notebooks_no_report(costs: ModuleType) -> None:
    lines: list[str] = []
    costs.pytest_terminal_summary(SimpleNamespace(section=lines.append, write_line=lines.append))
    assert lines == []
