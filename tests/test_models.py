"""kalm.models: loading (real SmolLM2, local directories, the Hugging Face cache, unreachable hub
models, 8 bit) and embeddings.

The embedding must not depend on how a text is batched: padding side, batch size and neighbours
all change the padded tensor, never the last real token's hidden state (book/method.md).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
import warnings
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from helpers import smollm2_tokenizer, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm import models
from kalm.config import REPO_ROOT, ConfigError, ModelSpec
from kalm.encoder import encode_ids
from kalm.encoder import encode_texts as encode
from kalm.models import (
    ModelUnavailableError,
    decoder_of,
    default_device,
    embed_batch,
    embed_views,
    load_model,
    pool_last_token,
)
from kalm.views import pad_batch

TEXTS = [
    "[ dog, a domesticated carnivorous mammal with a long snout, hypernym ]",
    "{ cat }",
    "{ wolf, a wild carnivorous mammal }",
    "[ Paris, capital of ]",
    "a",
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def reference(smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> torch.Tensor:
    """Every text embedded on its own (batch size 1, no padding): what any batching reproduces."""
    model, tokenizer = smollm2
    return encode(model, tokenizer, TEXTS, batch_size=1)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the hub library reads HF_HUB_OFFLINE once at import, so patch both."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- the real SmolLM2 ---------------------------------------------------------------------------


def test_greedy_generation_knows_paris(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = smollm2
    assert not model.training and next(model.parameters()).dtype == torch.float32
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(
        **inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_embeddings_are_unit_fp32_rows(reference: torch.Tensor) -> None:
    assert reference.dtype == torch.float32 and reference.shape[0] == len(TEXTS)
    torch.testing.assert_close(reference.norm(dim=1), torch.ones(len(TEXTS)))
    # different texts, different embeddings
    off_diagonal = (reference @ reference.T - torch.eye(len(TEXTS))).abs()
    assert off_diagonal.max() < 0.9999


@pytest.mark.parametrize("batch_size", [3, 8])
def test_batch_size_does_not_change_embeddings(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    reference: torch.Tensor,
    batch_size: int,
) -> None:
    model, tokenizer = smollm2
    torch.testing.assert_close(
        encode(model, tokenizer, TEXTS, batch_size=batch_size), reference, atol=ATOL, rtol=0
    )


def test_left_padding_gives_the_same_embeddings(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase], reference: torch.Tensor
) -> None:
    model, tokenizer = smollm2
    ids = tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    batch = pad_batch(ids, tokenizer.pad_token_id, left=True)
    assert batch.attention_mask[:, 0].min() == 0  # really left-padded
    with torch.inference_mode():
        hidden = decoder_of(model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
    left = F.normalize(pool_last_token(hidden, batch.attention_mask).float(), dim=-1)
    torch.testing.assert_close(left, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("neighbours", "where"), [([0, 2], 1), ([3, 4], 2)])
def test_neighbours_do_not_change_an_embedding(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    reference: torch.Tensor,
    neighbours: list[int],
    where: int,
) -> None:
    """The same short text embedded between different (longer and shorter) neighbours."""
    model, tokenizer = smollm2
    rows = [TEXTS[i] for i in neighbours]
    rows.insert(where, TEXTS[1])
    emb = encode(model, tokenizer, rows, batch_size=8)
    torch.testing.assert_close(emb[where], reference[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        emb[[i for i in range(3) if i != where]], reference[neighbours], atol=ATOL, rtol=0
    )


def test_empty_sequence_is_refused(
    smollm2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="empty sequence"):
        encode_ids(model, [[1, 2], []], pad_id=tokenizer.pad_token_id)


# --- pooling ----------------------------------------------------------------------------------


def test_pool_last_token_by_hand() -> None:
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)  # value = row * 4 + position
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert pool_last_token(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert pool_last_token(hidden, left).flatten().tolist() == [3.0, 7.0]


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6), left=st.booleans())
def test_pool_last_token_finds_the_last_real_token(lengths: list[int], left: bool) -> None:
    rows = [[100 + i] * n for i, n in enumerate(lengths)]
    batch = pad_batch(rows, pad_id=0, left=left)
    hidden = batch.input_ids.unsqueeze(-1).float()  # the hidden state is the token id itself
    pooled = pool_last_token(hidden, batch.attention_mask).flatten()
    assert pooled.tolist() == [100.0 + i for i in range(len(lengths))]


# --- loading -------------------------------------------------------------------------------------


def test_unreachable_hub_model_names_hub_id_and_local_directory(offline: None) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_model("llama2")
    assert time.perf_counter() - started < 5  # offline: no network attempt, no retries
    message = str(err.value)
    assert "meta-llama/Llama-2-7b-hf" in message and "HF_HUB_OFFLINE is set" in message
    assert "local directory" in message and "-p model /path/to/Llama-2-7b-hf" in message
    assert "python -m kalm.train --model /path/to/Llama-2-7b-hf" in message
    assert "hf download meta-llama/Llama-2-7b-hf" in message
    assert "HF_HUB_OFFLINE=1 papermill notebooks/kgc.ipynb out.ipynb -p model llama2" in message


def test_an_unreachable_hub_is_asked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not offline, not cached: one short request to the hub fails, and nothing retries it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def unreachable(url: str, **kwargs: object) -> None:
        asked.append((url, kwargs.get("timeout")))
        raise ConnectionError("Name or service not known")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("from_pretrained must not be reached")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ModelUnavailableError, match=r"(?s)the hub is unreachable.*local directory"):
        load_model("llama2")
    assert len(asked) == 1 and asked[0][1] == models.HUB_PROBE_SECONDS


def test_unknown_hub_id_in_the_configuration(
    offline: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = (REPO_ROOT / "_config.yml").read_text()
    config = config.replace("meta-llama/Meta-Llama-3-8B", "kalm-tests/no-such-model")
    (tmp_path / "config.yml").write_text(config)
    monkeypatch.setenv("KALM_CONFIG", str(tmp_path / "config.yml"))
    with pytest.raises(
        ModelUnavailableError, match=r"(?s)hub id 'kalm-tests/no-such-model'.*local directory"
    ):
        load_model("llama3")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama saved with the SmolLM2 tokenizer, as a user's local checkpoint."""
    tokenizer = smollm2_tokenizer()
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_local_directory_loads(tiny_dir: Path, offline: None) -> None:
    model, tokenizer = load_model(tiny_dir, device="cpu")
    assert model.config.hidden_size == 16 and not model.training
    assert tokenizer.pad_token_id is not None
    emb = encode(model, tokenizer, ["{ dog }", "[ cat, eats ]"])
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    same, _ = load_model(str(tiny_dir), device="cpu")  # a str path works too
    torch.testing.assert_close(encode(same, tokenizer, ["{ dog }"]), emb[:1])


