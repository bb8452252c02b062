"""The runs of the book's pages: ``python -m kalm.execute --plan``, ``--publish`` and ``--verify``.

:mod:`kalm.published` keeps one run in ``book/runs/``; this module applies it to the pages of
:data:`~kalm.pages.BOOK_EXPERIMENTS`: which runs a page uses, where each stands (published, in
the run store, to be trained and for about how long), publishing them, and re-executing pages
from the published runs to check the book's numbers.
"""

from __future__ import annotations

import ast
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from kalm.config import RunConfig
from kalm.durable import RunStoreError, read_json
from kalm.hardware import describe
from kalm.pages import EXECUTED, Experiment, execute, page_config
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

__all__ = ["MEASURED", "glued_numbers", "page_runs", "plan", "publish_pages", "verify"]


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
    described = describe()
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
    executed: Path = EXECUTED,
) -> int:
    """Re-execute ``experiments`` from the published runs and compare their numbers with the
    book's: the page's record in ``reference`` (``<record>.json``, named by
    :attr:`~kalm.pages.Experiment.record`) and the numbers it glues into its executed copy in
    ``executed``. Returns 1 on a mismatch, a page with nothing to compare
    or a run that is not published, else 0.

    The pages run against an empty temporary run store, so every trained run comes from
    ``book/runs/`` (a page whose runs are not all published is refused rather than trained),
    and write their executed copies and records into the same temporary directory, leaving the
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
    print(
        f"--verify: every number must agree with the book's within {tolerance:.1%} (relative); "
        f"glued speeds (*{MEASURED}) measure the machine and are not compared"
    )
    mismatches = 0
    with tempfile.TemporaryDirectory(prefix="kalm-verify-") as tmp:
        rerun = Path(tmp)
        for experiment in experiments:
            execute(
                experiment,
                model=model,
                profile=profile,
                executed=rerun,
                results_dir=rerun,
                runs_dir=rerun / "runs",
            )
        for experiment in experiments:
            problems, compared = [], []
            for book, read in ((reference, read_json), (executed, glued_numbers)):
                name = (
                    f"{experiment.record}.json" if read is read_json else f"{experiment.page}.ipynb"
                )
                if not (book / name).is_file():
                    continue
                compared.append(str(book / name))
                if not (rerun / name).is_file():
                    problems.append(f"the re-executed page wrote no {name}")
                    continue
                found = compare_records(read(book / name), read(rerun / name), tolerance)
                problems += [f"{name}: {problem}" for problem in found]
            if not compared:
                problems.append("the book holds no record or executed copy of it to compare")
            mismatches += bool(problems)
            verdict = "MISMATCH" if problems else "agrees"
            print(f"{experiment.page}: {verdict} ({', '.join(compared) or 'nothing compared'})")
            print("".join(f"  {problem}\n" for problem in problems), end="")
    return 1 if mismatches else 0


MEASURED = "_per_s"
"""The suffix of glued speeds: they measure the machine that executed a page, not its runs."""


def glued_numbers(path: Path) -> dict[str, Any]:
    """The numbers an executed page glues into the book (myst-nb's ``glue``, stored as
    papermill records in the cell outputs), by name, without the speeds (:data:`MEASURED`)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    numbers: dict[str, Any] = {}
    for output in (o for cell in nb["cells"] for o in cell.get("outputs", [])):
        glue = output.get("metadata", {}).get("scrapbook")
        if not glue or glue["name"].endswith(MEASURED):
            continue
        text = output.get("data", {}).get(f"{glue['mime_prefix']}text/plain", "")
        with contextlib.suppress(ValueError, SyntaxError):  # a figure or another object
            value = ast.literal_eval(text)
            if isinstance(value, int | float) and not isinstance(value, bool):
                numbers[glue["name"]] = value
    return numbers
