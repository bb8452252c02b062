"""Test-wide defaults: the smoke profile, a scratch directory for the pages' results and the
read-only data directory beside the repository; and, after a run of the notebooks (``--nbval``),
which notebook took the most memory and which the most time."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

os.environ.setdefault("KALM_PROFILE", "smoke")
# Smoke runs of the notebooks must not overwrite the book's results (book/results/).
os.environ.setdefault("KALM_RESULTS_DIR", tempfile.mkdtemp(prefix="kalm-results-"))
_shared = ROOT.parent / "shared" / "data"
if "KALM_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["KALM_DATA_DIR"] = str(_shared)


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (pad == EOS), shared by the tests that need real token ids."""
    from kalm.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def kg():
    """WN18RR from KALM_DATA_DIR."""
    from kalm.data import load_kg

    return load_kg("wn18rr")


@dataclass
class NotebookCost:
    """What one notebook of an ``--nbval`` run took: wall seconds (setup, cells, teardown) and
    the peak resident memory of its kernel, in bytes."""

    seconds: float = 0.0
    peak_bytes: int = 0


_notebooks: dict[str, NotebookCost] = {}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc; none where there is no /proc)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _peak_resident_bytes(pid: int) -> int:
    """The kernel's high-water mark of resident memory (VmHWM), or 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add a notebook cell's time to its notebook, and after the cell ran, the high-water mark
    of the kernel (the notebook's only child process while its cells run; the kernel lives for
    one notebook, so its high-water mark is the notebook's peak)."""
    path = report.nodeid.split("::")[0]
    if not path.endswith(".ipynb"):
        return
    cost = _notebooks.setdefault(path, NotebookCost())
    cost.seconds += report.duration
    if report.when == "call":
        peaks = [_peak_resident_bytes(pid) for pid in _descendants(os.getpid())]
        cost.peak_bytes = max([cost.peak_bytes, *peaks])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the notebook with the largest peak resident memory and the slowest one."""
    if not _notebooks:
        return
    biggest = max(_notebooks, key=lambda path: _notebooks[path].peak_bytes)
    slowest = max(_notebooks, key=lambda path: _notebooks[path].seconds)
    terminalreporter.section("notebook costs")
    terminalreporter.write_line(
        f"largest peak resident memory: {biggest} "
        f"({_notebooks[biggest].peak_bytes / 2**30:.2f} GiB, kernel high-water mark)"
    )
    terminalreporter.write_line(
        f"longest: {slowest} ({_notebooks[slowest].seconds:.0f} s, setup to teardown)"
    )
