"""Datasets: knowledge-graph benchmarks (WN18RR, FB15k-237) with entity and relation texts,
and WikiText-103.

`load_kg(name)` finds, verifies (sha256) and if needed downloads the files, then parses them
into a `KnowledgeGraph`; `KnownAnswers` supports filtered ranking; `sample_triples` draws the
fixed evaluation samples; `load_wikitext` reads the general text of the language-modelling checks.
"""

from kalm.data.answers import KnownAnswers
from kalm.data.errors import DataError
from kalm.data.kg import KnowledgeGraph, load_kg, sample_triples
from kalm.data.wikitext import load_wikitext, wikitext_path

__all__ = [
    "DataError",
    "KnowledgeGraph",
    "KnownAnswers",
    "load_kg",
    "load_wikitext",
    "sample_triples",
    "wikitext_path",
]
