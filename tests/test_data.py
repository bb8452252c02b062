"""Tests of kalm.data: counts, texts, inverse relations, known answers and error messages."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.data import DataError, KnowledgeGraph, KnownAnswers, load_kg
from kalm.data.kg import read_kg
from kalm.data.registry import DATASETS, get_dataset

EXPECTED = {
    # entities, relations, train, valid, test
    "wn18rr": (40_943, 11, 86_835, 3_034, 3_134),
    "fb15k237": (14_541, 237, 272_115, 17_535, 20_466),
}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get("KALM_DATA_DIR")
    if not value:
        pytest.skip("KALM_DATA_DIR is not set")
    return Path(value)


@pytest.fixture(scope="module")
def graphs(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, KnowledgeGraph]]:
    """Both benchmarks, with verification stamps kept out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KALM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield {name: load_kg(name, data_dir) for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts(graphs: dict[str, KnowledgeGraph], name: str) -> None:
    kg = graphs[name]
    n_ent, n_rel, n_train, n_valid, n_test = EXPECTED[name]
    assert (kg.num_entities, kg.num_relations) == (n_ent, n_rel)
    assert (len(kg.train), len(kg.valid), len(kg.test)) == (n_train, n_valid, n_test)
    for split in (kg.train, kg.valid, kg.test):
        assert split.dtype == np.int64 and split.shape[1] == 3
        assert split[:, [0, 2]].min() >= 0 and split[:, [0, 2]].max() < n_ent
        assert split[:, 1].min() >= 0 and split[:, 1].max() < n_rel
    lengths = {len(kg.entity_names), len(kg.entity_descriptions), len(kg.entity_ids)}
    assert lengths == {n_ent}
    assert {len(kg.relation_texts), len(kg.inverse_relation_texts)} == {n_rel}
    assert f"{n_ent:,} entities" in repr(kg) and f"{n_train:,}" in repr(kg)


def test_id_order_follows_files(graphs: dict[str, KnowledgeGraph]) -> None:
    wn, fb = graphs["wn18rr"], graphs["fb15k237"]
    assert wn.entity_ids[:3] == ("03455488", "11689483", "01726172")
    assert wn.entity_ids[-1] == "02675067"
    assert wn.relation_ids[:3] == ("_member_of_domain_usage", "_has_part", "_also_see")
    assert fb.entity_ids[-2:] == ("/m/02twdq", "/m/0ddkf")
    assert fb.relation_ids[1] == "/music/artist/origin"
    # First lines of WN18RR train.tsv and FB15k-237 dev.tsv (CRLF).
    e, r = {x: i for i, x in enumerate(wn.entity_ids)}, wn.relation_ids.index("_hypernym")
    assert wn.train[0].tolist() == [e["00260881"], r, e["00260622"]]
    e = {x: i for i, x in enumerate(fb.entity_ids)}
    r = fb.relation_ids.index("/film/film/genre")
    assert fb.valid[0].tolist() == [e["/m/07pd_j"], r, e["/m/02l7c8"]]


def test_wordnet_texts(graphs: dict[str, KnowledgeGraph]) -> None:
    kg = graphs["wn18rr"]
    stool = kg.entity_ids.index("14854262")
    assert kg.entity_names[stool] == "stool"
    assert kg.entity_descriptions[stool] == "solid excretory product evacuated from the bowels"
    assert kg.entity_text(stool) == "stool, solid excretory product evacuated from the bowels"
    muskrat = kg.entity_ids.index("02338145")
    assert kg.entity_names[muskrat] == "ondatra zibethica"
    assert all(kg.entity_descriptions)


def test_freebase_texts(graphs: dict[str, KnowledgeGraph]) -> None:
    kg = graphs["fb15k237"]
    irons = kg.entity_ids.index("/m/016ywr")
    assert kg.entity_names[irons] == "Jeremy Irons"
    assert kg.entity_text(irons) == "Jeremy Irons, Jeremy John Irons is an English actor."
    neal = kg.entity_ids.index("/m/01dvms")  # one of the 26 entities without a description
    assert (kg.entity_descriptions[neal], kg.entity_text(neal)) == ("", "Patricia Neal")
    assert sum(not d for d in kg.entity_descriptions) == 26
    assert not any("\r" in t for t in (*kg.entity_names, *kg.relation_texts))


def test_wordnet_inverse_texts(graphs: dict[str, KnowledgeGraph]) -> None:
    kg = graphs["wn18rr"]
    inverse = dict(zip(kg.relation_texts, kg.inverse_relation_texts, strict=True))
    assert inverse == {
        "hypernym": "hyponym",
        "instance hypernym": "instance hyponym",
        "member meronym": "member holonym",
        "synset domain topic of": "member of domain topic",
        "has part": "part of",
        "member of domain usage": "synset domain usage of",
        "member of domain region": "synset domain region of",
        "derivationally related form": "derivationally related form",
        "also see": "also see",
        "verb group": "verb group",
        "similar to": "similar to",
    }
    r = kg.relation_ids.index("_hypernym")
    assert kg.relation_text(r) == "hypernym"
    assert kg.relation_text(r + kg.num_relations) == "hyponym"
    with pytest.raises(IndexError):
        kg.relation_text(2 * kg.num_relations)


def test_freebase_inverse_texts(graphs: dict[str, KnowledgeGraph]) -> None:
    kg = graphs["fb15k237"]
    r = kg.relation_ids.index("/music/artist/origin")
    assert kg.relation_texts[r] == "music artist origin"
    assert kg.relation_text(r + kg.num_relations) == "origin artist music"
    r = kg.relation_ids.index("/film/actor/film./film/performance/film")
    assert kg.inverse_relation_texts[r] == "film performance film. film actor film"
    for text, inverse in zip(kg.relation_texts, kg.inverse_relation_texts, strict=True):
        assert inverse.replace(".", "").split() == text.replace(".", "").split()[::-1]


def test_names_and_cache(data_dir: Path, graphs: dict[str, KnowledgeGraph]) -> None:
    assert get_dataset("FB15k-237") is get_dataset("fb15k237") is DATASETS["fb15k237"]
    assert get_dataset("WN18RR").name == "wn18rr"
    with pytest.raises(DataError, match="valid names: fb15k-237, fb15k237, wn18rr"):
        load_kg("wn18")
    kg = graphs["wn18rr"]
    assert load_kg("WN18RR", str(data_dir)) is kg  # served from the in-process cache
    with pytest.raises(ValueError, match="read-only"):
        kg.train[0, 0] = 1


def test_known_answers_real_sample(graphs: dict[str, KnowledgeGraph]) -> None:
    kg = graphs["wn18rr"]
    answers = kg.known_answers()
    assert kg.known_answers(["test", "valid", "train"]) is answers
    rng = np.random.default_rng(0)
    every = np.concatenate([kg.train, kg.valid, kg.test])
    for h, r, t in every[rng.choice(len(every), 50, replace=False)]:
        assert answers.contains(h, r, t) and answers.contains(t, r + kg.num_relations, h)
        brute = every[(every[:, 0] == h) & (every[:, 1] == r), 2]
        assert answers.get(h, r).tolist() == sorted(set(brute.tolist()))
    train_only = kg.known_answers(["train"])
    h, r, t = kg.test[0]
    assert answers.contains(h, r, t) and not train_only.contains(h, r, t)
    with pytest.raises(ValueError, match="unknown split"):
        kg.known_answers(["dev"])


def _brute(triples: np.ndarray, num_relations: int) -> dict[tuple[int, int], set[int]]:
    table: dict[tuple[int, int], set[int]] = {}
    for h, r, t in triples.tolist():
        table.setdefault((h, r), set()).add(t)
        table.setdefault((t, r + num_relations), set()).add(h)
    return table


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n_ent: st.integers(1, 3).flatmap(
            lambda n_rel: st.tuples(
                st.just(n_ent),
                st.just(n_rel),
                st.lists(
                    st.tuples(
                        st.integers(0, n_ent - 1),
                        st.integers(0, n_rel - 1),
                        st.integers(0, n_ent - 1),
                    ),
                    max_size=25,
                ),
            )
        )
    )
)
def test_known_answers_match_brute_force(case: tuple[int, int, list[tuple[int, int, int]]]) -> None:
    n_ent, n_rel, rows = case
    triples = np.array(rows, dtype=np.int64).reshape(-1, 3)
    answers = KnownAnswers(triples, n_rel)
    brute = _brute(triples, n_rel)
    queries = [(e, r) for e in range(n_ent) for r in range(2 * n_rel)]
    assert len(answers) == len(brute)
    for e, r in queries:
        expected = sorted(brute.get((e, r), set()))
        assert answers.get(e, r).tolist() == expected
        assert all(answers.contains(e, r, a) == (a in expected) for a in range(n_ent))
    qe = torch.tensor([q[0] for q in queries])
    qr = torch.tensor([q[1] for q in queries])
    mask = answers.mask(qe, qr, n_ent)
    want = torch.tensor(
        [[a in brute.get(q, set()) for a in range(n_ent)] for q in queries], dtype=torch.bool
    ).reshape(len(queries), n_ent)
    assert torch.equal(mask, want)


