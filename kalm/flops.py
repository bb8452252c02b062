"""FLOP counts of KaLM training and encoding, for MFU and for comparing against the recipe.

Conventions (the usual ``2 * params * tokens`` accounting):

- A dense ``(d_in -> d_out)`` linear costs ``2 * d_in * d_out`` FLOPs per token forward; its
  input gradient costs the same again, its weight gradient the same again.
- The base model is frozen under LoRA, so a pass *with* gradient costs forward + input gradient
  = ``2 x`` forward for the base weights (no weight gradients are ever computed for them).
- A LoRA adapter of rank ``r`` on a ``(d_in -> d_out)`` linear costs ``2 r (d_in + d_out)`` per
  token forward and ``2 x`` that backward (input and weight gradients), counted separately.
- Attention score/value products (``~4 * layers * context * hidden`` per token) are left out:
  under 5 % for the short sequences here, and leaving them out can only understate MFU.
- The vocabulary projection (tied embeddings) is counted apart from the body: ``2 h V`` per
  position where logits are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig

__all__ = [
    "PassTokens",
    "StepFlops",
    "forward_flops",
    "kalm_step_flops",
    "linear_shapes",
    "lm_head_flops",
    "lora_flops",
    "params_non_embedding",
    "recipe_step_flops",
]


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """``(d_in, d_out)`` of each linear of one Llama-style decoder layer, by module name."""
    h, i, hd = config.hidden_size, config.intermediate_size, _head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def params_non_embedding(config: PretrainedConfig) -> int:
    """Parameters of a Llama-style decoder without token embeddings and LM head.

    These are the weights every token multiplies through (norm gains are included: they are
    in the count of a real model, though they cost no matmul FLOPs).
    """
    shapes = linear_shapes(config)
    per_layer = sum(a * b for a, b in shapes.values()) + 2 * config.hidden_size
    if getattr(config, "attention_bias", False):
        per_layer += sum(shapes[n][1] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if getattr(config, "mlp_bias", False):
        per_layer += sum(shapes[n][1] for n in ("gate_proj", "up_proj", "down_proj"))
    return config.num_hidden_layers * per_layer + config.hidden_size


def forward_flops(config: PretrainedConfig, tokens: int) -> int:
    """Forward FLOPs of the decoder body over ``tokens`` tokens: ``2 * P * tokens``."""
    return 2 * params_non_embedding(config) * tokens


def lm_head_flops(config: PretrainedConfig, positions: int) -> int:
    """Forward FLOPs of the vocabulary projection at ``positions`` positions: ``2 h V`` each."""
    return 2 * config.hidden_size * config.vocab_size * positions


def lora_flops(config: PretrainedConfig, targets: Sequence[str], rank: int, tokens: int) -> int:
    """Forward FLOPs of LoRA adapters of ``rank`` on ``targets`` in every layer."""
    shapes = linear_shapes(config)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"lora_flops: unknown target module(s) {unknown}; valid: {list(shapes)}")
    per_token = sum(2 * rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    return config.num_hidden_layers * per_token * tokens


@dataclass(frozen=True)
class PassTokens:
    """Real (unpadded) token counts of the passes of one training step.

    ``hr``/``tail``/``self_negative`` are the view passes, ``lm`` the triple-completion prompts
    (prompt + response) and ``response`` the positions whose next token is a response token.
    """

    hr: int
    tail: int
    self_negative: int
    lm: int
    response: int


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step, split so that MFU can be stated with or without the adapters."""

    body: int
    lm_head: int
    lora: int

    @property
    def total(self) -> int:
        return self.body + self.lm_head + self.lora


def _lora(
    config: PretrainedConfig, targets: Sequence[str], rank: int, grad: int, nograd: int
) -> int:
    """LoRA FLOPs of ``grad`` tokens with gradient (3x forward) and ``nograd`` without (1x)."""
    return 3 * lora_flops(config, targets, rank, grad) + lora_flops(config, targets, rank, nograd)


def kalm_step_flops(
    config: PretrainedConfig,
    tokens: PassTokens,
    lora_targets: Sequence[str],
    lora_rank: int,
    *,
    self_negative_grad: bool = False,
) -> StepFlops:
    """FLOPs of one KaLM step as this library runs it.

    body = 2P(hr + tail + self_negative + lm) forward + 2P(hr + tail + lm) input gradients
    (the self-negative view runs without gradient unless ``self_negative_grad``, then it has
    them too); LM head = 2hV * response forward + the same for its input gradient (the tied
    embedding is frozen); LoRA = 3x its forward on passes with gradient, 1x on the others.
    """
    grad = tokens.hr + tokens.tail + tokens.lm
    nograd = tokens.self_negative
    if self_negative_grad:
        grad, nograd = grad + nograd, 0
    return StepFlops(
        body=forward_flops(config, grad + nograd) + forward_flops(config, grad),
        lm_head=2 * lm_head_flops(config, tokens.response),
        lora=_lora(config, lora_targets, lora_rank, grad, nograd),
    )


def recipe_step_flops(
    config: PretrainedConfig, tokens: PassTokens, lora_targets: Sequence[str], lora_rank: int
) -> StepFlops:
    """FLOPs of the released recipe on the same batch.

    The recipe runs the head-only view (``self_negative`` tokens) *with* gradient, computes
    vocabulary logits at every position of all three views (forward only: no loss uses them) and
    of the LM prompt (forward, and input gradient since its loss backpropagates through them).
    """
    grad = tokens.hr + tokens.tail + tokens.self_negative + tokens.lm
    views = tokens.hr + tokens.tail + tokens.self_negative
    return StepFlops(
        body=2 * forward_flops(config, grad),
        lm_head=lm_head_flops(config, views) + 2 * lm_head_flops(config, tokens.lm),
        lora=_lora(config, lora_targets, lora_rank, grad, 0),
    )
