"""Numerical checks of Theorems 1 and 2 (the book's Theory chapter, ``book/theory.md``).

Theorem 1: the N-negative InfoNCE term minus log N converges to an alignment + uniformity limit.
Theorem 2: by Jensen, the log-mean-exp part of the loss bounds Sum(W) / (tau n^2) from above,
so lowering the loss lowers the mean cross-view similarity; for similarities in [0, 1],
Sum(W)/n <= sigma_max(W) <= sqrt(Sum(W)) ties the top of the spectrum to that mean.

Generative model used throughout (documented so the checks are reproducible):

- anchors `hr` are uniform on the unit sphere S^{d-1};
- positives are `t+ = normalise(hr + noise * g)` with g ~ N(0, I_d / d), so ||noise * g|| ~ noise;
- negatives are `t- = normalise(strength * e_0 + g)` with g ~ N(0, I_d / d): an anisotropic
  distribution whose members share the direction e_0 (mean cosine ~ strength^2 / (1 + strength^2)),
  like raw LLM embeddings. strength = 0 is the uniform distribution on the sphere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from tqdm import tqdm

from kalm.analysis import top_component_share
from kalm.config import EvalConfig
from kalm.losses import explicit_loss

SYNTHETIC_ROWS, SYNTHETIC_DIM = 256, 32
"""Size of the synthetic similarity matrices of the Theorem 2 check (rows, embedding width)."""

ANISOTROPY_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
"""The anisotropy strengths the Theorem 2 check sweeps, from uniform to strongly shared."""


def _anisotropic(n: int, d: int, strength: float, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen) / math.sqrt(d)
    x[:, 0] += strength
    return F.normalize(x, dim=1)


def anisotropic_embeddings(n: int, d: int, strength: float, seed: int = 0) -> torch.Tensor:
    """n unit vectors in R^d sharing the direction e_0 with weight `strength` (see module doc)."""
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}.")
    return _anisotropic(n, d, strength, torch.Generator().manual_seed(seed))


def random_embeddings(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n unit vectors drawn uniformly on the sphere S^{d-1} (the isotropic case, strength 0)."""
    return anisotropic_embeddings(n, d, 0.0, seed)