def test_mask_golden() -> None:
    # Triples over 4 entities and R = 2: (0,0,1), (0,0,2), (3,1,0).
    answers = KnownAnswers(np.array([[0, 0, 1], [0, 0, 2], [3, 1, 0]]), num_relations=2)
    mask = answers.mask(torch.tensor([0, 1, 0, 3, 2]), torch.tensor([0, 2, 3, 1, 0]), 4)
    assert mask.dtype == torch.bool and mask.shape == (5, 4)
    assert mask.int().tolist() == [
        [0, 1, 1, 0],  # (0, r0) -> 1, 2
        [1, 0, 0, 0],  # (1, r0^-1) -> 0
        [0, 0, 0, 1],  # (0, r1^-1) -> 3
        [1, 0, 0, 0],  # (3, r1) -> 0
        [0, 0, 0, 0],  # (2, r0) has no answer
    ]
    assert torch.equal(answers.mask(np.array([0]), np.array([0]), 4), mask[:1])
    assert answers.get(2, 0).tolist() == [] and answers.get(2, 2).tolist() == [0]
    with pytest.raises(ValueError, match=re.escape("[0, 4)")):
        answers.mask(torch.tensor([0]), torch.tensor([4]), 4)


# --- error messages on a tiny synthetic WN18RR-shaped dataset --------------------------------

