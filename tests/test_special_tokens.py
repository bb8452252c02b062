"""Special tokens as in the recipe: none on the two contrastive views; the tokenizer's default
ones (BOS for Llama) on the triple-completion prompts, the KGQA prompts and the perplexity text.

Checked with a Llama-style tokenizer built in the tests, which puts BOS before every text, and
with SmolLM2's, which puts nothing: for SmolLM2 every id is what it was, so the book's stored
runs and results stay valid.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama, toy_kg
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.evaluate import kgqa, lm
from kalm.models import load_tokenizer
from kalm.views import ViewBuilder, leading_special_ids

TEXT = (
    "The refrigerator is a white good . It keeps food cold by pumping heat out of an insulated "
    "box , and most homes have one ."
)


@pytest.fixture(scope="module")
def llama_tokenizer(llama_dir: Path) -> PreTrainedTokenizerBase:
    """The Llama-style tokenizer as a model directory hands it out (pad = EOS)."""
    return load_tokenizer(llama_dir)


@pytest.fixture(params=["llama-style", "smollm2"])
def any_tokenizer(request, llama_tokenizer, tokenizer) -> PreTrainedTokenizerBase:
    return llama_tokenizer if request.param == "llama-style" else tokenizer


def test_which_tokenizers_lead_with_bos(llama_tokenizer, tokenizer) -> None:
    assert llama_tokenizer("dog")["input_ids"][0] == llama_tokenizer.bos_token_id == 1
    assert leading_special_ids(llama_tokenizer) == [1]
    assert leading_special_ids(tokenizer) == []  # SmolLM2 adds nothing
    assert tokenizer(TEXT)["input_ids"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]


def test_views_carry_no_special_tokens(any_tokenizer) -> None:
    views = ViewBuilder(toy_kg(), any_tokenizer, max_entity_tokens=24)
    rows = views.hr_ids([0, 1], [0, 3]) + views.tail_ids([2, 3])
    texts = [views.hr_text(0, 0), views.hr_text(1, 3), views.tail_text(2), views.tail_text(3)]
    assert rows == any_tokenizer(texts, add_special_tokens=False)["input_ids"]
    special = set(any_tokenizer.all_special_ids)
    assert not special & {i for row in rows for i in row}


def test_completion_prompts_are_tokenised_with_the_defaults(any_tokenizer) -> None:
    """Prompt = the tokenizer's default ids of the prompt text (BOS first for Llama); response
    = the tail text without special tokens, then EOS."""
    views = ViewBuilder(toy_kg(), any_tokenizer, max_entity_tokens=24)
    heads, relations, tails = [0, 1], [0, 3], [2, 3]
    rows, lengths = views.completion_ids(heads, relations, tails, max_tokens=512)
    for row, length, h, r, t in zip(rows, lengths, heads, relations, tails, strict=True):
        assert row[:length] == any_tokenizer(views.prompt_text(h, r))["input_ids"]
        answer = any_tokenizer(views.entity_texts[t], add_special_tokens=False)["input_ids"]
        assert row[length:] == [*answer, any_tokenizer.eos_token_id]


def test_kgqa_prompts_are_tokenised_with_the_defaults(any_tokenizer) -> None:
    model = tiny_llama(len(any_tokenizer))
    prompt = "### Input:\nsalvinia, member holonym\n\n### Response:\n"
    seen: list[list[int]] = []
    generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(**kwargs)

    model.generate = spy
    kgqa.generate(model, any_tokenizer, [prompt], max_new_tokens=2, batch_size=4)
    assert seen == [any_tokenizer(prompt)["input_ids"]]


def test_perplexity_reads_the_text_as_tokenised_with_the_defaults(any_tokenizer) -> None:
    """One window over the whole text: the perplexity of the default ids (after BOS for Llama,
    so the first word is scored too), computed by hand."""
    model = tiny_llama(len(any_tokenizer), initializer_range=0.5)
    ids = torch.tensor(any_tokenizer(TEXT)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
    expected = F.cross_entropy(logits, ids[1:]).item()
    got = lm.perplexity(
        model, any_tokenizer, TEXT, max_tokens=0, window=512, stride=512, batch_size=1,
        progress=False,
    )  # fmt: skip
    assert got["tokens"] == len(ids) - 1
    assert got["nll"] == pytest.approx(expected, abs=1e-5)
