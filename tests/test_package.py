"""The package ``kalm``: every module is reachable as an attribute of it (``kalm.tables``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kalm

PACKAGE = Path(kalm.__file__).parent


def test_every_module_is_a_listed_submodule() -> None:
    """A module missing from ``_SUBMODULES`` raises AttributeError on ``kalm.<module>``."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(kalm._SUBMODULES) == modules | packages


def test_a_submodule_is_imported_on_first_access() -> None:
    """In a fresh interpreter, where no other test has imported it already."""
    code = "import kalm, sys; assert 'kalm.tables' not in sys.modules; print(kalm.tables.__name__)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        cwd=PACKAGE.parent,
    )
    assert done.stdout.strip() == "kalm.tables", done.stderr
