"""Generation-based KGQA (the paper's Figure 6): four question types on test triples.

Every question is a few-shot prompt in the Alpaca format of the triple-completion objective
(:mod:`kalm.prompts`): the preamble and the task's ``### Instruction`` once, then ``shots`` solved
examples drawn from the *training* triples as ``### Input`` / ``### Response`` pairs, then the
question's input and an open response. With no shots, a tail-prediction prompt is exactly the
training prompt; stating the instruction once keeps prompts short (generation cost is dominated
by the prompt).
Entities appear by their **names** (``kg.entity_names``), not their descriptions, in inputs and
answers alike, so an answer is a short string that can be compared with the gold.

Scoring rule (the same for every model):

- *answer* = the generated text up to the first newline (generation stops there or at EOS);
- *normalise* = lowercase, every run of characters that are not letters or digits becomes one
  space, leading/trailing spaces dropped;
- *exact*: normalised answer == normalised gold;
- *lenient*: the normalised gold occurs in the normalised answer as whole words;
- triple classification: both exact and lenient mean that the first word of the normalised
  answer ("yes" / "no") equals that of the gold, so "Yes." and "Yes, this is true" both count.

The headline accuracy is the lenient one: the models are not told where to stop, and an answer
that names the gold and then keeps going ("white goods, a class of appliances") is right.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import RunConfig
from kalm.data import KnowledgeGraph, sample_triples
from kalm.models import mixed_precision
from kalm.paper import read_resource
from kalm.prompts import INSTRUCTION, alpaca_prompt
from kalm.views import pad_batch, prompt_ids

__all__ = [
    "CASE_STUDIES",
    "TASKS",
    "TASK_LABELS",
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
"""The two triples of the paper's Figure 5 (head name, relation text, tail name)."""


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


# ---------------------------------------------------------------- generation


@functools.lru_cache(maxsize=4)
def _newline_tokens(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Bool table over the vocabulary: True for tokens whose text contains a newline."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor(["\n" in s for s in texts], dtype=torch.bool)


class _StopAtNewline(StoppingCriteria):
    """Marks a row done once it has produced a token containing a newline."""

    def __init__(self, table: torch.Tensor, prompt_width: int) -> None:
        self.table = table
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width :]
        table = self.table.to(input_ids.device)
        known = new < len(table)  # ids past the tokenizer's vocabulary (padded embeddings)
        return (known & table[new.clamp(max=len(table) - 1)]).any(dim=1)


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its first newline (EOS also stops).

    Prompts are sorted by length and left-padded in batches (so the new tokens of every row
    start at the same column); a batch stops as soon as every row has a newline or EOS. Returns
    the texts in the input order. Works for plain and peft models, in the model's precision.
    A prompt starts as the tokenizer starts a text (BOS for Llama; see
    :func:`~kalm.views.prompt_ids`).
    """
    ids = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    device = next(model.parameters()).device
    table = _newline_tokens(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    with (
        torch.inference_mode(),
        mixed_precision(model),
        tqdm(total=len(ids), desc="generating", disable=not progress, unit="q") as bar,
    ):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pad_batch([ids[i] for i in idx], tokenizer.pad_token_id, left=True)
            width = batch.input_ids.shape[1]
            result = model.generate(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_StopAtNewline(table, width)]),
            )
            for i, row in zip(idx, result[:, width:].tolist(), strict=True):
                if eos in row:
                    row = row[: row.index(eos)]
                out[i] = tokenizer.decode(row, skip_special_tokens=True).split("\n", 1)[0]
            bar.update(len(idx))
    model.train(was_training)
    return out


# ---------------------------------------------------------------- scoring


def normalise(text: str) -> str:
    """Lowercase; runs of non-alphanumeric characters become one space; ends stripped."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def score(task: str, answer: str, gold: str) -> tuple[bool, bool]:
    """(exact, lenient) correctness of one answer under the module's scoring rule."""
    a, g = normalise(answer.split("\n", 1)[0]), normalise(gold)
    if task == "classification":
        first = a.split(" ", 1)[0]
        ok = bool(first) and first == g.split(" ", 1)[0]
        return ok, ok
    return a == g, bool(g) and f" {g} " in f" {a} "


