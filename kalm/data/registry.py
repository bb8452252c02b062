"""The dataset registry: one entry per dataset with its files, their sources and hashes, and
the functions that build its entity and inverse-relation texts.

Every file is pinned to a public source at a fixed commit and to the sha256 of its content, so a
cache built on one machine is byte-identical to one built anywhere else. Adding a knowledge
graph means adding one entry to `DATASETS`, its name and every spelling of it (lower case) to
`_ALIASES`, through which `get_dataset` finds it, and its name to `_config.yml`'s `datasets`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kalm.data.errors import DataError
from kalm.data.texts import (
    Texts,
    freebase_entity_texts,
    freebase_inverse,
    wordnet_entity_texts,
    wordnet_inverse,
)

_KG_BERT = "https://raw.githubusercontent.com/yao8839836/kg-bert/0b8f625108efcb9b43603b6840f2548ff3d3c973/data"
_STAR = (
    "https://raw.githubusercontent.com/wangbo9719/StAR_KGC/"
    "a42a82c4a3510110e434611191b922ee0613495f/StAR/data/FB15k-237"
)
_SIMKGC = (
    "https://raw.githubusercontent.com/intfloat/SimKGC/"
    "97cc43e488f19ca5b0f6fbf60ffefd2ee56c0693/data/WN18RR"
)
_WIKITEXT = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset.

    `name` is the upstream file name and `sha256` the hash of its content. When `gzip_sha256` is
    set, the reference layout (and a `KALM_DATA_URL` mirror) stores `name + ".gz"` instead, made by
    `gzip -n -9` and hashing to `gzip_sha256`; either form is accepted locally.
    """

    name: str
    url: str
    sha256: str
    gzip_sha256: str | None = None

    @property
    def stored_name(self) -> str:
        """File name in the reference layout (e.g. `/work/shared/data`)."""
        return f"{self.name}.gz" if self.gzip_sha256 else self.name


