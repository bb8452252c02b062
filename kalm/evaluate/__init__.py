"""Evaluation of aligned models: KGC ranking (``kgc``), KGQA (``kgqa`` and the modules it
gathers; ``likelihood`` for multiple choice) and LM checks (``lm``).

Submodules load on first attribute access, like the top-level package, so
``kalm.evaluate.kgc.rank(...)`` works without importing every evaluator.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_SUBMODULES = (
    "candidates",
    "generation",
    "kgc",
    "kgqa",
    "likelihood",
    "lm",
    "questions",
    "scoring",
    "statistics",
)


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'kalm.evaluate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted((*globals(), *_SUBMODULES))
