"""The Jupyter Book builds warning-free and renders every chapter, experiment, theorem and citation.

The build (the session fixture ``html`` of tests/conftest.py) runs once per session, shared with
the browser tests: the book renders committed notebooks and never executes code, so the cost is
Sphinx alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kalm.config import REPO_ROOT
from kalm.pages import BOOK_EXPERIMENTS

BOOK = REPO_ROOT / "book"
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


def machine_paths(text: str) -> list[str]:
    """Absolute paths of the machine that built the book found in `text`: the checkout's and
    the home directory's (a reader's checkout is elsewhere)."""
    roots = {str(REPO_ROOT), str(REPO_ROOT.resolve()), str(Path.home())}
    return sorted(
        {m.group(0) for r in roots for m in re.finditer(re.escape(r) + r"[^\s<\"']*", text)}
    )


def test_machine_path_scan_finds_a_repository_path() -> None:
    text = f"<em>PosixPath('{REPO_ROOT / 'book' / 'results' / 'regeneration.md'}')</em>"
    assert machine_paths(text) == [str(REPO_ROOT / "book" / "results" / "regeneration.md")]


def test_api_prints_no_machine_path(html: Path) -> None:
    """Module paths (kalm.pages.REGENERATION) and path defaults are shown relative to the
    repository, as in a reader's checkout."""
    text = page(html, "api")
    assert not machine_paths(text), f"api.html holds machine paths: {machine_paths(text)[:5]}"
    assert "book/results/regeneration.md" in text


def test_bibliography_renders_and_citations_link_to_it(html: Path) -> None:
    text = page(html, "bibliography").lower()
    assert "knowledge-aligned autoregressive language modeling" in text
    assert 'href="bibliography.html#' in page(html, "intro")


# A resource a page loads by itself: script, stylesheet, icon, image, frame or font. Links that
# the reader follows (<a href>) are not loaded and may point anywhere.
LOADED = re.compile(
    r"<(?:script|img|iframe|source|audio|video|embed)\b[^>]*\bsrc\s*=\s*[\"']?(https?:)?//"
    r"|<link\b[^>]*\bhref\s*=\s*[\"']?(https?:)?//"
    r"|@import\s+(?:url\()?\s*[\"']?(https?:)?//"
    r"|url\(\s*[\"']?(https?:)?//",
    re.IGNORECASE,
)
CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)


def remote_resources(text: str) -> list[str]:
    """Snippets of `text` (HTML or CSS) that load something from another machine."""
    text = CSS_COMMENT.sub("", text)
    return [text[m.start() : m.start() + 120] for m in LOADED.finditer(text)]


def test_remote_resource_scan_finds_a_cdn_script() -> None:
    page_text = '<script defer src="https://cdn.example.org/mathjax.js"></script>'
    css = "/* see https://example.org */ @font-face { src: url(//fonts.example.org/a.woff2) }"
    assert remote_resources(page_text) and remote_resources(css)
    assert not remote_resources('<a href="https://example.org">a link</a><script src="x.js">')


def test_built_html_loads_no_remote_resource(html: Path) -> None:
    """Every page, stylesheet and script of the build loads only files of the build itself."""
    found = {
        str(path.relative_to(html)): hits
        for path in sorted(html.rglob("*"))
        if path.suffix in (".html", ".css") and path.is_file()
        for hits in [remote_resources(path.read_text(encoding="utf-8", errors="replace"))]
        if hits
    }
    assert not found, f"remote resources in the built book: {found}"
    mathjax = html / "_static" / "mathjax" / "tex-mml-chtml.js"
    assert mathjax.is_file(), f"{mathjax}: the local MathJax copy was not installed"
    assert 'src="_static/mathjax/tex-mml-chtml.js"' in page(html, "method")
