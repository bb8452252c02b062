"""The KGC protocol applied to a model: entity index, query encoding, filtered ranking.

Every candidate entity is encoded once per model state as a tail view and cached in the run
directory, so evaluating the same run again (or on another split) costs only the queries.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import RunConfig
from kalm.data import KnowledgeGraph
from kalm.evaluate.kgc import FilterMode, Ranks, per_relation, rank_queries, summarise
from kalm.models import encode_ids
from kalm.runs import Run
from kalm.views import ViewBuilder

__all__ = ["KGCResult", "candidate_set", "entity_index", "evaluate_kgc", "sample_triples"]


def sample_triples(triples: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random subset of ``n`` triples (all of them when ``n`` is 0 or too large)."""
    if n <= 0 or n >= len(triples):
        return triples
    pick = np.random.default_rng(seed).choice(len(triples), size=n, replace=False)
    return triples[np.sort(pick)]


def candidate_set(kg: KnowledgeGraph, triples: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Candidates: all entities (``n`` = 0), else every gold entity plus a random fill to ``n``.

    Restricted candidate sets only serve the smoke profile, where encoding 40k entities would
    not fit in a minute; the ``cpu`` and ``paper`` profiles rank against every entity.
    """
    everything = np.arange(kg.num_entities)
    if n <= 0 or n >= kg.num_entities:
        return everything
    gold = np.unique(triples[:, [0, 2]])
    rest = np.setdiff1d(everything, gold)
    fill = np.random.default_rng(seed).choice(rest, size=max(0, n - len(gold)), replace=False)
    return np.union1d(gold, fill)


def entity_index(
    model: nn.Module,
    views: ViewBuilder,
    run: Run,
    candidates: np.ndarray,
    *,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """Tail-view embeddings of ``candidates`` (cached in ``run``) and the seconds encoding took.

    The time is the one measured when the index was built, kept beside it in the run store, so a
    report of encoding throughput stays the same when the index comes from the cache.
    """
    texts = "\n".join(views.tail_text(int(e)) for e in candidates)
    digest = hashlib.sha256(texts.encode()).hexdigest()[:16]
    precision = "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}"
    name = f"entities-{views.kg.name}-{digest}{precision}"

    def compute() -> torch.Tensor:
        started = time.perf_counter()
        ids = views.tail_ids(candidates.tolist())
        emb = encode_ids(
            model,
            ids,
            pad_id=views.tokenizer.pad_token_id,
            batch_size=batch_size,
            progress=progress,
            desc="entity index",
            dtype=dtype,
        )
        run.save_metrics(
            f"timing-{name}",
            {"seconds": time.perf_counter() - started, "entities": len(candidates)},
        )
        return emb

    emb = run.cached(name, compute)
    timing = run.load_metrics(f"timing-{name}") or {"seconds": 0.0}
    return emb, float(timing["seconds"])


@dataclass
class KGCResult:
    """Ranks and metrics of one evaluation (tail queries and inverse/head queries)."""

    summary: dict[str, dict[str, float]]
    tail: Ranks
    head: Ranks
    triples: np.ndarray
    per_relation: pd.DataFrame
    num_candidates: int
    timings: dict[str, float] = field(default_factory=dict)

    def table_row(self) -> dict[str, float]:
        """Headline metrics averaged over both directions (realistic ranks), as in Table 1."""
        both = self.summary["both"]
        return {k: both[k] for k in ("MR", "MRR", "Hits@1", "Hits@3", "Hits@10")}

    def as_dict(self) -> dict[str, object]:
        """JSON-able form for the run store."""
        return {
            "summary": self.summary,
            "num_queries": len(self.triples),
            "num_candidates": self.num_candidates,
            "timings": self.timings,
            "per_relation": self.per_relation.to_dict(orient="records"),
        }


def evaluate_kgc(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    kg: KnowledgeGraph,
    cfg: RunConfig,
    run: Run,
    *,
    split: str = "test",
    mode: FilterMode = "strict",
    exclude_query_entity: bool = False,
    progress: bool = True,
) -> KGCResult:
    """Filtered link prediction on ``split`` in both directions (head prediction = inverse query).

    Filter: known answers from train ∪ valid ∪ test. Sizes come from ``cfg.eval``.
    ``exclude_query_entity`` also filters the query's own entity (the head of a tail query): a
    diagnostic of how often that entity alone outranks the gold, not the paper's protocol.
    """
    n = cfg.eval.test_queries if split == "test" else cfg.eval.valid_queries
    triples = sample_triples(getattr(kg, split), n, cfg.seed)
    candidates = candidate_set(kg, triples, cfg.eval.candidates, cfg.seed)
    views = ViewBuilder(kg, tokenizer, cfg.train.max_entity_tokens)
    dtype = getattr(torch, cfg.eval.encode_dtype)
    entities, encode_seconds = entity_index(
        model,
        views,
        run,
        candidates,
        batch_size=cfg.eval.entity_batch_size,
        dtype=dtype,
        progress=progress,
    )
    position = np.full(kg.num_entities, -1, dtype=np.int64)
    position[candidates] = np.arange(len(candidates))
    known = kg.known_answers()
    cols = torch.from_numpy(candidates)
    heads, rels, tails = triples.T
    ranks: dict[str, Ranks] = {}
    started = time.perf_counter()
    for direction, e, r, gold in (
        ("tail", heads, rels, tails),
        ("head", tails, rels + kg.num_relations, heads),
    ):
        ids = views.hr_ids(e.tolist(), r.tolist())
        queries = encode_ids(
            model,
            ids,
            pad_id=tokenizer.pad_token_id,
            batch_size=cfg.eval.query_batch_size,
            progress=progress,
            desc=f"{direction} queries",
            dtype=dtype,
        )

        def filter_mask(part: slice, e: np.ndarray = e, r: np.ndarray = r) -> torch.Tensor:
            mask = known.mask(e[part], r[part], kg.num_entities)
            if exclude_query_entity:
                mask[torch.arange(len(mask)), torch.from_numpy(e[part])] = True
            return mask[:, cols]

        ranks[direction] = rank_queries(
            queries,
            entities,
            torch.from_numpy(position[gold]),
            filter_mask,
            chunk_size=256,
            mode=mode,
            progress=progress,
        )
    query_seconds = time.perf_counter() - started
    table = per_relation(
        ranks["tail"].realistic, ranks["head"].realistic, torch.from_numpy(rels), kg.relation_texts
    )
    timings = {"query_seconds": query_seconds}
    if encode_seconds:
        timings |= {
            "entity_seconds": encode_seconds,
            "entities_per_s": len(candidates) / encode_seconds,
        }
    return KGCResult(
        summary=summarise(ranks["tail"], ranks["head"]),
        tail=ranks["tail"],
        head=ranks["head"],
        triples=triples,
        per_relation=table,
        num_candidates=len(candidates),
        timings=timings,
    )
