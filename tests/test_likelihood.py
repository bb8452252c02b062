"""Multiple-choice KGQA: candidates, batched likelihood scoring, ranking and paired statistics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_llama, toy_kg
from peft import LoraConfig, get_peft_model
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import resolve
from kalm.evaluate import candidates as cand
from kalm.evaluate import likelihood, questions, statistics
from kalm.evaluate.scoring import normalise
from kalm.models import load_tokenizer

PROMPT = questions.build_questions(
    toy_kg(train=[(0, 0, 1), (1, 0, 2)], test=[(2, 0, 3)]), n=0, shots=1, seed=0
)[1].prompt
OPTIONS = ("cat", "white goods", "salviniaceae of the north", "a", "Yes, this is true")


@pytest.fixture(scope="module")
def llama_tokenizer(llama_dir: Path) -> PreTrainedTokenizerBase:
    """A Llama-style tokenizer (BOS before every text)."""
    return load_tokenizer(llama_dir)


@pytest.fixture(params=["smollm2", "llama-style"])
def any_tokenizer(request, tokenizer, llama_tokenizer) -> PreTrainedTokenizerBase:
    return tokenizer if request.param == "smollm2" else llama_tokenizer


def model_for(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> torch.nn.Module:
    return tiny_llama(len(tokenizer), seed=seed, initializer_range=0.5)


def reference(model, tokenizer, prompt: str, candidate: str) -> float:
    """One prompt + candidate sequence at a time, no cache, no padding: the prompt tokenised
    with the tokenizer's defaults (BOS first for Llama), the candidate on its own."""
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(candidate, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + a])).logits[0].float()
    logp = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1)
    return float(logp[torch.arange(len(a)), torch.tensor(a)].sum())


# ---------------------------------------------------------------- scoring


def test_batched_scores_equal_the_one_at_a_time_reference(any_tokenizer) -> None:
    model = model_for(any_tokenizer)
    prompts = [PROMPT, "walk"]
    (first, second) = likelihood.candidate_log_likelihoods(
        model, any_tokenizer, prompts, [OPTIONS, OPTIONS[:2]]
    )
    for prompt, got, options in ((PROMPT, first, OPTIONS), ("walk", second, OPTIONS[:2])):
        expected = [reference(model, any_tokenizer, prompt, c) for c in options]
        np.testing.assert_allclose(got.log_likelihood, expected, rtol=1e-4, atol=1e-4)
        counts = [len(any_tokenizer(c, add_special_tokens=False)["input_ids"]) for c in options]
        assert got.tokens.tolist() == counts
    assert len(set(first.tokens.tolist())) > 1  # the batch really was padded


def test_padding_side_and_batch_composition_do_not_change_scores(tokenizer) -> None:
    model = model_for(tokenizer, seed=1)
    (right,) = likelihood.candidate_log_likelihoods(model, tokenizer, [PROMPT], [OPTIONS])
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left" if side == "right" else "right"
        (flipped,) = likelihood.candidate_log_likelihoods(model, tokenizer, [PROMPT], [OPTIONS])
    finally:
        tokenizer.padding_side = side
    np.testing.assert_allclose(flipped.log_likelihood, right.log_likelihood, rtol=1e-5)
    alone = [
        likelihood.candidate_log_likelihoods(model, tokenizer, [PROMPT], [(c,)])[0] for c in OPTIONS
    ]
    np.testing.assert_allclose(
        [a.log_likelihood[0] for a in alone], right.log_likelihood, rtol=1e-4, atol=1e-4
    )


def test_scores_through_peft_equal_the_plain_model(tokenizer) -> None:
    model = model_for(tokenizer, seed=2)
    (plain,) = likelihood.candidate_log_likelihoods(model, tokenizer, [PROMPT], [OPTIONS])
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    (tuned,) = likelihood.candidate_log_likelihoods(lora, tokenizer, [PROMPT], [OPTIONS])
    np.testing.assert_allclose(tuned.log_likelihood, plain.log_likelihood, rtol=1e-5)  # B = 0


