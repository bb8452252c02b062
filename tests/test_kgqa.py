"""KGQA: question building, scoring rule, Wilson interval and batched greedy generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import smollm2_tokenizer, tiny_llama, toy_kg
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from kalm.config import resolve
from kalm.data import sample_triples
from kalm.evaluate import kgqa
from kalm.prompts import INSTRUCTION
from kalm.views import ViewBuilder

NEWLINE = "\n"


def tiny_model(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(vocab, seed=seed, tie_word_embeddings=False, initializer_range=0.5)


# ---------------------------------------------------------------- questions


def test_zero_shot_tail_question_is_the_training_prompt() -> None:
    """Without shots, a tail-prediction question is exactly the triple-completion prompt of
    training (entities without descriptions, so names and entity texts agree)."""
    kg = toy_kg(test=[(0, 0, 1), (6, 1, 4)])
    views = ViewBuilder(kg, smollm2_tokenizer(), max_entity_tokens=16)
    tails = [q for q in kgqa.build_questions(kg, n=0, shots=0, seed=0) if q.task == "tail"]
    assert len(tails) == 2
    for q in tails:
        assert q.prompt == views.prompt_text(q.meta["head"], q.meta["relation"])


def test_questions_are_deterministic_and_sized(kg) -> None:
    a = kgqa.build_questions(kg, n=6, shots=3, seed=1)
    b = kgqa.build_questions(kg, n=6, shots=3, seed=1)
    c = kgqa.build_questions(kg, n=6, shots=3, seed=2)
    assert a == b
    assert [q.prompt for q in a] != [q.prompt for q in c]
    counts = {t: sum(q.task == t for q in a) for t in kgqa.TASKS}
    assert counts == dict.fromkeys(kgqa.TASKS, 6)


def test_prompt_format_and_gold(kg) -> None:
    questions = kgqa.build_questions(kg, n=3, shots=2, seed=0)
    test = {tuple(row) for row in kg.test.tolist()}
    for q in questions:
        h, r, t = q.meta["head"], q.meta["relation"], q.meta["tail"]
        assert q.prompt.count("### Instruction:") == 1
        assert q.prompt.count("### Input:") == 3  # two shots + the question
        assert q.prompt.endswith("### Response:\n")
        if q.meta["true"]:
            assert (h, r, t) in test
        if q.task == "tail":
            assert f"### Instruction:\n{INSTRUCTION}\n\n" in q.prompt
            assert q.prompt.endswith(
                f"{kg.entity_names[h]}, {kg.relation_texts[r]}\n\n### Response:\n"
            )
            assert q.gold == kg.entity_names[t]
        if q.task == "head":
            assert q.gold == kg.entity_names[h]
            assert kg.inverse_relation_texts[r] in q.prompt.rsplit("### Input:", 1)[1]
        if q.task == "relation":
            assert q.gold == kg.relation_texts[r]
            assert all(text in q.prompt for text in kg.relation_texts)
    # shots come from training triples: the solved tail examples are training facts (by name)
    name = kg.entity_names
    train_facts = {(name[h], kg.relation_texts[r], name[t]) for h, r, t in kg.train.tolist()}
    for block in questions[3].prompt.split("### Input:\n")[1:-1]:
        head_rel, answer = block.split("\n\n### Response:\n")
        head, rel = head_rel.rsplit(", ", 1)
        assert (head, rel, answer.strip()) in train_facts


def test_classification_is_balanced_with_unknown_corruptions(kg) -> None:
    questions = [
        q for q in kgqa.build_questions(kg, n=20, shots=3, seed=3) if q.task == "classification"
    ]
    assert len(questions) == 20
    labels = [q.meta["true"] for q in questions]
    assert sum(labels) == 10
    known = {tuple(row) for split in (kg.train, kg.valid, kg.test) for row in split.tolist()}
    for true_q, false_q in zip(questions[::2], questions[1::2], strict=True):
        assert true_q.meta["true"] and not false_q.meta["true"]
        assert true_q.gold == kgqa.YES and false_q.gold == kgqa.NO
        good = (true_q.meta["head"], true_q.meta["relation"], true_q.meta["tail"])
        bad = (false_q.meta["head"], false_q.meta["relation"], false_q.meta["tail"])
        assert good in known and bad not in known
        assert bad[1] == good[1]
        assert (bad[0] == good[0]) != (bad[2] == good[2])  # exactly one side replaced
        shots = true_q.prompt.rsplit("### Input:", 1)[0]
        assert false_q.prompt.startswith(shots)  # a pair differs only in the asked triple


def test_case_study_triples_are_found(kg) -> None:
    for head, relation, tail in kgqa.CASE_STUDIES:
        h, r, t = kgqa.find_triple(kg, head, relation, tail)
        assert (kg.entity_names[h], kg.relation_texts[r], kg.entity_names[t]) == (
            head,
            relation,
            tail,
        )
    with pytest.raises(KeyError, match="not in wn18rr"):
        kgqa.find_triple(kg, "refrigerator", "has part", "salvinia")


def test_case_study_triples_are_figure_5_for_wn18rr(kg) -> None:
    expected = [kgqa.find_triple(kg, *names) for names in kgqa.CASE_STUDIES]
    assert kgqa.case_study_triples(kg, n=10, seed=0) == expected


def test_case_study_triples_by_rule_for_other_datasets() -> None:
    """Elsewhere (FB15k-237 had no case studies and raised KeyError): the first sampled test
    triples with distinct relations, as many as Figure 5 has, the same for every call."""
    kg = toy_kg(test=[(0, 0, 1), (2, 0, 3), (4, 1, 5), (6, 1, 7)])
    triples = kgqa.case_study_triples(kg, n=0, seed=0)
    assert triples == [(0, 0, 1), (4, 1, 5)]
    assert len(triples) == len(kgqa.CASE_STUDIES)
    sample = {tuple(row) for row in sample_triples(kg.test, 3, 5).tolist()}
    chosen = kgqa.case_study_triples(kg, n=3, seed=5)
    assert set(chosen) <= sample and chosen == kgqa.case_study_triples(kg, n=3, seed=5)
    one_relation = toy_kg(test=[(0, 0, 1), (2, 0, 3)])
    with pytest.raises(ValueError, match="fewer than 2 relations"):
        kgqa.case_study_triples(one_relation, n=0, seed=0)


def test_case_studies_run_on_any_dataset(tokenizer) -> None:
    kg = toy_kg(
        train=[(0, 0, 1), (1, 0, 2), (2, 1, 3), (3, 1, 4)],
        test=[(0, 0, 1), (4, 1, 5)],
    )
    cfg = resolve("smollm2", "wn18rr", profile="smoke", kgqa_shots=1, kgqa_max_new_tokens=2)
    df = kgqa.case_studies(tiny_model(len(tokenizer)), tokenizer, kg, cfg)
    assert len(df) == 4 * len(kgqa.CASE_STUDIES)  # the notebook's check
    assert list(df["task"]) == list(kgqa.TASKS) * 2
    assert df["triple"].iloc[0] == "(dog, eats, cat)"
    assert df["triple"].iloc[4] == "(horse, resembles, zebra)"


def test_paper_results_table() -> None:
    paper = kgqa.paper_results()
    assert len(paper) == 24
    row = paper[(paper.task == "tail") & (paper.model == "Llama-2-7B") & paper.kalm]
    assert row.accuracy.item() == pytest.approx(28.9)


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("task", "answer", "gold", "expected"),
    [
        ("tail", "White goods.", "white goods", (True, True)),
        ("tail", "  white-goods ", "white goods", (True, True)),
        ("tail", "white goods, appliances", "white goods", (False, True)),
        ("tail", "whitegoods", "white goods", (False, False)),
        ("tail", "goodsman", "goods", (False, False)),  # whole words only
        ("tail", "refrigerator\nwhite goods", "white goods", (False, False)),
        ("tail", "", "white goods", (False, False)),
        ("relation", "Member Meronym", "member meronym", (True, True)),
        ("classification", "Yes.", kgqa.YES, (True, True)),
        ("classification", "yes, this is true", kgqa.YES, (True, True)),
        ("classification", "No, this is not true", kgqa.YES, (False, False)),
        ("classification", "Not sure, yes", kgqa.YES, (False, False)),
        ("classification", "no", kgqa.NO, (True, True)),
        ("classification", "", kgqa.NO, (False, False)),
    ],
)
def test_scoring_rule(task: str, answer: str, gold: str, expected: tuple[bool, bool]) -> None:
    assert kgqa.score(task, answer, gold) == expected


def test_normalise() -> None:
    assert kgqa.normalise("  Jack-o'-Lantern,\tNY_city!! ") == "jack o lantern ny city"


def test_wilson_interval_by_hand() -> None:
    # 8 of 10: centre (0.8 + 1.96²/20) / (1 + 1.96²/10) = 0.716737,
    # half-width 1.96 * sqrt(0.016 + 1.96²/400) / 1.38416 = 0.226579
    acc, lo, hi = kgqa.accuracy_with_ci([True] * 8 + [False] * 2)
    assert acc == pytest.approx(0.8)
    assert lo == pytest.approx(0.490158, abs=1e-5)
    assert hi == pytest.approx(0.943316, abs=1e-5)
    acc, lo, hi = kgqa.accuracy_with_ci(np.zeros(5, dtype=bool))
    assert (acc, lo) == (0.0, 0.0) and hi == pytest.approx(3.8416 / 8.8416, abs=1e-6)
    with pytest.raises(ValueError):
        kgqa.accuracy_with_ci([])


def test_summarise_counts_and_intervals() -> None:
    import pandas as pd

    df = pd.DataFrame(
        {
            "task": ["tail"] * 4 + ["classification"] * 2,
            "exact": [True, False, False, False, True, True],
            "lenient": [True, True, False, False, True, True],
        }
    )
    table = kgqa.summarise(df)
    assert list(table.index) == ["tail", "classification"]
    assert table.loc["tail", "n"] == 4
    assert table.loc["tail", "exact"] == 0.25 and table.loc["tail", "lenient"] == 0.5
    assert (table["lenient_lo"] <= table["lenient"]).all()
    assert (table["lenient"] <= table["lenient_hi"]).all()


# ---------------------------------------------------------------- reading the answers


def _answers(rows: list[tuple[str, str, str]]):
    import pandas as pd

    return pd.DataFrame(rows, columns=["task", "gold", "answer"])


def test_majority_baseline_and_first_words() -> None:
    df = _answers(
        [
            ("classification", kgqa.YES, "No."),
            ("classification", kgqa.NO, "no, this is not true"),
            ("classification", kgqa.NO, "Yes"),
            ("tail", "dog", ""),
        ]
    )
    assert kgqa.majority_baseline(df) == pytest.approx(2 / 3)
    shares = kgqa.first_word_shares(df)
    assert shares.to_dict() == pytest.approx({"no": 2 / 3, "yes": 1 / 3})
    with pytest.raises(ValueError, match="relation"):
        kgqa.majority_baseline(df, "relation")


@pytest.mark.parametrize(
    ("answer", "repeated"),
    [
        ("white goods", False),
        ("the the the", True),
        ("Dog, dog.", True),
        ("", False),
        ("member meronym", False),
        ("fern fern-ally", True),
    ],
)
def test_has_repeated_word(answer: str, repeated: bool) -> None:
    assert kgqa.has_repeated_word(answer) is repeated


def test_repetition_share_leaves_classification_out() -> None:
    df = _answers(
        [
            ("tail", "dog", "dog dog dog"),
            ("head", "cat", "cat"),
            ("relation", "hypernym", "a a"),
            ("tail", "x", "y"),
            ("classification", kgqa.YES, "yes yes"),
        ]
    )
    assert kgqa.repetition_share(df) == pytest.approx(0.5)
    assert kgqa.repetition_share(df, tasks=("classification",)) == 1.0
    with pytest.raises(ValueError, match="no answers"):
        kgqa.repetition_share(df.iloc[:0])


def test_accuracy_table_and_paper_comparison() -> None:
    import pandas as pd

    df = pd.DataFrame(
        {
            "task": ["tail"] * 4 + ["classification"] * 2,
            "exact": [True, False, False, False, True, False],
            "lenient": [True, True, False, False, True, False],
        }
    )
    summary = kgqa.summarise(df)
    table = kgqa.accuracy_table({"ours": summary})
    assert list(table["task"]) == ["tail prediction", "triple classification"]
    assert table.loc[0, "lenient (%)"] == pytest.approx(50.0)
    lo, hi = (float(v) for v in table.loc[0, "95% interval (%)"].split("–"))
    assert lo < 50.0 < hi
    comparison = kgqa.paper_comparison({"ours": summary})
    assert list(comparison["source"]) == ["paper", "paper", "this run"]
    assert comparison.loc[1, "tail prediction"] == pytest.approx(28.9)
    assert comparison.loc[2, "tail prediction"] == pytest.approx(50.0)
    assert pd.isna(comparison.loc[2, "head prediction"])
    with pytest.raises(ValueError, match="no paper results"):
        kgqa.paper_comparison({"ours": summary}, paper_model="GPT-9")


# ---------------------------------------------------------------- generation


class CountingForward:
    """Counts forward passes of a model (one per generated token)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def _raw_greedy(model, tokenizer, prompt: str, steps: int) -> list[int]:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def test_generation_stops_at_newline(tokenizer) -> None:
    model = tiny_model(len(tokenizer))
    prompt = "### Input:\nrefrigerator, hypernym\n\n### Response:\n"
    raw = _raw_greedy(model, tokenizer, prompt, 8)
    # Make the newline token win wherever the 4th generated token would have won.
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    assert tokenizer.decode([newline]) == NEWLINE
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[newline] = 3 * head[raw[3]]
    raw = _raw_greedy(model, tokenizer, prompt, 8)
    stop = raw.index(newline)
    assert stop <= 3 and tokenizer.eos_token_id not in raw[:stop]
    counter = CountingForward(model)
    (text,) = kgqa.generate(model, tokenizer, [prompt], max_new_tokens=8, batch_size=16)
    assert text == tokenizer.decode(raw[:stop]).split(NEWLINE)[0]
    assert NEWLINE not in text
    assert counter.calls == stop + 1  # stopped right after the newline, not at 8 tokens


