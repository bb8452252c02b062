"""The runs of the book's pages: ``python -m kalm.execute --plan``, ``--publish`` and ``--verify``.

:mod:`kalm.published` keeps one run in ``book/runs/``; this module applies it to the pages of
:data:`~kalm.execute.BOOK_EXPERIMENTS`: which runs a page uses, where each stands (published, in
the run store, to be trained and for about how long), publishing them, and re-executing pages
from the published runs to check the book's numbers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kalm.config import RunConfig
from kalm.durable import RunStoreError, read_json
from kalm.execute import Experiment, execute, hardware, page_config
from kalm.published import (
    VERIFY_TOLERANCE,
    PublishError,
    compare_records,
    is_published,
    plan_line,
    publish,
)
from kalm.results import BOOK_RESULTS
from kalm.runs import Run

__all__ = ["page_runs", "plan", "publish_pages", "verify"]


def page_runs(experiment: Experiment, cfg: RunConfig) -> list[RunConfig]:
    """The trained runs a page uses: its configuration's, or a study page's arms (the lambda
    study's only once the tuning page's record says which settings they tune)."""
    if not experiment.own_runs:
        return [cfg]
    from kalm import studies  # here: the command line starts without torch

    arms = {"ablation": studies.self_negative_arms, "tuning": studies.tuning_arms}
    if experiment.page in arms:
        chosen = arms[experiment.page]()
    elif studies.tuning_record(cfg) is not None:
        chosen = studies.lambda_arms(studies.tuned_settings(cfg))
    else:
        chosen = ()
    return [studies.arm_config(cfg, arm.changes) for arm in chosen]


def plan(experiments: list[Experiment], *, model: str | None = None, profile: str = "auto") -> int:
    """Print one line per page and run of ``experiments`` (see :func:`~kalm.published.plan_line`);
    computes nothing and loads no model."""
    first: dict[Path, str] = {}  # a run shared by pages: the page that trains or loads it first
    for experiment in experiments:
        runs = page_runs(experiment, page_config(experiment, model=model, profile=profile))
        for cfg in runs:
            path = Run.trained(cfg).path
            if path in first:
                print(f"{experiment.page}: {path.name}: the run of the page {first[path]} (above)")
            else:
                first[path] = experiment.page
                print(plan_line(experiment.page, cfg))
        if not runs:
            print(f"{experiment.page}: its runs follow from the tuning page's record, not yet made")
    return 0


def publish_pages(
    experiments: list[Experiment], *, model: str | None = None, profile: str = "auto"
) -> int:
    """Publish the runs of ``experiments`` from the run store into ``book/runs/`` (finished
    runs, else the latest checkpoint); a run the store lacks is named and skipped. Returns 1
    when a run could not be published (too large, damaged), else 0."""
    failed = 0
    described = hardware()
    done: set[Path] = set()
    for experiment in experiments:
        for cfg in page_runs(experiment, page_config(experiment, model=model, profile=profile)):
            run = Run.trained(cfg)
            if run.path in done:
                continue
            done.add(run.path)
            try:
                print(f"{experiment.page}: {publish(cfg, hardware=described)}")
            except PublishError as err:
                print(f"{experiment.page}: not published: {err}", file=sys.stderr)
                failed += not str(err).endswith("nor a checkpoint to publish")
            except RunStoreError as err:
                print(f"{experiment.page}: not published: {err}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def verify(
    experiments: list[Experiment],
    *,
    model: str | None = None,
    profile: str = "auto",
    tolerance: float = VERIFY_TOLERANCE,
    reference: Path = BOOK_RESULTS,
) -> int:
    """Re-execute ``experiments`` from the published runs and compare their numbers with the
    committed records in ``reference``; return 1 on a mismatch or an unpublished run, else 0.

    The pages run against an empty temporary run store, so every trained run comes from
    ``book/runs/`` (a page whose run is not published is refused rather than trained), and
    write their executed copies and records into the same temporary directory, leaving the
    book's untouched.
    """
    missing = [
        f"{e.page}: {Run.trained(cfg).path.name}"
        for e in experiments
        for cfg in page_runs(e, page_config(e, model=model, profile=profile))
        if not is_published(Run.trained(cfg))
    ]
    if missing:
        print("not published, so not verifiable without training:", file=sys.stderr)
        print("\n".join(f"  {line}" for line in missing), file=sys.stderr)
        return 1
    print(f"--verify: every number must agree with the book's within {tolerance:.1%} (relative)")
    mismatches = 0
    with tempfile.TemporaryDirectory(prefix="kalm-verify-") as tmp:
        results = Path(tmp) / "results"
        with _environment(KALM_RUNS_DIR=str(Path(tmp) / "runs"), KALM_RESULTS_DIR=str(results)):
            for experiment in experiments:
                execute(experiment, model=model, profile=profile, executed=Path(tmp))
        for experiment in experiments:
            committed, rerun = (d / f"{experiment.page}.json" for d in (reference, results))
            if not committed.is_file():
                problems = [f"there is no committed record {committed} to compare with"]
            elif not rerun.is_file():
                problems = ["the re-executed page wrote no record"]
            else:
                problems = compare_records(read_json(committed), read_json(rerun), tolerance)
            mismatches += bool(problems)
            verdict = "MISMATCH" if problems else "agrees"
            print(f"{experiment.page}: {verdict} with {committed}")
            print("".join(f"  {problem}\n" for problem in problems), end="")
    return 1 if mismatches else 0


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the ``with`` block (the pages' kernels inherit them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
