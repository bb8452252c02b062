"""The scoring rule of generated KGQA answers, and readings of the answers themselves.

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

import re
from collections.abc import Sequence

import pandas as pd

__all__ = [
    "first_word_shares",
    "has_repeated_word",
    "majority_baseline",
    "normalise",
    "repetition_share",
    "score",
]


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
