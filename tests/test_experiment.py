"""Notebook parameters become a configuration or a named error; --retrain reaches each run once."""

from __future__ import annotations

import ast
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from kalm import execute, hardware, pages, studies
from kalm.config import REPO_ROOT, ConfigError, resolve
from kalm.experiment import NOTEBOOK_PARAMETERS, notebook_config
from kalm.results import publish
from kalm.runs import Run

DECLARED = {
    "model": "smollm2",
    "dataset": "wn18rr",
    "profile": "smoke",
    "seed": 0,
    "retrain": False,
    "overrides": {},
}


def namespace(injected: str | None = None, **values: Any) -> dict[str, Any]:
    """A kernel's globals after the parameters cell and (if given) papermill's injected cell."""
    names = {**DECLARED, **values, "In": ["", "model = 'smollm2'\n"]}
    if injected is not None:
        names["In"].append(f"# Parameters\n{injected}")
        for node in ast.parse(injected).body:
            names[node.targets[0].id] = ast.literal_eval(node.value)
    return names


def test_declared_parameters_and_overrides_resolve() -> None:
    cfg = notebook_config(namespace("seed = 3\noverrides = {'lam': 0.5}\n"))
    assert (cfg.seed, cfg.train.lam, cfg.profile) == (3, 0.5, "smoke")
    assert cfg.session.retrain is False and cfg.session.results_dir is None
    assert cfg == resolve(profile="smoke", seed=3, lam=0.5)  # the session is not the run


def test_an_undeclared_profile_field_is_rejected_with_the_way_to_pass_it() -> None:
    with pytest.raises(ConfigError) as err:
        notebook_config(namespace("batch_size = 2\n"))
    assert str(err.value) == (
        "batch_size is not a parameter of this notebook; "
        "pass profile fields as -y 'overrides: {batch_size: 2}'"
    )


def test_an_unknown_name_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^colour is not a parameter of this notebook; the par"):
        notebook_config(namespace("colour = 'red'\n"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"retrain": "yes"}, "retrain must be True or False, got 'yes'"),
        ({"overrides": [("lam", 1)]}, "overrides must be a dict of profile fields"),
        ({"overrides": {"seed": 1}}, r"\['seed'\] are notebook parameters, not overrides"),
        ({"overrides": {"tau": 0}}, "tau"),  # the configuration's own rules still apply
    ],
)
def test_bad_parameter_values_are_named(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        notebook_config(namespace(**values))


def test_retrain_travels_with_the_configuration_not_the_module() -> None:
    """``retrain`` reaches ``train_or_load`` through the configuration, its copies and the study
    arms derived from it; another configuration of the same process is not affected."""
    cfg = notebook_config(namespace(retrain=True))
    assert cfg.session.retrain is True
    assert replace(cfg, seed=1).session is cfg.session
    assert studies.arm_config(cfg, {"lam": 0.1}).session is cfg.session
    assert notebook_config(namespace()).session.retrain is False
    assert resolve(profile="smoke").session.retrain is False
    assert "session" not in cfg.as_dict()
    assert cfg.train_key() == resolve(profile="smoke").train_key()


def test_execute_may_inject_the_results_and_runs_directories(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cfg = notebook_config(namespace(f"results_dir = {str(tmp_path)!r}\nruns_dir = {str(runs)!r}\n"))
    assert (cfg.session.results_dir, cfg.session.runs_dir) == (tmp_path, runs)
    assert publish("page", cfg, {"x": 1.0}) == tmp_path / "page.json"
    assert Run.trained(cfg).path.parent == runs
    assert Run.trained(studies.arm_config(cfg, {"lam": 0.1})).path.parent == runs
    # Only as an injected parameter: a variable of that name in the notebook is not read.
    assert notebook_config({**namespace(), "results_dir": "elsewhere"}).session.results_dir is None


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "notebooks").glob("*.ipynb")), ids=str)
def test_notebooks_declare_exactly_the_parameters_and_check_them_first(path: Path) -> None:
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    index = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cells[index]["source"]))
    declared = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}
    assert tuple(declared) == NOTEBOOK_PARAMETERS
    assert declared["retrain"] is False and declared["overrides"] == {}
    assert "cfg = notebook_config(globals())" in "".join(cells[index + 1]["source"])


