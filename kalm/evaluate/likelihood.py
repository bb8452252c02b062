"""Multiple-choice KGQA by likelihood: the model ranks given candidate answers.

Free generation puts a 135M-parameter model at the floor (2–3 % of the questions right), where
two models cannot be told apart. Scoring candidates keeps the prompt of every question
(:mod:`kalm.evaluate.questions`) and asks instead which of a fixed list of answers
(:mod:`kalm.evaluate.candidates`: the gold and nine plausible distractors, all relation
texts up to ten, or the two verdicts) the model finds most likely after the prompt. Every
question has a known chance level, and a model that knows a little scores above it.

A candidate's log-likelihood is the sum of the log-probabilities of its tokens after the
prompt. Tokens are those of the candidate text on its own, appended to the prompt's, exactly
as the triple-completion objective appends an answer to its prompt
(:meth:`kalm.views.ViewBuilder.completion_ids`); the prompt starts as the tokenizer starts a
text (:func:`~kalm.views.prompt_ids`). No end-of-answer token is scored: the few-shot answers
end with a newline and the training answers with EOS, so either would favour one model's
convention.

The score that ranks the candidates (``reduction``):

- ``"mean"`` (the default): the log-likelihood per token. Candidates differ in length (an
  entity name takes one to a dozen tokens) and every token costs log-probability, so the sum
  prefers short candidates whatever they mean; the mean removes most of that length bias (as
  the GPT-3 paper's multiple-choice evaluation does);
- ``"sum"``: the log-likelihood of the whole candidate, the probability that the model gives
  exactly this answer. It is the right score when candidates are about equally long, and it
  prefers a candidate that is a token prefix of another.

Both come from one pass (the rows keep the sums and the token counts), so :func:`choose` can
compare them on validation questions before the test ones are read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import RunConfig
from kalm.data import KnowledgeGraph
from kalm.evaluate.candidates import CANDIDATES, question_candidates
from kalm.evaluate.kgc import rank
from kalm.evaluate.questions import NO, TASKS, YES, build_questions
from kalm.evaluate.statistics import (
    accuracy_with_ci,
    chance_level,
    mcnemar_exact,
    mean_reciprocal_rank,
)
from kalm.models import cache_argument, decoder_of, mixed_precision
from kalm.views import pad_batch, prompt_ids

__all__ = [
    "REDUCTIONS",
    "CandidateLikelihoods",
    "Reduction",
    "candidate_log_likelihoods",
    "choose",
    "classification_pairs",
    "compare_choices",
    "disagreements",
    "run_choices",
    "summarise_choices",
]

Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum")


@dataclass(frozen=True)
class CandidateLikelihoods:
    """The candidates of one question: summed log-likelihood (nats) and token count each."""

    log_likelihood: np.ndarray
    tokens: np.ndarray

    def scores(self, reduction: Reduction) -> np.ndarray:
        """The ranking score of each candidate (see the module docstring)."""
        return _reduce(self.log_likelihood, self.tokens, reduction)


def _reduce(total: np.ndarray, tokens: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "mean":
        return np.asarray(total, dtype=np.float64) / np.asarray(tokens, dtype=np.float64)
    if reduction == "sum":
        return np.asarray(total, dtype=np.float64)
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


def _question_likelihoods(
    body: nn.Module,
    head: nn.Module,
    cache_name: str,
    prompt: list[int],
    answers: list[list[int]],
    device: torch.device,
) -> CandidateLikelihoods:
    """One question: the prompt runs once; its keys and values, repeated for each candidate,
    are the attention cache of the candidates, which run as one right-padded batch (right
    padding leaves every real token's positions and context as in the unpadded sequence)."""
    k = len(answers)
    out = body(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache = getattr(out, cache_name)
    cache.batch_repeat_interleave(k)
    # Pads follow every real token, so causal attention never shows one to a real token and
    # their outputs are dropped: the pad id does not matter.
    batch = pad_batch(answers, 0)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    full_mask = torch.cat([mask.new_ones(k, len(prompt)), mask], dim=1)
    hidden = body(input_ids=ids, attention_mask=full_mask, **{cache_name: cache}).last_hidden_state
    # The state that predicts answer token j: the prompt's last for j = 0, answer token j - 1's
    # after that. The LM head runs only there, in fp32 for the softmax.
    before = torch.cat([out.last_hidden_state[:, -1:].expand(k, -1, -1), hidden[:, :-1]], dim=1)
    real = mask.bool()
    logp = torch.log_softmax(head(before[real]).float(), dim=-1)
    token_ll = logp.gather(1, ids[real].unsqueeze(1)).squeeze(1).double()
    rows = torch.arange(k, device=device).unsqueeze(1).expand_as(mask)[real]
    total = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, rows, token_ll)
    return CandidateLikelihoods(total.cpu().numpy(), mask.sum(1).cpu().numpy())


def candidate_log_likelihoods(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    *,
    progress: bool = False,
) -> list[CandidateLikelihoods]:
    """Log-likelihood of each candidate's tokens after its question's prompt, for any causal
    LM (plain or peft) and its tokenizer, in the model's precision.

    Per question the prompt is encoded once and the candidates run as one padded batch on its
    cached keys and values; the result equals scoring every prompt + candidate sequence on its
    own. The tokenizer's padding side is not used.
    """
    if len(prompts) != len(candidates):
        raise ValueError(
            f"candidate_log_likelihoods: {len(prompts)} prompts but {len(candidates)} "
            "candidate lists; give one list per prompt"
        )
    prompt_rows = prompt_ids(tokenizer, prompts)
    device = next(model.parameters()).device
    body, head = decoder_of(model), model.get_output_embeddings()
    cache_name = cache_argument(body)
    out: list[CandidateLikelihoods] = []
    was_training = model.training
    model.eval()
    with (
        torch.inference_mode(),
        mixed_precision(model),
        tqdm(total=len(prompts), desc="scoring", disable=not progress, unit="q") as bar,
    ):
        for i, (prompt, options) in enumerate(zip(prompt_rows, candidates, strict=True)):
            answers = tokenizer(list(options), add_special_tokens=False)["input_ids"]
            empty = [repr(c) for c, a in zip(options, answers, strict=True) if not a]
            if not prompt or not answers or empty:
                raise ValueError(
                    f"candidate_log_likelihoods: question {i} needs a non-empty prompt and "
                    f"candidates of at least one token each; empty: {empty or 'prompt or list'}"
                )
            out.append(_question_likelihoods(body, head, cache_name, prompt, answers, device))
            bar.update(1)
    model.train(was_training)
    return out


def choose(df: pd.DataFrame, reduction: Reduction = "mean") -> pd.DataFrame:
    """``df`` (rows of :func:`run_choices`) ranked under ``reduction``: columns ``reduction``,
    ``choice`` (the best-scoring candidate, the first on ties), ``rank`` of the gold and
    ``correct`` (rank 1: the gold scores above every distractor).

    Ranks are :func:`~kalm.evaluate.kgc.rank`'s realistic ones (ties share the mean rank), so
    a tie with a distractor is never a right answer.
    """
    out = df.copy()
    scores = [
        _reduce(np.asarray(ll), np.asarray(n), reduction)
        for ll, n in zip(df["log_likelihood"], df["tokens"], strict=True)
    ]
    ranks = np.empty(len(scores))
    for count in {len(s) for s in scores}:  # one rank call per candidate count
        rows = [i for i, s in enumerate(scores) if len(s) == count]
        stacked = torch.from_numpy(np.stack([scores[i] for i in rows]))
        gold = torch.zeros(len(rows), dtype=torch.long)  # the gold is every list's first
        ranks[rows] = rank(stacked, gold).realistic.numpy()
    out["reduction"] = reduction
    out["choice"] = [c[int(np.argmax(s))] for c, s in zip(df["candidates"], scores, strict=True)]
    out["rank"] = ranks
    out["correct"] = ranks == 1
    return out


def run_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    kg: KnowledgeGraph,
    cfg: RunConfig,
    *,
    tasks: Sequence[str] = TASKS,
    split: str = "test",
    reduction: Reduction = "mean",
    k: int = CANDIDATES,
    progress: bool = True,
) -> pd.DataFrame:
    """Score the candidates of every question of :func:`build_questions` (sizes and seed from
    ``cfg``, the same questions as generation asks) and rank them under ``reduction``.

    One row per question: task, prompt, gold, candidates (gold first), log_likelihood and
    tokens per candidate, the triple asked (head, relation, tail, true), then the columns of
    :func:`choose`. ``df.attrs["seconds"]`` is the scoring time.
    """
    questions = build_questions(
        kg,
        n=cfg.eval.kgqa_questions,
        shots=cfg.eval.kgqa_shots,
        seed=cfg.seed,
        tasks=tasks,
        split=split,
    )
    options = question_candidates(kg, questions, seed=cfg.seed, k=k)
    started = time.perf_counter()
    scored = candidate_log_likelihoods(
        model, tokenizer, [q.prompt for q in questions], options, progress=progress
    )
    seconds = time.perf_counter() - started
    rows = [
        {
            "task": q.task,
            "prompt": q.prompt,
            "gold": q.gold,
            "candidates": list(c),
            "log_likelihood": s.log_likelihood.tolist(),
            "tokens": s.tokens.tolist(),
            **q.meta,
        }
        for q, c, s in zip(questions, options, scored, strict=True)
    ]
    df = choose(pd.DataFrame(rows), reduction)
    df.attrs["seconds"] = seconds
    return df


