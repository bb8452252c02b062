"""Language-modelling checks on WikiText-103: sliding-window perplexity and a sentence sample.

KaLM claims that aligning representations does not sacrifice language modelling (PAPER.md
section 5); perplexity of the base and the tuned model on the same general text tests that.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.data.download import sha256_file
from kalm.data.errors import DataError
from kalm.data.files import data_root
from kalm.models import decoder_of

__all__ = ["WIKITEXT_SHA256", "load_wikitext", "perplexity", "sentences", "wikitext_path"]

WIKITEXT_SHA256: dict[str, str] = {
    "test": "56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9",
    "valid": "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b",
}
"""sha256 of WikiText-103 (v1, tokens) ``wiki.<split>.tokens``."""


def wikitext_path(split: str = "test", data_dir: str | Path | None = None) -> Path:
    """Where ``wiki.<split>.tokens`` is expected: ``<data dir>/wikitext/wikitext-103/``."""
    if split not in WIKITEXT_SHA256:
        raise ValueError(f"unknown WikiText split {split!r}; valid: {', '.join(WIKITEXT_SHA256)}")
    root = data_root(data_dir)
    if root is None:
        raise DataError(
            "WikiText-103 has no download source here: set KALM_DATA_DIR (or pass data_dir) to a "
            f"directory holding wikitext/wikitext-103/wiki.{split}.tokens"
        )
    return root / "wikitext" / "wikitext-103" / f"wiki.{split}.tokens"


def load_wikitext(split: str = "test", data_dir: str | Path | None = None) -> str:
    """The WikiText-103 ``split`` as one string (its original tokenised form), sha256-checked."""
    path = wikitext_path(split, data_dir)
    if not path.is_file():
        raise DataError(
            f"{path} not found; set KALM_DATA_DIR (or data_dir) to a directory holding "
            f"wikitext/wikitext-103/wiki.{split}.tokens"
        )
    got = sha256_file(path)
    if got != WIKITEXT_SHA256[split]:
        raise DataError(
            f"checksum mismatch for {path}: expected sha256 {WIKITEXT_SHA256[split]}, got {got}; "
            "replace it with the WikiText-103 v1 tokens file"
        )
    return path.read_text(encoding="utf-8")


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
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Sliding-window perplexity of ``text`` (the Hugging Face perplexity guide's scheme).

    The text is tokenised without special tokens and cut to its first ``max_tokens`` tokens
    (0 = all). Windows of ``window`` tokens start every ``stride`` tokens; each token after the
    first is scored once, in the first window that reaches it. The LM head is applied only at
    the scored positions (hidden states come from the decoder body), which saves the
    vocabulary projection of the context tokens. Returns ppl, nll (mean, nats), the number of
    scored tokens and the seconds taken.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
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
