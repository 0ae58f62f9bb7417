import numpy as np
import pytest

from innards.glp.c2st import c2st_auc


def test_same_distribution_is_near_chance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1500, 8)), rng.normal(size=(1500, 8))
    assert abs(c2st_auc(a, b, seed=0) - 0.5) < 0.06


def test_shifted_distribution_is_separable():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8)) + 1.5
    assert c2st_auc(a, b, seed=0) > 0.95


def test_sees_beyond_two_moments():
    # same mean and covariance, different shape: Fréchet distance is ~0, the classifier is not fooled
    rng = np.random.default_rng(2)
    n, d = 2000, 4
    gauss = rng.normal(size=(n, d))
    signs = rng.choice([-1.0, 1.0], size=(n, d))  # Rademacher: mean 0, variance 1
    assert c2st_auc(gauss, signs + 0.05 * rng.normal(size=(n, d)), seed=0) > 0.9


def test_unbalanced_sets_and_bad_input():
    rng = np.random.default_rng(3)
    assert 0.0 <= c2st_auc(rng.normal(size=(600, 3)), rng.normal(size=(300, 3)), seed=1) <= 1.0
    with pytest.raises(ValueError):
        c2st_auc(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        c2st_auc(np.full((10, 3), np.nan), np.zeros((10, 3)))


def test_heavy_tails_are_caught_by_the_summary_features():
    # Student-t vs a Gaussian of the same per-dimension variance: same first two moments
    rng = np.random.default_rng(4)
    n, d = 2000, 64
    t = rng.standard_t(4, size=(n, d))
    g = rng.normal(size=(n, d)) * t.std(0)
    assert c2st_auc(t, g, seed=0, summaries=False) < 0.6  # the bare MLP misses it
    assert c2st_auc(t, g, seed=0) > 0.75
    assert abs(c2st_auc(t, rng.standard_t(4, size=(n, d)), seed=0) - 0.5) < 0.07
