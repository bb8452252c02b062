"""Source notebooks are committed clean and parameterised; the book shows real runs of them.

`notebooks/*.ipynb` are the sources papermill runs, so they must carry no outputs and a
`parameters` cell; `book/experiments/*.ipynb` are their executed copies that the book renders,
so each must be a complete, error-free papermill run of the current source in a real profile.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from kalm.pages import (
    BOOK_EXPERIMENTS,
    EXECUTED,
    REGENERATION,
    Experiment,
    cell_source,
    cell_tags,
    regeneration_table,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

EXPERIMENTS = sorted({e.notebook for e in BOOK_EXPERIMENTS})
PARAMETER_DEFAULTS = {"model": "smollm2", "dataset": "wn18rr", "profile": "auto"}


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_experiment_has_a_source_notebook() -> None:
    missing = [e for e in EXPERIMENTS if not (ROOT / "notebooks" / f"{e}.ipynb").is_file()]
    assert not missing, f"notebooks/ lacks the experiment notebooks {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_source_notebook_has_no_outputs(path: Path) -> None:
    nb = read(path)
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; clear them "
        f"(jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)})"
    )
    assert "papermill" not in nb["metadata"], f"{path.name} is an executed copy, not a source"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_source_notebook_has_parameters_cell(path: Path) -> None:
    cells = [c for c in read(path)["cells"] if "parameters" in cell_tags(c)]
    assert len(cells) == 1, (
        f"{path.name}: expected one cell tagged `parameters`, found {len(cells)}"
    )
    assert cells[0]["cell_type"] == "code", f"{path.name}: the `parameters` cell must be code"
    values = {
        target.id: ast.literal_eval(node.value)
        for node in ast.parse(cell_source(cells[0])).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    missing = {*PARAMETER_DEFAULTS, "seed"} - set(values)
    assert not missing, f"{path.name}: the `parameters` cell does not define {sorted(missing)}"
    defaults = {k: values[k] for k in PARAMETER_DEFAULTS}
    assert defaults == PARAMETER_DEFAULTS, f"{path.name}: parameter defaults {defaults}"
    assert isinstance(values["seed"], int), f"{path.name}: seed must be an int"


@pytest.mark.parametrize("experiment", BOOK_EXPERIMENTS, ids=lambda e: e.page)
def test_book_shows_a_real_executed_run(experiment: Experiment) -> None:
    """The executed copy exists, ran the current source to the end, and not in the smoke profile."""
    path = ROOT / "notebooks" / f"{experiment.notebook}.ipynb"
    executed = EXECUTED / f"{experiment.page}.ipynb"
    assert executed.is_file(), f"{executed.relative_to(ROOT)} missing: run `make experiments`"
    nb = read(executed)
    meta = nb["metadata"].get("papermill")
    assert meta, f"{executed.name}: no papermill metadata; produce it with papermill"
    assert not meta.get("exception"), f"{executed.name}: the papermill run raised an exception"
    parameters = meta.get("parameters", {})
    assert parameters.items() >= experiment.parameters.items(), (
        f"{executed.name}: ran with {parameters}, the book needs {experiment.parameters}"
    )
    profile = parameters.get("profile")
    assert profile not in (None, "auto", "smoke"), (
        f"{executed.name}: papermill parameters.profile is {profile!r}; the book needs a real run "
        "with an explicit profile, e.g. `-p profile cpu`"
    )

    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert any(c.get("outputs") for c in code), f"{executed.name} has no outputs"
    errors = [
        i for i, c in enumerate(code) for o in c.get("outputs", []) if o["output_type"] == "error"
    ]
    assert not errors, f"{executed.name}: code cells {errors} end in an error"

    ran = [
        (c["cell_type"], cell_source(c))
        for c in nb["cells"]
        if "injected-parameters" not in cell_tags(c)
    ]
    src = [(c["cell_type"], cell_source(c)) for c in read(path)["cells"]]
    assert ran == src, f"{executed.name} is stale: notebooks/{path.name} changed since it was run"


def test_regeneration_table_matches_the_executed_pages() -> None:
    """book/results/regeneration.md is rewritten after every executed page; a page executed
    some other way would leave it stale."""
    table = regeneration_table()
    assert all(f"| {e.page} |" in table for e in BOOK_EXPERIMENTS)
    committed = REGENERATION.read_text(encoding="utf-8")
    assert committed == table, f"{REGENERATION} is stale: run `python -m kalm.execute` for a page"

