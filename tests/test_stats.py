import math

import numpy as np
import pytest
import torch

from innards.data.stats import Moments, merge_all


def test_merged_chunks_match_numpy_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 7)) * np.arange(1, 8)
    cuts = [0, 1, 17, 400, 401, 999, 1000]
    parts = [Moments.of(x[a:b]) for a, b in zip(cuts, cuts[1:])]
    m = merge_all(parts)
    assert m.count == 1000
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var, x.var(0), rtol=1e-12)
    s = m.summary()
    assert s["mean_norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-12)
    assert s["rms_norm"] == pytest.approx(math.sqrt(np.sum(x.mean(0) ** 2 + x.var(0))), rel=1e-12)
    assert s["rms_norm"] == pytest.approx(math.sqrt(np.mean(np.sum(x**2, 1))), rel=1e-10)


def test_large_offset_is_stable():
    # E[x^2] - E[x]^2 in fp32 (the reference pipeline) loses everything here; Chan merges do not
    rng = np.random.default_rng(1)
    x = (1e4 + rng.normal(0, 1e-2, size=(4096, 3))).astype(np.float32)
    m = merge_all([Moments.of(torch.from_numpy(x[i:i + 100])) for i in range(0, 4096, 100)])
    np.testing.assert_allclose(m.var, x.astype(np.float64).var(0), rtol=1e-6)


def test_update_empty_and_tensor_roundtrip():
    m = Moments.empty(4)
    assert m.count == 0 and m.summary()["mean_norm"] == 0.0
    m.update(torch.ones(3, 4)).update(np.zeros((0, 4))).update(torch.zeros(1, 4))
    assert m.count == 4
    np.testing.assert_allclose(m.mean, 0.75)
    back = Moments.from_tensors(m.to_tensors("s."), "s.")
    assert back.count == m.count and back.norm_sum == m.norm_sum
    assert np.array_equal(back.mean, m.mean) and np.array_equal(back.m2, m.m2)
    with pytest.raises(ValueError):
        Moments.of(np.zeros(3))


def test_fixed_order_is_bit_identical():
    rng = np.random.default_rng(2)
    chunks = [rng.normal(size=(n, 5)) for n in (3, 50, 7, 64)]
    a = merge_all([Moments.of(c) for c in chunks])
    b = merge_all([Moments.of(c) for c in chunks])
    assert a.mean.tobytes() == b.mean.tobytes() and a.m2.tobytes() == b.m2.tobytes()
