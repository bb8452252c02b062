"""kalm.views: the recipe's view templates (book/method.md), tokenisation and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import smollm2_tokenizer, toy_kg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kalm.prompts import PROMPT_PREAMBLE
from kalm.views import ViewBuilder, pad_batch, split_shared_prefix, training_examples

DOG = (
    "a domesticated carnivorous mammal that typically has a long snout and an acute sense of smell"
)


@pytest.fixture(scope="module")
def views() -> ViewBuilder:
    descriptions = (DOG, "", "", "", "", "", "", "")
    return ViewBuilder(toy_kg(descriptions=descriptions), smollm2_tokenizer(), max_entity_tokens=6)


# --- texts ---------------------------------------------------------------------------------------


def test_view_templates(views: ViewBuilder) -> None:
    assert views.hr_text(1, 0) == "[ cat, eats ]"
    assert views.tail_text(2) == "{ wolf }"
    assert views.hr_text(1, 2) == "[ cat, eaten by ]"  # r >= R: the inverse relation text
    assert views.hr_text(1, 3) == "[ cat, resembles ]"
    with pytest.raises(IndexError):
        views.hr_text(1, 4)


def test_entity_text_is_truncated_to_max_entity_tokens(views: ViewBuilder) -> None:
    tokenizer = views.tokenizer
    full = tokenizer("dog, " + DOG, add_special_tokens=False)["input_ids"]
    assert len(full) > 6
    truncated = views.entity_texts[0]
    assert truncated == tokenizer.decode(full[:6])
    assert ("dog, " + DOG).startswith(truncated) and len(truncated) < len("dog, " + DOG)
    assert views.tail_text(0) == f"{{ {truncated} }}"
    assert views.hr_text(0, 1) == f"[ {truncated}, resembles ]"
    long_enough = ViewBuilder(views.kg, tokenizer, max_entity_tokens=50)
    assert long_enough.entity_texts[0] == "dog, " + DOG


def test_the_views_of_one_graph_and_tokenizer_are_tokenised_once(
    views: ViewBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every study arm builds its views twice: the truncated entity texts are reused when
    texts, tokenizer and length are the same, and only then."""
    calls: list[int] = []
    tokenizer = smollm2_tokenizer()
    real = type(tokenizer).__call__

    def counted(self, texts, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counted)
    kg = views.kg
    first = ViewBuilder(kg, tokenizer, max_entity_tokens=7)
    entities = [n for n in calls if n == kg.num_entities]
    again = ViewBuilder(kg, tokenizer, max_entity_tokens=7)
    assert [n for n in calls if n == kg.num_entities] == entities  # not tokenised again
    assert again.entity_texts == first.entity_texts
    assert (again.entity_lengths == first.entity_lengths).all()
    again.entity_texts[0] = "changed"  # a builder's texts are its own
    assert ViewBuilder(kg, tokenizer, max_entity_tokens=7).entity_texts == first.entity_texts
    other = toy_kg(descriptions=("a dog", "", "", "", "", "", "", ""))
    assert ViewBuilder(other, tokenizer, max_entity_tokens=7).entity_texts[0] == "dog, a dog"
    shorter = ViewBuilder(kg, tokenizer, max_entity_tokens=3)
    assert shorter.entity_texts[0] != first.entity_texts[0]
    assert len([n for n in calls if n == kg.num_entities]) == len(entities) + 2


def test_view_ids_have_no_special_tokens(views: ViewBuilder) -> None:
    tokenizer = views.tokenizer
    hr = views.hr_ids([1, 2], [0, 2])
    assert hr == [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in ("[ cat, eats ]", "[ wolf, eaten by ]")
    ]
    tails = views.tail_ids([3])
    assert tokenizer.decode(tails[0]) == "{ lion }"
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert not specials & {i for row in hr + tails for i in row}


def test_prompt_text(views: ViewBuilder) -> None:
    prompt = views.prompt_text(1, 2)
    assert prompt.startswith(PROMPT_PREAMBLE + "\n\n### Instruction:\n")
    assert (
        "Given the head entity and relation, write a tail entity that completes the triple"
        in prompt
    )
    assert "### Input:\ncat, eaten by\n\n" in prompt
    assert prompt.endswith("### Response:\n")


