"""The book's one table helper: a pandas DataFrame as a readable, consistently styled table.

Why: results tables mix the paper's rows with this run's, have many numeric columns and, per
relation, hundreds of rows. Styled by hand in each notebook they ran together without padding,
hid columns and made pages long. :func:`styled_table` gives every table the same look: padded
cells, numbers right-aligned in fixed formats, the paper's rows set apart from this run's, and a
long table cut to its first and last rows with the full table written to a CSV that the page
offers as a download.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from pandas.io.formats.style import Styler

from kalm.durable import atomic_write_text

__all__ = ["kgc_summary_table", "query_entity_table", "styled_table"]

PAPER = "paper"
"""Value of the ``source`` column (or index level) that marks a row copied from the paper."""

CELL_PADDING = "0.3em 0.75em"

_ROW_STYLES = {
    "paper": "font-style: italic; opacity: 0.8;",
    "group-start": "border-top: 2px solid #999;",
    "after-gap": "border-top: 2px dashed #999;",
}
"""Inline styles of the row marks, so that a table reads the same in Jupyter as in the book
(whose CSS, ``book/_static/kalm.css``, adds the theme's colours to the same classes)."""

_TABLE_STYLES = [
    {"selector": "th, td", "props": f"padding: {CELL_PADDING};"},
    {"selector": "td.num", "props": "text-align: right; white-space: nowrap;"},
    {"selector": "caption", "props": "caption-side: bottom; text-align: left;"},
    *({"selector": f"td.{mark}", "props": props} for mark, props in _ROW_STYLES.items()),
]


def styled_table(
    df: pd.DataFrame,
    *,
    formats: Mapping[str, str] | None = None,
    source: str = "source",
    max_rows: int = 30,
    keep: int = 10,
    csv: str | Path | None = None,
    caption: str | None = None,
    hide_index: bool = False,
) -> Styler:
    """Style ``df`` as a book table; summarise it when it is longer than ``max_rows``.

    Args:
        df: the table. Its row order is kept: sort it before (e.g. by MRR) to choose which rows
            a summary keeps.
        formats: format string per column (``{"MRR": "{:.3f}", "share": "{:.1%}"}``); other
            float columns get ``{:.3f}``, integer columns a thousands separator.
        source: name of a column or index level whose value ``"paper"`` marks the rows copied
            from the paper. They are set in muted italics, and the first row of another source
            after them gets a rule above it. Absent: no row is marked.
        max_rows: longer tables are summarised to their first and last ``keep`` rows, with a
            dashed rule at the gap and a caption that says which rows are shown.
        keep: rows kept at each end of a summarised table.
        csv: where the full table is written as CSV; required for a table that is summarised,
            optional otherwise. The caption links the file for download (embedded in the page,
            so the link works wherever the HTML is opened).
        caption: text under the table (the summary note and download link are appended).
        hide_index: hide the row labels (for tables whose index is a plain counter).

    Returns:
        A pandas ``Styler``; its ``.data`` is the (possibly summarised) table that is shown.
    """
    if keep < 1 or max_rows < 2 * keep:
        raise ValueError(
            f"styled_table: need keep >= 1 and max_rows >= 2 * keep, got keep={keep}, "
            f"max_rows={max_rows}"
        )
    unknown = sorted(set(formats or {}) - set(df.columns))
    if unknown:
        raise ValueError(
            f"styled_table: `formats` names columns {unknown} that the table does not have; "
            f"its columns are {list(df.columns)}"
        )
    if not df.index.is_unique:
        if not hide_index:
            raise ValueError(
                "styled_table: the table's row labels repeat (e.g. after pd.concat); pass "
                "hide_index=True or give it unique labels (df.reset_index(drop=True))"
            )
        df = df.reset_index(drop=True)  # hidden labels: renumbered so cells can be styled
    summarised = len(df) > max_rows
    if summarised and csv is None:
        raise ValueError(
            f"styled_table: the table has {len(df)} rows (> max_rows={max_rows}) and is "
            f"summarised; pass csv=<path> so the full table is kept and offered for download"
        )
    notes = [caption] if caption else []
    shown = df
    if summarised:
        shown = pd.concat([df.head(keep), df.tail(keep)])
        notes.append(f"Rows 1–{keep} and {len(df) - keep + 1}–{len(df)} of {len(df):,} are shown.")
    if csv is not None:
        path = Path(csv)
        atomic_write_text(path, df.to_csv(index=not hide_index))
        what = f"the full table ({len(df):,} rows)" if summarised else "this table"
        notes.append(f"Download {what} as {_download_link(path)}.")

    numeric = [c for c in shown.columns if _is_numeric(shown[c])]
    row_classes = _row_classes(_sources(shown, source), len(shown), keep if summarised else None)

    styler = shown.style.format(
        {c: (formats or {}).get(c, _default_format(shown[c])) for c in numeric}, na_rep="–"
    )
    for column, fmt in (formats or {}).items():
        if column not in numeric:
            styler = styler.format(fmt, subset=[column], na_rep="–")
    cell_classes = pd.DataFrame(
        [[f"{row} num".strip() if c in numeric else row for c in shown] for row in row_classes],
        index=shown.index,
        columns=shown.columns,
    )
    header_styles = [
        {"selector": f"th.col_heading.col{i}", "props": "text-align: right;"}
        for i, c in enumerate(shown.columns)
        if c in numeric
    ]
    styler = (
        styler.set_td_classes(cell_classes)
        .set_table_styles(_TABLE_STYLES + header_styles, overwrite=True)
        .set_table_attributes('class="dataframe kalm-table"')
        # Row labels cannot carry classes: the same marks go inline on them.
        .apply_index(lambda labels: [_label_style(c) for c in row_classes], axis=0)
    )
    if hide_index:
        styler = styler.hide(axis="index")
    if notes:
        styler = styler.set_caption(" ".join(notes))
    return styler


def _is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _default_format(column: pd.Series) -> str:
    return "{:,}" if pd.api.types.is_integer_dtype(column) else "{:.3f}"


def _sources(df: pd.DataFrame, source: str) -> list[str] | None:
    if source in df.columns:
        return [str(v) for v in df[source]]
    if source in (df.index.names or []):
        return [str(v) for v in df.index.get_level_values(source)]
    return None


def _row_classes(sources: list[str] | None, n: int, gap_at: int | None) -> list[str]:
    """Per shown row: "paper", "group-start" (first row of a new source), "after-gap"."""
    classes: list[list[str]] = [[] for _ in range(n)]
    for i, value in enumerate(sources or []):
        if value == PAPER:
            classes[i].append("paper")
        elif i > 0 and sources[i - 1] != value:  # type: ignore[index]
            classes[i].append("group-start")
    if gap_at is not None and gap_at < n:
        classes[gap_at].append("after-gap")
    return [" ".join(c) for c in classes]


def _label_style(row_class: str) -> str:
    return " ".join(_ROW_STYLES[mark] for mark in row_class.split())


def _download_link(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name, quote=True)
    return f'<a download="{name}" href="data:text/csv;base64,{data}">{name}</a>'


FILTERED = ", query entity filtered"
"""Suffix of the metrics ranked with the query's own entity filtered too
(:func:`kalm.evaluate.protocol.query_entity_effect`)."""


def query_entity_table(effects: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """The query-entity diagnostic as a narrow table: one row per model and ranking.

    ``effects`` maps a model label to its ``query_entity_effect`` row, whose metrics come
    twice (all candidates, and with the query entity filtered, suffix :data:`FILTERED`).
    Side by side that made nine columns; stacked, the two rankings of a model sit one above
    the other with the metrics as the only columns. The share of queries that the query
    entity wins is left out: it is one number per model, for the prose.
    """
    rows = []
    for model, effect in effects.items():
        metrics = [k for k in effect if not k.endswith(FILTERED) and f"{k}{FILTERED}" in effect]
        if not metrics:
            raise ValueError(
                f"query_entity_table: the row of {model!r} has no metric with its "
                f"'{FILTERED}' counterpart; keys are {list(effect)}"
            )
        rows.append({"model": model, "ranking": "all entities", **{k: effect[k] for k in metrics}})
        rows.append(
            {
                "model": model,
                "ranking": "query entity filtered",
                **{k: effect[f"{k}{FILTERED}"] for k in metrics},
            }
        )
    return pd.DataFrame(rows)


def kgc_summary_table(
    summary: Mapping[str, Mapping[str, float]], *, caption: str | None = None
) -> Styler:
    """A KGC evaluation's metrics per direction (``KGCResult.summary``: tail, head, both) as a
    book table, with readable headers and whole-number MR and query counts."""
    df = pd.DataFrame(summary).T.rename_axis("direction")
    df = df.rename(
        columns={
            "MRR_optimistic": "MRR (optimistic)",
            "MRR_pessimistic": "MRR (pessimistic)",
            "count": "queries",
        }
    )
    if "queries" in df:
        df["queries"] = df["queries"].astype(int)
    formats = {"MR": "{:,.0f}"} if "MR" in df else None
    return styled_table(df, formats=formats, caption=caption)
