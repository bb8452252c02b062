"""Knowledge-graph benchmarks (WN18RR, FB15k-237) with entity and relation texts.

`load_kg(name)` finds, verifies (sha256) and if needed downloads the files, then parses them
into a `KnowledgeGraph`; `KnownAnswers` supports filtered ranking.
"""

from kalm.data.answers import KnownAnswers
from kalm.data.errors import DataError
from kalm.data.kg import KnowledgeGraph, load_kg

__all__ = ["DataError", "KnowledgeGraph", "KnownAnswers", "load_kg"]
