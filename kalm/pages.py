"""The book's pages: which notebooks, with which parameters, how they are executed and recorded.

Each book page is a notebook of ``notebooks/`` executed by papermill with explicit parameters
(the profile is resolved here, so the executed copy records ``cpu`` rather than ``auto``), into
``book/experiments/``; the executed copy records the precision and hardware of its runs, and
:func:`regeneration_table` sums how long the pages took. Every page writes its record,
``book/results/<record>.json`` (:attr:`Experiment.record`). The command line that drives this is
``python -m kalm.execute`` (:mod:`kalm.execute`); the runs of the pages are planned, published and
verified by :mod:`kalm.book_runs`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalm import hardware
from kalm.config import REPO_ROOT, RunConfig, load_config, resolve
from kalm.durable import atomic_write_text
from kalm.published import keep_precision, locate, run_state
from kalm.runs import Run

__all__ = [
    "BOOK_EXPERIMENTS",
    "EXECUTED",
    "NOTEBOOKS",
    "REGENERATION",
    "Experiment",
    "cell_source",
    "cell_tags",
    "execute",
    "page_config",
    "record_provenance",
    "refresh_prose",
    "regeneration_table",
    "training_plan",
]

REGENERATION = REPO_ROOT / "book" / "results" / "regeneration.md"
"""The table of how long each executed page took, included by the reproducing chapter."""

EXECUTED = REPO_ROOT / "book" / "experiments"
"""Where the executed copies of the pages go (the book renders these)."""

NOTEBOOKS = REPO_ROOT / "notebooks"
"""The source notebooks papermill executes."""


@dataclass(frozen=True)
class Experiment:
    """A book page: a source notebook, the executed copy's name and its parameters.

    ``own_runs`` marks a page that trains runs of its own besides its configuration's (the
    study arms), so that ``--retrain`` reaches them even when an earlier page retrained the
    configuration's run. ``study`` marks a page of ``make studies`` rather than ``make book``.
    ``record`` names the record the page writes, ``book/results/<record>.json``
    (:func:`kalm.results.publish`): a page run for several datasets writes one per dataset
    (``kgc_wn18rr``, ``kgc_fb15k237``), so it is declared with the page, never derived.
    """

    notebook: str
    page: str
    parameters: dict[str, Any] = field(default_factory=dict)
    own_runs: bool = False
    study: bool = False
    record: str = field(kw_only=True)

    def __post_init__(self) -> None:
        if not self.record or "/" in self.record or self.record.endswith(".json"):
            raise ValueError(
                f"page {self.page!r}: record {self.record!r} must be the name of its results "
                f"file without '.json', e.g. record={self.page!r}"
            )


# In execution order: the WN18RR KGC run trains the adapter that the next pages reuse; the
# FB15k-237 page and the studies train runs of their own.
BOOK_EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("kgc", "kgc", record="kgc_wn18rr"),
    Experiment("similarity", "similarity", record="similarity"),
    Experiment("kgqa", "kgqa", record="kgqa_wn18rr"),
    Experiment("lm", "lm", record="lm"),
    Experiment("theorems", "theorems", record="theorems"),
    Experiment("kgc", "kgc_fb15k237", {"dataset": "fb15k237"}, record="kgc_fb15k237"),
    Experiment("ablation", "ablation", own_runs=True, study=True, record="ablation"),
    Experiment("tuning", "tuning", own_runs=True, study=True, record="tuning"),
    Experiment("lam", "lam", own_runs=True, study=True, record="lam"),
)


def page_config(
    experiment: Experiment, *, model: str | None = None, profile: str = "auto"
) -> RunConfig:
    """The resolved configuration of a page (``profile="auto"`` becomes a real profile)."""
    model = model or load_config().default_model
    cfg = resolve(**{"model": model, "profile": profile, **experiment.parameters})
    return keep_precision(cfg)  # as the page's notebook_config does


def execute(
    experiment: Experiment,
    *,
    model: str | None = None,
    profile: str = "auto",
    retrain: bool = False,
    executed: Path = EXECUTED,
    results_dir: Path | None = None,
    runs_dir: Path | None = None,
) -> Path:
    """Run one experiment notebook into ``<executed>/<page>.ipynb`` and return its path.

    ``retrain`` is the notebook parameter: the page trains anew every run it uses.
    ``results_dir`` and ``runs_dir``, when given, are injected as the parameters of those names
    (which :func:`~kalm.experiment.notebook_config` accepts undeclared): the page publishes its
    record into the first and keeps its runs in the second, with no environment variable
    passed to its kernel.
    """
    import papermill

    cfg = page_config(experiment, model=model, profile=profile)
    params = {
        "model": model or load_config().default_model,
        **experiment.parameters,
        "profile": cfg.profile,
        "retrain": retrain,
        **{
            name: str(path.resolve())
            for name, path in (("results_dir", results_dir), ("runs_dir", runs_dir))
            if path is not None
        },
    }
    source = NOTEBOOKS / f"{experiment.notebook}.ipynb"
    target = executed / f"{experiment.page}.ipynb"
    # A temporary name of this process: a failed run keeps the previous executed copy, and two
    # runs of one page never write into one file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    started = time.perf_counter()
    print(f"== {source.relative_to(REPO_ROOT)} -> {target} {params}")
    try:
        papermill.execute_notebook(
            str(source),
            str(tmp),
            parameters=params,
            kernel_name="python3",
            cwd=str(REPO_ROOT),
            progress_bar=True,
        )
        record_provenance(tmp, cfg)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"   done in {time.perf_counter() - started:.0f} s")
    return target


def _write_notebook(path: Path, nb: dict[str, Any]) -> None:
    """Write an executed notebook in papermill's own format, so that rewriting a page without
    changing it leaves its file byte for byte as it was."""
    atomic_write_text(path, json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False))


def record_provenance(path: Path, cfg: RunConfig) -> None:
    """Write into an executed notebook's metadata (``kalm``) the precision its runs resolved to
    and the hardware that ran it: runs of other precisions live under other keys and give
    somewhat different numbers, so the book says for every page which one it shows."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    nb["metadata"]["kalm"] = {"precision": cfg.train.precision, "hardware": hardware.describe()}
    _write_notebook(path, nb)


