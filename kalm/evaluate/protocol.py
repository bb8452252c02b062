"""The KGC protocol applied to an encoder: entity index, query encoding, filtered ranking.

Every candidate entity is encoded once per model state as a tail view and cached in the run
directory, so evaluating the same run again (or on another split) costs only the queries.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from kalm.config import RunConfig
from kalm.data import KnowledgeGraph, KnownAnswers, sample_triples
from kalm.encoder import Encoder
from kalm.evaluate.kgc import FilterMode, Ranks, metrics_by_direction, per_relation, rank_queries
from kalm.runs import Run

__all__ = [
    "INDEX_CHUNK",
    "KGCResult",
    "ValidationProbe",
    "candidate_set",
    "entity_index",
    "evaluate_kgc",
    "query_entity_effect",
    "rank_both_directions",
]


def candidate_set(kg: KnowledgeGraph, triples: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Candidates: all entities (``n`` = 0), else every gold entity plus a random fill to ``n``.

    Restricted candidate sets serve quick checks (a profile's ``candidates`` field), where
    encoding 40k entities would not fit in a minute; the full protocol ranks every entity.
    """
    everything = np.arange(kg.num_entities)
    if n <= 0 or n >= kg.num_entities:
        return everything
    gold = np.unique(triples[:, [0, 2]])
    rest = np.setdiff1d(everything, gold)
    fill = np.random.default_rng(seed).choice(rest, size=max(0, n - len(gold)), replace=False)
    return np.union1d(gold, fill)


INDEX_CHUNK = 4096
"""Entities per cache entry of an entity index: an interrupted index keeps its finished chunks."""


def entity_index(
    encoder: Encoder,
    run: Run,
    candidates: np.ndarray,
    *,
    progress: bool = True,
    chunk: int = INDEX_CHUNK,
) -> tuple[torch.Tensor, float]:
    """Tail-view embeddings of ``candidates`` (cached in ``run``) and the seconds encoding took.

    The index is cached in chunks of ``chunk`` entities, each its own entry of the run store, so
    a run interrupted while it encodes (an index of every WN18RR entity takes an hour or more on
    a CPU without native bf16) resumes at its first missing chunk. The time is the one measured
    when the chunks were built, kept beside them, so a report of encoding throughput stays the
    same when the index comes from the cache. An entry's name covers what its embeddings
    depend on besides the run's model state (which its seal records): the graph, the entities'
    texts, the batch size, the matmul dtype and 8-bit weights.
    """
    views = encoder.views
    texts = "\n".join(views.tail_text(int(e)) for e in candidates)
    digest = hashlib.sha256(texts.encode()).hexdigest()[:16]
    # The batch size shapes the padding, and so the rounding, of every embedding.
    batches = f"b{encoder.entity_batch_size}"
    dtype = encoder.dtype
    precision = "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}"
    if getattr(encoder.model, "is_loaded_in_8bit", False):  # the paper profile's 8-bit weights
        precision += "-int8"
    ids = candidates.tolist()
    parts = [ids[start : start + chunk] for start in range(0, len(ids), chunk)]
    pieces, seconds = [], 0.0
    for k, part in enumerate(parts, 1):
        name = f"entities-{views.kg.name}-{digest}-{batches}-part{k}of{len(parts)}{precision}"
        desc = "entity index" if len(parts) == 1 else f"entity index {k}/{len(parts)}"
        encode = functools.partial(encoder.encode_entities, part, progress=progress, desc=desc)
        piece, took = run.cached_timed(name, encode)
        pieces.append(piece)
        seconds += took
    return torch.cat(pieces), seconds


