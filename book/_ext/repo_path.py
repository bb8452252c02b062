"""Make the repository root importable so autodoc documents the checked-out ``kalm`` sources,
and show the library's paths relative to the repository.

Why: the API chapter must describe the code next to the book, not whichever ``kalm`` happens
to be installed, and the book must build from a plain checkout. A module constant such as
``kalm.pages.REGENERATION`` is an absolute path of the machine that built the book; autodoc
would print it as ``PosixPath('/home/…/book/results/regeneration.md')``, so the documenters
below print ``book/results/regeneration.md`` instead (default arguments are kept as written in
the source by ``autodoc_preserve_defaults`` in ``_config.yml``).
"""

import sys
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.ext.autodoc import AttributeDocumenter, DataDocumenter

REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_relative(value: Any) -> str | None:
    """A path inside the repository as the repository-relative path a reader's checkout has,
    or None for any other value (printed as autodoc prints it)."""
    if not isinstance(value, Path) or not value.is_absolute():
        return None
    try:
        return value.resolve().relative_to(REPO_ROOT).as_posix() or "."
    except ValueError:
        return None


class _RepoPathValue:
    """Mix-in of a documenter of module data or class attributes: a repository path's value is
    written relative to the repository root."""

    def should_suppress_value_header(self) -> bool:
        return repo_relative(self.object) is not None or super().should_suppress_value_header()

    def add_directive_header(self, sig: str) -> None:
        super().add_directive_header(sig)
        relative = repo_relative(self.object)
        if relative is not None and not self.options.no_value:
            self.add_line(f"   :value: {relative}", self.get_sourcename())


class RepoPathDataDocumenter(_RepoPathValue, DataDocumenter):
    """Module data (``kalm.pages.EXECUTED``)."""


class RepoPathAttributeDocumenter(_RepoPathValue, AttributeDocumenter):
    """Class and instance attributes."""


def setup(app: Sphinx) -> dict[str, bool]:
    """Put the repository root first on ``sys.path`` (before autodoc imports ``kalm``) and
    register the documenters of repository paths."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    app.setup_extension("sphinx.ext.autodoc")
    app.add_autodocumenter(RepoPathDataDocumenter, override=True)
    app.add_autodocumenter(RepoPathAttributeDocumenter, override=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
