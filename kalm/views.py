"""Texts of the two views and of the triple-completion prompt, tokenisation and padding.

Templates follow the released recipe (the book's Method chapter, ``book/method.md``):
``D_hr = "[ head, relation ]"``, ``D_t = "{ tail }"``, entity text truncated to
``max_entity_tokens`` tokens, no BOS/EOS on the views. Prompts, which the model reads as a
language model, start as the tokenizer starts a text (:func:`prompt_ids`). :class:`Collator`
turns a batch of example indices into a :class:`KaLMBatch` of padded tensors and masks. No
model code lives here.

An encoder (the bi-encoder baseline) reads SimKGC's views instead (:class:`SimKGCViews`):
``[CLS] name: description [SEP] relation [SEP]`` and ``[CLS] name: description [SEP]``,
descriptions cut to 50 words and views to ``max_entity_tokens`` tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import RunConfig
from kalm.data import KnowledgeGraph, KnownAnswers
from kalm.losses import false_negative_mask, self_negative_mask
from kalm.prompts import INSTRUCTION, alpaca_prompt

__all__ = [
    "SIMKGC_DESCRIPTION_WORDS",
    "Batch",
    "Collator",
    "KaLMBatch",
    "SimKGCViews",
    "ViewBuilder",
    "leading_special_ids",
    "pad_batch",
    "prompt_ids",
    "simkgc_entity_text",
    "split_shared_prefix",
    "training_examples",
]


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts in front of a text by default: BOS for Llama-2/3
    and Mistral, none for SmolLM2.

    Found by tokenising one text with and without special tokens, so any tokenizer answers for
    itself. Tokens added after the text (an EOS some tokenizers append) are not included: they
    would close a prompt before its answer.
    """
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    found = (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain)
    start = next(found, None)
    if start is None:  # the text tokenises differently after the special tokens
        start = int(bool(full) and full[0] == tokenizer.bos_token_id)
    return list(full[:start])