TINY = {
    "entities": "e1\ne2\ne3",
    "relations": "_hypernym\n_also_see",
    "relation_texts": "_hypernym\thypernym\n_also_see\talso see",
    "entity_texts": "e1\t__big_cat_NN_1\ta large cat\ne2\t__lion_NN_1\tking\ne3\t__cub_NN_2\tyoung",
    "train": "e1\t_hypernym\te2\r\ne2\t_also_see\te3\r\n",
    "valid": "e3\t_hypernym\te1\n",
    "test": "e2\t_hypernym\te1",
}


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    paths = {role: tmp_path / f"{role}.txt" for role in TINY}
    for role, text in TINY.items():
        paths[role].write_text(text)
    return paths


def test_tiny_dataset_parses(tiny: dict[str, Path]) -> None:
    kg = read_kg(get_dataset("wn18rr"), tiny)
    assert kg.entity_names == ("big cat", "lion", "cub")
    assert kg.train.tolist() == [[0, 0, 1], [1, 1, 2]]
    assert kg.test.tolist() == [[1, 0, 0]]
    assert kg.inverse_relation_texts == ("hyponym", "also see")
    assert kg.known_answers().get(0, 2).tolist() == [1, 2]


def test_malformed_line_names_file_and_line(tiny: dict[str, Path]) -> None:
    tiny["valid"].write_text("e3\t_hypernym\te1\ne1 _hypernym e2\n")
    with pytest.raises(DataError, match=r"valid\.txt, line 2: malformed.*'e1 _hypernym e2'"):
        read_kg(get_dataset("wn18rr"), tiny)


