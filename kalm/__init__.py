"""KaLM: knowledge-graph alignment of causal language models, as a small reproducible library.

Submodules are imported on first access (``kalm.data``, ``kalm.models`` …) so that
``import kalm`` stays cheap and does not pull in torch until a submodule needs it; every module
of the package is listed (``tests/test_package.py`` checks that).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = (
    "analysis",
    "batching",
    "book_runs",
    "config",
    "data",
    "durable",
    "encoder",
    "evaluate",
    "execute",
    "experiment",
    "flops",
    "hardware",
    "losses",
    "models",
    "pages",
    "paper",
    "plots",
    "prompts",
    "published",
    "results",
    "runs",
    "settings",
    "studies",
    "tables",
    "theory",
    "train",
    "trainer",
    "views",
    "weights",
)


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'kalm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted((*globals(), *_SUBMODULES))
