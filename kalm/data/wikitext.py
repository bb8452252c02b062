"""WikiText-103, the general text of the language-modelling checks, found and verified like
the knowledge graphs (registry entry `WIKITEXT`; files under ``<data dir>/wikitext/``)."""

from __future__ import annotations

from pathlib import Path

from kalm.data.files import cache_root, data_root, dataset_files
from kalm.data.registry import WIKITEXT, DatasetSpec

__all__ = ["load_wikitext", "wikitext_path"]


def wikitext_path(split: str = "test", data_dir: str | Path | None = None) -> Path:
    """The sha256-verified ``wikitext/wikitext-103/wiki.<split>.tokens`` of the data directory
    (``data_dir``, else ``KALM_DATA_DIR``) or the cache; it is never downloaded."""
    if split not in WIKITEXT.files:
        raise ValueError(f"unknown WikiText split {split!r}; valid: {', '.join(WIKITEXT.files)}")
    one = DatasetSpec(
        WIKITEXT.name, WIKITEXT.title, {split: WIKITEXT.files[split]}, downloadable=False
    )
    return dataset_files(one, data_root(data_dir), cache_root())[split]


def load_wikitext(split: str = "test", data_dir: str | Path | None = None) -> str:
    """The WikiText-103 ``split`` as one string (its original tokenised form), sha256-checked."""
    return wikitext_path(split, data_dir).read_text(encoding="utf-8")
