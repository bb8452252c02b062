"""Batched greedy generation of KGQA answers, each cut at its first newline."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.models import mixed_precision
from kalm.views import pad_batch, prompt_ids

__all__ = ["generate"]


@functools.lru_cache(maxsize=4)
def _newline_tokens(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Bool table over the vocabulary: True for tokens whose text contains a newline."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor(["\n" in s for s in texts], dtype=torch.bool)


class _StopAtNewline(StoppingCriteria):
    """Marks a row done once it has produced a token containing a newline."""

    def __init__(self, table: torch.Tensor, prompt_width: int) -> None:
        self.table = table
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width :]
        table = self.table.to(input_ids.device)
        known = new < len(table)  # ids past the tokenizer's vocabulary (padded embeddings)
        return (known & table[new.clamp(max=len(table) - 1)]).any(dim=1)


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its first newline (EOS also stops).

    Prompts are sorted by length and left-padded in batches (so the new tokens of every row
    start at the same column); a batch stops as soon as every row has a newline or EOS. Returns
    the texts in the input order. Works for plain and peft models, in the model's precision.
    A prompt starts as the tokenizer starts a text (BOS for Llama; see
    :func:`~kalm.views.prompt_ids`).
    """
    ids = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    device = next(model.parameters()).device
    table = _newline_tokens(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    with (
        torch.inference_mode(),
        mixed_precision(model),
        tqdm(total=len(ids), desc="generating", disable=not progress, unit="q") as bar,
    ):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pad_batch([ids[i] for i in idx], tokenizer.pad_token_id, left=True)
            width = batch.input_ids.shape[1]
            result = model.generate(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_StopAtNewline(table, width)]),
            )
            for i, row in zip(idx, result[:, width:].tolist(), strict=True):
                if eos in row:
                    row = row[: row.index(eos)]
                out[i] = tokenizer.decode(row, skip_special_tokens=True).split("\n", 1)[0]
            bar.update(len(idx))
    model.train(was_training)
    return out
