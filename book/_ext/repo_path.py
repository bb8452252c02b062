"""Make the repository root importable so autodoc documents the checked-out ``kalm`` sources.

Why: the API chapter must describe the code next to the book, not whichever ``kalm`` happens
to be installed, and the book must build from a plain checkout.
"""

import sys
from pathlib import Path

from sphinx.application import Sphinx

REPO_ROOT = Path(__file__).resolve().parents[2]


def setup(app: Sphinx) -> dict[str, bool]:
    """Put the repository root first on ``sys.path`` (before autodoc imports ``kalm``)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