def test_empty_candidates_and_mismatched_lists_are_refused(tokenizer) -> None:
    model = model_for(tokenizer)
    with pytest.raises(ValueError, match=r"question 0 .*''"):
        likelihood.candidate_log_likelihoods(model, tokenizer, [PROMPT], [("cat", "")])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        likelihood.candidate_log_likelihoods(model, tokenizer, [PROMPT, PROMPT], [("cat",)])


def test_reductions() -> None:
    scored = likelihood.CandidateLikelihoods(np.array([-4.0, -3.0]), np.array([4, 1]))
    assert scored.scores("sum").tolist() == [-4.0, -3.0]
    assert scored.scores("mean").tolist() == [-1.0, -3.0]
    with pytest.raises(ValueError, match="valid: mean, sum"):
        scored.scores("max")  # type: ignore[arg-type]


def _rows(log_likelihoods: list[list[float]], tokens: list[list[int]], tasks: list[str]):
    return pd.DataFrame(
        {
            "task": tasks,
            "prompt": [f"q{i}" for i in range(len(tasks))],
            "gold": ["g"] * len(tasks),
            "candidates": [["g", *(f"d{j}" for j in range(len(x) - 1))] for x in log_likelihoods],
            "log_likelihood": log_likelihoods,
            "tokens": tokens,
            "head": 0,
            "relation": 0,
            "tail": 1,
            "true": True,
        }
    )


def test_choose_ranks_the_gold_under_either_reduction() -> None:
    df = _rows(
        [[-4.0, -3.0, -9.0], [-2.0, -2.0], [-1.0, -5.0, -6.0]],
        [[4, 1, 3], [1, 1], [1, 1, 1]],
        ["tail", "classification", "tail"],
    )
    by_sum = likelihood.choose(df, "sum")
    assert by_sum["rank"].tolist() == [2.0, 1.5, 1.0]  # a tie shares the mean rank
    assert by_sum["correct"].tolist() == [False, False, True]
    assert by_sum["choice"].tolist() == ["d0", "g", "g"]
    by_mean = likelihood.choose(df, "mean")
    assert by_mean["rank"].tolist() == [1.0, 1.5, 1.0]
    assert by_mean["correct"].tolist() == [True, False, True]
    assert set(by_mean["reduction"]) == {"mean"}
    summary = likelihood.summarise_choices(by_mean)
    assert list(summary.index) == ["tail", "classification"]
    assert summary.loc["tail", "chance"] == pytest.approx(1 / 3)
    assert summary.loc["classification", "chance"] == 0.5
    assert summary.loc["tail", "accuracy"] == 1.0
    assert summary.loc["classification", "mrr"] == pytest.approx(1 / 1.5)
    assert summary.loc["tail", "accuracy_lo"] < 1.0 == summary.loc["tail", "accuracy_hi"]


def test_classification_pairs_compare_the_margins_of_a_pair() -> None:
    yes_no, no_yes = [questions.YES, questions.NO], [questions.NO, questions.YES]
    df = pd.DataFrame(
        {
            "task": ["tail"] + ["classification"] * 4,
            "candidates": [["g", "d"], yes_no, no_yes, yes_no, no_yes],
            # mean margins: -1.0 vs -1.5 (right, though "No" always wins), then 0 vs 0;
            # summed margins: -7 vs -11.5, then 1 vs -2
            "log_likelihood": [[-1.0, -2.0], [-8.0, -1.0], [-0.5, -12.0], [-1.0, -2.0], [-3, -5]],
            "tokens": [[1, 1], [4, 1], [1, 6], [2, 4], [3, 5]],
            "true": [True, True, False, True, False],
            "head": [9, 0, 0, 2, 7],
            "relation": [0, 0, 0, 1, 1],
            "tail": [9, 1, 5, 3, 3],
        }
    )
    pairs = likelihood.classification_pairs(df)
    assert pairs[["head", "relation", "tail"]].values.tolist() == [[0, 0, 1], [2, 1, 3]]
    np.testing.assert_allclose(pairs["margin_true"], [-1.0, 0.0])
    np.testing.assert_allclose(pairs["margin_false"], [-1.5, 0.0])
    assert pairs["correct"].tolist() == [True, False]  # a tie is not right
    assert likelihood.classification_pairs(df, "sum")["correct"].tolist() == [True, True]
    with pytest.raises(ValueError, match="do not filter or reorder"):
        likelihood.classification_pairs(df.iloc[[0, 2, 1, 3, 4]])