def cell_source(cell: dict[str, Any]) -> str:
    """A notebook cell's text (nbformat stores it as one string or as a list of lines)."""
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def cell_tags(cell: dict[str, Any]) -> list[str]:
    """A notebook cell's tags (papermill's ``parameters`` and ``injected-parameters``)."""
    return list(cell.get("metadata", {}).get("tags", []))


def refresh_prose(
    experiment: Experiment, *, executed: Path = EXECUTED, notebooks: Path = NOTEBOOKS
) -> Path:
    """Give an executed page the current markdown of its source notebook, keeping every code
    cell with its outputs, and return its path.

    Papermill copies markdown cells verbatim, so when the code is unchanged this writes what
    re-executing the page would, without the hours a study page takes to train. A page whose
    code changed since it ran is refused with the command that re-executes it.
    """
    path = executed / f"{experiment.page}.ipynb"
    if not path.is_file():
        raise ValueError(f"{path} is missing: run `python -m kalm.execute {experiment.page}`")
    nb = json.loads(path.read_text(encoding="utf-8"))
    source = json.loads((notebooks / f"{experiment.notebook}.ipynb").read_text(encoding="utf-8"))
    # Each executed code cell with the injected parameters papermill put after it, if any.
    groups: list[list[dict[str, Any]]] = []
    for cell in (c for c in nb["cells"] if c["cell_type"] == "code"):
        if "injected-parameters" in cell_tags(cell) and groups:
            groups[-1].append(cell)
        else:
            groups.append([cell])
    new = [cell_source(c) for c in source["cells"] if c["cell_type"] == "code"]
    if [cell_source(group[0]) for group in groups] != new:
        raise ValueError(
            f"{path}: the code of {experiment.notebook}.ipynb changed since this page ran; "
            f"re-execute it with `python -m kalm.execute {experiment.page}`"
        )
    prose = {c.get("id"): c for c in nb["cells"] if c["cell_type"] != "code"}
    cells, code = [], iter(groups)
    for cell in source["cells"]:
        if cell["cell_type"] == "code":
            cells.extend(next(code))
        else:
            old = prose.get(cell.get("id"), {})
            cells.append({**cell, "metadata": old.get("metadata", cell.get("metadata", {}))})
    nb["cells"] = cells
    _write_notebook(path, nb)
    return path


