"""Generation-based KGQA (the paper's Figure 6): the questions answered by free generation,
summarised per task, and the tables of the book's KGQA page.

The pieces live in focused modules, re-exported here under their old names so that
``kalm.evaluate.kgqa.<name>`` keeps working: questions (:mod:`kalm.evaluate.questions`),
generation (:mod:`kalm.evaluate.generation`), the scoring rule and readings of the answers
(:mod:`kalm.evaluate.scoring`), intervals (:mod:`kalm.evaluate.statistics`). Multiple choice by
likelihood, the protocol that separates models at small scale, is
:mod:`kalm.evaluate.likelihood`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import RunConfig
from kalm.data import KnowledgeGraph
from kalm.evaluate.generation import generate
from kalm.evaluate.questions import (
    CASE_STUDIES,
    CLASSIFY_INSTRUCTION,
    NO,
    TASK_LABELS,
    TASKS,
    YES,
    Question,
    build_questions,
    case_study_triples,
    find_triple,
    triple_questions,
)
from kalm.evaluate.scoring import (
    first_word_shares,
    has_repeated_word,
    majority_baseline,
    normalise,
    repetition_share,
    score,
)
from kalm.evaluate.statistics import accuracy_with_ci
from kalm.paper import read_resource

__all__ = [
    "CASE_STUDIES",
    "CLASSIFY_INSTRUCTION",
    "NO",
    "TASKS",
    "TASK_LABELS",
    "YES",
    "Question",
    "accuracy_table",
    "accuracy_with_ci",
    "build_questions",
    "case_studies",
    "find_triple",
    "first_word_shares",
    "generate",
    "has_repeated_word",
    "majority_baseline",
    "normalise",
    "paper_comparison",
    "paper_results",
    "repetition_share",
    "run_kgqa",
    "score",
    "summarise",
    "triple_questions",
]


def _answer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    cfg: RunConfig,
    progress: bool,
) -> pd.DataFrame:
    started = time.perf_counter()
    answers = generate(
        model,
        tokenizer,
        [q.prompt for q in questions],
        max_new_tokens=cfg.eval.kgqa_max_new_tokens,
        batch_size=cfg.eval.kgqa_batch_size,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    rows = []
    for q, a in zip(questions, answers, strict=True):
        exact, lenient = score(q.task, a, q.gold)
        rows.append(
            {
                "task": q.task,
                "prompt": q.prompt,
                "gold": q.gold,
                "answer": a,
                "exact": exact,
                "lenient": lenient,
                **q.meta,
            }
        )
    df = pd.DataFrame(rows)
    df.attrs["seconds"] = seconds
    return df


def run_kgqa(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    kg: KnowledgeGraph,
    cfg: RunConfig,
    *,
    tasks: Sequence[str] = TASKS,
    split: str = "test",
    progress: bool = True,
) -> pd.DataFrame:
    """Answer every question of :func:`build_questions` (sizes from ``cfg.eval``).

    One row per question: task, prompt, gold, answer, exact, lenient and the triple asked
    (head, relation, tail, true). ``df.attrs["seconds"]`` is the generation time.
    """
    questions = build_questions(
        kg,
        n=cfg.eval.kgqa_questions,
        shots=cfg.eval.kgqa_shots,
        seed=cfg.seed,
        tasks=tasks,
        split=split,
    )
    return _answer(model, tokenizer, questions, cfg, progress)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per task: number of questions, exact and lenient accuracy with Wilson 95 % intervals."""
    rows = []
    for task in [t for t in TASKS if t in set(df["task"])]:
        part = df[df["task"] == task]
        row: dict[str, Any] = {"task": task, "n": len(part)}
        for kind in ("exact", "lenient"):
            acc, lo, hi = accuracy_with_ci(part[kind].to_numpy())
            row |= {kind: acc, f"{kind}_lo": lo, f"{kind}_hi": hi}
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")


def _triple_label(kg: KnowledgeGraph, h: int, r: int, t: int) -> str:
    """A triple as "(head name, relation text, tail name)"."""
    return f"({kg.entity_names[h]}, {kg.relation_texts[r]}, {kg.entity_names[t]})"


def case_studies(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, kg: KnowledgeGraph, cfg: RunConfig
) -> pd.DataFrame:
    """The case-study triples (:func:`~kalm.evaluate.questions.case_study_triples`: Figure 5's
    for WN18RR, chosen by rule elsewhere) answered for all four tasks, ``4 *
    len(CASE_STUDIES)`` rows in the same order for every model."""
    questions = []
    for triple in case_study_triples(kg, n=cfg.eval.kgqa_questions, seed=cfg.seed):
        questions += triple_questions(kg, triple, shots=cfg.eval.kgqa_shots, seed=cfg.seed)
    df = _answer(model, tokenizer, questions, cfg, progress=False)
    df.insert(
        0,
        "triple",
        [_triple_label(kg, *row) for row in df[["head", "relation", "tail"]].itertuples(False)],
    )
    return df


def paper_results() -> pd.DataFrame:
    """The paper's Figure 6 accuracies (%, WN18RR): columns task, model, kalm, accuracy."""
    return read_resource("paper_kgqa.csv")


def accuracy_table(summaries: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The :func:`summarise` tables of several models as one readable table, accuracies in %.

    One row per model and task: questions, exact and lenient accuracy and the lenient
    accuracy's Wilson 95 % interval as one "low–high" column.
    """
    rows = [
        {
            "model": name,
            "task": TASK_LABELS[task],
            "questions": int(s.loc[task, "n"]),
            "exact (%)": 100 * s.loc[task, "exact"],
            "lenient (%)": 100 * s.loc[task, "lenient"],
            "95% interval (%)": f"{100 * s.loc[task, 'lenient_lo']:.1f}–"
            f"{100 * s.loc[task, 'lenient_hi']:.1f}",
        }
        for name, s in summaries.items()
        for task in s.index
    ]
    return pd.DataFrame(rows)


def paper_comparison(
    measured: Mapping[str, pd.DataFrame], *, paper_model: str = "Llama-2-7B"
) -> pd.DataFrame:
    """Lenient accuracy (%) per task: the paper's ``paper_model`` untuned and with KaLM, then
    each measured model (a :func:`summarise` table per row label); a ``source`` column marks
    the paper's rows ("paper") and this run's ("this run")."""
    paper = paper_results()
    paper = paper[paper["model"] == paper_model]
    if paper.empty:
        models = sorted(paper_results()["model"].unique())
        raise ValueError(f"paper_comparison: no paper results for {paper_model!r}; have {models}")
    rows = []
    for kalm, suffix in ((False, ""), (True, " + KaLM")):
        accuracy = paper[paper["kalm"] == kalm].set_index("task")["accuracy"]
        rows.append({"source": "paper", "model": f"{paper_model}{suffix}", **accuracy.to_dict()})
    for name, s in measured.items():
        rows.append({"source": "this run", "model": name, **(100 * s["lenient"]).to_dict()})
    table = pd.DataFrame(rows)
    tasks = [t for t in TASKS if t in table.columns]
    return table[["source", "model", *tasks]].rename(columns=TASK_LABELS)