def rank_both_directions(
    encoder: Encoder,
    triples: np.ndarray,
    candidates: np.ndarray,
    entities: torch.Tensor,
    known: KnownAnswers,
    *,
    chunk_size: int,
    mode: FilterMode = "strict",
    exclude_query_entity: bool = False,
    progress: bool = False,
) -> tuple[dict[str, Ranks], float]:
    """Filtered ranks of the gold among ``candidates`` (embedded as ``entities``) for the tail
    queries ``[ h, r ]`` and the inverse (head) queries ``[ t, r⁻¹ ]`` of ``triples``, and the
    share of all those queries whose own entity (``h``, resp. ``t``) scores above the gold.

    That share is the failure that self-negatives target: a query holds its own entity's text,
    so an encoder can learn to retrieve that entity. Every query entity must be a candidate
    (:func:`candidate_set` keeps every entity of ``triples``).
    """
    kg = encoder.views.kg
    position = np.full(kg.num_entities, -1, dtype=np.int64)
    position[candidates] = np.arange(len(candidates))
    missing = np.setdiff1d(triples[:, [0, 2]], candidates)
    if len(missing):
        raise ValueError(
            f"rank_both_directions: entities {missing[:10].tolist()} of the triples are not "
            "candidates; build the candidates with candidate_set, which keeps all of them."
        )
    cols = torch.from_numpy(candidates)
    heads, rels, tails = triples.T
    ranks: dict[str, Ranks] = {}
    wins = []
    unit_e = F.normalize(entities.float(), dim=-1)  # once, for both directions
    for direction, e, r, gold in (
        ("tail", heads, rels, tails),
        ("head", tails, rels + kg.num_relations, heads),
    ):
        queries = encoder.encode_queries(
            e.tolist(), r.tolist(), progress=progress, desc=f"{direction} queries"
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
            chunk_size=chunk_size,
            mode=mode,
            progress=progress,
        )
        unit_q = F.normalize(queries.float(), dim=-1)
        own = (unit_q * unit_e[position[e]]).sum(1)
        right = (unit_q * unit_e[position[gold]]).sum(1)
        wins.append(((own > right) & torch.from_numpy(e != gold)).numpy())
    return ranks, float(np.concatenate(wins).mean())


@dataclass(frozen=True)
class ValidationProbe:
    """One point of a run's learning curve: the studies' validation protocol at the curve's
    sizes (``train.curve_queries`` validation triples, filtered with train ∪ valid answers,
    ranked in both directions against a fixed set of ``train.curve_candidates`` entities that
    holds every gold and every query entity).

    The triples and candidates are drawn once, from the run's seed, so every point of the
    curve measures the same queries. The trainer calls it with an :class:`Encoder` of the model
    being trained (it holds no evaluation code itself).
    """

    triples: np.ndarray
    candidates: np.ndarray
    known: KnownAnswers
    chunk_size: int

    @classmethod
    def from_config(cls, kg: KnowledgeGraph, cfg: RunConfig) -> ValidationProbe:
        """The probe of the run ``cfg`` on its graph ``kg``."""
        if len(kg.valid) == 0:
            raise ValueError(
                f"{kg.name} has no validation triples to measure a learning curve on; train "
                "without one (curve_points=0) or give the graph a validation split"
            )
        triples = sample_triples(kg.valid, cfg.train.curve_queries, cfg.seed)
        return cls(
            triples=triples,
            candidates=candidate_set(kg, triples, cfg.train.curve_candidates, cfg.seed),
            known=kg.known_answers(("train", "valid")),
            chunk_size=cfg.eval.rank_chunk_size,
        )

    def __call__(self, encoder: Encoder) -> dict[str, float]:
        """Validation MRR and Hits@1 (realistic ranks, both directions) and the share of queries
        whose own entity outranks the gold, of the model behind ``encoder``."""
        entities = encoder.encode_entities(self.candidates.tolist())
        ranks, wins = rank_both_directions(
            encoder, self.triples, self.candidates, entities, self.known, chunk_size=self.chunk_size
        )
        both = metrics_by_direction(ranks["tail"], ranks["head"])["both"]
        return {"MRR": both["MRR"], "Hits@1": both["Hits@1"], "query entity outranks gold": wins}


