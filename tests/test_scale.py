import numpy as np
import pytest

from innards.errors import InnardsError
from innards.glp.scale import envelope, fit_power_law, power_law


@pytest.mark.parametrize("E,A,alpha,lo,hi", [(0.52, 435.1, 0.169, 13, 19), (1.2, 30.0, 0.3, 10, 14), (0.0, 5.0, 0.1, 8, 12)])
def test_fit_recovers_a_known_law(E, A, alpha, lo, hi):
    C = np.logspace(lo, hi, 20)
    fit = fit_power_law(C, power_law(C, E, A, alpha))
    assert fit["E"] == pytest.approx(E, abs=1e-4)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert fit["A"] == pytest.approx(A, rel=1e-2)
    assert fit["r2"] > 0.9999


def test_fit_with_noise_is_close():
    rng = np.random.default_rng(0)
    C = np.logspace(13, 19, 30)
    L = power_law(C, 0.52, 435.1, 0.169) * np.exp(rng.normal(0, 0.003, C.size))
    fit = fit_power_law(C, L)
    assert fit["E"] == pytest.approx(0.52, abs=0.03)
    assert fit["alpha"] == pytest.approx(0.169, abs=0.02)
    assert fit["r2"] > 0.99


def test_envelope_keeps_the_compute_efficient_frontier():
    # two runs: the small one is better at low compute, the big one at high compute
    small = [(1e1, 3.0), (1e2, 2.0), (1e3, 1.7), (1e4, 1.65)]
    big = [(1e2, 2.5), (1e3, 1.9), (1e4, 1.5), (1e5, 1.2)]
    pts = small + big
    idx = envelope([c for c, _ in pts], [L for _, L in pts])
    chosen = [pts[i] for i in idx]
    assert chosen == [(1e1, 3.0), (1e2, 2.0), (1e3, 1.7), (1e4, 1.5), (1e5, 1.2)]


def test_envelope_skips_non_finite_and_fit_needs_three_points():
    idx = envelope([1.0, 2.0, float("nan"), 4.0], [2.0, float("inf"), 1.0, 1.5])
    assert list(idx) == [0, 3]
    with pytest.raises(InnardsError):
        fit_power_law([1.0, 2.0], [1.0, 0.5])
