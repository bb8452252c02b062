"""Regenerate the book's executed notebooks with papermill: ``python -m kalm.execute [NAME ...]``.

Each book page is a notebook of ``notebooks/`` executed with explicit parameters (the profile is
resolved, so the executed copy records ``cpu`` rather than ``auto``); :mod:`kalm.pages`
lists the pages and executes one, this module is only the command line. Trained adapters and
cached embeddings come from the run store, so only the first notebook of a run trains. With
``--retrain`` each run is trained anew once: by the first chosen page that uses it.

Without page names the experiment pages run (``make experiments``); ``--studies`` runs the
study pages instead (``make studies``: the self-negative, tuning and lambda studies, whose many
short runs take longer than the rest of the book). Every page writes its headline numbers to
its record, ``book/results/<record>.json`` (:attr:`kalm.pages.Experiment.record`);
``--results-dir`` sends them elsewhere, and ``--compare DIR`` sets the numbers of such a rerun
beside the book's. ``--prose`` reruns nothing: it gives the
executed pages the current markdown of their sources.

Trained runs come from the run store or, when the book publishes them, from ``book/runs/``
(:mod:`kalm.published`). ``--plan`` says for every page where its runs stand, ``--publish``
copies them into ``book/runs/`` and ``--verify`` re-executes pages from the published runs and
checks their numbers against the book's (:mod:`kalm.book_runs`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kalm import book_runs, pages
from kalm.config import REPO_ROOT, load_config
from kalm.durable import atomic_write_text
from kalm.published import VERIFY_TOLERANCE
from kalm.runs import Run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Command line: execute all book experiments, or the named pages."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [e.page for e in pages.BOOK_EXPERIMENTS]
    parser.add_argument(
        "pages", nargs="*", help=f"pages to run (default: all of {', '.join(names)})"
    )
    parser.add_argument("--model", default=None, help="model alias or local directory")
    profiles = ", ".join(load_config().profiles)
    parser.add_argument("--profile", default="auto", help=f"{profiles} or auto")
    parser.add_argument("--studies", action="store_true", help="run the study pages (make studies)")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="write the pages' headline numbers here instead of book/results/",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        default=None,
        help="run nothing: print the numbers of a rerun's --results-dir beside the book's",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train every run anew (once, on the first chosen page that uses it) instead of "
        "loading it from the run store",
    )
    parser.add_argument(
        "--prose",
        action="store_true",
        help="run nothing: give the chosen executed pages (default: all) the current markdown of "
        "their source notebooks; refused for a page whose code changed since it ran",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="run nothing: print for every chosen page and run whether it is published, in the "
        "run store (finished or at step N) or to be trained, with an estimate of the minutes",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="copy the finished runs of the chosen pages (default: all) into book/runs/, and the "
        "latest checkpoint of an unfinished one into book/runs/<run>/checkpoint/",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-execute the chosen pages from the published runs into a temporary directory and "
        "compare every number of their records in book/results/; exit 1 on a mismatch",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=VERIFY_TOLERANCE,
        help=f"relative tolerance of --verify (default {VERIFY_TOLERANCE:g})",
    )
    args = parser.parse_args(argv)
    if args.compare is not None:
        from kalm.results import compare

        table = compare(args.compare)
        print(table.to_string(index=False) if len(table) else f"no records in {args.compare}")
        return 0
    unknown = sorted(set(args.pages) - set(names))
    if unknown:
        parser.error(f"unknown page(s) {unknown}; valid pages: {', '.join(names)}")
    chosen = [
        e
        for e in pages.BOOK_EXPERIMENTS
        if e.page in args.pages or (not args.pages and e.study == args.studies)
    ]
    # the named pages, or all of them (studies included): what --prose and --publish treat
    named = [e for e in pages.BOOK_EXPERIMENTS if e.page in args.pages] or list(
        pages.BOOK_EXPERIMENTS
    )
    if args.prose:
        refused = 0
        for experiment in named:
            try:
                print(f"== prose of {pages.refresh_prose(experiment).relative_to(REPO_ROOT)}")
            except ValueError as err:
                print(f"refused: {err}", file=sys.stderr)
                refused += 1
        return 1 if refused else 0
    if args.plan or args.publish or args.verify:
        options = {"model": args.model, "profile": args.profile}
        if args.plan:
            return book_runs.plan(chosen, **options)
        if args.publish:
            return book_runs.publish_pages(named, **options)
        return book_runs.verify(chosen, **options, tolerance=args.tolerance)
    retrained: set[Path] = set()
    for experiment in chosen:
        cfg = pages.page_config(experiment, model=args.model, profile=args.profile)
        run = Run.trained(cfg).path
        retrain = args.retrain and (experiment.own_runs or run not in retrained)
        if retrain:
            retrained.add(run)
        plan = None if experiment.own_runs else pages.training_plan(cfg, retrain=retrain)
        if plan:
            print(plan)
        pages.execute(
            experiment,
            model=args.model,
            profile=args.profile,
            retrain=retrain,
            results_dir=args.results_dir,
        )
        atomic_write_text(pages.REGENERATION, pages.regeneration_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