@dataclass
class KGCResult:
    """Ranks and metrics of one evaluation (tail queries and inverse/head queries)."""

    summary: dict[str, dict[str, float]]
    tail: Ranks
    head: Ranks
    triples: np.ndarray
    per_relation: pd.DataFrame
    num_candidates: int
    # The share of queries (both directions) whose own entity outranks the gold.
    query_entity_wins: float
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
            "query_entity_wins": self.query_entity_wins,
            "timings": self.timings,
            "per_relation": self.per_relation.to_dict(orient="records"),
        }


def evaluate_kgc(
    encoder: Encoder,
    cfg: RunConfig,
    run: Run,
    *,
    split: str = "test",
    mode: FilterMode = "strict",
    exclude_query_entity: bool = False,
    progress: bool = True,
) -> KGCResult:
    """Filtered link prediction on ``split`` in both directions (head prediction = inverse query).

    The graph is the encoder's (``encoder.views.kg``). Filter: known answers from
    train ∪ valid ∪ test on the test split; on the validation split train ∪ valid only, so that
    tuning never sees a test triple. Sizes come from ``cfg.eval``.
    ``exclude_query_entity`` also filters the query's own entity (the head of a tail query): a
    diagnostic of how often that entity alone outranks the gold, not the paper's protocol.
    """
    kg = encoder.views.kg
    n = cfg.eval.test_queries if split == "test" else cfg.eval.valid_queries
    triples = sample_triples(getattr(kg, split), n, cfg.seed)
    candidates = candidate_set(kg, triples, cfg.eval.candidates, cfg.seed)
    entities, encode_seconds = entity_index(encoder, run, candidates, progress=progress)
    known = kg.known_answers(("train", "valid") if split == "valid" else ("train", "valid", "test"))
    started = time.perf_counter()
    ranks, wins = rank_both_directions(
        encoder,
        triples,
        candidates,
        entities,
        known,
        chunk_size=cfg.eval.rank_chunk_size,
        mode=mode,
        exclude_query_entity=exclude_query_entity,
        progress=progress,
    )
    query_seconds = time.perf_counter() - started
    table = per_relation(
        ranks["tail"].realistic,
        ranks["head"].realistic,
        torch.from_numpy(triples[:, 1]),
        kg.relation_texts,
    )
    timings = {"query_seconds": query_seconds}
    if encode_seconds:
        timings |= {
            "entity_seconds": encode_seconds,
            "entities_per_s": len(candidates) / encode_seconds,
        }
    return KGCResult(
        summary=metrics_by_direction(ranks["tail"], ranks["head"]),
        tail=ranks["tail"],
        head=ranks["head"],
        triples=triples,
        per_relation=table,
        num_candidates=len(candidates),
        query_entity_wins=wins,
        timings=timings,
    )


def query_entity_effect(strict: KGCResult, excluded: KGCResult) -> dict[str, float]:
    """How much the query's own entity costs: the share of queries (both directions) whose
    realistic rank improves when that entity is filtered too, and the headline metrics (no MR)
    of both evaluations (``excluded`` ran with ``exclude_query_entity=True``)."""
    if len(strict.triples) != len(excluded.triples):
        raise ValueError(
            f"query_entity_effect: the evaluations ranked {len(strict.triples)} and "
            f"{len(excluded.triples)} triples; evaluate the same configuration twice."
        )
    wins = np.concatenate(
        [
            (strict.tail.realistic > excluded.tail.realistic).numpy(),
            (strict.head.realistic > excluded.head.realistic).numpy(),
        ]
    )
    row = {k: v for k, v in strict.table_row().items() if k != "MR"}
    row |= {f"{k}, query entity filtered": v for k, v in excluded.table_row().items() if k != "MR"}
    return {"query entity outranks gold": float(wins.mean()), **row}
