"""Geometry of embedding sets: similarity matrices, alignment / uniformity, anisotropy, spectra.

Pure functions of (n, d) embedding arrays or tensors. Rows are L2-normalised on entry (the
paper's representation is a unit vector, and cosine geometry is what every quantity here is
about), computations run in fp32 with fp64 reductions, and results are numpy values.
`triple_embeddings` is the one bridge from a model to such arrays (an `Encoder`, no logic);
`statistics` and `check_similarities` are what the similarity experiment reports and asserts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from kalm.encoder import Encoder

Embeddings = ArrayLike | torch.Tensor


def _unit_rows(x: Embeddings, name: str = "x") -> NDArray[np.float32]:
    """Rows of `x` as fp32 unit vectors; rejects non-matrices and zero rows (no direction)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (n, d) matrix, got shape {arr.shape}.")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if np.any(norms == 0):
        rows = np.flatnonzero(norms[:, 0] == 0)[:5].tolist()
        raise ValueError(f"{name}: rows {rows} are all-zero and have no direction; drop them.")
    return arr / norms


def _off_diagonal_mean(sim: NDArray[np.floating]) -> float:
    n = sim.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 rows for off-diagonal statistics, got {n}.")
    total = sim.sum(dtype=np.float64) - np.trace(sim, dtype=np.float64)
    return float(total / (n * (n - 1)))


def cosine_matrix(a: Embeddings, b: Embeddings) -> NDArray[np.float32]:
    """Cosine similarity matrix S_ij = cos(a_i, b_j) of shape (len(a), len(b))."""
    ua, ub = _unit_rows(a, "a"), _unit_rows(b, "b")
    if ua.shape[1] != ub.shape[1]:
        raise ValueError(f"a has dimension {ua.shape[1]} but b has {ub.shape[1]}; they must match.")
    return ua @ ub.T


def anisotropy(x: Embeddings) -> float:
    """Mean cosine between distinct rows of x: ~0 for isotropic sets, ~1 when all rows agree."""
    return _off_diagonal_mean(cosine_matrix(x, x))


def diagonal_gap(sim: ArrayLike) -> float:
    """Mean diagonal minus mean off-diagonal of a square similarity matrix.

    With rows = head-relation views and columns = tail views, this is how much true pairs stand
    out from the in-batch negatives (Figure 1 of the paper).
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"diagonal_gap: expected a square matrix, got shape {s.shape}.")
    return float(np.trace(s) / s.shape[0]) - _off_diagonal_mean(s)


def alignment(x: Embeddings, y: Embeddings, alpha: float = 2.0) -> float:
    """Wang & Isola alignment E ||f(x_i) - f(y_i)||^alpha over positive pairs; lower = better."""
    ux, uy = _unit_rows(x, "x"), _unit_rows(y, "y")
    if ux.shape != uy.shape:
        raise ValueError(f"alignment: x {ux.shape} and y {uy.shape} must be row-paired.")
    dist = np.linalg.norm(ux.astype(np.float64) - uy, axis=1)
    return float(np.mean(dist**alpha))


def uniformity(x: Embeddings, t: float = 2.0) -> float:
    """Wang & Isola uniformity log E_{i<j} exp(-t ||f(x_i) - f(x_j)||^2); lower = more uniform.

    Uses ||u - v||^2 = 2 - 2 cos(u, v) for unit vectors and a log-sum-exp for stability.
    """
    sim = cosine_matrix(x, x).astype(np.float64)
    n = sim.shape[0]
    if n < 2:
        raise ValueError(f"uniformity: need at least 2 rows, got {n}.")
    iu = np.triu_indices(n, k=1)
    logits = -t * (2.0 - 2.0 * sim[iu])
    top = logits.max()
    return float(top + np.log(np.mean(np.exp(logits - top))))


def spectrum(x: Embeddings) -> NDArray[np.float64]:
    """Singular values (descending) of the UNCENTRED matrix of unit rows.

    Uncentred on purpose: anisotropy is a shared mean direction, and centring would subtract
    exactly that direction away. Uncentred, it shows up as a dominant first singular value.
    """
    return np.linalg.svd(_unit_rows(x).astype(np.float64), compute_uv=False)


def top_component_share(x: Embeddings) -> float:
    """s_1^2 / sum_k s_k^2: fraction of the energy on the dominant direction (1 for rank one).

    For unit rows this is at least the mean of the Gram matrix (diagonal included), so an
    anisotropic set necessarily has a large top share.
    """
    s = spectrum(x)
    return float(s[0] ** 2 / np.sum(s**2))


def summary(hr: Embeddings, t: Embeddings) -> dict[str, float]:
    """All the above for a model's paired embeddings (row i of hr and t is one triple)."""
    cross = cosine_matrix(hr, t)
    return {
        "alignment": alignment(hr, t),
        "uniformity_hr": uniformity(hr),
        "uniformity_t": uniformity(t),
        "anisotropy_hr": anisotropy(hr),
        "anisotropy_t": anisotropy(t),
        "mean_cross_similarity": float(cross.mean(dtype=np.float64)),
        "diagonal_gap": diagonal_gap(cross),
        "top_share_hr": top_component_share(hr),
        "top_share_t": top_component_share(t),
    }