def test_completion_ids_layout(views: ViewBuilder) -> None:
    tokenizer = views.tokenizer
    rows, lengths = views.completion_ids([1, 0], [0, 3], [2, 0], max_tokens=256)
    for row, length, (h, r, t) in zip(rows, lengths, [(1, 0, 2), (0, 3, 0)], strict=True):
        prompt = tokenizer(views.prompt_text(h, r), add_special_tokens=False)["input_ids"]
        answer = tokenizer(views.entity_texts[t], add_special_tokens=False)["input_ids"]
        assert length == len(prompt)
        assert row == [*prompt, *answer, tokenizer.eos_token_id]
    assert tokenizer.decode(rows[0][lengths[0] :]) == "wolf" + tokenizer.eos_token


@settings(max_examples=40, deadline=None)
@given(
    max_tokens=st.integers(2, 120), h=st.integers(0, 7), r=st.integers(0, 3), t=st.integers(0, 7)
)
def test_completion_ids_respect_max_tokens(
    views: ViewBuilder, max_tokens: int, h: int, r: int, t: int
) -> None:
    tokenizer = views.tokenizer
    (row,), (length,) = views.completion_ids([h], [r], [t], max_tokens=max_tokens)
    prompt = tokenizer(views.prompt_text(h, r), add_special_tokens=False)["input_ids"]
    answer = [
        *tokenizer(views.entity_texts[t], add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    assert len(row) <= max_tokens
    assert 1 <= length <= len(prompt) and row[:length] == prompt[:length]
    if max_tokens > len(answer):  # room for the whole answer: the prompt is cut, never the answer
        assert row[length:] == answer
        assert len(row) == min(max_tokens, len(prompt) + len(answer))


# --- examples -------------------------------------------------------------------------------------


@given(
    triples=arrays(np.int64, st.tuples(st.integers(0, 20), st.just(3)), elements=st.integers(0, 9))
)
def test_training_examples_add_inverses(triples: np.ndarray) -> None:
    examples = training_examples(triples, num_relations=10)
    assert examples.dtype == np.int64 and examples.shape == (2 * len(triples), 3)
    np.testing.assert_array_equal(examples[: len(triples)], triples)
    h, r, t = triples.T
    np.testing.assert_array_equal(examples[len(triples) :], np.stack([t, r + 10, h], axis=1))


def test_training_examples_by_hand() -> None:
    got = training_examples(np.array([[0, 1, 2]]), num_relations=3)
    assert got.tolist() == [[0, 1, 2], [2, 4, 0]]


# --- padding -------------------------------------------------------------------------------------


def test_pad_batch_left_and_right() -> None:
    right = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert right.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left = pad_batch([[5, 6, 7], [8]], pad_id=2, left=True)
    assert left.input_ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert left.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left.input_ids.dtype == torch.long and left.attention_mask.dtype == torch.long


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 3), min_size=2, max_size=12), min_size=1, max_size=6),
    data=st.data(),
)
def test_split_shared_prefix_reassembles_the_rows(rows: list[list[int]], data) -> None:
    plens = [data.draw(st.integers(1, len(r) - 1)) for r in rows]
    prefix, rest, rest_plens = split_shared_prefix(rows, plens)
    assert [prefix + r for r in rest] == rows
    assert [p + len(prefix) for p in rest_plens] == plens
    assert all(p >= 1 for p in rest_plens)  # the position before the response stays
    if len(rows) == 1:
        assert prefix == []


def test_completion_prompts_share_the_preamble(views: ViewBuilder) -> None:
    rows, plens = views.completion_ids([0, 2, 4], [0, 1, 0], [1, 3, 5], max_tokens=256)
    prefix, _, _ = split_shared_prefix(rows, plens)
    preamble = views.tokenizer(PROMPT_PREAMBLE, add_special_tokens=False)["input_ids"]
    assert prefix[: len(preamble)] == preamble and len(prefix) > len(preamble)
