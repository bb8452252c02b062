"""Language-modelling checks on WikiText-103: sliding-window perplexity and a sentence sample.

KaLM claims that aligning representations does not sacrifice language modelling (the book's
Method chapter, ``book/method.md``); perplexity of the base and the tuned model on the same
general text (:func:`kalm.data.load_wikitext`) tests that.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.models import decoder_of, mixed_precision
from kalm.views import prompt_ids

__all__ = ["perplexity", "sentences"]


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n`` tokens.

    Every position 1..n-1 is scored exactly once, with all tokens from ``begin`` as context
    (at least ``window - stride`` of them, and never none: with ``stride == window`` successive
    windows share one token).
    """
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got {window=}, {stride=}")
    spans, scored_to, begin = [], 1, 0
    while scored_to < n:
        end = min(begin + window, n)
        spans.append((begin, end, scored_to))
        scored_to = end
        begin = min(begin + stride, end - 1)
    return spans


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_tokens: int,
    window: int,
    stride: int,
    batch_size: int,
    progress: bool = True,
) -> dict[str, float]:
    """Sliding-window perplexity of ``text`` (the Hugging Face perplexity guide's scheme).

    The text is tokenised as the tokenizer starts a text (one BOS in front for Llama, as in
    the guide; nothing for SmolLM2, see :func:`~kalm.views.prompt_ids`) and cut to its first
    ``max_tokens`` tokens (0 = all). Windows of ``window`` tokens start every ``stride`` tokens
    (``batch_size`` windows run together); each token after the first is scored once, in the
    first window that reaches it. The LM head is applied only at
    the scored positions (hidden states come from the decoder body), which saves the
    vocabulary projection of the context tokens. Matmuls run in the model's precision, the
    cross-entropy in fp32. Returns ppl, nll (mean, nats), the number of
    scored tokens and the seconds taken.
    """
    ids = prompt_ids(tokenizer, [text])[0]
    if max_tokens > 0:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    tokens = torch.tensor(ids, dtype=torch.long)
    spans = _windows(len(ids), window, stride)
    device = next(model.parameters()).device
    body, head = decoder_of(model), model.get_output_embeddings()
    total, count = 0.0, 0
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    # Windows of equal length share a batch (all but the last one or two are full windows).
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    with (
        torch.inference_mode(),
        mixed_precision(model),
        tqdm(total=len(spans), desc="perplexity", disable=not progress, unit="win") as bar,
    ):
        for group in groups.values():
            for start in range(0, len(group), batch_size):
                part = group[start : start + batch_size]
                batch = torch.stack([tokens[b:e] for b, e, _ in part]).to(device)
                hidden = body(input_ids=batch).last_hidden_state
                rows = torch.cat([torch.full((e - s,), i) for i, (_, e, s) in enumerate(part)]).to(
                    device
                )
                pos = torch.cat([torch.arange(s - b, e - b) for b, e, s in part]).to(device)
                logits = head(hidden[rows, pos - 1]).float()
                nll = F.cross_entropy(logits, batch[rows, pos], reduction="sum")
                total += float(nll)
                count += len(pos)
                bar.update(len(part))
    model.train(was_training)
    mean = total / count
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": count,
        "seconds": time.perf_counter() - started,
    }


_DETOKENISE = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=[A-Z0-9\"'])")


def sentences(
    text: str, n: int, seed: int, *, min_words: int = 8, max_words: int = 40
) -> list[str]:
    """A fixed random sample of ``n`` WikiText sentences (fewer if the text has fewer).

    Headings (``= Title =`` lines) and blank lines are skipped; paragraphs are split after
    " . ", " ! " or " ? " before a capital, digit or quote; sentences of ``min_words`` to
    ``max_words`` words are kept, and WikiText's ``@-@``, ``@,@``, ``@.@`` markers are joined
    back ("1 @,@ 000" -> "1,000"). The sample is returned in text order.
    """
    pool: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for old, new in _DETOKENISE:
            line = line.replace(old, new)
        pool += [s for s in _SENTENCE_END.split(line) if min_words <= len(s.split()) <= max_words]
    if n >= len(pool):
        return pool
    pick = np.sort(np.random.default_rng(seed).choice(len(pool), size=n, replace=False))
    return [pool[i] for i in pick]
