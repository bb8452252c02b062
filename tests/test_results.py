"""Headline numbers as data: pages publish flat records, reruns are compared with the book's."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from kalm import execute
from kalm.config import Session, resolve
from kalm.results import BOOK_RESULTS, compare, glue_name, publish, report


def test_publish_writes_a_flat_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KALM_RESULTS_DIR", str(tmp_path))
    cfg = resolve(profile="smoke")
    path = publish("kgc_wn18rr", cfg, {"kalm_mrr": 0.25, "test_queries": 16})
    record = json.loads(path.read_text())
    assert record == {
        "model": "smollm2",
        "profile": "smoke",
        "dataset": "wn18rr",
        "kalm_mrr": 0.25,
        "test_queries": 16,
    }
    with pytest.raises(ValueError, match="finite"):
        publish("kgc_wn18rr", cfg, {"kalm_mrr": math.nan})


def test_compare_sets_a_rerun_beside_the_book(tmp_path: Path) -> None:
    book, rerun = tmp_path / "book", tmp_path / "rerun"
    book.mkdir(), rerun.mkdir()
    base = {"model": "smollm2", "profile": "cpu", "dataset": "wn18rr"}
    (book / "kgc.json").write_text(json.dumps({**base, "kalm_mrr": 0.2}))
    (rerun / "kgc.json").write_text(json.dumps({**base, "profile": "smoke", "kalm_mrr": 0.25}))
    table = compare(rerun, book)
    row = table.iloc[0]
    assert (row["page"], row["metric"], row["book"], row["rerun"]) == ("kgc", "kalm_mrr", 0.2, 0.25)
    assert row["relative"] == pytest.approx(0.25)
    assert "profile 'cpu' -> 'smoke'" in row["labels"]
    (rerun / "new.json").write_text(json.dumps(base))
    with pytest.raises(FileNotFoundError, match=r"new\.json"):
        compare(rerun, book)


def test_execute_compare_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A rerun's record beside the book's: one line per metric, the changed one with its
    difference; an empty rerun directory says so."""
    assert execute.main(["--compare", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no records in {tmp_path}\n"
    book = json.loads((BOOK_RESULTS / "lam.json").read_text())
    rerun = {**book, "base_perplexity": book["base_perplexity"] + 1.0}
    (tmp_path / "lam.json").write_text(json.dumps(rerun))
    assert execute.main(["--compare", str(tmp_path)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["page", "metric", "book", "rerun", "difference", "relative", "labels"]
    assert len(lines) == len(book) - 3  # every metric, not the labels model, profile, dataset
    changed = [line.split() for line in lines if " base_perplexity " in line]
    assert len(changed) == 1
    page, _, old, new, difference, _, labels = changed[0]
    assert (page, labels) == ("lam", "same")
    assert float(old) == pytest.approx(book["base_perplexity"], rel=1e-5)
    assert float(new) == pytest.approx(book["base_perplexity"] + 1.0, rel=1e-5)
    assert float(difference) == pytest.approx(1.0)
    others = [line.split() for line in lines if " base_perplexity " not in line]
    assert all(float(row[-3]) == 0.0 and row[-1] == "same" for row in others)


def test_report_publishes_the_record_and_glues_each_key_once(tmp_path: Path) -> None:
    cfg = replace(resolve(profile="smoke"), session=Session(results_dir=tmp_path))
    glued: list[tuple[str, object]] = []
    path = report(
        "kgc",
        cfg,
        {"mrr_kalm": 0.25, "lr 2e-4: MRR": 0.5, "queries": 16},
        text={"direction": "raises"},
        glue=lambda name, value, display: glued.append((name, value)),
    )
    assert path == tmp_path / "kgc.json"
    assert json.loads(path.read_text())["lr 2e-4: MRR"] == 0.5
    assert glued == [
        ("mrr_kalm", 0.25),
        ("lr_2e_4_mrr", 0.5),
        ("queries", 16),
        ("direction", "raises"),
    ]
    assert "direction" not in json.loads(path.read_text())  # text is glued, not published


def test_report_glues_through_myst_nb_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The display data a page's cell produces: one hidden glue record per key."""
    from myst_nb.ext import glue

    shown: list[tuple[dict[str, object], dict[str, object]]] = []
    monkeypatch.setattr(
        glue, "ipy_display", lambda bundle, raw, metadata: shown.append((bundle, metadata))
    )
    cfg = replace(resolve(profile="smoke"), session=Session(results_dir=tmp_path))
    report("lm", cfg, {"ppl_base": 20.5}, text={"trend": "falls"})
    assert [m["scrapbook"]["name"] for _, m in shown] == ["ppl_base", "trend"]
    assert [b[glue.GLUE_PREFIX + "text/plain"] for b, _ in shown] == ["20.5", "'falls'"]


@pytest.mark.parametrize(
    ("numbers", "text", "message"),
    [
        ({"MRR": 0.1, "mrr": 0.2}, {}, "'MRR' and 'mrr' share the glue name 'mrr'"),
        ({"mrr": 0.1}, {"mrr": "high"}, r"\['mrr'\] are given as numbers and as text"),
        ({"≈": 0.1}, {}, "'≈' has no letter or digit"),
    ],
)
def test_report_refuses_ambiguous_keys(
    tmp_path: Path, numbers: dict, text: dict, message: str
) -> None:
    cfg = replace(resolve(profile="smoke"), session=Session(results_dir=tmp_path))
    with pytest.raises(ValueError, match=message):
        report("page", cfg, numbers, text=text, glue=lambda *a, **k: None)
    assert not (tmp_path / "page.json").exists()  # nothing published half


def test_glue_names_are_readable_by_the_glue_role() -> None:
    assert glue_name("self-negatives, trained through: MRR") == "self_negatives_trained_through_mrr"
    assert glue_name("λ = 0.01: kgqa_tail") == "lambda_0_01_kgqa_tail"
