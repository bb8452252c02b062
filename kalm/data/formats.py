"""Parsers for the plain-text benchmark files (LF or CRLF, optionally gzipped).

Each parser checks the shape of every line and reports the file, the 1-based line number and the
offending content, because a silent mis-parse would corrupt every downstream number.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import NoReturn

import numpy as np

from kalm.data.errors import DataError


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, without line ends; a missing final newline is fine."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 ({err.reason})") from err
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def read_fields(path: Path, count: int, *, what: str = "") -> list[list[str]]:
    """Split every line on tabs into exactly `count` non-empty fields.

    With `what` (e.g. "one entity id per line") the file must have a line: an empty id list or
    split is a truncated file, and saying so here beats an error about whichever file reads it.
    """
    rows = [line.split("\t") for line in read_lines(path)]
    if what and not rows:
        raise DataError(
            f"{path} is empty; expected {what}. The file is truncated or not the dataset's; "
            "replace it with a complete copy (a downloaded file: delete it to fetch it again)."
        )
    for number, row in enumerate(rows, start=1):
        if len(row) != count or not all(row):
            _malformed(path, number, row, f"{count} non-empty tab-separated fields")
    return rows


def read_ids(path: Path) -> tuple[str, ...]:
    """An id list (one per line, order = integer id); ids must be unique and tab-free and there
    must be at least one."""
    ids = tuple(row[0] for row in read_fields(path, 1, what="one id per line"))
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for number, value in enumerate(ids, start=1):
            if value in seen:
                raise DataError(f"{path}, line {number}: duplicate id {value!r}")
            seen.add(value)
    return ids


def read_mapping(path: Path) -> dict[str, str]:
    """A two-column `key<TAB>value` file as a dict."""
    return {key: value for key, value in read_fields(path, 2)}


def read_triples(
    path: Path, entity_index: dict[str, int], relation_index: dict[str, int]
) -> np.ndarray:
    """Triples `head<TAB>relation<TAB>tail` as an int64 (n, 3) array of integer ids (at least
    one: an empty split would make every metric on it vacuous)."""
    rows = read_fields(path, 3, what="one head<TAB>relation<TAB>tail triple per line")
    try:
        ids = [(entity_index[h], relation_index[r], entity_index[t]) for h, r, t in rows]
    except KeyError:
        _unknown(path, rows, entity_index, relation_index)
    return np.array(ids, dtype=np.int64).reshape(-1, 3)


def _unknown(
    path: Path,
    rows: list[list[str]],
    entity_index: dict[str, int],
    relation_index: dict[str, int],
) -> NoReturn:
    """Raise for the first triple naming an entity or relation outside the id lists."""
    for number, (h, r, t) in enumerate(rows, start=1):
        checks = (
            ("entity", h, entity_index),
            ("relation", r, relation_index),
            ("entity", t, entity_index),
        )
        for kind, value, index in checks:
            if value not in index:
                line = "\t".join((h, r, t))
                raise DataError(
                    f"{path}, line {number}: unknown {kind} {value!r} (not in the {kind} list); "
                    f"line content {line!r}"
                )
    raise AssertionError("a lookup failed but every id is known")


def _malformed(path: Path, number: int, row: list[str], expected: str) -> NoReturn:
    content = "\t".join(row)
    shown = content if len(content) <= 200 else content[:200] + "..."
    raise DataError(f"{path}, line {number}: malformed line, expected {expected}, got {shown!r}")
