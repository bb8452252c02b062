"""Embedding-based KGC ranking and metrics (the protocol of the book's Method chapter).

Ranks are computed by counting, never by sorting, so ties are explicit: optimistic
``1 + #{score > gold}``, pessimistic ``#{score >= gold}`` and realistic = their mean, the same
definitions as PyKEEN's rank-based evaluator. Filtering is strict: other known answers are never
counted against the gold. Everything here is a pure function of score or embedding tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

__all__ = [
    "HITS_AT",
    "Ranks",
    "metrics",
    "metrics_by_direction",
    "per_relation",
    "rank",
    "rank_queries",
]

HITS_AT: tuple[int, ...] = (1, 3, 10)
FilterMode = Literal["strict", "simkgc"]


@dataclass(frozen=True)
class Ranks:
    """Per-query ranks of the gold entity (float tensors of equal length Q)."""

    optimistic: Tensor
    pessimistic: Tensor
    realistic: Tensor

    def __len__(self) -> int:
        return len(self.realistic)

    @classmethod
    def cat(cls, parts: Sequence[Ranks]) -> Ranks:
        """Concatenate the ranks of several query chunks or directions."""
        return cls(
            torch.cat([p.optimistic for p in parts]),
            torch.cat([p.pessimistic for p in parts]),
            torch.cat([p.realistic for p in parts]),
        )


def rank(
    scores: Tensor,
    gold: Tensor,
    filter_mask: Tensor | None = None,
    *,
    mode: FilterMode = "strict",
) -> Ranks:
    """Rank the gold entity of each query among all N candidates (higher score = better).

    Args:
        scores: (B, N) float scores of every candidate.
        gold: (B,) int64 index of the correct candidate.
        filter_mask: (B, N) bool, True for known answers to filter out. The gold is never
            filtered, even when its entry is True.
        mode: ``"strict"`` drops filtered candidates from the count (they can never outrank
            the gold). ``"simkgc"`` reproduces the released recipe instead: subtract 1 from the
            filtered candidates' scores and count as usual; with cosine scores a filtered
            candidate can still outrank the gold, so use it only to compare with published numbers.
    """
    if scores.ndim != 2 or gold.shape != scores.shape[:1]:
        raise ValueError(
            f"rank: expected scores (B, N) and gold (B,); got {tuple(scores.shape)} and "
            f"{tuple(gold.shape)}."
        )
    if bool(torch.isnan(scores).any()):
        rows = torch.nonzero(torch.isnan(scores).any(1)).flatten()[:10].tolist()
        raise ValueError(
            f"rank: NaN scores in query rows {rows} (first 10); check the embeddings for NaN "
            "(e.g. a zero vector normalised, or fp16 overflow)."
        )
    if mode not in ("strict", "simkgc"):
        raise ValueError(f"rank: mode must be 'strict' or 'simkgc', got {mode!r}.")
    scores = scores.float()
    rows = torch.arange(scores.shape[0], device=scores.device)
    gold = gold.to(scores.device)
    gold_score = scores[rows, gold].unsqueeze(1)

    counted = torch.ones_like(scores, dtype=torch.bool)
    if filter_mask is not None:
        if filter_mask.shape != scores.shape:
            raise ValueError(
                f"rank: filter_mask must match scores {tuple(scores.shape)}, got "
                f"{tuple(filter_mask.shape)}."
            )
        others = filter_mask.to(scores.device).clone()
        others[rows, gold] = False
        if mode == "strict":
            counted = ~others
        else:
            scores = scores - others.float()

    greater = ((scores > gold_score) & counted).sum(1).float()
    greater_equal = ((scores >= gold_score) & counted).sum(1).float()
    optimistic = greater + 1
    return Ranks(optimistic, greater_equal, (optimistic + greater_equal) / 2)


def metrics(ranks: Tensor) -> dict[str, float]:
    """MR, MRR and Hits@k (rank <= k) of a 1-D tensor of ranks."""
    if ranks.ndim != 1 or ranks.numel() == 0:
        raise ValueError(
            f"metrics: expected a non-empty 1-D rank tensor, got {tuple(ranks.shape)}."
        )
    ranks = ranks.double()
    out = {"MR": ranks.mean().item(), "MRR": ranks.reciprocal().mean().item()}
    out.update({f"Hits@{k}": (ranks <= k).double().mean().item() for k in HITS_AT})
    return out


def _direction_summary(ranks: Ranks) -> dict[str, float]:
    """Headline metrics on realistic ranks plus the optimistic/pessimistic MRR bracket."""
    out = metrics(ranks.realistic)
    out["MRR_optimistic"] = metrics(ranks.optimistic)["MRR"]
    out["MRR_pessimistic"] = metrics(ranks.pessimistic)["MRR"]
    out["count"] = float(len(ranks))
    return out


def metrics_by_direction(tail_ranks: Ranks, head_ranks: Ranks) -> dict[str, dict[str, float]]:
    """Metrics per direction (``"tail"``, ``"head"``) and over all queries of both (``"both"``).

    ``"both"`` averages over all queries, which equals the mean of the two directions when they
    have equally many queries (every test triple is asked in both directions).
    """
    return {
        "tail": _direction_summary(tail_ranks),
        "head": _direction_summary(head_ranks),
        "both": _direction_summary(Ranks.cat([tail_ranks, head_ranks])),
    }


def rank_queries(
    query_emb: Tensor,
    entity_emb: Tensor,
    gold: Tensor,
    filter_mask_fn: Callable[[slice], Tensor] | None = None,
    *,
    chunk_size: int = 1024,
    mode: FilterMode = "strict",
    progress: bool = True,
) -> Ranks:
    """Rank every query against all entities by cosine, in chunks of queries.

    Memory stays at ``chunk_size x N`` scores. Embeddings are cast to fp32 and normalised, since
    bf16 cosines create exact ties. ``filter_mask_fn(slice)`` returns the (b, N) bool filter mask
    of the queries in that slice (e.g. built from ``KnownAnswers.mask``), keeping this function
    independent of how known answers are stored.
    """
    if query_emb.ndim != 2 or entity_emb.ndim != 2 or query_emb.shape[1] != entity_emb.shape[1]:
        raise ValueError(
            f"rank_queries: expected query_emb (Q, d) and entity_emb (N, d); got "
            f"{tuple(query_emb.shape)} and {tuple(entity_emb.shape)}."
        )
    if gold.shape != query_emb.shape[:1]:
        raise ValueError(
            f"rank_queries: gold must be ({len(query_emb)},), got {tuple(gold.shape)}."
        )
    if chunk_size < 1:
        raise ValueError(f"rank_queries: chunk_size must be >= 1, got {chunk_size}.")
    entities = F.normalize(entity_emb.float(), dim=-1)
    parts = []
    starts = range(0, len(query_emb), chunk_size)
    for start in tqdm(starts, desc="ranking queries", disable=not progress, leave=False):
        part = slice(start, min(start + chunk_size, len(query_emb)))
        queries = F.normalize(query_emb[part].float().to(entities.device), dim=-1)
        mask = filter_mask_fn(part) if filter_mask_fn is not None else None
        parts.append(rank(queries @ entities.T, gold[part], mask, mode=mode))
    if not parts:
        raise ValueError("rank_queries: no queries to rank (query_emb is empty).")
    return Ranks.cat(parts)


def per_relation(
    tail_ranks: Tensor,
    head_ranks: Tensor,
    relations: Tensor,
    relation_names: Sequence[str],
) -> pd.DataFrame:
    """MRR, Hits@10 and query count per relation and direction (long format, one row each).

    ``tail_ranks`` / ``head_ranks`` are (Q,) ranks (usually ``Ranks.realistic``) of the same Q
    test triples, whose relation ids are ``relations`` (indices into ``relation_names``).
    """
    if not tail_ranks.shape == head_ranks.shape == relations.shape:
        raise ValueError(
            f"per_relation: tail_ranks, head_ranks and relations must have equal shape (Q,); got "
            f"{tuple(tail_ranks.shape)}, {tuple(head_ranks.shape)}, {tuple(relations.shape)}."
        )
    rows = []
    for direction, ranks in (("tail", tail_ranks), ("head", head_ranks)):
        for r in torch.unique(relations).tolist():
            selected = ranks[relations == r]
            m = metrics(selected)
            rows.append(
                {
                    "relation": relation_names[r],
                    "direction": direction,
                    "count": len(selected),
                    "MRR": m["MRR"],
                    "Hits@10": m["Hits@10"],
                }
            )
    return pd.DataFrame(rows, columns=["relation", "direction", "count", "MRR", "Hits@10"])