def _tasks(df: pd.DataFrame) -> list[str]:
    return [t for t in TASKS if t in set(df["task"])]


def summarise_choices(df: pd.DataFrame) -> pd.DataFrame:
    """Per task: questions, candidates per question (mean), chance level, accuracy with its
    Wilson 95 % interval, and the mean reciprocal rank of the gold."""
    rows = []
    for task in _tasks(df):
        part = df[df["task"] == task]
        counts = part["candidates"].map(len).to_numpy()
        acc, lo, hi = accuracy_with_ci(part["correct"].to_numpy())
        rows.append(
            {
                "task": task,
                "n": len(part),
                "candidates": float(counts.mean()),
                "chance": chance_level(counts),
                "accuracy": acc,
                "accuracy_lo": lo,
                "accuracy_hi": hi,
                "mrr": mean_reciprocal_rank(part["rank"].to_numpy()),
            }
        )
    return pd.DataFrame(rows).set_index("task")


def classification_pairs(df: pd.DataFrame, reduction: Reduction = "mean") -> pd.DataFrame:
    """Triple classification read pair by pair, free of a constant verdict.

    A small model's likelihoods often prefer one verdict for every triple (the untuned
    SmolLM2-135M chose "No" for all 16 questions of a WN18RR validation sample), which puts
    plain accuracy at the majority share whatever the model knows. Each true triple is asked
    next to its corruption with the same shots
    (:func:`~kalm.evaluate.questions.build_questions`), so the pair answers a cleaner
    question: is the margin score(YES) - score(NO) larger for the true triple? Chance is 1/2,
    and a bias shared by both questions cancels.

    One row per pair: the true triple (head, relation, tail), both margins and ``correct``
    (the true triple's margin is strictly larger). ``df`` holds the classification rows of
    :func:`run_choices` in question order (true, then corrupted).
    """
    part = df[df["task"] == "classification"]
    truth = part["true"].to_numpy(dtype=bool)
    if len(part) % 2 or not (truth[::2].all() and not truth[1::2].any()):
        raise ValueError(
            f"classification_pairs: expected the {len(part)} classification rows of "
            "run_choices in question order (a true triple, then its corruption); do not "
            "filter or reorder them"
        )
    margins = []
    columns = (part["candidates"], part["log_likelihood"], part["tokens"])
    for options, ll, n in zip(*columns, strict=True):
        scores = dict(zip(options, _reduce(np.asarray(ll), np.asarray(n), reduction), strict=True))
        margins.append(scores[YES] - scores[NO])
    true_margin, false_margin = np.asarray(margins[::2]), np.asarray(margins[1::2])
    pairs = part.iloc[::2][["head", "relation", "tail"]].reset_index(drop=True)
    return pairs.assign(
        margin_true=true_margin, margin_false=false_margin, correct=true_margin > false_margin
    )


