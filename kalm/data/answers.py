"""Known answers of (entity, relation) queries, for filtered ranking.

Stored as a CSR table: query keys `e * 2R + r` sorted and unique, with the answers of key i in
`answers[offsets[i]:offsets[i + 1]]` (sorted). Look-ups are binary searches, and the batch mask
is built with array operations only, so filtering a full evaluation costs milliseconds.
"""

from __future__ import annotations

import numpy as np
import torch


class KnownAnswers:
    """Maps (entity, relation id in [0, 2R)) to the sorted array of known answer entities.

    A triple (h, r, t) answers the forward query (h, r) with t and the inverse query (t, r + R)
    with h.
    """

    def __init__(self, triples: np.ndarray, num_relations: int) -> None:
        triples = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        h, r, t = triples.T
        self.num_relations = num_relations
        width = 2 * num_relations
        keys = np.concatenate([h * width + r, t * width + r + num_relations])
        values = np.concatenate([t, h])
        order = np.lexsort((values, keys))
        keys, values = keys[order], values[order]
        fresh = np.ones(len(keys), dtype=bool)
        fresh[1:] = (keys[1:] != keys[:-1]) | (values[1:] != values[:-1])
        keys, values = keys[fresh], values[fresh]
        starts = np.flatnonzero(np.diff(keys, prepend=-1))
        self._keys = keys[starts]
        self._offsets = np.append(starts, len(keys)).astype(np.int64)
        self._answers = values

    def __len__(self) -> int:
        """Number of queries with at least one known answer."""
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KnownAnswers({len(self):,} queries, {len(self._answers):,} answers)"

    def get(self, e: int, r: int) -> np.ndarray:
        """Sorted known answers of (e, r); an empty array if there are none."""
        i = self._find(np.array([e]), np.array([r]))[0]
        if i < 0:
            return self._answers[:0]
        return self._answers[self._offsets[i] : self._offsets[i + 1]]

    def contains(self, e: int, r: int, a: int) -> bool:
        """Whether `a` is a known answer of (e, r)."""
        found = self.get(e, r)
        j = int(np.searchsorted(found, a))
        return j < len(found) and int(found[j]) == a

    def mask(
        self,
        queries_e: torch.Tensor | np.ndarray,
        queries_r: torch.Tensor | np.ndarray,
        num_entities: int,
    ) -> torch.Tensor:
        """Bool (B, num_entities) tensor, True at the known answers of each query (e_i, r_i)."""
        idx = self._find(_as_numpy(queries_e), _as_numpy(queries_r))
        hit = idx >= 0
        rows = np.flatnonzero(hit)
        starts = self._offsets[idx[hit]]
        counts = self._offsets[idx[hit] + 1] - starts
        row_of = np.repeat(rows, counts)
        # Position of each answer: its slice start plus its rank within the slice.
        shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        cols = self._answers[np.arange(len(row_of)) + shift]
        out = torch.zeros((len(idx), num_entities), dtype=torch.bool)
        out[torch.from_numpy(row_of), torch.from_numpy(cols)] = True
        return out

    def _find(self, e: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Row of each query in the CSR table, or -1 where the query has no known answer."""
        e = e.astype(np.int64).ravel()
        r = r.astype(np.int64).ravel()
        width = 2 * self.num_relations
        if e.shape != r.shape:
            raise ValueError(f"{len(e)} entities but {len(r)} relations in the queries")
        if len(r) and (r.min() < 0 or r.max() >= width):
            raise ValueError(f"relation ids must lie in [0, {width}), got {r.min()}..{r.max()}")
        if len(e) and e.min() < 0:
            raise ValueError(f"entity ids must be >= 0, got {e.min()}")
        keys = e * width + r
        if not len(self._keys):
            return np.full(len(keys), -1, dtype=np.int64)
        idx = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(self._keys[idx] == keys, idx, -1)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