def test_a_page_announces_the_training_it_will_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A regeneration says which run a page trains, how long and where to follow it; a run the
    store holds finished is announced only when it is retrained."""
    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path))
    cfg = resolve(profile="smoke")
    run = Run.trained(cfg)
    plan = pages.training_plan(cfg)
    assert plan is not None
    assert f"trains {run.path.name}: {cfg.train.max_steps} steps of 8 examples in fp32" in plan
    assert str(run.train_log_path) in plan
    assert "20 epochs in bf16" in pages.training_plan(resolve("llama2", profile="paper"))
    run.path.mkdir(parents=True)
    torch.save({"step": 3}, run.checkpoint_path)  # a regeneration interrupted at step 3
    assert f"examples in fp32, resuming at step 3; progress: {run.train_log_path}" in (
        pages.training_plan(cfg) or ""
    )
    assert pages.training_plan(cfg, retrain=True) == plan  # retraining starts at step 0
    run.checkpoint_path.write_bytes(b"torn")
    assert pages.training_plan(cfg) == plan
    monkeypatch.setattr(Run, "finished_record", lambda self: {"steps": cfg.train.max_steps})
    assert pages.training_plan(cfg) is None
    assert pages.training_plan(cfg, retrain=True) == plan


def test_execute_retrain_trains_each_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        pages,
        "execute",
        lambda e, *, model, profile, retrain, results_dir: calls.append((e.page, retrain)),
    )
    execute.main(["--profile", "smoke", "--retrain"])
    assert dict(calls) == {
        "kgc": True,
        "similarity": False,  # the kgc page retrained its run
        "kgqa": False,
        "lm": False,
        "theorems": False,
        "kgc_fb15k237": True,  # a run of its own
    }
    calls.clear()
    execute.main(["--profile", "smoke", "--retrain", "--studies"])
    assert dict(calls) == {"ablation": True, "tuning": True, "lam": True}  # arms of their own
    calls.clear()
    execute.main(["similarity", "--profile", "smoke", "--retrain"])
    assert calls == [("similarity", True)]
    calls.clear()
    execute.main(["kgc", "--profile", "smoke"])
    assert calls == [("kgc", False)]


def test_executed_pages_record_their_precision_and_hardware(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each executed page carries the precision its runs resolved to and the hardware that ran
    it, and the regeneration table shows both; a page run before they were recorded says so."""
    papermill = {
        "duration": 90.0,
        "end_time": "2026-12-02T06:00:00",
        "parameters": {"profile": "smoke"},
    }
    for page in ("kgc", "lm"):
        (tmp_path / f"{page}.ipynb").write_text(
            json.dumps({"cells": [], "metadata": {"papermill": papermill}}), encoding="utf-8"
        )
    monkeypatch.setattr(hardware, "describe", lambda: "2 CPU cores, no native bf16")
    pages.record_provenance(tmp_path / "kgc.ipynb", resolve(profile="smoke"))
    kgc = json.loads((tmp_path / "kgc.ipynb").read_text(encoding="utf-8"))
    assert kgc["metadata"]["kalm"] == {
        "precision": "fp32",
        "hardware": "2 CPU cores, no native bf16",
    }
    rows = pages.regeneration_table(tmp_path).splitlines()
    assert (
        "| kgc | make book | smoke | fp32 | 2 CPU cores, no native bf16 | 1.5 | 2026-12-02 "
        "| `kgc_wn18rr.json` |" in rows
    )
    assert (
        "| lm | make book | smoke | not recorded | not recorded | 1.5 | 2026-12-02 | `lm.json` |"
        in rows
    )
    assert "| **all pages of `make book`** | | | | | **3.0** | | |" in rows
    assert "| **all pages of `make studies`** | | | | | **0.0** | | |" in rows
    assert "| **the whole book** (0.1 hours) | | | | | **3.0** | | |" in rows


