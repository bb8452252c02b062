"""KaLM training objectives as pure tensor functions (the book's Method chapter, book/method.md).

``L_KaLM = L_exp + lam * L_imp``: ``explicit_loss`` is the dual-view (symmetric) InfoNCE over the
in-batch cosine matrix of head-relation and tail views; ``lm_loss_from_hidden`` is the
triple-completion language-modelling loss on response tokens only. No model code lives here, so
every formula can be checked by hand and by ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "dual_view_logits",
    "explicit_loss",
    "false_negative_mask",
    "implicit_loss",
    "info_nce",
    "kalm_loss",
    "lm_loss_from_hidden",
    "response_positions",
    "self_negative_diagnostics",
    "self_negative_mask",
]


def _working_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (bf16 scores create ties and lose the margin), else as is."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _masked_fill_min(logits: Tensor, mask: Tensor) -> Tensor:
    """Remove ``mask`` entries from a softmax without inf/NaN gradients.

    Applied *after* the temperature scaling: filling with the most negative finite value gives
    those entries probability 0 and a zero gradient, also for a learnable temperature (scaling
    ``-inf`` by a learnable ``1/tau`` is what produces NaN gradients).
    """
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def dual_view_logits(
    hr_emb: Tensor,
    t_emb: Tensor,
    *,
    tau: float | Tensor,
    margin: float,
    false_negative_mask: Tensor | None = None,
    extra_negatives: Tensor | None = None,
    extra_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The row (hr -> t, with the extra negative as a last column) and column (t -> hr) logits
    of :func:`explicit_loss` (whose docstring explains the arguments), after checking every
    shape; :func:`info_nce` turns them into the loss."""
    if hr_emb.ndim != 2 or hr_emb.shape != t_emb.shape:
        raise ValueError(
            f"explicit_loss: hr_emb and t_emb must both be (B, d); got {tuple(hr_emb.shape)} and "
            f"{tuple(t_emb.shape)}. Pass one pooled embedding per triple for each view."
        )
    tau_value = float(tau.detach()) if isinstance(tau, Tensor) else float(tau)
    if tau_value <= 0:
        raise ValueError(f"explicit_loss: tau must be > 0, got {tau_value}.")
    batch = hr_emb.shape[0]
    dtype = _working_dtype(hr_emb)
    hr = F.normalize(hr_emb.to(dtype), dim=-1)
    t = F.normalize(t_emb.to(dtype), dim=-1)
    eye = torch.eye(batch, dtype=torch.bool, device=hr.device)

    cos = hr @ t.T
    logits = (cos - margin * eye.to(dtype)) / tau
    row_logits, col_logits = logits, logits.T
    if false_negative_mask is not None:
        if false_negative_mask.shape != (batch, batch):
            raise ValueError(
                f"explicit_loss: false_negative_mask must be ({batch}, {batch}), got "
                f"{tuple(false_negative_mask.shape)}."
            )
        if bool((false_negative_mask & eye).any()):
            bad = torch.nonzero(false_negative_mask.diagonal()).flatten().tolist()
            raise ValueError(
                f"explicit_loss: false_negative_mask masks the positive (diagonal) of rows {bad}; "
                "clear the diagonal (false_negative_mask() does this)."
            )
        row_logits = _masked_fill_min(row_logits, false_negative_mask)
        col_logits = _masked_fill_min(col_logits, false_negative_mask.T)

    if extra_negatives is not None:
        if extra_negatives.shape != hr_emb.shape:
            raise ValueError(
                f"explicit_loss: extra_negatives must be {tuple(hr_emb.shape)} like hr_emb, got "
                f"{tuple(extra_negatives.shape)}."
            )
        extra = F.normalize(extra_negatives.to(dtype), dim=-1)
        extra_logits = ((hr * extra).sum(-1) / tau).unsqueeze(1)
        if extra_mask is not None:
            if extra_mask.shape != (batch,):
                raise ValueError(
                    f"explicit_loss: extra_mask must be ({batch},), got {tuple(extra_mask.shape)}."
                )
            extra_logits = _masked_fill_min(extra_logits, extra_mask.unsqueeze(1))
        row_logits = torch.cat([row_logits, extra_logits], dim=1)
    elif extra_mask is not None:
        raise ValueError("explicit_loss: extra_mask given without extra_negatives.")
    return row_logits, col_logits