def training_plan(cfg: RunConfig, *, retrain: bool = False) -> str | None:
    """The line announcing the run a page trains before it shows anything, or None when the run
    store holds it finished (and ``retrain`` is off).

    Papermill reports cells, not optimiser steps, so without this a regeneration from an empty
    run store sits on one cell for hours; the line says how much training comes, in which
    precision (``auto`` resolved for this machine), from which step a regeneration that spans
    sessions resumes (from a local or a published checkpoint), and which file to follow. A run
    the book publishes is announced as loaded from ``book/runs/``, after its files verified.
    """
    run = Run.trained(cfg)
    if not retrain and run.finished_record() is not None:
        return None
    state, resume = run_state(run) if not retrain else ("none", None)
    if state == "published":
        return f"   loads the published run {locate(run).done_path.parent}"
    t = cfg.train
    steps = f"{t.max_steps:,} steps of {t.global_batch_size} examples"
    budget = steps if t.max_steps else f"{t.epochs:g} epochs"
    resuming = f", resuming at step {resume:,}" if resume else ""
    if resume and state == "published checkpoint":
        resuming += " of its published checkpoint"
    return (
        f"   trains {run.path.name}: {budget} in {t.precision}{resuming}; "
        f"progress: {run.train_log_path}"
    )


def regeneration_table(executed: Path = EXECUTED) -> str:
    """Markdown table of the executed pages: profile, precision, hardware, minutes and date of
    their papermill run (from the executed notebooks' own metadata) and the record each writes,
    with the totals of the book, of the studies and of both, summed here from the rows (the
    chapter states no time of its own). A page trains its runs when the run store lacks them,
    so its minutes include training; a page executed before provenance was recorded says so."""
    rows, totals = [], {False: 0.0, True: 0.0}
    for e in BOOK_EXPERIMENTS:
        path = executed / f"{e.page}.ipynb"
        if not path.is_file():
            continue
        metadata = json.loads(path.read_text(encoding="utf-8"))["metadata"]
        meta = metadata.get("papermill", {})
        provenance = metadata.get("kalm", {})
        minutes = float(meta.get("duration") or 0.0) / 60
        totals[e.study] += minutes
        rows.append(
            f"| {e.page} | {'make studies' if e.study else 'make book'} | "
            f"{meta.get('parameters', {}).get('profile', '?')} | "
            f"{provenance.get('precision', 'not recorded')} | "
            f"{provenance.get('hardware', 'not recorded')} | {minutes:.1f} | "
            f"{str(meta.get('end_time', '?'))[:10]} | `{e.record}.json` |"
        )
    whole = totals[False] + totals[True]
    return (
        "\n".join(
            [
                "| page | target | profile | precision | hardware | minutes | executed | record |",
                "|---|---|---|---|---|---|---|---|",
                *rows,
                f"| **all pages of `make book`** | | | | | **{totals[False]:.1f}** | | |",
                f"| **all pages of `make studies`** | | | | | **{totals[True]:.1f}** | | |",
                f"| **the whole book** ({whole / 60:.1f} hours) | | | | | **{whole:.1f}** | | |",
            ]
        )
        + "\n"
    )
