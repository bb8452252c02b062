"""The Jupyter Book builds warning-free and renders every chapter, experiment, theorem and citation.

The build runs once per session (about ten seconds): the book renders committed notebooks and
never executes code, so the cost is Sphinx alone.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kalm.execute import BOOK_EXPERIMENTS

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
EXPERIMENTS = tuple(e.page for e in BOOK_EXPERIMENTS)


def toc_files(node: object) -> Iterator[str]:
    """Every `file:` entry of a (nested) jb-book table of contents, in order."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("file", "root"):
                yield str(value)
            else:
                yield from toc_files(value)
    elif isinstance(node, list):
        for item in node:
            yield from toc_files(item)


@pytest.fixture(scope="session")
def toc() -> list[str]:
    return list(toc_files(yaml.safe_load((BOOK / "_toc.yml").read_text())))


@pytest.fixture(scope="session")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the book with warnings as errors into a temporary directory; return the HTML root."""
    script = Path(sys.executable).with_name("jupyter-book")
    assert script.is_file(), (
        f"{script} not found: install the book extra (pip install -e '.[book]')"
    )
    out = tmp_path_factory.mktemp("book")
    cmd = [str(script), "build", str(BOOK), "-W", "--keep-going", "--path-output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (
        f"`{' '.join(cmd)}` exited with {proc.returncode}:\n"
        f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )
    return out / "_build" / "html"


def page(html: Path, name: str) -> str:
    path = html / f"{name}.html"
    assert path.is_file(), f"{path} was not built"
    return path.read_text(encoding="utf-8")


def test_every_toc_entry_exists(toc: list[str]) -> None:
    missing = [
        f for f in toc if not any((BOOK / f"{f}{ext}").is_file() for ext in (".md", ".ipynb"))
    ]
    assert not missing, f"book/_toc.yml lists files that do not exist in book/: {missing}"


def test_toc_lists_every_experiment(toc: list[str]) -> None:
    listed = [f for f in toc if f.startswith("experiments/")]
    assert sorted(listed) == sorted(f"experiments/{e}" for e in EXPERIMENTS)


def test_home_page(html: Path) -> None:
    assert "KaLM, reproduced" in page(html, "intro")
    assert (html / "index.html").is_file()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_page_renders_executed_notebook(html: Path, name: str) -> None:
    """The page is built from book/experiments/<name>.ipynb and shows a table and a figure."""
    assert (html / "_sources" / "experiments" / f"{name}.ipynb").is_file(), (
        f"experiments/{name}.html was not built from book/experiments/{name}.ipynb"
    )
    text = page(html, f"experiments/{name}")
    assert "<table" in text, f"experiments/{name}: no table in the rendered notebook"
    assert "<img" in text, f"experiments/{name}: no figure in the rendered notebook"


def test_theory_renders_theorems(html: Path) -> None:
    text = page(html, "theory")
    for label in ("thm-asymptotic", "thm-anisotropy"):
        assert f'<div class="proof theorem admonition" id="{label}">' in text, label
    assert 'href="experiments/theorems.html"' in text


def test_api_documents_load_kg(html: Path) -> None:
    assert 'id="kalm.data.load_kg"' in page(html, "api")


def test_bibliography_renders_and_citations_link_to_it(html: Path) -> None:
    text = page(html, "bibliography").lower()
    assert "knowledge-aligned autoregressive language modeling" in text
    assert 'href="bibliography.html#' in page(html, "intro")
