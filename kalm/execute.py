"""Regenerate the book's executed notebooks with papermill: ``python -m kalm.execute [NAME ...]``.

Each book page is a notebook of ``notebooks/`` executed with explicit parameters (the profile is
resolved here, so the executed copy records ``cpu`` rather than ``auto``). Trained adapters and
cached embeddings come from the run store, so only the first notebook of a run trains. With
``--retrain`` each run is trained anew once: by the first chosen page that uses it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalm.config import REPO_ROOT, RunConfig, load_config, resolve
from kalm.runs import Run

__all__ = ["BOOK_EXPERIMENTS", "Experiment", "execute", "main", "page_config"]


@dataclass(frozen=True)
class Experiment:
    """A book page: a source notebook, the executed copy's name and its parameters.

    ``own_runs`` marks a page that trains runs of its own besides its configuration's (the
    ablation arms), so that ``--retrain`` reaches them even when an earlier page retrained the
    configuration's run.
    """

    notebook: str
    page: str
    parameters: dict[str, Any] = field(default_factory=dict)
    own_runs: bool = False


# In execution order: the WN18RR KGC run trains the adapter that the next pages reuse; the
# FB15k-237 page and the ablation train runs of their own.
BOOK_EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("kgc", "kgc"),
    Experiment("similarity", "similarity"),
    Experiment("kgqa", "kgqa"),
    Experiment("lm", "lm"),
    Experiment("theorems", "theorems"),
    Experiment("ablation", "ablation", own_runs=True),
)


def page_config(
    experiment: Experiment, *, model: str | None = None, profile: str = "auto"
) -> RunConfig:
    """The resolved configuration of a page (``profile="auto"`` becomes a real profile)."""
    model = model or load_config().default_model
    return resolve(**{"model": model, "profile": profile, **experiment.parameters})


def execute(
    experiment: Experiment,
    *,
    model: str | None = None,
    profile: str = "auto",
    retrain: bool = False,
) -> Path:
    """Run one experiment notebook into ``book/experiments/<page>.ipynb`` and return its path.

    ``retrain`` is the notebook parameter: the page trains anew every run it uses.
    """
    import papermill

    cfg = page_config(experiment, model=model, profile=profile)
    params = {
        "model": model or load_config().default_model,
        **experiment.parameters,
        "profile": cfg.profile,
        "retrain": retrain,
    }
    source = REPO_ROOT / "notebooks" / f"{experiment.notebook}.ipynb"
    target = REPO_ROOT / "book" / "experiments" / f"{experiment.page}.ipynb"
    # A temporary name of this process: a failed run keeps the previous executed copy, and two
    # runs of one page never write into one file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    started = time.perf_counter()
    print(f"== {source.relative_to(REPO_ROOT)} -> {target.relative_to(REPO_ROOT)} {params}")
    try:
        papermill.execute_notebook(
            str(source),
            str(tmp),
            parameters=params,
            kernel_name="python3",
            cwd=str(REPO_ROOT),
            progress_bar=True,
        )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"   done in {time.perf_counter() - started:.0f} s")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line: execute all book experiments, or the named pages."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pages = [e.page for e in BOOK_EXPERIMENTS]
    parser.add_argument(
        "pages", nargs="*", help=f"pages to run (default: all of {', '.join(pages)})"
    )
    parser.add_argument("--model", default=None, help="model alias or local directory")
    profiles = ", ".join(load_config().profiles)
    parser.add_argument("--profile", default="auto", help=f"{profiles} or auto")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train every run anew (once, on the first chosen page that uses it) instead of "
        "loading it from the run store",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.pages) - set(pages))
    if unknown:
        parser.error(f"unknown page(s) {unknown}; valid pages: {', '.join(pages)}")
    chosen = [e for e in BOOK_EXPERIMENTS if not args.pages or e.page in args.pages]
    retrained: set[Path] = set()
    for experiment in chosen:
        run = Run.trained(page_config(experiment, model=args.model, profile=args.profile)).path
        retrain = args.retrain and (experiment.own_runs or run not in retrained)
        if retrain:
            retrained.add(run)
        execute(experiment, model=args.model, profile=args.profile, retrain=retrain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
