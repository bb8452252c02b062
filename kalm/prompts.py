"""The Alpaca-style prompt of the triple-completion objective, shared by training and KGQA.

A prompt is the preamble, one ``### Instruction``, solved examples as ``### Input`` /
``### Response`` pairs, then the question's input and an open response. Training uses it with
no examples (:meth:`kalm.views.ViewBuilder.prompt_text`); few-shot KGQA adds examples, so a
zero-shot tail-prediction question is exactly a training prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["INSTRUCTION", "PROMPT_PREAMBLE", "alpaca_prompt"]

PROMPT_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
INSTRUCTION = "Given the head entity and relation, write a tail entity that completes the triple"
"""The triple-completion instruction (also used for inverse, i.e. head, queries)."""


def _block(inp: str, answer: str | None) -> str:
    head = f"### Input:\n{inp}\n\n### Response:\n"
    return head if answer is None else f"{head}{answer}\n\n"


def alpaca_prompt(instruction: str, query: str, examples: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt up to (and including) the open response header of ``query``.

    ``examples`` are solved ``(input, answer)`` pairs shown before the query.
    """
    return (
        f"{PROMPT_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n"
        + "".join(_block(x, a) for x, a in examples)
        + _block(query, None)
    )