def test_unknown_entity_and_relation_are_named(tiny: dict[str, Path]) -> None:
    tiny["test"].write_text("e2\t_hypernym\te1\ne2\t_hypernym\te9\n")
    with pytest.raises(DataError, match=r"test\.txt, line 2: unknown entity 'e9'"):
        read_kg(get_dataset("wn18rr"), tiny)
    tiny["test"].write_text("e2\t_part_of\te1\n")
    with pytest.raises(DataError, match=r"test\.txt, line 1: unknown relation '_part_of'"):
        read_kg(get_dataset("wn18rr"), tiny)


def test_missing_text_and_bad_word(tiny: dict[str, Path]) -> None:
    tiny["entity_texts"].write_text("e1\t__big_cat_NN_1\ta large cat\ne2\tlion\tking\n")
    with pytest.raises(DataError, match=r"entity_texts\.txt, line 2: malformed word 'lion'"):
        read_kg(get_dataset("wn18rr"), tiny)
    tiny["entity_texts"].write_text("e1\t__big_cat_NN_1\ta large cat\n")
    with pytest.raises(DataError, match="no entry for 'e2'"):
        read_kg(get_dataset("wn18rr"), tiny)


def test_checksum_mismatch_names_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KALM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "data" / "wn18rr").mkdir(parents=True)
    (tmp_path / "data" / "wn18rr" / "train.tsv").write_text(TINY["train"])
    got = hashlib.sha256(TINY["train"].encode()).hexdigest()
    want = DATASETS["wn18rr"].files["train"].sha256
    with pytest.raises(DataError) as err:
        load_kg("wn18rr", tmp_path / "data", download=False)
    message = str(err.value)
    assert want in message and got in message and "train.tsv" in message
    assert "delete" in message


def test_missing_file_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KALM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KALM_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataError) as err:
        load_kg("fb15k-237", download=False)
    message = str(err.value)
    assert "train.tsv" in message and "KALM_DATA_DIR" in message
    assert str(tmp_path / "data" / "fb15k237") in message
    assert str(tmp_path / "cache" / "data" / "fb15k237") in message


@pytest.mark.parametrize("role", ["entities", "relations", "train", "valid", "test"])
@pytest.mark.parametrize("content", ["", "\r\n"])
def test_empty_file_is_named(tiny: dict[str, Path], role: str, content: str) -> None:
    """An empty id list or split is blamed on itself, not on the first file that reads it."""
    tiny[role].write_text(content)
    expected = (
        rf"{role}\.txt is empty; expected one"
        if content == ""
        else rf"{role}\.txt, line 1: malformed line"
    )
    with pytest.raises(DataError, match=expected):
        read_kg(get_dataset("wn18rr"), tiny)


def test_every_source_is_pinned_to_a_commit() -> None:
    for spec in DATASETS.values():
        assert spec.entity_texts is not None and spec.inverse is not None, spec.name
        for f in spec.files.values():
            assert f.url.startswith("https://raw.githubusercontent.com/"), f.url
            owner, repo, ref = f.url.split("/")[3:6]
            assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{f.name}: {owner}/{repo} at {ref!r}"


def test_the_registry_docstring_names_every_table_a_new_dataset_needs() -> None:
    """Adding a knowledge graph takes an entry of `DATASETS` and its names in `_ALIASES` (else
    `get_dataset` does not find it); the docstring says both, and the two tables agree."""
    from kalm.data import registry

    assert "`DATASETS`" in registry.__doc__ and "`_ALIASES`" in registry.__doc__
    assert set(registry._ALIASES.values()) <= set(registry.DATASETS)
    assert all(registry.get_dataset(name).name == name for name in registry.DATASETS)