EntityTexts = Callable[[Mapping[str, Path], Sequence[str]], Texts]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its canonical name (also its directory name), its files by role and, for a
    knowledge graph, how its entity texts (names, descriptions) and inverse relation words are
    built. ``downloadable`` is False when the files have no single-file source to fetch.

    ``triples`` counts the triples of each split of a knowledge graph. The files are pinned by
    their hashes, so the counts are facts of the dataset: the book states sizes (an epoch, the
    test set) from them on a machine that has not downloaded the files, and the tests check
    them against the files."""

    name: str
    title: str
    files: Mapping[str, DataFile]
    entity_texts: EntityTexts | None = None
    inverse: Callable[[str], str] | None = None
    downloadable: bool = True
    triples: Mapping[str, int] = field(default_factory=dict)


def _kg_bert(folder: str, name: str, sha256: str, gzip_sha256: str | None = None) -> DataFile:
    return DataFile(name, f"{_KG_BERT}/{folder}/{name}", sha256, gzip_sha256)


DATASETS: dict[str, DatasetSpec] = {
    "wn18rr": DatasetSpec(
        name="wn18rr",
        title="WN18RR",
        files={
            "train": _kg_bert(
                "WN18RR",
                "train.tsv",
                "038612e783c215ee5f3ca9fbfca27b8d0739be1028fe4ee7c174aecf0b83d5df",
            ),
            "valid": _kg_bert(
                "WN18RR",
                "dev.tsv",
                "453ce7202afa58094a04d2b1560ee2b02660f1c260b32ce6651c8ccedd1028ab",
            ),
            "test": _kg_bert(
                "WN18RR",
                "test.tsv",
                "0383bceaaa1096cf3c03ec021ed0048068e2355dbfc0239b292cefdac821cec5",
            ),
            "entities": _kg_bert(
                "WN18RR",
                "entities.txt",
                "178f3020f4a4dd7a2b51a93d8f4e95b38f7b431b0eadb5d317a2ce2f0b3097f0",
            ),
            "relations": _kg_bert(
                "WN18RR",
                "relations.txt",
                "53e8790103375e198e418ba55fc52118789dab8ffe55a848a150dfb630cbd3ad",
            ),
            "relation_texts": _kg_bert(
                "WN18RR",
                "relation2text.txt",
                "91b1de5585d686ed31498d50f1c4eed44ba9486dffbbcc0c28927ac884184918",
            ),
            "entity_texts": DataFile(
                "wordnet-mlj12-definitions.txt",
                f"{_SIMKGC}/wordnet-mlj12-definitions.txt",
                "4cb535c333a3c784bdb6a2a4fc0c96d99cdbb486d5200841bd055e6648454580",
            ),
        },
        entity_texts=wordnet_entity_texts,
        inverse=wordnet_inverse,
        triples={"train": 86_835, "valid": 3_034, "test": 3_134},
    ),
    "fb15k237": DatasetSpec(
        name="fb15k237",
        title="FB15k-237",
        files={
            "train": _kg_bert(
                "FB15k-237",
                "train.tsv",
                "6e4c2782169af21e9743f3b1d200886f5d595bf6bc504ec1351720949c5cdfae",
                gzip_sha256="ed91d9e513e54397b5466d762324f1dfcfdb445a2280751d7a350e4db2e03152",
            ),
            "valid": _kg_bert(
                "FB15k-237",
                "dev.tsv",
                "cf6309010852f6a8d47a45df830a426415d1ee6f7a3970a8376ff1fb81db4a5c",
            ),
            "test": _kg_bert(
                "FB15k-237",
                "test.tsv",
                "5711cf41623ceb4eacc50eb6108a3ca6565c7492e3caaf82a3e355cc660d1574",
            ),
            "entities": _kg_bert(
                "FB15k-237",
                "entities.txt",
                "7341cc8e03b3b0293d2a3cf7b355513e76a70558a804ad8572bb9847a51fdec1",
            ),
            "relations": _kg_bert(
                "FB15k-237",
                "relations.txt",
                "8abf7ba03bad41395095538e4678ab61831d337ab37d3d4f8bacea6514e0a9fc",
            ),
            "relation_texts": _kg_bert(
                "FB15k-237",
                "relation2text.txt",
                "4bf7cb6ea0ac09b17ad210889f723be5e079669f6ae5d507787e1320bbaa0f72",
            ),
            "entity_names": _kg_bert(
                "FB15k-237",
                "entity2text.txt",
                "16beedcfad3d32696e8b0b98cfa0f5eeb144f5142225f227a64fd9ce37447da5",
            ),
            "entity_descriptions": DataFile(
                "fb-entity2text-new.txt",
                f"{_STAR}/fb-entity2text-new.txt",
                "d982bb5b950820dabc00aee9870cae2035d48c169d10c9f2c225579e19528aa2",
            ),
        },
        entity_texts=freebase_entity_texts,
        inverse=freebase_inverse,
        triples={"train": 272_115, "valid": 17_535, "test": 20_466},
    ),
}

WIKITEXT = DatasetSpec(
    name="wikitext",
    title="WikiText-103",
    files={
        split: DataFile(f"wikitext-103/wiki.{split}.tokens", _WIKITEXT, sha256)
        for split, sha256 in (
            ("test", "56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9"),
            ("valid", "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b"),
        )
    },
    downloadable=False,
)
"""WikiText-103 (v1, tokens) ``wiki.<split>.tokens``: general text for the language-modelling
checks. Its source is a zip archive, so the files are read from the data directory only."""

_ALIASES = {"wn18rr": "wn18rr", "fb15k237": "fb15k237", "fb15k-237": "fb15k237"}


def get_dataset(name: str) -> DatasetSpec:
    """Look a dataset up by name, case-insensitively ("WN18RR", "fb15k-237", ...)."""
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        valid = ", ".join(sorted(_ALIASES))
        raise DataError(f"unknown dataset {name!r}; valid names: {valid}")
    return DATASETS[key]