def statistics(hr: Embeddings, t: Embeddings, sentences: Embeddings) -> dict[str, float]:
    """`summary` of the triple views plus the means over both views (``anisotropy``,
    ``uniformity``, ``top_share``) and the same geometry of sentence embeddings (``*_wiki``)."""
    s = summary(hr, t)
    return {
        **s,
        "anisotropy": (s["anisotropy_hr"] + s["anisotropy_t"]) / 2,
        "uniformity": (s["uniformity_hr"] + s["uniformity_t"]) / 2,
        "top_share": (s["top_share_hr"] + s["top_share_t"]) / 2,
        "anisotropy_wiki": anisotropy(sentences),
        "uniformity_wiki": uniformity(sentences),
        "top_share_wiki": top_component_share(sentences),
    }


def shared_scale(mats: Mapping[str, ArrayLike]) -> tuple[float, float]:
    """One (vmin, vmax) over all matrices, so that colours compare across panels."""
    if not mats:
        raise ValueError("shared_scale: no matrices given.")
    arrays = [np.asarray(m) for m in mats.values()]
    return min(float(m.min()) for m in arrays), max(float(m.max()) for m in arrays)


def check_similarities(mats: Mapping[str, ArrayLike], n: int, *, self_similarity: bool) -> None:
    """Raise ``ValueError`` unless every cosine matrix is (n, n), finite and within [-1, 1], and,
    for self-similarities, has a unit diagonal (each within 1e-5)."""
    for name, m in mats.items():
        m = np.asarray(m)
        if m.shape != (n, n):
            raise ValueError(f"{name}: shape {m.shape}, expected {(n, n)}")
        if not np.isfinite(m).all():
            raise ValueError(f"{name}: non-finite similarities")
        if np.abs(m).max() > 1 + 1e-5:
            raise ValueError(f"{name}: |cosine| {np.abs(m).max()} > 1")
        if self_similarity and not np.allclose(np.diag(m), 1.0, rtol=0, atol=1e-5):
            worst = float(np.abs(np.diag(m) - 1).max())
            raise ValueError(f"{name}: diagonal differs from 1 by up to {worst:.2e}")


def stats_sample_size(min_rows: int, figure_size: int) -> int:
    """How many triples (or sentences) the reported statistics use: the figure's, but at least
    ``min_rows`` (``EvalConfig.stats_min_rows``), since off-diagonal means of the 32 rows a
    heatmap can show are noisy."""
    return max(min_rows, figure_size)


def triple_embeddings(
    encoder: Encoder,
    triples: np.ndarray,
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hr, t): unit embeddings of the head-relation and tail views of (n, 3) triples.

    Row i of both is triple i, so `cosine_matrix(hr, t)` has the true pairs on its diagonal.
    ``batch_size`` overrides the encoder's.
    """
    triples = np.asarray(triples)
    if triples.ndim != 2 or triples.shape[1] != 3 or len(triples) == 0:
        raise ValueError(
            f"triple_embeddings: expected a non-empty (n, 3) array of (head, relation, tail) "
            f"ids, got shape {triples.shape}."
        )
    views = encoder.views
    hr = encoder.encode(
        views.hr_ids(triples[:, 0].tolist(), triples[:, 1].tolist()),
        batch_size=batch_size or encoder.query_batch_size,
        progress=progress,
        desc="head-relation views",
    )
    t = encoder.encode(
        views.tail_ids(triples[:, 2].tolist()),
        batch_size=batch_size or encoder.entity_batch_size,
        progress=progress,
        desc="tail views",
    )
    return hr, t


def head_outranks_gold(
    encoder: Encoder, triples: np.ndarray, *, batch_size: int | None = None
) -> float:
    """Share of tail queries ``[ h, r ]`` closer to the head's own view ``{ h }`` than to ``{ t }``.

    The failure mode self-negatives target: a query contains its head's text, so an encoder
    trained with in-batch negatives alone learns to retrieve the head itself.
    """
    hr, t = triple_embeddings(encoder, triples, batch_size=batch_size, progress=False)
    own = encoder.encode(
        encoder.views.tail_ids(np.asarray(triples)[:, 0].tolist()),
        batch_size=batch_size or encoder.entity_batch_size,
    )
    return float(((hr * own).sum(1) > (hr * t).sum(1)).float().mean())


@dataclass(frozen=True)
class Trend:
    """How a noisy series moved over a run: the mean of its first and of its last ``fraction``
    of the values, read instead of one step (one batch) at either end."""

    first: float
    last: float
    fraction: float

    @property
    def change(self) -> float:
        """``last - first``."""
        return self.last - self.first

    def direction(self, tolerance: float) -> str:
        """``"rises"``, ``"falls"`` or ``"stays level"``: a change smaller than ``tolerance``
        (in the series' units) is level."""
        if self.change > tolerance:
            return "rises"
        if self.change < -tolerance:
            return "falls"
        return "stays level"


def trend(values: ArrayLike, fraction: float = 0.2) -> Trend:
    """The :class:`Trend` of ``values`` (NaN dropped): the means of the first and the last
    ``fraction`` of them, at least one value each.

    A loss logged once per batch swings by a large share of its value from step to step; a
    verdict such as "the loss rises" read from the last step alone is a verdict on one batch.
    """
    if not 0 < fraction <= 0.5:
        raise ValueError(f"trend: fraction must be in (0, 0.5], got {fraction}")
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        raise ValueError("trend: no finite values")
    k = max(1, int(len(x) * fraction))
    return Trend(first=float(x[:k].mean()), last=float(x[-k:].mean()), fraction=fraction)
