"""`KnowledgeGraph`: entities, relations, their texts and the three splits as id arrays."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kalm.data.answers import KnownAnswers
from kalm.data.files import cache_root, data_root, dataset_files
from kalm.data.formats import read_ids, read_triples
from kalm.data.registry import DatasetSpec, get_dataset
from kalm.data.texts import relation_texts

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True, eq=False)
class KnowledgeGraph:
    """A text-attributed knowledge graph; integer ids index the tuples, inverse relations are r+R.

    Triple arrays are int64 (n, 3) with columns head, relation, tail, and read-only because a
    loaded graph is shared by every caller in the process.
    """

    name: str
    entity_ids: tuple[str, ...]
    entity_names: tuple[str, ...]
    entity_descriptions: tuple[str, ...]
    relation_ids: tuple[str, ...]
    relation_texts: tuple[str, ...]
    inverse_relation_texts: tuple[str, ...]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    _answers: dict[tuple[str, ...], KnownAnswers] = field(
        default_factory=dict, init=False, repr=False
    )

    @property
    def num_entities(self) -> int:
        return len(self.entity_ids)

    @property
    def num_relations(self) -> int:
        """Number of forward relations R (inverse ids run from R to 2R - 1)."""
        return len(self.relation_ids)

    def __repr__(self) -> str:
        sizes = "/".join(f"{len(getattr(self, s)):,}" for s in SPLITS)
        return (
            f"KnowledgeGraph({self.name}: {self.num_entities:,} entities, "
            f"{self.num_relations} relations, train/valid/test {sizes} triples)"
        )

    def entity_text(self, e: int) -> str:
        """ "name, description", or just the name when there is no description."""
        name, description = self.entity_names[e], self.entity_descriptions[e]
        return f"{name}, {description}" if description else name

    def relation_text(self, r: int) -> str:
        """Words of relation `r` in [0, 2R); r >= R is the inverse of r - R."""
        if not 0 <= r < 2 * self.num_relations:
            raise IndexError(f"relation id {r} outside [0, {2 * self.num_relations})")
        if r < self.num_relations:
            return self.relation_texts[r]
        return self.inverse_relation_texts[r - self.num_relations]

    def known_answers(self, splits: Sequence[str] = SPLITS) -> KnownAnswers:
        """Known answers over the union of `splits` (built once per split set, then reused)."""
        key = tuple(sorted(set(splits)))
        unknown = set(key) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; valid: {', '.join(SPLITS)}")
        if key not in self._answers:
            triples = np.concatenate([getattr(self, s) for s in key])
            self._answers[key] = KnownAnswers(triples, self.num_relations)
        return self._answers[key]


def load_kg(
    name: str, data_dir: str | Path | None = None, *, download: bool = True
) -> KnowledgeGraph:
    """Load "wn18rr" or "fb15k237" ("FB15k-237" too), verifying and downloading files as needed.

    Files are looked up in `data_dir` (else `$KALM_DATA_DIR`) laid out as `<dataset>/<file>`,
    then in the cache `$KALM_CACHE_DIR/data` (default `~/.cache/kalm/data`); with `download`,
    missing files are fetched into the cache. Graphs are cached per process.
    """
    spec = get_dataset(name)
    return _load(spec.name, data_root(data_dir), cache_root(), download)


@functools.lru_cache(maxsize=8)
def _load(name: str, root: Path | None, cache: Path, download: bool) -> KnowledgeGraph:
    spec = get_dataset(name)
    return read_kg(spec, dataset_files(spec, root, cache, allow_download=download))


def read_kg(spec: DatasetSpec, paths: Mapping[str, Path]) -> KnowledgeGraph:
    """Parse a dataset from explicit file paths by role (no checksum checks)."""
    entity_ids = read_ids(paths["entities"])
    relation_ids = read_ids(paths["relations"])
    entity_index = {e: i for i, e in enumerate(entity_ids)}
    relation_index = {r: i for i, r in enumerate(relation_ids)}
    splits = {}
    for split in SPLITS:
        triples = read_triples(paths[split], entity_index, relation_index)
        triples.setflags(write=False)
        splits[split] = triples
    if spec.entity_texts is None or spec.inverse is None:
        raise ValueError(f"{spec.title} is not a knowledge graph (it has no text builders)")
    names, descriptions = spec.entity_texts(paths, entity_ids)
    rel_texts = relation_texts(paths["relation_texts"], relation_ids)
    return KnowledgeGraph(
        name=spec.name,
        entity_ids=entity_ids,
        entity_names=names,
        entity_descriptions=descriptions,
        relation_ids=relation_ids,
        relation_texts=rel_texts,
        inverse_relation_texts=tuple(spec.inverse(t) for t in rel_texts),
        **splits,
    )


def sample_triples(triples: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random subset of ``n`` triples in their original order (all of them when ``n``
    is 0 or too large): the same test sample for every model and notebook of a seed."""
    if n <= 0 or n >= len(triples):
        return triples
    pick = np.random.default_rng(seed).choice(len(triples), size=n, replace=False)
    return triples[np.sort(pick)]
