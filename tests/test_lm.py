"""Language-modelling checks: sliding-window perplexity, WikiText loading, sentence sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from hypothesis import given
from hypothesis import strategies as st

from kalm.data import load_wikitext, wikitext_path
from kalm.data.errors import DataError
from kalm.evaluate import lm

TEXT = (
    "The refrigerator is a white good . It keeps food cold by pumping heat out of an insulated "
    "box , and most homes have one . Salvinia is a genus of floating ferns in the family "
    "Salviniaceae , named after Antonio Maria Salvini ."
)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), initializer_range=0.5)


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])


def test_full_window_equals_naive_perplexity(model, tokenizer) -> None:
    ids = _ids(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    naive = F.cross_entropy(logits[:-1], ids[1:]).item()
    got = lm.perplexity(
        model,
        tokenizer,
        TEXT,
        max_tokens=0,
        window=len(ids) + 5,
        stride=7,
        batch_size=8,
        progress=False,
    )
    assert got["tokens"] == len(ids) - 1
    assert got["nll"] == pytest.approx(naive, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(naive), rel=1e-5)


def test_stride_one_scores_each_token_with_window_context(model, tokenizer) -> None:
    ids = _ids(tokenizer)[:30]
    window = 8
    losses = []
    with torch.no_grad():
        first = model(input_ids=ids[None, :window]).logits[0]
        losses += F.cross_entropy(first[:-1], ids[1:window], reduction="none").tolist()
        for p in range(window, len(ids)):
            ctx = ids[p - window + 1 : p + 1]
            logits = model(input_ids=ctx[None]).logits[0, -2]
            losses.append(F.cross_entropy(logits[None], ids[p : p + 1]).item())
    text = tokenizer.decode(ids)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids.tolist()
    got = lm.perplexity(
        model,
        tokenizer,
        text,
        max_tokens=0,
        window=window,
        stride=1,
        batch_size=5,
        progress=False,
    )
    assert got["tokens"] == len(ids) - 1
    assert got["nll"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_max_tokens_cuts_the_text(model, tokenizer) -> None:
    got = lm.perplexity(
        model, tokenizer, TEXT, max_tokens=10, window=4, stride=2, batch_size=8, progress=False
    )
    assert got["tokens"] == 9 and got["ppl"] > 1
    with pytest.raises(ValueError, match="stride"):
        lm.perplexity(
            model, tokenizer, TEXT, max_tokens=10, window=4, stride=5, batch_size=8, progress=False
        )


@given(n=st.integers(2, 300), window=st.integers(2, 64), frac=st.floats(0.01, 1.0))
def test_windows_score_every_position_once(n: int, window: int, frac: float) -> None:
    stride = max(1, round(frac * window))
    spans = lm._windows(n, window, stride)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in spans:
        assert end - begin <= window and begin < first < end
        if begin > 0:  # past the first window: at least window - stride tokens of context
            assert first - begin >= max(1, window - stride)


def test_load_wikitext_checks_path_and_hash(tmp_path) -> None:
    text = load_wikitext("test")
    assert text.startswith(" \n = Robert Boulter = \n")
    assert len(text.splitlines()) == 4358
    with pytest.raises(DataError, match=r"wikitext-103/wiki\.test\.tokens not found"):
        load_wikitext("test", data_dir=tmp_path)
    bad = tmp_path / "wikitext" / "wikitext-103"
    bad.mkdir(parents=True)
    (bad / "wiki.test.tokens").write_text("not wikitext")
    with pytest.raises(DataError, match="checksum mismatch"):
        load_wikitext("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="valid: test, valid"):
        load_wikitext("train")


def test_missing_data_dir_names_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("KALM_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="KALM_DATA_DIR"):
        wikitext_path("test")


WIKI = "\n".join(
    [
        " ",
        " = Heading = ",
        " ",
        " The first sentence has exactly eight words here . Short one . The ship weighed "
        "1 @,@ 000 tons and was 20 @.@ 5 m long and well @-@ armed . ",
        " = = Sub heading with many many words in it to be skipped = = ",
        ' " Quoted sentences start with a quote and have words enough . ',
    ]
)


def test_sentences_split_filter_and_sample() -> None:
    pool = lm.sentences(WIKI, 100, seed=0)
    assert pool == [
        "The first sentence has exactly eight words here .",
        "The ship weighed 1,000 tons and was 20.5 m long and well-armed .",
        '" Quoted sentences start with a quote and have words enough .',
    ]
    two = lm.sentences(WIKI, 2, seed=5)
    assert two == lm.sentences(WIKI, 2, seed=5) and len(two) == 2
    assert [s for s in pool if s in two] == two  # sampled sentences keep text order
    assert lm.sentences(WIKI, 100, seed=0, max_words=10) == pool[:1]