def test_generation_stops_at_eos(tokenizer) -> None:
    model = tiny_model(len(tokenizer), seed=1)
    prompt = "Is this true?"
    raw = _raw_greedy(model, tokenizer, prompt, 6)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = 3 * head[raw[2]]
    raw = _raw_greedy(model, tokenizer, prompt, 6)
    stop = raw.index(tokenizer.eos_token_id)
    (text,) = kgqa.generate(model, tokenizer, [prompt], max_new_tokens=6, batch_size=16)
    assert text == tokenizer.decode(raw[:stop]).split(NEWLINE)[0]


def test_generation_independent_of_padding_and_order(tokenizer) -> None:
    model = tiny_model(len(tokenizer), seed=2)
    prompts = [
        "salviniaceae, member meronym",
        "Below is an instruction that describes a task.\n\n### Input:\nrefrigerator, hypernym",
        "walk",
        "Is this true: salviniaceae member meronym salvinia?",
    ]
    alone = [
        kgqa.generate(model, tokenizer, [p], max_new_tokens=5, batch_size=16)[0] for p in prompts
    ]
    batched = kgqa.generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    assert batched == alone
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left untouched


def test_generation_through_peft(tokenizer) -> None:
    model = tiny_model(len(tokenizer), seed=3)
    prompts = ["salvinia, member holonym", "white goods, hyponym"]
    plain = kgqa.generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=16)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert (
        kgqa.generate(lora, tokenizer, prompts, max_new_tokens=4, batch_size=16) == plain
    )  # LoRA B = 0