def prompt_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of texts that the model reads as a language model (the triple-completion
    prompts, KGQA prompts and perplexity text): the tokenizer's default leading special tokens
    (:func:`leading_special_ids`), then the text.

    The recipe tokenises these with the tokenizer's defaults, and a Llama model has only ever
    seen text after a BOS; the two contrastive views alone carry no special tokens.
    """
    lead = leading_special_ids(tokenizer)
    return [lead + ids for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def training_examples(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """Triples plus their inverses ``(t, r + R, h)``: the recipe trains on both directions."""
    inverse = np.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], axis=1)
    return np.concatenate([triples, inverse]).astype(np.int64)


# Entity texts cut to a number of tokens, and their lengths, by _truncation_key: every arm of a
# study builds the views of one graph with one tokenizer twice (to train and to evaluate), and
# tokenising WN18RR's 40,943 entities takes seconds each time. The last few are kept.
_TRUNCATIONS: dict[str, tuple[list[str], np.ndarray]] = {}
_TRUNCATIONS_KEPT = 4


def _truncation_key(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, tokens: int) -> str:
    """A digest of everything a truncation depends on: the texts, the tokenizer's whole
    definition (its backend's JSON and how it decodes) and the number of tokens; "" for a
    tokenizer without a serialisable backend, whose truncations are not kept."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return ""
    digest = hashlib.sha256()
    for part in (
        type(tokenizer).__qualname__,
        backend.to_str(),
        str(tokenizer.clean_up_tokenization_spaces),
        str(tokens),
        *texts,
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def _truncated(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, tokens: int
) -> tuple[list[str], np.ndarray]:
    """``texts`` cut to at most ``tokens`` tokens (decoded again) and their token counts."""
    key = _truncation_key(texts, tokenizer, tokens)
    if key not in _TRUNCATIONS:
        ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=tokens)[
            "input_ids"
        ]
        found = (tokenizer.batch_decode(ids), np.array([len(i) for i in ids], dtype=np.int64))
        if not key:
            return found
        _TRUNCATIONS[key] = found
        while len(_TRUNCATIONS) > _TRUNCATIONS_KEPT:
            del _TRUNCATIONS[next(iter(_TRUNCATIONS))]
    cut, lengths = _TRUNCATIONS[key]
    return list(cut), lengths.copy()


class ViewBuilder:
    """Builds view texts and token ids for one graph and tokenizer.

    Entity texts are truncated by tokens once, up front, so that every view of an entity (tail
    view in training, the entity index in evaluation) sees the same text.
    """

    def __init__(
        self, kg: KnowledgeGraph, tokenizer: PreTrainedTokenizerBase, max_entity_tokens: int
    ):
        self.kg = kg
        self.tokenizer = tokenizer
        texts = [kg.entity_text(e) for e in range(kg.num_entities)]
        self.entity_texts, self.entity_lengths = _truncated(texts, tokenizer, max_entity_tokens)
        self.relation_lengths = self._token_counts(
            [self.relation_words(r) for r in range(2 * kg.num_relations)]
        )

    @classmethod
    def from_config(
        cls, kg: KnowledgeGraph, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig
    ) -> ViewBuilder:
        """The views of a run: entity texts cut to the profile's ``max_entity_tokens``, the same
        in training and evaluation; SimKGC's views (:class:`SimKGCViews`) for an encoder."""
        views = SimKGCViews if cfg.model.is_encoder else ViewBuilder
        return views(kg, tokenizer, cfg.train.max_entity_tokens)

    def _token_counts(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([len(i) for i in self._ids(texts)], dtype=np.int64)

    def relation_words(self, relation: int) -> str:
        """The words of ``relation`` in the views (an inverse has its own words)."""
        return self.kg.relation_text(relation)

    def view_lengths(self, examples: np.ndarray) -> np.ndarray:
        """``(N, 2)`` token lengths of the hr and tail views of ``(h, r, t)`` rows, up to the
        template's constant tokens: the bucketing key of training batches."""
        h, r, t = examples.T
        return np.stack(
            [self.entity_lengths[h] + self.relation_lengths[r], self.entity_lengths[t]], axis=1
        )

    def hr_text(self, head: int, relation: int) -> str:
        """The head-relation view ``[ head text, relation text ]`` (relation may be inverse)."""
        return f"[ {self.entity_texts[head]}, {self.relation_words(relation)} ]"

    def tail_text(self, entity: int) -> str:
        """The tail view ``{ entity text }``."""
        return f"{{ {self.entity_texts[entity]} }}"

    def prompt_text(self, head: int, relation: int) -> str:
        """The triple-completion prompt up to (and including) the response header."""
        return alpaca_prompt(
            INSTRUCTION, f"{self.entity_texts[head]}, {self.kg.relation_text(relation)}"
        )

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def hr_ids(self, heads: Sequence[int], relations: Sequence[int]) -> list[list[int]]:
        """Token ids of head-relation views."""
        return self._ids([self.hr_text(h, r) for h, r in zip(heads, relations, strict=True)])

    def tail_ids(self, entities: Sequence[int]) -> list[list[int]]:
        """Token ids of tail views."""
        return self._ids([self.tail_text(e) for e in entities])

    def completion_ids(
        self, heads: Sequence[int], relations: Sequence[int], tails: Sequence[int], max_tokens: int
    ) -> tuple[list[list[int]], list[int]]:
        """Prompt + response (tail text + EOS) ids and the prompt lengths (loss starts there).

        The prompt starts as the tokenizer starts a text (:func:`prompt_ids`: BOS for Llama).
        """
        texts = [self.prompt_text(h, r) for h, r in zip(heads, relations, strict=True)]
        prompts = prompt_ids(self.tokenizer, texts)
        answers = self._ids([self.entity_texts[t] for t in tails])
        eos = self.tokenizer.eos_token_id
        rows, prompt_lengths = [], []
        for p, a in zip(prompts, answers, strict=True):
            answer = [*a, eos]
            p = p[: max(1, max_tokens - len(answer))]
            rows.append((p + answer)[:max_tokens])
            prompt_lengths.append(len(p))
        return rows, prompt_lengths


SIMKGC_DESCRIPTION_WORDS = 50
"""Words kept of an entity description in SimKGC's views (its preprocessing cuts FB15k-237's
descriptions there; WN18RR's definitions are shorter)."""


def simkgc_entity_text(name: str, description: str, words: int = SIMKGC_DESCRIPTION_WORDS) -> str:
    """SimKGC's entity text: ``name: description``, the description cut to ``words`` words and
    without a leading repeat of the name; the name alone when there is no description."""
    description = " ".join(description.split()[:words])
    if description.startswith(name):
        description = description[len(name) :].strip()
    return f"{name}: {description}" if description else name


class SimKGCViews(ViewBuilder):
    """SimKGC's views, for a bidirectional encoder (the bi-encoder baseline).

    The head-relation view is the BERT text pair ``[CLS] head text [SEP] relation [SEP]`` and
    the tail view ``[CLS] entity text [SEP]``, each cut to ``max_tokens`` tokens with the
    special tokens (SimKGC's ``max_num_tokens``; a pair loses tokens from its longer text
    first); an inverse relation reads ``inverse`` and the relation's words. Entity texts are
    :func:`simkgc_entity_text`. The segment ids of the pair are not passed (every token is of
    segment 0, as the model saw single texts in its own training).
    """

    def __init__(self, kg: KnowledgeGraph, tokenizer: PreTrainedTokenizerBase, max_tokens: int):
        self.kg, self.tokenizer, self.max_tokens = kg, tokenizer, max_tokens
        self.entity_texts = [
            simkgc_entity_text(n, d)
            for n, d in zip(kg.entity_names, kg.entity_descriptions, strict=True)
        ]
        self._tails = self._views(self.entity_texts)
        # The exact tail views as text (name the entity index's cache entries).
        self._tail_texts = tokenizer.batch_decode(self._tails)
        self.entity_lengths = np.array([len(i) for i in self._tails], dtype=np.int64)
        self.relation_lengths = self._token_counts(
            [self.relation_words(r) for r in range(2 * kg.num_relations)]
        )

    def _views(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[list[int]]:
        encoded = self.tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            truncation=True,
            max_length=self.max_tokens,
        )
        return encoded["input_ids"]

    def relation_words(self, relation: int) -> str:
        """The relation's words; an inverse relation's are ``inverse`` and the forward words."""
        forward = self.kg.num_relations
        if relation >= forward:
            return f"inverse {self.kg.relation_text(relation - forward)}"
        return self.kg.relation_text(relation)

    def hr_text(self, head: int, relation: int) -> str:
        """The head-relation view as the model reads it (special tokens included)."""
        return self.tokenizer.decode(self.hr_ids([head], [relation])[0])

    def tail_text(self, entity: int) -> str:
        """The tail view as the model reads it (special tokens included)."""
        return self._tail_texts[entity]

    def hr_ids(self, heads: Sequence[int], relations: Sequence[int]) -> list[list[int]]:
        """Token ids of head-relation views: (head text, relation words) pairs."""
        texts = [self.entity_texts[h] for h in heads]
        return self._views(texts, [self.relation_words(r) for r in relations])

    def tail_ids(self, entities: Sequence[int]) -> list[list[int]]:
        """Token ids of tail views."""
        return [list(self._tails[e]) for e in entities]


def split_shared_prefix(
    rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int]
) -> tuple[list[int], list[list[int]], list[int]]:
    """The token prefix that all ``rows`` share, the rows without it, and the prompt lengths
    counted after it.

    Every triple-completion prompt starts with the recipe's fixed preamble and instruction (about
    half of its tokens), so the LM pass can run that prefix once and repeat its keys and values
    for each row. The prefix stops one token short of the shortest prompt, so every row keeps the
    position that predicts its first response token. One row, or none in common: empty prefix.
    """
    if len(rows) < 2:
        return [], [list(r) for r in rows], list(prompt_lengths)
    limit = min(prompt_lengths) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return list(first[:n]), [list(r[n:]) for r in rows], [p - n for p in prompt_lengths]


@dataclass(frozen=True)
class Batch:
    """A padded batch of token ids with its attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool = False) -> Batch:
    """Pad to the longest row; the mask, not the pad id, marks real tokens (pad == EOS here)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.as_tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return Batch(ids, mask)


@dataclass(frozen=True)
class KaLMBatch:
    """One training step's inputs: padded views, masks and the triple-completion prompts.

    ``known`` marks the known (training) answers of each query ``(h_i, r_i)`` over all
    entities; the two masks derive from it. ``self_negative`` (tail views of the heads) is set
    when self-negatives are on, ``lm`` when the step has a triple-completion loss; ``lm_prefix``
    (1, P) is the prompts' shared prefix and ``prompt_lengths`` count after it.
    """

    heads: torch.Tensor
    relations: torch.Tensor
    tails: torch.Tensor
    hr: Batch
    tail: Batch
    known: torch.Tensor
    false_negative_mask: torch.Tensor
    self_negative: Batch | None = None
    self_negative_mask: torch.Tensor | None = None
    lm: Batch | None = None
    lm_prefix: torch.Tensor | None = None
    prompt_lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.heads)

    def to(self, device: torch.device | str) -> KaLMBatch:
        """The views, masks and prompts on ``device``; ids and known answers stay on the CPU."""

        def move(x: object) -> object:
            if isinstance(x, Batch):
                return Batch(x.input_ids.to(device), x.attention_mask.to(device))
            return x.to(device) if isinstance(x, torch.Tensor) else x

        keep = ("heads", "relations", "tails", "known")
        return replace(
            self,
            **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name not in keep},
        )


