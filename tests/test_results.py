"""Headline numbers as data: pages publish flat records, reruns are compared with the book's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kalm import execute
from kalm.config import resolve
from kalm.results import compare, publish


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
    assert execute.main(["--compare", str(tmp_path)]) == 0
    assert "no records" in capsys.readouterr().out
