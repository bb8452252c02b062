"""Serve MathJax from the copy installed with the book's Python dependencies, not from a CDN.

Why: Sphinx's default ``mathjax_path`` is a CDN address, so without network every formula of
the book showed as raw TeX. The PyPI package ``django-static-mathjax`` (a dependency of the
``book`` extra) ships MathJax 3.2 with its web fonts; MathJax 3 is what Sphinx 7 configures
(``mathjax3_config``) and what the pages' inline configuration is written for. The build copies
that distribution into ``_static/mathjax`` and points every page at it, so the HTML loads no
remote script, stylesheet or font.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError

TARGET = "mathjax"
"""Directory under the build's ``_static`` that receives MathJax's ``es5`` distribution."""

ENTRY = "tex-mml-chtml.js"
"""MathJax 3 component Sphinx uses by default: TeX and MathML input, HTML-CSS output."""

INSTALL_HINT = "pip install 'django-static-mathjax>=3.2.2,<4' (part of the book extra)"


def mathjax_dist() -> Path:
    """The ``es5`` directory of the installed MathJax 3 copy; a clear error if it is missing."""
    spec = importlib.util.find_spec("mathjax")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        dist = Path(root) / "static" / "mathjax" / "es5"
        if (dist / ENTRY).is_file():
            return dist
    raise ExtensionError(
        f"offline_mathjax: MathJax 3 ({ENTRY}) not found in the Python package `mathjax` "
        f"(searched {roots or 'nothing: the package is not installed'}); {INSTALL_HINT}"
    )


def _use_local_copy(app: Sphinx, config: Config) -> None:
    mathjax_dist()  # fail at start-up, not after the whole book was written
    config.mathjax_path = f"{TARGET}/{ENTRY}"  # relative: resolved against _static


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        shutil.copytree(mathjax_dist(), Path(app.outdir) / "_static" / TARGET, dirs_exist_ok=True)


def setup(app: Sphinx) -> dict[str, bool]:
    """Point ``mathjax_path`` at the local copy and copy it into the HTML output."""
    app.connect("config-inited", _use_local_copy)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
