"""KGQA questions (the paper's Figure 6): four question types about knowledge-graph triples.

Every question is a few-shot prompt in the Alpaca format of the triple-completion objective
(:mod:`kalm.prompts`): the preamble and the task's ``### Instruction`` once, then ``shots`` solved
examples drawn from the *training* triples as ``### Input`` / ``### Response`` pairs, then the
question's input and an open response. With no shots, a tail-prediction prompt is exactly the
training prompt; stating the instruction once keeps prompts short (generation cost is dominated
by the prompt).
Entities appear by their **names** (``kg.entity_names``), not their descriptions, in inputs and
answers alike, so an answer is a short string that can be compared with the gold.

The same questions serve both protocols: free generation (:mod:`kalm.evaluate.generation`)
and multiple choice by likelihood (:mod:`kalm.evaluate.likelihood`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kalm.data import KnowledgeGraph, sample_triples
from kalm.prompts import INSTRUCTION, alpaca_prompt

__all__ = [
    "CASE_STUDIES",
    "CLASSIFY_INSTRUCTION",
    "NO",
    "TASKS",
    "TASK_LABELS",
    "YES",
    "Question",
    "build_questions",
    "case_study_triples",
    "find_triple",
    "triple_questions",
]

TASKS: tuple[str, ...] = ("head", "tail", "relation", "classification")
TASK_LABELS: dict[str, str] = {
    "head": "head prediction",
    "tail": "tail prediction",
    "relation": "relation prediction",
    "classification": "triple classification",
}
YES, NO = "Yes, this is true", "No, this is not true"
CLASSIFY_INSTRUCTION = f"Is this triple true? Please choose your answer from: '{YES}' or '{NO}'."
CASE_STUDIES: tuple[tuple[str, str, str], ...] = (
    ("salviniaceae", "member meronym", "salvinia"),
    ("refrigerator", "hypernym", "white goods"),
)
"""The two triples of the paper's Figure 5 (head name, relation text, tail name), in WN18RR."""
CASE_STUDY_DATASET = "wn18rr"
"""The dataset of :data:`CASE_STUDIES`; other datasets get case studies by rule."""


@dataclass(frozen=True)
class Question:
    """One prompt with its gold answer; ``meta`` holds the triple ids and, for classification,
    whether the asked triple is true."""

    task: str
    prompt: str
    gold: str
    meta: dict[str, Any] = field(default_factory=dict)


def _relation_instruction(kg: KnowledgeGraph) -> str:
    return (
        "What is the relation between the head entity and the tail entity? "
        f"Please choose your answer from: {', '.join(kg.relation_texts)}."
    )


def _example(kg: KnowledgeGraph, task: str, h: int, r: int, t: int, true: bool) -> tuple[str, str]:
    """(input, answer) of one example of ``task`` about triple (h, r, t).

    For classification ``(h, r, t)`` is the triple *as asked*; ``true`` is its label.
    """
    name = kg.entity_names
    if task == "tail":
        return f"{name[h]}, {kg.relation_text(r)}", name[t]
    if task == "head":
        return f"{name[t]}, {kg.relation_text(r + kg.num_relations)}", name[h]
    if task == "relation":
        return f"{name[h]}, {name[t]}", kg.relation_text(r)
    if task == "classification":
        return f"{name[h]}, {kg.relation_text(r)}, {name[t]}", YES if true else NO
    raise ValueError(f"unknown KGQA task {task!r}; valid tasks: {', '.join(TASKS)}")


def _instruction(kg: KnowledgeGraph, task: str) -> str:
    if task in ("head", "tail"):
        return INSTRUCTION  # the training instruction, also for the inverse (head) query
    return _relation_instruction(kg) if task == "relation" else CLASSIFY_INSTRUCTION


def _corrupt(
    kg: KnowledgeGraph, h: int, r: int, t: int, rng: np.random.Generator
) -> tuple[int, int, int]:
    """Replace the head or the tail (a fair coin) by a random entity so that the result is not a
    known triple of train ∪ valid ∪ test."""
    known = kg.known_answers()
    replace_head = bool(rng.random() < 0.5)
    for _ in range(1000):
        e = int(rng.integers(kg.num_entities))
        if replace_head and not known.contains(t, r + kg.num_relations, e):
            return e, r, t
        if not replace_head and not known.contains(h, r, e):
            return h, r, e
    raise RuntimeError(f"no corruption of triple ({h}, {r}, {t}) found in 1000 draws")


