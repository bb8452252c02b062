"""Entity and relation texts of each benchmark, including the inverse-relation texts.

Inverse relations (ids r + R) need their own words so that a head-prediction query reads
naturally: "(tail, inverse relation, ?)".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from kalm.data.errors import DataError
from kalm.data.formats import read_fields, read_mapping

T = TypeVar("T")
Texts = tuple[tuple[str, ...], tuple[str, ...]]

# Inverse words for WN18RR relations (the recipe's, see book/method.md), keyed by relation2text
# words.
WORDNET_INVERSES: Mapping[str, str] = {
    "hypernym": "hyponym",
    "instance hypernym": "instance hyponym",
    "member meronym": "member holonym",
    "synset domain topic of": "member of domain topic",
    "has part": "part of",
    "member of domain usage": "synset domain usage of",
    "member of domain region": "synset domain region of",
}
WORDNET_SYMMETRIC = frozenset(
    {"derivationally related form", "also see", "verb group", "similar to"}
)


def wordnet_entity_texts(paths: Mapping[str, Path], entity_ids: Sequence[str]) -> Texts:
    """Names and glosses from `wordnet-mlj12-definitions.txt` (`synset, __lemma_POS_sense, gloss`).

    The name is the lemma with underscores as spaces: `__stool_NN_2` -> "stool".
    """
    path = paths["entity_texts"]
    table: dict[str, tuple[str, str]] = {}
    for number, (synset, word, gloss) in enumerate(read_fields(path, 3), start=1):
        parts = word.removeprefix("__").rsplit("_", 2)
        if not word.startswith("__") or len(parts) != 3 or not parts[0]:
            raise DataError(
                f"{path}, line {number}: malformed word {word!r}, expected __lemma_POS_sense "
                "(e.g. __stool_NN_2)"
            )
        table[synset] = (parts[0].replace("_", " "), gloss)
    rows = [_require(table, e, path) for e in entity_ids]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def freebase_entity_texts(paths: Mapping[str, Path], entity_ids: Sequence[str]) -> Texts:
    """Names from `entity2text.txt`; descriptions after " -- " in `fb-entity2text-new.txt`.

    Entities without a description part (26 of FB15k-237) get "".
    """
    names = read_mapping(paths["entity_names"])
    described = read_mapping(paths["entity_descriptions"])
    descriptions = {
        mid: text.split(" -- ", 1)[1] for mid, text in described.items() if " -- " in text
    }
    return (
        tuple(_require(names, e, paths["entity_names"]) for e in entity_ids),
        tuple(descriptions.get(e, "") for e in entity_ids),
    )


def relation_texts(path: Path, relation_ids: Sequence[str]) -> tuple[str, ...]:
    """Relation words from `relation2text.txt`, in relation-id order."""
    table = read_mapping(path)
    return tuple(_require(table, r, path) for r in relation_ids)


def wordnet_inverse(text: str) -> str:
    """Inverse words of a WN18RR relation; symmetric relations keep their words."""
    if text in WORDNET_SYMMETRIC:
        return text
    try:
        return WORDNET_INVERSES[text]
    except KeyError:
        known = ", ".join(sorted([*WORDNET_INVERSES, *WORDNET_SYMMETRIC]))
        raise DataError(f"no inverse text for WN18RR relation {text!r}; known: {known}") from None


def freebase_inverse(text: str) -> str:
    """Inverse words of a FB15k-237 relation: its path words in reverse order.

    "music artist origin" -> "origin artist music". In a two-hop (CVT) path the "." between the
    hops counts as a word, so the hops swap too: "film actor film. film performance film" ->
    "film performance film. film actor film".
    """
    words = text.replace(".", " . ").split()
    return " ".join(reversed(words)).replace(" . ", ". ")


def _require(table: Mapping[str, T], key: str, path: Path) -> T:
    """`table[key]`, or a `DataError` naming the file that should have covered `key`."""
    try:
        return table[key]
    except KeyError:
        raise DataError(f"{path} has no entry for {key!r}; the file must cover every id") from None
