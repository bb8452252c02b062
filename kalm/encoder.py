"""One handle from a model to KaLM embeddings: :class:`Encoder` over a model and its views.

Evaluation, analysis, the training step's self-negatives and the notebooks all embed through it,
so the views, padding, pooling and precision are the same everywhere. Long inputs are batched by
length (little padding) and returned in input order, as unit fp32 vectors on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import RunConfig
from kalm.models import compute_dtype, embed_batch, mixed_precision, pooling_of
from kalm.views import Batch, ViewBuilder, pad_batch

__all__ = ["Encoder", "encode_ids", "encode_texts"]


def encode_ids(
    model: nn.Module,
    token_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "encoding",
) -> torch.Tensor:
    """Embed token id sequences, batched by length (little padding), in the input order.

    The forward runs in the model's own precision (:func:`~kalm.models.mixed_precision`); the
    embeddings are returned in fp32 either way.
    """
    if any(len(r) == 0 for r in token_ids):
        raise ValueError("cannot embed an empty sequence")
    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    with (
        torch.inference_mode(),
        mixed_precision(model),
        tqdm(total=len(order), desc=desc, disable=not progress, unit="seq") as bar,
    ):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = pad_batch([token_ids[i] for i in idx], pad_id)
            emb = embed_batch(
                model, batch.input_ids.to(device), batch.attention_mask.to(device)
            ).cpu()
            if out is None:
                out = torch.empty((len(token_ids), emb.shape[1]), dtype=torch.float32)
            out[torch.tensor(idx)] = emb
            bar.update(len(idx))
    model.train(was_training)
    assert out is not None
    return out


def encode_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "texts",
) -> torch.Tensor:
    """Embeddings of plain texts, cut to ``max_length`` tokens. A causal LM's get no BOS/EOS (the
    recipe's views end with a closing bracket, which is the pooled token) and the LM head is never
    run; an encoder's get its special tokens (``[CLS] text [SEP]``), as its views do."""
    ids = tokenizer(
        list(texts),
        add_special_tokens=pooling_of(model) == "mean",
        truncation=max_length is not None,
        max_length=max_length,
    )["input_ids"]
    return encode_ids(
        model,
        ids,
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )


class Encoder:
    """Embeds head-relation queries, entities (tail views) and plain texts with one model.

    Matmuls run in the model's precision (bf16 where its frozen weights are bf16, see
    ``train.precision``); the batch sizes are those of queries and of entities.
    """

    def __init__(
        self,
        model: nn.Module,
        views: ViewBuilder,
        *,
        query_batch_size: int = 64,
        entity_batch_size: int = 64,
    ) -> None:
        self.model, self.views = model, views
        self.query_batch_size, self.entity_batch_size = query_batch_size, entity_batch_size

    @classmethod
    def from_config(cls, model: nn.Module, views: ViewBuilder, cfg: RunConfig) -> Encoder:
        """The encoder of a run: precision and batch sizes from ``cfg.eval``."""
        return cls(
            model,
            views,
            query_batch_size=cfg.eval.query_batch_size,
            entity_batch_size=cfg.eval.entity_batch_size,
        )

    @property
    def dtype(self) -> torch.dtype:
        """The matmul dtype of the encoder's model (part of every cache key of its embeddings)."""
        return compute_dtype(self.model)

    @property
    def pad_id(self) -> int:
        return self.views.tokenizer.pad_token_id

    def encode(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        batch_size: int,
        progress: bool = False,
        desc: str = "encoding",
    ) -> torch.Tensor:
        """Unit fp32 embeddings of token id sequences (inference mode, length-sorted batches)."""
        return encode_ids(
            self.model,
            token_ids,
            pad_id=self.pad_id,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
        )

    def encode_queries(
        self,
        heads: Sequence[int],
        relations: Sequence[int],
        *,
        progress: bool = False,
        desc: str = "queries",
    ) -> torch.Tensor:
        """Embeddings of the head-relation views ``[ h, r ]`` (``r`` may be an inverse id)."""
        ids = self.views.hr_ids(list(heads), list(relations))
        return self.encode(ids, batch_size=self.query_batch_size, progress=progress, desc=desc)

    def encode_entities(
        self, entities: Sequence[int], *, progress: bool = False, desc: str = "entities"
    ) -> torch.Tensor:
        """Embeddings of the tail views ``{ e }`` of ``entities``."""
        ids = self.views.tail_ids(list(entities))
        return self.encode(ids, batch_size=self.entity_batch_size, progress=progress, desc=desc)

    def encode_texts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        desc: str = "texts",
    ) -> torch.Tensor:
        """Embeddings of plain texts (see :func:`encode_texts`); ``batch_size`` overrides the
        entity batch size."""
        return encode_texts(
            self.model,
            self.views.tokenizer,
            texts,
            max_length=max_length,
            batch_size=batch_size or self.entity_batch_size,
            progress=progress,
            desc=desc,
        )

    def embed(self, batch: Batch) -> torch.Tensor:
        """Embeddings of one padded batch, on the model's device, in the model's current mode and
        the caller's gradient context (the training step's self-negatives)."""
        device = next(self.model.parameters()).device
        return embed_batch(self.model, batch.input_ids.to(device), batch.attention_mask.to(device))