def test_the_regeneration_total_is_the_sum_of_its_rows(tmp_path: Path) -> None:
    """The chapter's times are the table's: the book's, the studies' and the whole, summed
    from the pages' own papermill durations."""
    for page, seconds in (("kgc", 3600.0), ("lm", 600.0), ("tuning", 1800.0)):
        meta = {"papermill": {"duration": seconds, "parameters": {"profile": "cpu"}}}
        (tmp_path / f"{page}.ipynb").write_text(json.dumps({"cells": [], "metadata": meta}))
    rows = pages.regeneration_table(tmp_path).splitlines()
    assert "| **all pages of `make book`** | | | | | **70.0** | | |" in rows
    assert "| **all pages of `make studies`** | | | | | **30.0** | | |" in rows
    assert "| **the whole book** (1.7 hours) | | | | | **100.0** | | |" in rows


def test_every_page_declares_the_record_it_writes() -> None:
    """A page names its results file (book/results/<record>.json); a page run for several
    datasets writes one per dataset, so no two pages share a record."""
    records = {e.page: e.record for e in pages.BOOK_EXPERIMENTS}
    assert records["kgc"] == "kgc_wn18rr" and records["kgc_fb15k237"] == "kgc_fb15k237"
    assert records["kgqa"] == "kgqa_wn18rr"
    assert len(set(records.values())) == len(records), records
    for e in pages.BOOK_EXPERIMENTS:
        dataset = e.parameters.get("dataset")
        if dataset is not None and e.notebook in ("kgc", "kgqa"):
            assert e.record == f"{e.notebook}_{dataset}", e
    with pytest.raises(TypeError, match="record"):
        pages.Experiment("lm", "lm")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="record='lm'"):
        pages.Experiment("lm", "lm", record="lm.json")