def test_compare_and_disagreements_pair_the_questions() -> None:
    tasks = ["tail"] * 4 + ["relation"] * 2
    first = likelihood.choose(_rows([[-1.0, -2.0]] * 6, [[1, 1]] * 6, tasks))
    second = first.copy()
    second["correct"] = [False, True, False, True, True, False]
    second["choice"] = ["d0", "g", "d0", "g", "g", "d0"]
    table = likelihood.compare_choices(first, second)
    assert table.loc["tail", ["only_first", "only_second"]].tolist() == [2, 0]
    assert table.loc["tail", "p_value"] == pytest.approx(0.5)
    assert table.loc["relation", "p_value"] == 1.0
    cases = likelihood.disagreements(first, second, names=("base", "kalm"), per_task=1)
    assert cases["task"].tolist() == ["tail", "relation"]
    assert cases["kalm_choice"].tolist() == ["d0", "d0"]
    assert cases["base_correct"].all() and not cases["kalm_correct"].any()
    with pytest.raises(ValueError, match="same questions"):
        likelihood.compare_choices(first, second.iloc[1:])


def test_run_choices_scores_the_generation_questions(tokenizer) -> None:
    kg = toy_kg(
        train=[(0, 0, 1), (1, 0, 2), (2, 1, 3), (3, 0, 4), (5, 0, 6)],
        test=[(0, 0, 2), (4, 1, 5)],
    )
    cfg = resolve("smollm2", "wn18rr", profile="smoke", kgqa_questions=0, kgqa_shots=1)
    df = likelihood.run_choices(model_for(tokenizer), tokenizer, kg, cfg, k=4, progress=False)
    asked = questions.build_questions(kg, n=0, shots=1, seed=cfg.seed)
    assert df["prompt"].tolist() == [q.prompt for q in asked]
    assert (df["gold"] == df["candidates"].str[0]).all()
    assert df.groupby("task")["candidates"].agg(lambda c: max(map(len, c))).to_dict() == {
        "classification": 2,
        "head": 4,
        "relation": 2,  # all the graph's relations
        "tail": 4,
    }
    assert df.attrs["seconds"] >= 0
    again = likelihood.choose(df, "sum")
    assert again["log_likelihood"].tolist() == df["log_likelihood"].tolist()


# ---------------------------------------------------------------- candidates


def test_entity_distractors_are_plausible_unknown_and_deterministic(kg) -> None:
    asked = [
        q
        for q in questions.build_questions(kg, n=40, shots=0, seed=4)
        if q.task in ("head", "tail")
    ]
    options = cand.question_candidates(kg, asked, seed=4)
    assert options == cand.question_candidates(kg, asked[::-1], seed=4)[::-1]
    assert options != cand.question_candidates(kg, asked, seed=5)
    known = kg.known_answers()
    names = [normalise(n) for n in kg.entity_names]
    for q, c in zip(asked, options, strict=True):
        h, r, t = q.meta["head"], q.meta["relation"], q.meta["tail"]
        answers, column = (
            (known.get(h, r), 2) if q.task == "tail" else (known.get(t, r + kg.num_relations), 0)
        )
        right = {names[e] for e in answers}
        assert c[0] == q.gold and len(c) == cand.CANDIDATES
        assert len({normalise(x) for x in c}) == len(c)
        assert not {normalise(x) for x in c[1:]} & right
        seen = {kg.entity_names[e] for e in kg.train[kg.train[:, 1] == r][:, column]}
        if len(seen) > 10 * cand.CANDIDATES:
            assert set(c[1:]) <= seen


