"""Candidate answers of KGQA questions for multiple choice by likelihood.

Every question keeps its prompt (:mod:`kalm.evaluate.questions`); the model ranks a fixed list
of answers, the gold first:

- head / tail prediction: the gold and up to ``k - 1`` *plausible* distractors, entities seen in
  training with the question's relation in the asked position (heads of ``r`` for a head
  question, tails for a tail question), so a model cannot win by recognising the entity type
  alone; the pool is topped up with other entities when it is too small;
- relation prediction: the gold and up to ``k - 1`` other relation texts (all of them when
  the graph has fewer than ``k`` relations);
- triple classification: the two verdicts, :data:`~kalm.evaluate.questions.YES` and
  :data:`~kalm.evaluate.questions.NO`.

A distractor is never a right answer: not a known answer of the question in train ∪ valid ∪
test, and not a text that normalises (:func:`~kalm.evaluate.scoring.normalise`) like a known
answer's or another candidate's (WordNet has many synsets of one name, "dog" among them).
Distractors are drawn from ``default_rng((seed, task, h, r, t))``, so a question gets the same
candidates whatever else is asked, in any run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from kalm.data import KnowledgeGraph
from kalm.evaluate.questions import NO, TASKS, YES, Question
from kalm.evaluate.scoring import normalise

__all__ = ["CANDIDATES", "question_candidates"]

CANDIDATES = 10
"""Candidates per head, tail or relation question: the gold and nine distractors."""


class _Pools:
    """Per-graph lookups shared by the questions of one call: normalised names and, per
    (relation, position), the entities seen there in training."""

    def __init__(self, kg: KnowledgeGraph) -> None:
        self.kg = kg
        self.known = kg.known_answers()
        self.names = [normalise(n) for n in kg.entity_names]
        self._seen: dict[tuple[int, int], np.ndarray] = {}

    def seen(self, relation: int, column: int) -> np.ndarray:
        """Entities in ``column`` (0 head, 2 tail) of the training triples of ``relation``."""
        key = (relation, column)
        if key not in self._seen:
            rows = self.kg.train[self.kg.train[:, 1] == relation]
            self._seen[key] = np.unique(rows[:, column])
        return self._seen[key]


def _pick(
    gold: str, pool: Iterable[tuple[int, str]], taken: set[str], excluded: set[int], k: int
) -> list[str]:
    """The gold, then the first texts of ``pool`` whose id is not ``excluded`` and whose
    normalised text is not ``taken`` (updated as texts are picked), until there are ``k``."""
    out = [gold]
    for i, text in pool:
        if len(out) == k:
            break
        key = normalise(text)
        if i not in excluded and key not in taken:
            out.append(text)
            taken.add(key)
    return out


def _entity_candidates(
    pools: _Pools, question: Question, k: int, rng: np.random.Generator
) -> list[str]:
    kg, meta = pools.kg, question.meta
    h, r, t = meta["head"], meta["relation"], meta["tail"]
    if question.task == "tail":
        known, column = pools.known.get(h, r), 2
    else:
        known, column = pools.known.get(t, r + kg.num_relations), 0
    excluded = {int(e) for e in known}
    taken = {pools.names[e] for e in excluded} | {normalise(question.gold)}
    plausible = rng.permutation(pools.seen(r, column))
    others = rng.permutation(kg.num_entities)  # the top-up, used only if the pool runs out
    order = (int(e) for e in np.concatenate([plausible, others]))
    return _pick(question.gold, ((e, kg.entity_names[e]) for e in order), taken, excluded, k)


def _relation_candidates(
    pools: _Pools, question: Question, k: int, rng: np.random.Generator
) -> list[str]:
    kg, meta = pools.kg, question.meta
    h, t = meta["head"], meta["tail"]
    # Other relations that also hold between h and t are right answers too.
    excluded = {r for r in range(kg.num_relations) if pools.known.contains(h, r, t)}
    order = (int(r) for r in rng.permutation(kg.num_relations))
    taken = {normalise(question.gold)}
    return _pick(question.gold, ((r, kg.relation_texts[r]) for r in order), taken, excluded, k)


def question_candidates(
    kg: KnowledgeGraph, questions: Sequence[Question], *, seed: int, k: int = CANDIDATES
) -> list[tuple[str, ...]]:
    """The candidate answers of each question (see the module docstring), gold first.

    Head, tail and relation questions get ``k`` candidates, fewer only when the graph has
    fewer admissible answers; classification questions get the two verdicts.
    """
    if k < 2:
        raise ValueError(f"question_candidates: need k >= 2 candidates per question, got {k}")
    pools = _Pools(kg)
    out: list[tuple[str, ...]] = []
    for q in questions:
        if q.task == "classification":
            out.append((q.gold, NO if q.gold == YES else YES))
            continue
        triple = (q.meta["head"], q.meta["relation"], q.meta["tail"])
        rng = np.random.default_rng([seed, TASKS.index(q.task), *triple])
        pick = _relation_candidates if q.task == "relation" else _entity_candidates
        out.append(tuple(pick(pools, q, k, rng)))
    return out