def explicit_loss(
    hr_emb: Tensor,
    t_emb: Tensor,
    *,
    tau: float | Tensor,
    margin: float,
    false_negative_mask: Tensor | None = None,
    extra_negatives: Tensor | None = None,
    extra_mask: Tensor | None = None,
) -> Tensor:
    """Dual-view InfoNCE ``L_exp`` over a batch of B positive pairs ``(hr_i, t_i)``.

    ``logits_ij = (cos(hr_i, t_j) - margin * [i == j]) / tau``;
    ``L = 0.5 * (CE over rows, hr -> t  +  CE over columns, t -> hr)``, each a batch mean.

    Args:
        hr_emb, t_emb: (B, d) embeddings of the two views; normalised here, so scores are cosines.
        tau: temperature, a float or a 0-d tensor (a learnable temperature may require grad).
        margin: additive margin subtracted from the positives (diagonal) only.
        false_negative_mask: (B, B) bool, True removes ``t_j`` as a negative of row ``i`` (and
            ``hr_i`` as a negative of column ``j``); see :func:`false_negative_mask`. The diagonal
            holds the positives and must be False.
        extra_negatives: (B, d) optional extra negative per row, used in the hr -> t direction
            only: row ``i`` gets one more logit ``cos(hr_i, extra_i) / tau``. This is SimKGC's
            *self-negative*: pass the tail-view embedding of row ``i``'s own head entity, so the
            model cannot score a query high just because it mentions the answer's text.
        extra_mask: (B,) bool, True drops row ``i``'s extra negative (the head entity is itself a
            known answer of the query); see :func:`self_negative_mask`.
    """
    return info_nce(
        *dual_view_logits(
            hr_emb,
            t_emb,
            tau=tau,
            margin=margin,
            false_negative_mask=false_negative_mask,
            extra_negatives=extra_negatives,
            extra_mask=extra_mask,
        )
    )


def info_nce(row_logits: Tensor, col_logits: Tensor) -> Tensor:
    """The mean of the two directions' cross-entropies, positives on the diagonal."""
    targets = torch.arange(row_logits.shape[0], device=row_logits.device)
    return 0.5 * (F.cross_entropy(row_logits, targets) + F.cross_entropy(col_logits, targets))


@torch.no_grad()
def self_negative_diagnostics(
    row_logits: Tensor, *, margin_logit: float | Tensor, extra_mask: Tensor | None = None
) -> dict[str, float]:
    """How much the self-negatives still compete in a batch, over the rows that use one.

    ``row_logits`` are the hr -> t logits of :func:`dual_view_logits` with the self-negative as
    the last column, and ``margin_logit`` the margin in logit units (``margin / tau``).
    ``self_negative_mass``: the mean probability the softmax puts on the row's own head.
    ``head_wins``: the share of rows whose head scores above their positive tail (without the
    margin): the in-batch counterpart of the evaluation's "the head outranks the gold". Both are
    NaN when no row has a self-negative.
    """
    used = torch.ones(len(row_logits), dtype=torch.bool, device=row_logits.device)
    if extra_mask is not None:
        used = ~extra_mask.to(used.device)
    if not bool(used.any()):
        return {"self_negative_mass": math.nan, "head_wins": math.nan}
    mass = row_logits.softmax(dim=1)[:, -1]
    wins = row_logits[:, -1] > row_logits.diagonal() + margin_logit
    return {
        "self_negative_mass": float(mass[used].mean()),
        "head_wins": float(wins[used].float().mean()),
    }


