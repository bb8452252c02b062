"""The table helper: padded cells, right-aligned numbers, paper rows set apart, long tables cut."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kalm.tables import styled_table


def table1() -> pd.DataFrame:
    rows = [
        ("paper", "Llama-2-7B + KaLM", 114.0, 0.596),
        ("paper", "Llama-2-7B (no tuning)", 15969.0, 0.010),
        ("this run", "smollm2 (no tuning)", 20000.5, 0.008),
        ("this run", "smollm2 + KaLM", 900.25, np.nan),
    ]
    return pd.DataFrame(rows, columns=["source", "method", "MR", "MRR"]).set_index(
        ["source", "method"]
    )


def cells(markup: str) -> list[tuple[str, str]]:
    """(class attribute, text) of every body cell."""
    return re.findall(r'<td id="[^"]+" class="([^"]*)" >([^<]*)</td>', markup)


def test_numbers_formatted_right_aligned_and_padded() -> None:
    markup = styled_table(table1(), formats={"MR": "{:.0f}"}).to_html()
    assert 'class="dataframe kalm-table"' in markup
    assert "padding: 0.3em 0.75em" in markup
    assert re.search(r"td\.num \{\s*text-align: right;", markup)
    texts = [text for _, text in cells(markup)]
    assert texts == ["114", "0.596", "15969", "0.010", "20000", "0.008", "900", "–"]
    assert all("num" in cls.split() for cls, _ in cells(markup))


def test_paper_rows_set_apart_from_this_run() -> None:
    classes = [cls.split() for cls, _ in cells(styled_table(table1()).to_html())]
    rows = [classes[i] for i in range(0, len(classes), 2)]  # first cell of each row
    assert ["paper" in c for c in rows] == [True, True, False, False]
    assert ["group-start" in c for c in rows] == [False, False, True, False]


def test_source_as_column_and_text_columns_left_aligned() -> None:
    df = table1().reset_index()
    markup = styled_table(df, hide_index=True).to_html()
    first_row = cells(markup)[:4]
    assert [("num" in c.split(), "paper" in c.split()) for c, _ in first_row] == [
        (False, True),
        (False, True),
        (True, True),
        (True, True),
    ]


def test_long_table_summarised_and_written_to_csv(tmp_path: Path) -> None:
    df = pd.DataFrame({"relation": [f"/r/{i}" for i in range(308)], "MRR": np.linspace(1, 0, 308)})
    csv = tmp_path / "tables" / "per_relation.csv"
    styler = styled_table(df, csv=csv, keep=10, hide_index=True, caption="Per relation.")
    shown = styler.data
    assert list(shown["relation"]) == [f"/r/{i}" for i in [*range(10), *range(298, 308)]]
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)
    markup = styler.to_html()
    assert "Rows 1–10 and 299–308 of 308 are shown." in markup
    gap = [i // 2 for i, (cls, _) in enumerate(cells(markup)) if "after-gap" in cls.split()]
    assert gap == [10, 10], "the dashed rule belongs to the first row after the gap"
    link = re.search(r'<a download="per_relation.csv" href="data:text/csv;base64,([^"]+)"', markup)
    assert link and base64.b64decode(link.group(1)) == csv.read_bytes()


def test_short_table_is_not_summarised(tmp_path: Path) -> None:
    df = pd.DataFrame({"x": range(30)})
    styler = styled_table(df, max_rows=30)
    assert len(styler.data) == 30
    assert "are shown" not in styler.to_html()


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="csv=<path>"):
        styled_table(pd.DataFrame({"x": range(31)}), max_rows=30)
    with pytest.raises(ValueError, match=r"\['Hits@1'\]"):
        styled_table(table1(), formats={"Hits@1": "{:.3f}"})
    with pytest.raises(ValueError, match="keep"):
        styled_table(table1(), max_rows=5, keep=3)


def test_query_entity_table_stacks_the_two_rankings() -> None:
    from kalm.tables import query_entity_table

    effect = {
        "query entity outranks gold": 0.9,
        "MRR": 0.1,
        "Hits@1": 0.0,
        "MRR, query entity filtered": 0.4,
        "Hits@1, query entity filtered": 0.3,
    }
    table = query_entity_table({"untuned": effect, "KaLM": effect})
    assert list(table.columns) == ["model", "ranking", "MRR", "Hits@1"]
    assert list(table["ranking"]) == ["all entities", "query entity filtered"] * 2
    assert table.loc[1, "MRR"] == 0.4
    with pytest.raises(ValueError, match="counterpart"):
        query_entity_table({"x": {"MRR": 0.1}})


def test_kgc_summary_table_names_directions_and_counts() -> None:
    from kalm.tables import kgc_summary_table

    summary = {
        d: {"MR": 1234.5, "MRR": 0.1, "MRR_optimistic": 0.1, "MRR_pessimistic": 0.1, "count": 4.0}
        for d in ("tail", "head", "both")
    }
    styler = kgc_summary_table(summary)
    assert list(styler.data.index) == ["tail", "head", "both"]
    assert "queries" in styler.data and styler.data["queries"].dtype.kind == "i"
    html = styler.to_html()
    assert "1,234" in html or "1,235" in html
    assert "MRR (optimistic)" in html


def test_repeated_row_labels_are_renumbered_when_hidden() -> None:
    """Hidden repeated labels (a paper row and this run's, concatenated) become 0..n-1, so each
    row keeps its own values and its own style: the paper row muted, a rule above the next."""
    sources = ["paper", "this run", "this run"]
    df = pd.DataFrame({"a": [1, 2, 3], "source": sources}, index=[0, 0, 1])
    styler = styled_table(df, hide_index=True)
    assert list(styler.data.index) == [0, 1, 2]
    cell = r'<td id="[^"]*_row(\d)_col\d" class="([^"]*)" >([^<]*)</td>'
    cells = re.findall(cell, styler.to_html())
    rows = [(int(r), set(c.split()) - {"data", f"row{r}"}, v) for r, c, v in cells]
    assert rows == [
        (0, {"col0", "paper", "num"}, "1"),
        (0, {"col1", "paper"}, "paper"),
        (1, {"col0", "group-start", "num"}, "2"),
        (1, {"col1", "group-start"}, "this run"),
        (2, {"col0", "num"}, "3"),
        (2, {"col1"}, "this run"),
    ]
    with pytest.raises(ValueError, match="repeat"):
        styled_table(df)
