"""The weight files of a model directory, inspected without loading the model.

Why a module of its own: the configuration sizes a local model directory to choose its default
profile, and the model loader checks that a directory (a user's, or a Hugging Face cache
snapshot) holds complete weights before handing it to ``from_pretrained``. This leaf imports no
other ``kalm`` module (``tests/test_layering.py`` checks that).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = [
    "POOLING_MODES",
    "encoder_pooling",
    "is_model_directory",
    "parameter_count",
    "weight_files",
]

_BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: safetensors if there are any, else PyTorch
    ``.bin`` files; a sharded checkpoint must hold every shard its index lists."""
    for suffix in ("safetensors", "bin"):
        files = sorted(directory.glob(f"*.{suffix}"))
        index = next(iter(directory.glob(f"*.{suffix}.index.json")), None)
        if index is not None:
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return []
            if not all((directory / shard).is_file() for shard in shards):
                return []
        if files:
            return files
    return []


def is_model_directory(directory: Path) -> bool:
    """Whether ``directory`` holds what ``from_pretrained`` needs: ``config.json`` and a
    complete set of weights (:func:`weight_files`)."""
    return (directory / "config.json").is_file() and bool(weight_files(directory))


def _safetensors_parameters(path: Path) -> int:
    """Elements of every tensor of a safetensors file, read from its JSON header alone."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        # Garbage would claim a header of exabytes; read no more than the file holds.
        raw = f.read(size) if size <= path.stat().st_size - 8 else b""
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path.name} holds no valid safetensors header") from err
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def parameter_count(directory: Path) -> int:
    """Parameters of the model in ``directory`` without loading it.

    Safetensors headers give the exact count in milliseconds (building the model on the meta
    device takes seconds for 7B parameters); ``.bin`` weights are estimated from their size and
    the ``torch_dtype`` of ``config.json``.
    """
    files = weight_files(directory)
    if files and files[0].suffix == ".safetensors":
        return sum(_safetensors_parameters(f) for f in files)
    config = json.loads((directory / "config.json").read_text())
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return sum(f.stat().st_size for f in files) // _BYTES_PER_ELEMENT.get(str(dtype), 4)


POOLING_MODES = {"pooling_mode_mean_tokens": "mean"}
"""The sentence-transformers pooling modes KaLM pools by, under their key in the pooling
configuration: the mean of the token states over the attention mask (all-MiniLM-L6-v2's)."""


def encoder_pooling(directory: Path) -> str | None:
    """The pooling of a sentence-transformers model directory (``"mean"``), or None for a
    directory without ``modules.json`` (a causal LM, which KaLM pools at its last token).

    A bi-encoder's checkpoint does not say how to pool in ``config.json``: its
    ``modules.json`` names a Pooling module, whose ``config.json`` sets one mode true. A
    directory whose pooling is missing or not one of :data:`POOLING_MODES` is refused, with the
    file at fault: pooling it otherwise would embed differently from its training.
    """
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        path = next(m["path"] for m in modules if str(m["type"]).endswith(".Pooling"))
        pooling_file = directory / path / "config.json"
        modes = json.loads(pooling_file.read_text())
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as err:
        raise ValueError(
            f"{modules_file}: no readable Pooling module ({type(err).__name__}: {err}); a "
            "sentence-transformers directory lists one whose config.json sets the pooling mode"
        ) from err
    chosen = [key for key, on in modes.items() if key.startswith("pooling_mode_") and on is True]
    if len(chosen) != 1 or chosen[0] not in POOLING_MODES:
        raise ValueError(
            f"{pooling_file} sets the pooling modes {chosen or 'none'}; KaLM pools by exactly "
            f"one of {', '.join(POOLING_MODES)}"
        )
    return POOLING_MODES[chosen[0]]