def false_negative_mask(tails: Tensor, known_mask: Tensor) -> Tensor:
    """In-batch false negatives: ``mask[i, j]`` is True when ``t_j`` also answers query ``i``.

    Args:
        tails: (B,) int64 tail entity ids of the batch (the in-batch candidates).
        known_mask: (B, N) bool, True where an entity is a known (training) answer of query
            ``(h_i, r_i)``; e.g. ``KnownAnswers.mask(heads, relations, num_entities)``.

    Returns (B, B) bool with a False diagonal. A repeated tail id (``tails[i] == tails[j]``) is
    always masked, even if ``known_mask`` misses it, since it is the same entity as the positive.
    """
    if tails.ndim != 1 or known_mask.ndim != 2 or known_mask.shape[0] != tails.shape[0]:
        raise ValueError(
            f"false_negative_mask: expected tails (B,) and known_mask (B, N); got "
            f"{tuple(tails.shape)} and {tuple(known_mask.shape)}."
        )
    batch = tails.shape[0]
    mask = known_mask[:, tails] | (tails.unsqueeze(0) == tails.unsqueeze(1))
    return mask & ~torch.eye(batch, dtype=torch.bool, device=mask.device)


def self_negative_mask(heads: Tensor, known_mask: Tensor) -> Tensor:
    """(B,) bool: True where the head entity is itself a known answer of its query.

    Those rows must not use their own head as a self-negative (``extra_mask`` of
    :func:`explicit_loss`).
    """
    return known_mask.gather(1, heads.unsqueeze(1)).squeeze(1)


def implicit_loss(logits_at_targets: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy ``L_imp`` over (M, V) logits and their (M,) target ids."""
    if logits_at_targets.ndim != 2 or targets.shape != logits_at_targets.shape[:1]:
        raise ValueError(
            f"implicit_loss: expected logits (M, V) and targets (M,); got "
            f"{tuple(logits_at_targets.shape)} and {tuple(targets.shape)}."
        )
    return F.cross_entropy(logits_at_targets.to(_working_dtype(logits_at_targets)), targets)


def response_positions(attention_mask: Tensor, prompt_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Positions whose *next* token is a response token (tail text + EOS).

    Real tokens are found from ``attention_mask`` only, never from token ids, because the pad id
    equals the EOS id in our tokenizers; this works for left and right padding alike.

    Args:
        attention_mask: (B, L) 0/1, real tokens of each sequence contiguous.
        prompt_lengths: (B,) number of real prompt tokens at the start of each sequence.

    Returns ``(batch_idx, pos_idx)``, each (M,) int64: predicting token ``pos_idx + 1``.
    """
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    first = mask.int().argmax(1)
    last = first + lengths - 1
    positions = torch.arange(mask.shape[1], device=mask.device)
    contiguous = (positions >= first[:, None]) & (positions <= last[:, None])
    if not bool((contiguous == mask).all()):
        rows = torch.nonzero(~(contiguous == mask).all(1)).flatten().tolist()
        raise ValueError(
            f"response_positions: attention_mask rows {rows} have gaps; pad only on one side."
        )
    prompt_lengths = prompt_lengths.to(lengths.device)
    if bool(((prompt_lengths < 1) | (prompt_lengths >= lengths)).any()):
        raise ValueError(
            f"response_positions: prompt_lengths {prompt_lengths.tolist()} must be in "
            f"[1, real length - 1] (real lengths {lengths.tolist()}): every sequence needs a "
            "prompt and at least one response token."
        )
    start = first + prompt_lengths - 1  # last prompt token predicts the first response token
    carries_loss = (positions >= start[:, None]) & (positions < last[:, None])
    batch_idx, pos_idx = torch.nonzero(carries_loss, as_tuple=True)
    return batch_idx, pos_idx


def lm_loss_from_hidden(
    hidden: Tensor,
    lm_head: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_lengths: Tensor,
) -> Tensor:
    """``L_imp`` from final hidden states (B, L, H), applying ``lm_head`` only where loss is taken.

    Vocabulary logits are the most expensive tensor of a causal LM; computing them only at the
    response positions (see :func:`response_positions`) saves most of that memory and time.
    """
    batch_idx, pos_idx = response_positions(attention_mask, prompt_lengths)
    logits = lm_head(hidden[batch_idx, pos_idx])
    return implicit_loss(logits, input_ids[batch_idx, pos_idx + 1])


def kalm_loss(l_exp: Tensor, l_imp: Tensor, lam: float) -> Tensor:
    """``L_KaLM = L_exp + lam * L_imp`` (the recipe uses ``lam = 0.01``)."""
    return l_exp + lam * l_imp
