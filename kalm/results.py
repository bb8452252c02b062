"""The headline numbers of every book page as data: ``book/results/<page>.json``.

Each experiment page writes a flat ``{"metric name": number}`` record, with the model, profile
and dataset it ran and the number of queries behind it. The records are committed with the
executed pages, so a rerun can be compared with the book's numbers without reading notebooks:
``python -m kalm.execute --results-dir /tmp/rerun kgc`` then
``python -m kalm.execute --compare /tmp/rerun``. The configuration's session
(:class:`~kalm.config.Session`, from the notebook parameter ``results_dir`` that ``--results-dir``
injects) or else ``KALM_RESULTS_DIR`` redirects where pages write (the book's directory by
default).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from kalm.config import REPO_ROOT, RunConfig
from kalm.durable import atomic_write_json, read_json

__all__ = ["BOOK_RESULTS", "compare", "labels", "publish", "results_dir"]

BOOK_RESULTS = REPO_ROOT / "book" / "results"
_LABELS = ("model", "profile", "dataset")


def results_dir(cfg: RunConfig | None = None) -> Path:
    """Where pages write their records: ``cfg.session.results_dir``, else
    ``KALM_RESULTS_DIR``, else ``book/results``."""
    if cfg is not None and cfg.session.results_dir is not None:
        return cfg.session.results_dir
    return Path(os.environ.get("KALM_RESULTS_DIR", BOOK_RESULTS))


def labels(cfg: RunConfig) -> dict[str, str]:
    """The labels a record carries to say which run it describes (model, profile, dataset)."""
    return {"model": cfg.model.alias, "profile": cfg.profile, "dataset": cfg.dataset}


def publish(page: str, cfg: RunConfig, metrics: Mapping[str, float]) -> Path:
    """Write the record of ``page``: the run's labels, then ``metrics`` (finite numbers only;
    counts such as ``test_queries`` belong in ``metrics`` too)."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        raise ValueError(f"{page}: metrics must be finite numbers, got {bad}")
    record: dict[str, object] = dict(labels(cfg))
    for name, value in metrics.items():
        number = float(value)
        record[name] = int(number) if isinstance(value, int) else number
    path = results_dir(cfg) / f"{page}.json"
    atomic_write_json(path, record)
    return path


def compare(rerun: Path, reference: Path = BOOK_RESULTS) -> pd.DataFrame:
    """Every metric of the records in ``rerun`` beside the same metric in ``reference``.

    One row per (page, metric) with both values, their difference and the relative difference;
    a page whose model, profile or dataset differ is listed with ``labels`` saying so, since its
    numbers are not comparable. A record missing from ``reference`` is an error naming it.
    """
    rows = []
    for path in sorted(rerun.glob("*.json")):
        target = reference / path.name
        if not target.is_file():
            raise FileNotFoundError(f"{path} has no counterpart {target} to compare with")
        new, old = read_json(path), read_json(target)
        labels = [
            f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in _LABELS if new.get(k) != old.get(k)
        ]
        for metric in (k for k in new if k not in _LABELS):
            book, value = old.get(metric, math.nan), new[metric]
            rows.append(
                {
                    "page": path.stem,
                    "metric": metric,
                    "book": book,
                    "rerun": value,
                    "difference": value - book,
                    "relative": (value - book) / abs(book) if book else math.nan,
                    "labels": "; ".join(labels) or "same",
                }
            )
    return pd.DataFrame(rows)
