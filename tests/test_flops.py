"""FLOP formulas against hand-computed values and against real tiny Llama models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from kalm.flops import (
    PassTokens,
    forward_flops,
    kalm_step_flops,
    linear_shapes,
    lm_head_flops,
    lora_flops,
    params_non_embedding,
    recipe_step_flops,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(**overrides: object) -> LlamaConfig:
    """hidden 8, intermediate 12, 2 layers, 4 heads of 2 dims, 2 KV heads, vocab 32."""
    base = {
        "hidden_size": 8,
        "intermediate_size": 12,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 32,
        "tie_word_embeddings": True,
    }
    return LlamaConfig(**{**base, **overrides})


def body_params(model: LlamaForCausalLM) -> int:
    """Parameters of the real model minus token embeddings and (untied) LM head."""
    skip = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def test_params_by_hand() -> None:
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; MLP 3 * 8*12 = 288; two norms 16
    # -> 496; two layers 992 + final norm 8 = 1000
    assert params_non_embedding(tiny()) == 1000


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": False}, {"attention_bias": True, "mlp_bias": True}],
)
def test_params_match_a_real_model(overrides: dict[str, object]) -> None:
    config = tiny(**overrides)
    assert params_non_embedding(config) == body_params(LlamaForCausalLM(config))


def test_forward_and_head_by_hand() -> None:
    assert forward_flops(tiny(), 3) == 2 * 1000 * 3
    assert lm_head_flops(tiny(), 5) == 2 * 8 * 32 * 5


def test_matmul_flops_match_the_flop_counter() -> None:
    """Linear FLOPs of a real forward = 2 (P - norm gains) T + LM head 2 h V T."""
    config = tiny()
    model = LlamaForCausalLM(config).eval()
    tokens = 5
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.arange(tokens)[None])
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for k, v in counts.items() if k.__name__.split(".")[0] in ("mm", "addmm"))
    norm_gains = (2 * config.num_hidden_layers + 1) * config.hidden_size
    expected = 2 * (params_non_embedding(config) - norm_gains) * tokens
    assert matmul == expected + lm_head_flops(config, tokens)


def test_lora_flops_by_hand_and_against_peft() -> None:
    # q_proj 8 -> 8 at rank 2: 2 * 2 * (8 + 8) = 64 per layer and token; 2 layers, 3 tokens
    assert lora_flops(tiny(), ["q_proj"], 2, 3) == 64 * 2 * 3
    peft = get_peft_model(LlamaForCausalLM(tiny()), LoraConfig(r=2, target_modules=TARGETS))
    adapters = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert lora_flops(tiny(), TARGETS, 2, 7) == 2 * adapters * 7


def test_lora_rejects_unknown_modules() -> None:
    with pytest.raises(ValueError, match="qproj"):
        lora_flops(tiny(), ["qproj"], 2, 1)


def test_step_flops_by_hand() -> None:
    tokens = PassTokens(hr=2, tail=3, self_negative=4, lm=5, response=1)
    ours = kalm_step_flops(tiny(), tokens, [], 0)
    # forward of all 14 tokens (28000) + input gradients of the 10 with gradient (20000)
    assert ours.body == 48_000
    assert ours.lm_head == 2 * 512  # one position, forward + input gradient
    assert ours.lora == 0
    recipe = recipe_step_flops(tiny(), tokens, [], 0)
    assert recipe.body == 2 * 2 * 1000 * 14  # all four passes with gradient
    assert recipe.lm_head == 512 * 9 + 2 * 512 * 5  # view logits forward; prompt logits fwd+bwd
    with_lora = kalm_step_flops(tiny(), tokens, ["q_proj"], 2)
    assert with_lora.lora == 3 * 64 * 2 * 10 + 64 * 2 * 4
    assert with_lora.total == 48_000 + 1024 + with_lora.lora
    trained = kalm_step_flops(tiny(), tokens, ["q_proj"], 2, self_negative_grad=True)
    assert trained.body == recipe.body  # the head view now has input gradients too
    assert trained.lora == 3 * 64 * 2 * 14


@settings(max_examples=50, deadline=None)
@given(
    hr=st.integers(0, 500),
    tail=st.integers(0, 500),
    own=st.integers(0, 500),
    lm=st.integers(0, 500),
    share=st.floats(0, 1),
)
def test_recipe_never_cheaper(hr: int, tail: int, own: int, lm: int, share: float) -> None:
    tokens = PassTokens(hr, tail, own, lm, int(share * lm))
    ours = kalm_step_flops(tiny(), tokens, TARGETS, 4)
    recipe = recipe_step_flops(tiny(), tokens, TARGETS, 4)
    assert ours.total <= recipe.total
    assert ours.body <= recipe.body and ours.lm_head <= recipe.lm_head


def test_linear_shapes_use_head_dim() -> None:
    config = tiny(head_dim=3)
    assert linear_shapes(config)["q_proj"] == (8, 12)
    assert linear_shapes(config)["k_proj"] == (8, 6)
    assert params_non_embedding(config) == body_params(LlamaForCausalLM(config))