def test_small_pools_are_topped_up_with_unknown_entities() -> None:
    kg = toy_kg(train=[(0, 0, 1), (2, 0, 1)], valid=[(0, 0, 3)], test=[(0, 0, 2)])
    (q,) = [q for q in questions.build_questions(kg, n=0, shots=0, seed=0) if q.task == "tail"]
    (c,) = cand.question_candidates(kg, [q], seed=0, k=6)
    assert c[0] == "wolf" and len(c) == 6
    assert not {"cat", "lion"} & set(c)  # known tails of (dog, eats) in train and valid
    assert c[1] == "cat" or "cat" not in c  # the plausible pool (tails of eats) comes first


def test_distractors_never_share_a_name_with_a_known_answer() -> None:
    """WordNet has many synsets of one name: another entity named like a known answer is a
    right answer by its text, so it is no distractor."""
    base = toy_kg(train=[(0, 0, 1), (2, 0, 4), (3, 0, 5)], test=[(0, 0, 2)])
    kg = replace(base, entity_names=("dog", "cat", "wolf", "lion", "horse", "Cat!", "x", "y"))
    (q,) = questions.build_questions(kg, n=0, shots=0, seed=0, tasks=("tail",))
    for seed in range(5):
        (c,) = cand.question_candidates(kg, [q], seed=seed, k=7)
        assert len(c) == 6 and "Cat!" not in c and "cat" not in c


def test_relation_candidates_hold_the_gold_and_no_other_true_relation(kg) -> None:
    asked = questions.build_questions(kg, n=30, shots=0, seed=1, tasks=("relation",))
    known = kg.known_answers()
    for q, c in zip(asked, cand.question_candidates(kg, asked, seed=1), strict=True):
        assert c[0] == q.gold and q.gold in c
        assert len(c) == min(cand.CANDIDATES, kg.num_relations) and len(set(c)) == len(c)
        h, t = q.meta["head"], q.meta["tail"]
        holding = {kg.relation_texts[r] for r in range(kg.num_relations) if known.contains(h, r, t)}
        assert holding & set(c) == {q.gold}
    small = toy_kg(train=[(0, 0, 1), (0, 1, 1)], test=[(0, 0, 1), (2, 1, 3)])
    asked = questions.build_questions(small, n=0, shots=0, seed=0, tasks=("relation",))
    options = cand.question_candidates(small, asked, seed=0)
    assert options == [("eats",), ("resembles", "eats")]  # (dog, cat) also resembles: excluded


def test_classification_candidates_are_the_two_verdicts(kg) -> None:
    asked = [
        q for q in questions.build_questions(kg, n=4, shots=0, seed=0) if q.task == "classification"
    ]
    for q, c in zip(asked, cand.question_candidates(kg, asked, seed=0), strict=True):
        assert c[0] == q.gold and set(c) == {questions.YES, questions.NO}
    with pytest.raises(ValueError, match="k >= 2"):
        cand.question_candidates(kg, asked, seed=0, k=1)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("only_first", "only_second", "p"),
    [
        (0, 5, 0.0625),  # 2 / 2**5
        (5, 0, 0.0625),
        (1, 9, 0.021484375),  # 2 (1 + 10) / 2**10
        (2, 8, 0.109375),  # 2 (1 + 10 + 45) / 2**10
        (3, 3, 1.0),
        (7, 7, 1.0),
        (0, 0, 1.0),
    ],
)
def test_mcnemar_exact_by_hand(only_first: int, only_second: int, p: float) -> None:
    both, neither = [True] * 4, [False] * 3
    first = both + neither + [True] * only_first + [False] * only_second
    second = both + neither + [False] * only_first + [True] * only_second
    assert statistics.mcnemar_exact(first, second) == pytest.approx(p, abs=1e-12)


def test_mcnemar_needs_paired_outcomes() -> None:
    with pytest.raises(ValueError, match="pair the outcomes"):
        statistics.mcnemar_exact([True, False], [True])


def test_chance_level_and_mean_reciprocal_rank() -> None:
    assert statistics.chance_level([2, 10, 10]) == pytest.approx((0.5 + 0.1 + 0.1) / 3)
    assert statistics.mean_reciprocal_rank([1, 2, 4]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    with pytest.raises(ValueError):
        statistics.chance_level([])
    with pytest.raises(ValueError):
        statistics.mean_reciprocal_rank([0.5])
