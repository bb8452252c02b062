"""The paper's published numbers, kept as data files in ``kalm/resources`` (each cites its source).

Notebooks show them beside this project's measurements; they are never used as results.
"""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

__all__ = ["read_resource"]


def read_resource(name: str) -> pd.DataFrame:
    """A CSV file from ``kalm/resources`` (lines starting with ``#`` are its citation)."""
    path = files("kalm") / "resources" / name
    if not path.is_file():
        available = sorted(p.name for p in (files("kalm") / "resources").iterdir())
        raise FileNotFoundError(f"no resource {name!r}; available: {', '.join(available)}")
    with path.open() as handle:
        return pd.read_csv(handle, comment="#")
