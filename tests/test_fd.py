import numpy as np
import pytest
import scipy.linalg
import torch

from innards.glp.fd import frechet_distance, frechet_distance_from_moments, moments, trace_sqrt_product


def _random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_commuting_covariances_closed_form():
    rng = np.random.default_rng(0)
    d = 12
    Q = _random_orthogonal(d, rng)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    S1, S2 = (Q * a) @ Q.T, (Q * b) @ Q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_moments(mu1, S1, mu2, S2) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_scaled_covariance_closed_form_and_singular():
    rng = np.random.default_rng(1)
    d = 8
    L = rng.normal(size=(d, 3))
    S = L @ L.T  # rank 3: the eigen route must not produce NaN or complex numbers
    c = 2.5
    got = frechet_distance_from_moments(np.zeros(d), S, np.zeros(d), c * S)
    # zero eigenvalues come back as ~1e-16, whose square roots (~1e-8) bound the attainable accuracy
    assert got == pytest.approx(np.trace(S) * (1 - np.sqrt(c)) ** 2, rel=1e-6)
    assert np.isfinite(got)


def test_matches_scipy_sqrtm_on_well_conditioned_gaussians():
    rng = np.random.default_rng(2)
    d = 10
    A, B = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    S1, S2 = A @ A.T + np.eye(d), B @ B.T + np.eye(d)
    ref = np.trace(scipy.linalg.sqrtm(S1 @ S2)).real
    assert trace_sqrt_product(S1, S2) == pytest.approx(ref, rel=1e-8)
    assert trace_sqrt_product(S2, S1) == pytest.approx(ref, rel=1e-8)


def test_samples_zero_on_self_and_symmetric():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3.0
    y = rng.normal(size=(400, 6)) * 2.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) == pytest.approx(
        frechet_distance(x, y), rel=1e-5)


def test_moments_are_float64_and_stable_under_large_offset():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20000, 4)) + 1e4  # naive E[x^2]-E[x]^2 in float32 would lose everything
    mu, cov = moments(torch.tensor(x, dtype=torch.float64))
    assert mu.dtype == np.float64
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)


def test_sample_estimate_approaches_population_value():
    rng = np.random.default_rng(5)
    d = 4
    x = rng.normal(size=(200000, d))
    y = rng.normal(size=(200000, d)) * 2.0 + 1.0
    expected = d * 1.0 + d * (1 - 2) ** 2  # ||mu||^2 + sum (1 - 2)^2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.02)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        frechet_distance_from_moments(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