def test_executing_any_page_records_its_precision_and_hardware(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The one execution path (pages.execute, used by `make book`, `make studies` and
    --verify) writes the provenance into every page it executes."""
    import papermill

    def run(source: str, target: str, **_: object) -> None:
        meta = {"papermill": {"duration": 1.0, "parameters": {"profile": "smoke"}}}
        Path(target).write_text(json.dumps({"cells": [], "metadata": meta}))

    monkeypatch.setattr(papermill, "execute_notebook", run)
    monkeypatch.setattr(hardware, "describe", lambda: "2 CPU cores, no native bf16")
    for e in pages.BOOK_EXPERIMENTS:
        path = pages.execute(e, profile="smoke", executed=tmp_path)
        provenance = json.loads(path.read_text())["metadata"].get("kalm")
        assert provenance == {"precision": "fp32", "hardware": "2 CPU cores, no native bf16"}, e
    assert "not recorded" not in pages.regeneration_table(tmp_path)


def _notebook(*cells: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {
        "cells": [
            {"cell_type": kind, "id": f"c{i}", "metadata": {"tags": tags}, "source": text}
            | ({"outputs": [{"output_type": "stream", "text": "ran"}]} if kind == "code" else {})
            for i, (kind, text, tags) in enumerate(cells)
        ],
        "metadata": {"papermill": {"duration": 60.0}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def test_prose_of_an_executed_page_follows_its_source_without_a_rerun(tmp_path: Path) -> None:
    """Markdown edits reach the executed copy with every output kept; a code edit is refused
    with the command that re-executes the page; an unchanged page stays byte for byte."""
    page = pages.Experiment("study", "study", record="study")
    executed, notebooks = tmp_path / "executed", tmp_path / "notebooks"
    executed.mkdir(), notebooks.mkdir()
    ran = _notebook(
        ("markdown", "# Old title", []),
        ("code", "x = 1", ["parameters"]),
        ("code", "x = 2", ["injected-parameters"]),
        ("code", "print(x)", []),
        ("markdown", "Old reading.", []),
    )
    (executed / "study.ipynb").write_text(json.dumps(ran), encoding="utf-8")
    source = _notebook(
        ("markdown", "# New title", []),
        ("code", "x = 1", ["parameters"]),
        ("code", "print(x)", []),
        ("markdown", "New reading.", []),
        ("markdown", "A new paragraph.", []),
    )
    for cell in source["cells"]:
        cell.pop("outputs", None)
    (notebooks / "study.ipynb").write_text(json.dumps(source), encoding="utf-8")

    path = pages.refresh_prose(page, executed=executed, notebooks=notebooks)
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    assert [c["source"] for c in cells] == [
        "# New title",
        "x = 1",
        "x = 2",
        "print(x)",
        "New reading.",
        "A new paragraph.",
    ]
    assert [c.get("outputs") for c in cells if c["cell_type"] == "code"] == [
        [{"output_type": "stream", "text": "ran"}]
    ] * 3
    before = path.read_bytes()
    pages.refresh_prose(page, executed=executed, notebooks=notebooks)
    assert path.read_bytes() == before

    source["cells"][2]["source"] = "print(x + 1)"
    (notebooks / "study.ipynb").write_text(json.dumps(source), encoding="utf-8")
    with pytest.raises(ValueError, match=r"re-execute it with `python -m kalm.execute study`"):
        pages.refresh_prose(page, executed=executed, notebooks=notebooks)
    with pytest.raises(ValueError, match=r"missing: run `python -m kalm.execute lost`"):
        pages.refresh_prose(
            pages.Experiment("study", "lost", record="lost"), executed=executed, notebooks=notebooks
        )


def test_execute_passes_the_results_directory_as_a_parameter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--results-dir`` reaches the page as the parameter ``results_dir``, not through the
    environment the kernel inherits; without it nothing is injected. A caller's run store goes
    the same way (``runs_dir``)."""
    import papermill

    injected: list[dict[str, Any]] = []

    def fake_execute(source: str, out: str, *, parameters: dict[str, Any], **_: Any) -> None:
        injected.append(parameters)
        Path(out).write_text(json.dumps({"cells": [], "metadata": {}}), encoding="utf-8")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setattr(pages, "REPO_ROOT", tmp_path)  # no page of the book is written
    monkeypatch.setattr(pages, "NOTEBOOKS", tmp_path / "notebooks")
    page = pages.execute

    def into_tmp(experiment: pages.Experiment, **kwargs: Any) -> Path:
        return page(experiment, **{**kwargs, "executed": tmp_path / "executed"})

    monkeypatch.setattr(pages, "execute", into_tmp)  # main() writes no page of the book
    monkeypatch.setattr(pages, "REGENERATION", tmp_path / "regeneration.md")
    monkeypatch.setattr(hardware, "describe", lambda: "test")
    monkeypatch.delenv("KALM_RESULTS_DIR", raising=False)
    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "executed").mkdir()
    assert execute.main(["lm", "--profile", "smoke", "--results-dir", str(tmp_path / "r")]) == 0
    assert injected[-1]["results_dir"] == str(tmp_path / "r")
    assert "KALM_RESULTS_DIR" not in os.environ
    assert execute.main(["lm", "--profile", "smoke"]) == 0
    assert "results_dir" not in injected[-1] and "runs_dir" not in injected[-1]
    lm = next(e for e in pages.BOOK_EXPERIMENTS if e.page == "lm")
    into_tmp(lm, profile="smoke", results_dir=tmp_path / "r", runs_dir=tmp_path / "runs")
    assert (injected[-1]["results_dir"], injected[-1]["runs_dir"]) == (
        str(tmp_path / "r"),
        str(tmp_path / "runs"),
    )