def accuracy_with_ci(
    correct: Sequence[bool] | np.ndarray, z: float = 1.96
) -> tuple[float, float, float]:
    """Accuracy and its Wilson score interval (95 % for ``z = 1.96``).

    Wilson rather than the normal approximation because question counts are small and
    accuracies can be near 0 or 1, where the normal interval leaves [0, 1].
    """
    x = np.asarray(correct, dtype=bool)
    n = len(x)
    if n == 0:
        raise ValueError("accuracy_with_ci: no answers to score")
    p = float(x.mean())
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


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


def case_studies(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, kg: KnowledgeGraph, cfg: RunConfig
) -> pd.DataFrame:
    """The Figure 5 triples answered for all four tasks (only defined for WN18RR)."""
    questions = []
    for head, relation, tail in CASE_STUDIES:
        triple = find_triple(kg, head, relation, tail)
        questions += triple_questions(kg, triple, shots=cfg.eval.kgqa_shots, seed=cfg.seed)
    df = _answer(model, tokenizer, questions, cfg, progress=False)
    df.insert(
        0,
        "triple",
        [
            f"({kg.entity_names[h]}, {kg.relation_texts[r]}, {kg.entity_names[t]})"
            for h, r, t in df[["head", "relation", "tail"]].itertuples(index=False)
        ],
    )
    return df


def paper_results() -> pd.DataFrame:
    """The paper's Figure 6 accuracies (%, WN18RR): columns task, model, kalm, accuracy."""
    return read_resource("paper_kgqa.csv")


# ---------------------------------------------------------------- reading the answers


def majority_baseline(df: pd.DataFrame, task: str = "classification") -> float:
    """Accuracy of always giving the most common gold answer of ``task`` (a share in [0, 1]).

    Why: on a balanced yes/no task a model that always says "No" scores 50 %, the same as
    chance; an accuracy is only evidence of knowledge once it beats this constant answer.
    """
    gold = df.loc[df["task"] == task, "gold"].map(normalise)
    if gold.empty:
        raise ValueError(f"majority_baseline: no questions of task {task!r} in the answers")
    return float(gold.value_counts(normalize=True).iloc[0])


def first_word_shares(df: pd.DataFrame, task: str = "classification") -> pd.Series:
    """Share of the answers of ``task`` by their first normalised word (e.g. "yes", "no"),
    largest first; an empty answer counts as ``""``."""
    answers = df.loc[df["task"] == task, "answer"].map(normalise)
    if answers.empty:
        raise ValueError(f"first_word_shares: no questions of task {task!r} in the answers")
    first = answers.str.split(" ", n=1).str[0].rename("first word")
    return first.value_counts(normalize=True).rename("share")


def has_repeated_word(answer: str) -> bool:
    """Whether a normalised word occurs at least twice in ``answer``.

    A short entity or relation name rarely repeats a word, while a degenerate generation
    (a loop such as "the the the" or "dog, dog, dog") always does: the repetition is a cheap,
    checkable sign of degeneration. Names that legitimately repeat a word are rare and make
    the statistic an upper bound.
    """
    words = normalise(answer).split()
    return len(words) != len(set(words))


def repetition_share(
    df: pd.DataFrame, tasks: Sequence[str] = ("head", "tail", "relation")
) -> float:
    """Share of the generated answers of ``tasks`` that repeat a word (see
    :func:`has_repeated_word`); classification answers, a fixed yes/no sentence, are left out
    by default."""
    answers = df.loc[df["task"].isin(tasks), "answer"]
    if answers.empty:
        raise ValueError(f"repetition_share: no answers of the tasks {list(tasks)}")
    return float(answers.map(has_repeated_word).mean())


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