def _paired(first: pd.DataFrame, second: pd.DataFrame) -> None:
    """Raise unless the two tables ask the same questions with the same candidates, in order."""
    keys = ["task", "prompt", "candidates"]
    same = len(first) == len(second) and all(
        first[key].tolist() == second[key].tolist() for key in keys
    )
    if not same:
        raise ValueError(
            "the two answer tables do not hold the same questions and candidates in the same "
            f"order ({len(first)} and {len(second)} rows); score both models with the same "
            "cfg (questions, shots, seed) and split"
        )


def compare_choices(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Per task, two models on the same questions: both accuracies, the discordant counts
    (``only_first``: right for the first model alone; ``only_second``) and McNemar's exact
    p-value (:func:`~kalm.evaluate.statistics.mcnemar_exact`)."""
    _paired(first, second)
    rows = []
    for task in _tasks(first):
        a = first.loc[first["task"] == task, "correct"].to_numpy(dtype=bool)
        b = second.loc[second["task"] == task, "correct"].to_numpy(dtype=bool)
        rows.append(
            {
                "task": task,
                "n": len(a),
                "first": float(a.mean()),
                "second": float(b.mean()),
                "only_first": int((a & ~b).sum()),
                "only_second": int((~a & b).sum()),
                "p_value": mcnemar_exact(a, b),
            }
        )
    return pd.DataFrame(rows).set_index("task")


def disagreements(
    first: pd.DataFrame,
    second: pd.DataFrame,
    *,
    names: tuple[str, str] = ("first", "second"),
    per_task: int = 1,
) -> pd.DataFrame:
    """Case studies by rule, for any dataset: per task, the first ``per_task`` questions (in
    question order) that exactly one of the two models gets right, McNemar's discordant pairs.

    Columns: task, gold, the triple asked (head, relation, tail, true), and each model's
    choice and correctness (``<name>_choice``, ``<name>_correct``).
    """
    _paired(first, second)
    differ = first["correct"].to_numpy(dtype=bool) != second["correct"].to_numpy(dtype=bool)
    picked = first[differ].groupby("task", sort=False).head(per_task).index
    meta = ["task", "gold", "head", "relation", "tail", "true"]
    out: dict[str, Any] = {c: first.loc[picked, c].to_numpy() for c in meta}
    for name, df in zip(names, (first, second), strict=True):
        out[f"{name}_choice"] = df.loc[picked, "choice"].to_numpy()
        out[f"{name}_correct"] = df.loc[picked, "correct"].to_numpy()
    return pd.DataFrame(out)