def _positives(hr: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(hr.shape, generator=gen) / math.sqrt(hr.shape[1])
    return F.normalize(hr + noise * g, dim=1)


# ---------------------------------------------------------------------------------------------
# Theorem 1
# ---------------------------------------------------------------------------------------------


def theorem1_sizes(ev: EvalConfig) -> dict[str, Any]:
    """The profile's sizes of the Theorem 1 check, as keywords of :func:`theorem1_gap`."""
    return {
        "ns": ev.theorem1_negatives,
        "dim": ev.theorem1_dim,
        "n_queries": ev.theorem1_queries,
        "pool_size": ev.theorem1_pool,
    }


def descent_sizes(ev: EvalConfig) -> dict[str, int]:
    """The profile's sizes of the descent experiment, as keywords of
    :func:`descent_experiment`."""
    return {"n": ev.descent_rows, "d": ev.descent_dim, "steps": ev.descent_steps}


def theorem1_gap(
    ns: Sequence[int] = (10, 32, 100, 316, 1000, 3162, 10000),
    *,
    tau: float = 0.5,
    margin: float = 0.02,
    dim: int = 32,
    n_queries: int = 256,
    pool_size: int = 200_000,
    noise: float = 0.5,
    strength: float = 1.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Monte-Carlo E[l_N] - log N against the Theorem 1 limit, for each N in `ns`.

    l_N = -log(e^{(phi+ - margin)/tau} / (e^{(phi+ - margin)/tau} + sum_{j<=N} e^{phi_j-/tau}))
    with phi the cosine. The limit is
    -(1/tau) E[phi+] + margin/tau + E_hr[log E_t-[e^{phi(hr, t-)/tau}]], whose inner expectation
    comes from an independent pool of `pool_size` negatives shared by all anchors.

    Both sides use the same anchors and positives, so `gap` = estimate - limit is a paired
    difference with a small standard error (`stderr`, over anchors). For each N the max(ns)
    negatives drawn per anchor are split into max(ns) // N independent groups of N, and l_N is
    averaged over the groups. The gap is O(1/N): a positive e^{a}/N term from the positive in
    the denominator and a negative Jensen term -Var/(2 N m^2) from the log of a sample mean.
    """
    ns = sorted({int(n) for n in ns})
    if ns[0] < 1:
        raise ValueError(f"theorem1_gap: every N must be >= 1, got {ns}.")
    n_max = ns[-1]
    gen = torch.Generator().manual_seed(seed)
    hr = random_embeddings(n_queries, dim, seed)
    pos = _positives(hr, noise, gen)
    a = ((hr * pos).sum(1).double() - margin) / tau  # (q,)

    # log E_t-[e^{phi/tau}] per anchor, from an independent pool (chunked to bound memory).
    chunk = 50_000
    lse = torch.full((n_queries,), -math.inf, dtype=torch.float64)
    for start in range(0, pool_size, chunk):
        pool = _anisotropic(min(chunk, pool_size - start), dim, strength, gen)
        lse = torch.logaddexp(lse, torch.logsumexp((hr @ pool.T).double() / tau, dim=1))
    log_m = lse - math.log(pool_size)
    limit = -a + log_m  # per-anchor limit

    # Per-anchor i.i.d. negatives: scores b (q, n_max), generated in anchor chunks.
    b = torch.empty(n_queries, n_max, dtype=torch.float64)
    step = max(1, 2_000_000 // (n_max * dim))
    for start in tqdm(
        range(0, n_queries, step), desc="theorem 1 negatives", leave=False, disable=None
    ):
        q = hr[start : start + step]
        neg = _anisotropic(len(q) * n_max, dim, strength, gen).view(len(q), n_max, dim)
        b[start : start + step] = torch.einsum("qd,qnd->qn", q, neg).double() / tau

    rows = []
    for n in ns:
        groups = n_max // n
        bg = b[:, : groups * n].view(n_queries, groups, n)
        # l_N - log N = -a + log(e^a / N + mean_j e^{b_j}), computed in log space.
        log_mean = torch.logsumexp(bg, dim=2) - math.log(n)
        est = (-a[:, None] + torch.logaddexp(a[:, None] - math.log(n), log_mean)).mean(1)
        diff = est - limit
        rows.append(
            {
                "N": n,
                "estimate": est.mean().item(),
                "limit": limit.mean().item(),
                "gap": diff.mean().item(),
                "stderr": (diff.std() / math.sqrt(n_queries)).item(),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Theorem 2
# ---------------------------------------------------------------------------------------------


def _square(w: ArrayLike | torch.Tensor, caller: str) -> torch.Tensor:
    """W as a float64 tensor, checked to be a non-empty square matrix."""
    w = w.double() if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w, np.float64))
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[0] != w.shape[1]:
        raise ValueError(f"{caller}: W must be a non-empty square matrix, got {tuple(w.shape)}.")
    return w


def jensen_check(w: ArrayLike | torch.Tensor, tau: float) -> tuple[float, float]:
    """(lhs, rhs) of Theorem 2 for a similarity matrix W; lhs >= rhs always (Jensen).

    lhs = (1/n) sum_i log((1/n) sum_j e^{W_ij/tau}), rhs = Sum(W) / (tau n^2). Equality holds
    exactly when every row of W is constant.
    """
    w = _square(w, "jensen_check")
    n = w.shape[0]
    lhs = (torch.logsumexp(w / tau, dim=1) - math.log(n)).mean().item()
    rhs = (w.sum() / (tau * n * n)).item()
    return lhs, rhs


def spectral_check(w: ArrayLike | torch.Tensor) -> tuple[float, float, float]:
    """(Sum(W)/n, sigma_max(W), sqrt(Sum(W))): Theorem 2, part 2, as lower <= sigma <= upper.

    The lower bound holds for any square W (Rayleigh quotient of the all-ones vector); the upper
    bound needs entries in [0, 1] (then ||W||_F^2 <= Sum(W)), the anisotropic regime of cosines.
    """
    w = _square(w, "spectral_check")
    total = w.sum().item()
    return total / w.shape[0], torch.linalg.matrix_norm(w, ord=2).item(), math.sqrt(max(total, 0))


def descent_experiment(
    n: int = 64,
    d: int = 16,
    steps: int = 300,
    lr: float = 0.5,
    tau: float = 0.1,
    seed: int = 0,
    *,
    strength: float = 2.0,
    margin: float = 0.02,
) -> pd.DataFrame:
    """Gradient descent on L_exp (`kalm.losses.explicit_loss`) from anisotropic unit embeddings.

    hr and t are free (n, d) parameters, normalised in the loss's forward pass, both initialised
    from the anisotropic distribution (independent draws, so the pairs also have to align). Records
    per step: the loss, Sum(W)/n^2, sigma_1(W)/n (top singular value of W, scaled to [0, 1]) and
    the top-component share of the stacked embeddings. Theorem 2 predicts the last three fall
    together with the loss.
    """
    hr = anisotropic_embeddings(n, d, strength, seed).clone().requires_grad_(True)
    t = anisotropic_embeddings(n, d, strength, seed + 1).clone().requires_grad_(True)
    opt = torch.optim.SGD([hr, t], lr=lr)
    rows = []
    for step in tqdm(range(steps + 1), desc="descent", leave=False, disable=None):
        loss = explicit_loss(hr, t, tau=tau, margin=margin)
        uh, ut = F.normalize(hr, dim=1), F.normalize(t, dim=1)
        with torch.no_grad():
            w = uh @ ut.T
            rows.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "mean_similarity": (w.sum() / n**2).item(),
                    "top_singular_value": (torch.linalg.matrix_norm(w, ord=2) / n).item(),
                    "top_share": top_component_share(torch.cat([uh, ut])),
                }
            )
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return pd.DataFrame(rows)
