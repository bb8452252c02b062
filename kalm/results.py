"""The headline numbers of every book page as data: ``book/results/<record>.json``, named by
the page's :attr:`kalm.pages.Experiment.record` (one per dataset of a page run for several).

Each experiment page writes a flat ``{"metric name": number}`` record, with the model, profile
and dataset it ran and the number of queries behind it; :func:`report` writes it and glues each
of its numbers (and the page's words) into the page's prose under one name, in one call. The
records are committed with the executed pages, so a rerun can be compared with the book's
numbers without reading notebooks: ``python -m kalm.execute --results-dir /tmp/rerun kgc`` then
``python -m kalm.execute --compare /tmp/rerun``. The configuration's session
(:class:`~kalm.config.Session`, from the notebook parameter ``results_dir`` that ``--results-dir``
injects) or else ``KALM_RESULTS_DIR`` redirects where pages write (the book's directory by
default).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

from kalm.config import REPO_ROOT, RunConfig
from kalm.durable import atomic_write_json, read_json

__all__ = ["BOOK_RESULTS", "compare", "glue_name", "labels", "publish", "report", "results_dir"]

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


Glue = Callable[..., object]
"""``myst_nb.glue``'s signature: ``glue(name, value, display=False)``."""


_GREEK = {"λ": "lambda", "τ": "tau"}
"""The Greek letters of the recipe's symbols, spelt out in glue names."""


def glue_name(key: str) -> str:
    """The glue name of a record key: lower case, λ and τ spelt out, every run of other
    characters than ASCII letters and digits made one ``_`` (``"lr 2e-4: MRR"`` is
    ``lr_2e_4_mrr``, ``"λ = 0.1: MRR"`` is ``lambda_0_1_mrr``), so that a
    ``{glue:text}`name:format``` role can read it."""
    spelt = "".join(_GREEK.get(c, c) for c in key.lower())
    name = re.sub(r"[^a-z0-9]+", "_", spelt).strip("_")
    if not name:
        raise ValueError(f"{key!r} has no letter or digit to name its glue value")
    return name


def report(
    page: str,
    cfg: RunConfig,
    numbers: Mapping[str, float],
    *,
    text: Mapping[str, str] | None = None,
    glue: Glue | None = None,
) -> Path:
    """The one bookkeeping call of an experiment page: publish ``numbers`` as the page's record
    (:func:`publish`) and glue each number and each item of ``text`` once, under
    :func:`glue_name` of its key; return the record's path.

    Glue names are the page's own (other pages read them as
    ``{glue:text}`experiments/<page>.ipynb::<name>```), so a page that runs for several datasets
    glues the same names on each, and one number has one name in the record and in the prose.
    Two keys with one glue name are an error naming both. ``glue`` defaults to
    ``myst_nb.glue``.
    """
    if glue is None:
        from myst_nb import glue  # here: the library runs without Jupyter

    text = text or {}
    both = sorted(set(numbers) & set(text))
    if both:
        raise ValueError(f"{page}: {both} are given as numbers and as text; give each once")
    values: dict[str, object] = {**numbers, **text}
    names: dict[str, str] = {}
    for key in values:
        name = glue_name(key)
        if name in names:
            raise ValueError(f"{page}: {names[name]!r} and {key!r} share the glue name {name!r}")
        names[name] = key
    path = publish(page, cfg, numbers)
    for name, key in names.items():
        glue(name, values[key], display=False)
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
