"""Numerical checks of Theorems 1 and 2 (kalm.theory) on small, fast configurations."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kalm import analysis, theory
from kalm.config import resolve

SMALL = {"ns": (10, 100, 1000), "dim": 16, "n_queries": 64, "pool_size": 50_000}


@pytest.fixture(scope="module")
def gap_table():
    return theory.theorem1_gap(**SMALL, tau=0.5, margin=0.02, seed=0)


def test_generators_are_unit_seeded_and_anisotropic():
    x = theory.anisotropic_embeddings(400, 32, strength=2.0, seed=3)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(400))
    torch.testing.assert_close(x, theory.anisotropic_embeddings(400, 32, strength=2.0, seed=3))
    # shared direction e_0 with weight 2 against noise of norm ~1: mean cosine ~ 4 / 5
    assert analysis.anisotropy(x) == pytest.approx(0.8, abs=0.05)
    assert abs(analysis.anisotropy(theory.random_embeddings(400, 32, seed=3))) < 0.02
    with pytest.raises(ValueError, match="strength"):
        theory.anisotropic_embeddings(3, 3, strength=-1.0)


def test_jensen_hand_value():
    # tau = 1: row 0 -> log((1 + 3) / 2) = log 2, row 1 -> log 1 = 0
    lhs, rhs = theory.jensen_check(np.array([[0.0, math.log(3)], [0.0, 0.0]]), tau=1.0)
    assert lhs == pytest.approx(math.log(2) / 2)
    assert rhs == pytest.approx(math.log(3) / 4)


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_jensen_equality_for_constant_rows(tau):
    w = np.repeat(np.array([[0.3], [-0.2], [0.9]]), 3, axis=1)
    lhs, rhs = theory.jensen_check(w, tau)
    assert lhs == pytest.approx(rhs, abs=1e-12)
    assert theory.jensen_check(np.full((4, 4), 0.7), tau)[0] == pytest.approx(0.7 / tau)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12).flatmap(
        lambda n: arrays(np.float64, (n, n), elements=st.floats(-1, 1, allow_nan=False))
    ),
    st.floats(0.05, 2.0),
)
def test_jensen_holds_on_any_matrix(w, tau):
    lhs, rhs = theory.jensen_check(w, tau)
    assert lhs >= rhs - 1e-9


@settings(max_examples=20, deadline=None)
@given(st.floats(0.0, 4.0), st.integers(0, 10_000), st.floats(0.05, 1.0))
def test_jensen_holds_on_embedding_similarities(strength, seed, tau):
    hr = theory.anisotropic_embeddings(16, 8, strength, seed)
    t = theory.anisotropic_embeddings(16, 8, strength, seed + 1)
    lhs, rhs = theory.jensen_check(hr @ t.T, tau)
    assert lhs >= rhs - 1e-9


def test_jensen_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        theory.jensen_check(np.ones((2, 3)), 0.5)


def test_theorem1_gap_shrinks_like_one_over_n(gap_table):
    gaps = gap_table["gap"].to_numpy()
    assert list(gap_table["N"]) == [10, 100, 1000]
    assert np.all(np.diff(np.abs(gaps)) < 0)
    assert abs(gaps[-1]) < 0.02
    assert 4 < gaps[1] / gaps[2] < 25  # one decade of N, about one decade of gap
    np.testing.assert_allclose(gap_table["gap"], gap_table["estimate"] - gap_table["limit"])


def test_theorem1_margin_only_shifts_the_limit(gap_table):
    shifted = theory.theorem1_gap(**SMALL, tau=0.5, margin=0.12, seed=0)
    np.testing.assert_allclose(shifted["limit"] - gap_table["limit"], 0.1 / 0.5, rtol=1e-9)


@pytest.fixture(scope="module")
def descent():
    return theory.descent_experiment(n=32, d=8, steps=60, lr=0.5, tau=0.1, seed=0)


def test_descent_lowers_loss_and_similarity(descent):
    first, last = descent.iloc[0], descent.iloc[-1]
    assert len(descent) == 61
    assert last["loss"] < 0.5 * first["loss"]
    assert last["mean_similarity"] < first["mean_similarity"] - 0.2
    assert last["top_singular_value"] < first["top_singular_value"] - 0.2
    assert last["top_share"] < first["top_share"]


def test_descent_top_singular_value_bounds_mean_similarity(descent):
    # Rayleigh quotient with the all-ones vector: sigma_1(W) >= Sum(W) / n
    assert np.all(descent["top_singular_value"] >= descent["mean_similarity"] - 1e-6)


def test_spectral_check_hand_values():
    # all-ones: Sum = n^2, sigma = n, both bounds tight
    np.testing.assert_allclose(theory.spectral_check(np.ones((4, 4))), (4.0, 4.0, 4.0))
    # identity: Sum = n, sigma = 1
    np.testing.assert_allclose(theory.spectral_check(np.eye(4)), (1.0, 1.0, 2.0))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 10).flatmap(
        lambda n: arrays(np.float64, (n, n), elements=st.floats(-1, 1, allow_nan=False))
    )
)
def test_spectral_bounds(w):
    lower, sigma, _ = theory.spectral_check(w)
    assert lower <= sigma + 1e-9  # any matrix
    lower, sigma, upper = theory.spectral_check(np.abs(w))  # entries in [0, 1]
    assert lower <= sigma + 1e-9 <= upper + 2e-9


def test_profile_sizes_are_keywords_of_the_checks():
    """A page runs the checks at its profile's sizes without naming the fields itself."""
    ev = resolve(profile="cpu", theorem1_dim=24, descent_steps=7).eval
    thm1, descent = theory.theorem1_sizes(ev), theory.descent_sizes(ev)
    assert set(thm1) <= set(inspect.signature(theory.theorem1_gap).parameters)
    assert set(descent) <= set(inspect.signature(theory.descent_experiment).parameters)
    assert (thm1["ns"], thm1["dim"], thm1["n_queries"], thm1["pool_size"]) == (
        ev.theorem1_negatives,
        24,
        ev.theorem1_queries,
        ev.theorem1_pool,
    )
    assert descent == {"n": ev.descent_rows, "d": ev.descent_dim, "steps": 7}
