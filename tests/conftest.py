"""Fixtures shared by the tests: one warning-free build of the book per test session, a tiny
local Llama directory, and a fresh accelerate state per test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kalm.config import REPO_ROOT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of the built book carries the ``book`` marker (``make test-fast`` leaves them
    out): those that take the ``html`` fixture, which builds it, and the browser's."""
    for item in items:
        if "html" in getattr(item, "fixturenames", ()) or item.path.name == "test_browser.py":
            item.add_marker(pytest.mark.book)


@pytest.fixture(scope="session")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the book with warnings as errors into a temporary directory; return the HTML root."""
    script = Path(sys.executable).with_name("jupyter-book")
    assert script.is_file(), (
        f"{script} not found: install the book extra (pip install -e '.[book]')"
    )
    out = tmp_path_factory.mktemp("book")
    cmd = [
        str(script),
        "build",
        str(REPO_ROOT / "book"),
        "-W",
        "--keep-going",
        "--path-output",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, (
        f"`{' '.join(cmd)}` exited with {proc.returncode}:\n"
        f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )
    return out / "_build" / "html"


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama with a Llama-style tokenizer (BOS before every text), saved as a
    user's local model directory."""
    from helpers import llama_style_tokenizer, save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), llama_style_tokenizer())


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> None:
    """Each test may pick its own mixed precision: accelerate keeps one per process otherwise
    (a process that trains in one precision keeps it, as a notebook kernel does)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