def _shots(
    kg: KnowledgeGraph, task: str, k: int, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """``k`` solved examples of ``task`` from random training triples.

    Classification shots hold at least one true and one false example (in random order), so the
    prompt does not suggest a single label.
    """
    rows = kg.train[rng.choice(len(kg.train), size=k, replace=False)]
    labels = [True] * k
    if task == "classification":
        labels = [i % 2 == 0 for i in range(k)]
        labels = [bool(x) for x in rng.permutation(labels)]
    out = []
    for (h, r, t), true in zip(rows.tolist(), labels, strict=True):
        asked = (h, r, t) if true else _corrupt(kg, h, r, t, rng)
        out.append(_example(kg, task, *asked, true=true))
    return out


def _question(
    kg: KnowledgeGraph,
    task: str,
    triple: Sequence[int],
    true: bool,
    shots: int,
    seed: Sequence[int],
) -> Question:
    """The prompt of ``task`` about ``triple`` (corrupted unless ``true``), with shots and
    corruption drawn from ``default_rng(seed)``: shots first, so the true and the corrupted
    question of a classification pair share their shots."""
    rng = np.random.default_rng(list(seed))
    examples = _shots(kg, task, shots, rng)
    h, r, t = (int(x) for x in triple)
    asked = (h, r, t) if true else _corrupt(kg, h, r, t, rng)
    inp, gold = _example(kg, task, *asked, true=true)
    prompt = alpaca_prompt(_instruction(kg, task), inp, examples)
    meta = {"head": asked[0], "relation": asked[1], "tail": asked[2], "true": true}
    return Question(task, prompt, gold, meta)


def build_questions(
    kg: KnowledgeGraph,
    *,
    n: int,
    shots: int,
    seed: int,
    tasks: Sequence[str] = TASKS,
    split: str = "test",
) -> list[Question]:
    """Questions of every task on a fixed sample of ``n`` triples of ``split`` (all when ``n``
    is 0); the studies ask about validation triples, the book's KGQA page about test ones.

    Head, tail and relation prediction ask about each sampled triple once. Classification is
    balanced and paired: the first ``ceil(n / 2)`` sampled triples are each asked once as they
    are and once corrupted, so every task has ``n`` questions (``n`` rounded up to even).
    Everything is a function of ``seed``: the sample, the shots and the corruptions.
    """
    triples = sample_triples(getattr(kg, split), n, seed)
    questions: list[Question] = []
    for task in tasks:
        index = TASKS.index(task)
        if task == "classification":
            pairs = triples[: math.ceil(len(triples) / 2)]
            for i, triple in enumerate(pairs):
                for true in (True, False):
                    questions.append(_question(kg, task, triple, true, shots, (seed, index, i)))
        else:
            for i, triple in enumerate(triples):
                questions.append(_question(kg, task, triple, True, shots, (seed, index, i)))
    return questions


def triple_questions(
    kg: KnowledgeGraph, triple: Sequence[int], *, shots: int, seed: int
) -> list[Question]:
    """One question of each task about one (true) triple, e.g. a case study."""
    key = tuple(int(x) for x in triple)
    return [
        _question(kg, task, key, True, shots, (seed, TASKS.index(task), *key)) for task in TASKS
    ]


def find_triple(kg: KnowledgeGraph, head: str, relation: str, tail: str) -> tuple[int, int, int]:
    """The (h, r, t) ids of a triple given by entity names and relation text, in any split."""
    r = kg.relation_texts.index(relation) if relation in kg.relation_texts else -1
    names = np.asarray(kg.entity_names, dtype=object)
    for split in ("train", "valid", "test"):
        rows = getattr(kg, split)
        hit = (rows[:, 1] == r) & (names[rows[:, 0]] == head) & (names[rows[:, 2]] == tail)
        if hit.any():
            h, r, t = rows[np.flatnonzero(hit)[0]].tolist()
            return h, r, t
    raise KeyError(f"triple ({head!r}, {relation!r}, {tail!r}) is not in {kg.name}")


def case_study_triples(kg: KnowledgeGraph, *, n: int, seed: int) -> list[tuple[int, int, int]]:
    """The case-study triples of ``kg``: the paper's Figure 5 triples for WN18RR; for any
    other dataset, by rule, the first ``len(CASE_STUDIES)`` test triples of the question sample
    of :func:`build_questions` (``n`` triples drawn with ``seed``) whose relations differ.

    The rule uses no model, so every model answers the same case studies, and the triples are
    among those the main evaluation asks about; distinct relations keep two examples from
    showing the same kind of fact.
    """
    if kg.name == CASE_STUDY_DATASET:
        return [find_triple(kg, *names) for names in CASE_STUDIES]
    chosen: list[tuple[int, int, int]] = []
    for h, r, t in sample_triples(kg.test, n, seed).tolist():
        if all(r != seen for _, seen, _ in chosen):
            chosen.append((h, r, t))
        if len(chosen) == len(CASE_STUDIES):
            return chosen
    raise ValueError(
        f"case_study_triples: the {n or 'all'}-triple test sample of {kg.name} has fewer than "
        f"{len(CASE_STUDIES)} relations; ask more questions (eval.kgqa_questions)"
    )
