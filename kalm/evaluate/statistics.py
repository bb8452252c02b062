"""Statistics of KGQA outcomes: accuracy with its Wilson interval, the chance level and mean
reciprocal rank of multiple-choice questions, and McNemar's exact test for two models answering
the same questions.

Question counts are small (hundreds per task) and accuracies sit near 0 or near chance, so
every statistic here is exact or well behaved there: Wilson rather than the normal interval,
the exact binomial McNemar test rather than its chi-squared approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["accuracy_with_ci", "chance_level", "mcnemar_exact", "mean_reciprocal_rank"]


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


def chance_level(candidate_counts: Sequence[int] | np.ndarray) -> float:
    """Expected accuracy of picking one of each question's candidates uniformly at random:
    the mean of ``1 / k`` over the questions' candidate counts ``k``."""
    k = np.asarray(candidate_counts, dtype=np.float64)
    if k.size == 0 or (k < 1).any():
        raise ValueError(f"chance_level: need candidate counts >= 1, got {k.tolist()[:10]}")
    return float((1 / k).mean())


def mean_reciprocal_rank(ranks: Sequence[float] | np.ndarray) -> float:
    """Mean of ``1 / rank`` of the gold among each question's candidates (rank 1 = best)."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0 or (r < 1).any():
        raise ValueError(f"mean_reciprocal_rank: need ranks >= 1, got {r.tolist()[:10]}")
    return float((1 / r).mean())


def mcnemar_exact(first: Sequence[bool] | np.ndarray, second: Sequence[bool] | np.ndarray) -> float:
    """Two-sided exact McNemar p-value of two models' paired outcomes (True = right) on the
    same questions.

    Only the discordant questions count: ``b`` right for the first model alone, ``c`` for the
    second alone. Under the null hypothesis of equal accuracy each discordant question is a
    fair coin, so the p-value is ``min(1, 2 P(X <= min(b, c)))`` for ``X ~ Binomial(b + c,
    1/2)``; with no discordant question it is 1. Exact, because at these accuracies ``b + c``
    is often a handful, where the chi-squared approximation is poor.
    """
    a, b_ = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1:
        raise ValueError(
            f"mcnemar_exact: need two equally long 1-D outcome arrays, got {a.shape} and "
            f"{b_.shape}; pair the outcomes question by question"
        )
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