def test_a_spec_is_loaded_without_reading_the_configuration(
    tiny_dir: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KALM_CONFIG", str(tiny_dir / "no-such-config.yml"))
    spec = ModelSpec(alias="tiny", source="hub", default_profile="cpu", hub_id=str(tiny_dir))
    model, tokenizer = load_model(spec, device="cpu")
    assert model.config.hidden_size == 16 and tokenizer.pad_token_id is not None


def test_a_hub_model_in_the_cache_loads_without_the_hub(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hugging Face cache is read first: a filled cache needs no request at all."""
    snapshot = tmp_path / "models--kalm-tests--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_refusal", lambda hub_id: pytest.fail("the hub was asked"))
    spec = ModelSpec(alias="tiny", source="hub", default_profile="cpu", hub_id="kalm-tests/tiny")
    model, tokenizer = load_model(spec, device="cpu")
    assert model.config.hidden_size == 16 and tokenizer.pad_token_id is not None


def test_8_bit_needs_a_gpu_and_bitsandbytes_and_says_which_is_missing(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed = {"bitsandbytes": False}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: (
            (find_spec("torch") if installed["bitsandbytes"] else None)
            if name == "bitsandbytes"
            else find_spec(name, *a)
        ),
    )
    with pytest.raises(ModelUnavailableError) as err:
        load_model(tiny_dir, device="cpu", load_in_8bit=True)
    assert "a CUDA GPU" in str(err.value) and "bitsandbytes" in str(err.value)
    assert "pip install -e '.[gpu]'" in str(err.value)
    # The command line's syntax and the notebooks', whichever set the field.
    assert "`--profile cpu` or `--set load_in_8bit=false`" in str(err.value)
    assert "`-p profile cpu` or `-y 'overrides: {load_in_8bit: false}'`" in str(err.value)
    with pytest.raises(ModelUnavailableError) as err:
        load_model(tiny_dir, device="cuda:0", load_in_8bit=True)
    assert "bitsandbytes" in str(err.value) and "CUDA" not in str(err.value)
    installed["bitsandbytes"] = True
    with pytest.raises(ModelUnavailableError) as err:
        load_model(tiny_dir, device="cpu", load_in_8bit=True)
    assert "a CUDA GPU" in str(err.value) and "bitsandbytes" not in str(err.value)


def _copy(tiny_dir: Path, target: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """``tiny_dir`` copied to ``target`` without the files named in ``skip``."""
    return Path(shutil.copytree(tiny_dir, target, ignore=lambda d, names: list(skip)))


def test_a_directory_without_tokenizer_files_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    bare = _copy(tiny_dir, tmp_path / "bare", skip=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(ModelUnavailableError) as err:
        load_model(bare, device="cpu")
    assert f"{bare} holds no tokenizer: none of tokenizer.json" in str(err.value)


def test_weights_without_a_layer_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    """transformers would initialise the missing layer at random and only log it."""
    partial = _copy(tiny_dir, tmp_path / "partial")
    weights = load_file(partial / "model.safetensors")
    kept = {name: t for name, t in weights.items() if ".layers.1." not in name}
    save_file(kept, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelUnavailableError) as err:
        load_model(partial, device="cpu")
    message = str(err.value)
    assert f"{partial}: the weights lack {len(weights) - len(kept)} tensors" in message
    assert "model.layers.1.input_layernorm.weight" in message


@pytest.mark.parametrize(
    "garbage",
    [b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{{{{{"],
    ids=["huge header size", "header not JSON"],
)
def test_a_garbage_safetensors_header_is_named(
    tiny_dir: Path, tmp_path: Path, garbage: bytes
) -> None:
    """A header size of exabytes (or a header that is not JSON), as a local directory and as a
    configured directory: both errors name the file instead of running out of memory."""
    damaged = _copy(tiny_dir, tmp_path / "damaged")
    (damaged / "model.safetensors").write_bytes(garbage)
    with pytest.raises(ConfigError) as err:
        load_model(damaged, device="cpu")
    assert "model.safetensors holds no valid safetensors header" in str(err.value)
    spec = ModelSpec(alias="tiny", source="hub", default_profile="cpu", hub_id=str(damaged))
    with pytest.raises(ModelUnavailableError) as err:
        load_model(spec, device="cpu")
    assert f"{damaged / 'model.safetensors'} is damaged" in str(err.value)


def test_missing_weights_are_reported_before_8_bit(offline: None) -> None:
    with pytest.raises(ModelUnavailableError) as err:
        load_model("llama2", device="cpu", load_in_8bit=True)
    assert "Hugging Face cache" in str(err.value) and "CUDA" not in str(err.value)


def test_each_process_loads_onto_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert default_device() == torch.device("cuda", 0)


def test_decoder_of_sees_through_peft(tiny_dir: Path) -> None:
    model, tokenizer = load_model(tiny_dir, device="cpu")
    base = decoder_of(model)
    assert base is model.model  # the LlamaModel body, no LM head
    before = encode(model, tokenizer, TEXTS[:3])
    tuned = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decoder_of(tuned) is base
    tuned.train()
    # LoRA starts as the identity (B = 0), so the embeddings do not move
    torch.testing.assert_close(encode(tuned, tokenizer, TEXTS[:3]), before)
    assert tuned.training  # encode evaluates in eval mode and restores the caller's mode


def test_a_damaged_converted_model_is_converted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kalm import models
    from kalm.config import load_config
    from kalm.durable import StoreWarning

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    tokenizer = smollm2_tokenizer()
    conversions = []

    def dequantise(path: Path):
        conversions.append(path)
        return tiny_llama(len(tokenizer)), tokenizer

    monkeypatch.setenv("KALM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_package_path", lambda spec: gguf)
    monkeypatch.setattr(models, "_dequantise", dequantise)
    spec = load_config().model("smollm2")
    first = models._converted_dir(spec)
    assert first.name.startswith("smollm2-") and (first / "manifest.json").is_file()
    assert models._converted_dir(spec) == first and len(conversions) == 1
    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(StoreWarning, match=r"file model\.safetensors has 100 bytes.*Converting"):
        model, _ = load_model(spec)
    assert len(conversions) == 2 and isinstance(model, PreTrainedModel)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".smollm2")]  # no temp


def test_bf16_on_a_cpu_without_it_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated bf16 is a trap (orders of magnitude slower than fp32): the loader says so and
    names the fix; with native bf16, or in fp32, or on a GPU, it says nothing."""
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"without AMX or AVX512-BF16.*precision: auto") as w:
        models.warn_if_emulated("bf16", torch.device("cpu"))
    assert "`--set precision=fp32`" in str(w[0].message)  # the command line's syntax too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.warn_if_emulated("fp32", torch.device("cpu"))
        models.warn_if_emulated("bf16", torch.device("cuda", 0))
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
        models.warn_if_emulated("bf16", torch.device("cpu"))


def _views(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three right-padded batches of random ids, each of another width and length mix."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for lengths in ([3, 7, 5], [9, 2, 4], [1, 6, 6]):
        rows = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
        batch = pad_batch(rows, pad_id=0)
        batches.append((batch.input_ids, batch.attention_mask))
    return batches


def test_embed_views_in_one_forward_equals_one_forward_per_batch() -> None:
    """Stacked and padded to a common width, every row keeps the embedding and the gradient
    it has in a batch of its own (fp32)."""
    model = get_peft_model(
        tiny_llama(64, layers=2), LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    views = _views(64)

    def run(merged: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if merged:
            embeddings = embed_views(model, views)
        else:
            embeddings = [embed_batch(model, ids, mask) for ids, mask in views]
        weights = torch.linspace(-1, 1, 16)
        sum((e * weights * (i + 1)).sum() for i, e in enumerate(embeddings)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return [e.detach() for e in embeddings], grads

    merged, merged_grads = run(True)
    separate, separate_grads = run(False)
    assert [e.shape for e in merged] == [e.shape for e in separate] == [(3, 16)] * 3
    for a, b in zip(merged, separate, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert merged_grads.keys() == separate_grads.keys() and merged_grads
    for name in merged_grads:
        torch.testing.assert_close(merged_grads[name], separate_grads[name], atol=ATOL, rtol=1e-4)


def test_embed_views_refuses_left_padding() -> None:
    batch = pad_batch([[1, 2, 3], [4]], pad_id=0, left=True)
    with pytest.raises(ValueError, match="padded on the right"):
        embed_views(tiny_llama(16), [(batch.input_ids, batch.attention_mask)])