class Collator:
    """Turns example indices into a :class:`KaLMBatch` (tokenising, padding, masks).

    ``lm_examples`` first examples of a batch get the triple-completion prompt (0: none);
    with ``share_prefix`` their common token prefix is split off to run once.
    """

    def __init__(
        self,
        views: ViewBuilder,
        examples: np.ndarray,
        known: KnownAnswers,
        *,
        lm_examples: int,
        max_prompt_tokens: int,
        share_prefix: bool,
        self_negatives: bool,
    ) -> None:
        self.views, self.examples, self.known = views, examples, known
        self.lm_examples, self.max_prompt_tokens = lm_examples, max_prompt_tokens
        self.share_prefix, self.self_negatives = share_prefix, self_negatives

    def lm_prompts(
        self, heads: list[int], rels: list[int], tails: list[int]
    ) -> tuple[list[int], list[list[int]], list[int]]:
        """Token ids of the triple-completion prompts of a batch's first ``lm_examples`` triples:
        their shared prefix (empty unless ``share_prefix``), the rows after it and the prompt
        lengths counted after it."""
        k = self.lm_examples
        if k == 0:
            return [], [], []
        rows, plens = self.views.completion_ids(
            heads[:k], rels[:k], tails[:k], self.max_prompt_tokens
        )
        return split_shared_prefix(rows, plens) if self.share_prefix else ([], rows, plens)

    def collate(self, indices: np.ndarray) -> KaLMBatch:
        """The batch of the examples at ``indices`` (CPU tensors; see :meth:`KaLMBatch.to`)."""
        heads, rels, tails = (torch.from_numpy(c) for c in self.examples[indices].T)
        h, r, t = heads.tolist(), rels.tolist(), tails.tolist()
        pad = self.views.tokenizer.pad_token_id
        known = self.known.mask(heads, rels, self.views.kg.num_entities)
        batch = KaLMBatch(
            heads=heads,
            relations=rels,
            tails=tails,
            hr=pad_batch(self.views.hr_ids(h, r), pad),
            tail=pad_batch(self.views.tail_ids(t), pad),
            known=known,
            false_negative_mask=false_negative_mask(tails, known),
        )
        if self.self_negatives:
            batch = replace(
                batch,
                self_negative=pad_batch(self.views.tail_ids(h), pad),
                self_negative_mask=self_negative_mask(heads, known),
            )
        prefix, rows, plens = self.lm_prompts(h, r, t)
        if rows:
            batch = replace(
                batch,
                lm=pad_batch(rows, pad),
                lm_prefix=torch.tensor([prefix]) if prefix else None,
                prompt_lengths=torch.tensor(plens),
            )
        return batch
