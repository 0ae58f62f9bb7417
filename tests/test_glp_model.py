"""GLP denoiser: architecture, time conventions, solvers, projection, persistence, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from innards.errors import ChecksumError, InnardsError
from innards.glp import schedule as sch
from innards.glp.model import GLP, GLPConfig, param_count_formula, sinusoid

D = 4


def _mixture(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[3.0, 0.0, 1.0, -1.0], [-2.0, 1.0, 0.0, 2.0]])
    k = torch.randint(0, 2, (n,), generator=g)
    return centers[k] + 0.4 * torch.randn(n, D, generator=g) + torch.tensor([10.0, -5.0, 0.0, 1.0])


def _stats(x: torch.Tensor) -> dict:
    x64 = x.double()
    return {"mean": x64.mean(0), "var": x64.var(0, unbiased=False), "count": x.shape[0]}


@pytest.fixture(scope="module")
def trained() -> tuple[GLP, torch.Tensor]:
    """A tiny GLP fitted for a few hundred steps on a 2-cluster mixture (raw scale, off-centre)."""
    torch.manual_seed(0)
    data = _mixture(4096)
    glp = GLP(GLPConfig(d_in=D, n_blocks=2, d_model=32, d_mlp=64),
              {"model": {"name": "toy"}, "sites": ["blocks.0.resid_post"], "stats_by_site": {"blocks.0.resid_post": _stats(data)}})
    opt = torch.optim.AdamW(glp.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(400):
        x = glp.normalize(data[torch.randint(0, len(data), (256,), generator=g)])
        t = torch.rand(256, generator=g)
        eps = torch.randn(256, D, generator=g)
        z = (1 - t[:, None]) * x + t[:, None] * eps
        loss = (glp(z, t) - (eps - x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    glp.eval()
    return glp, data


def test_param_counts_match_reference_formula():
    assert param_count_formula(2048, 3) == 453_117_952
    assert param_count_formula(4096, 6) == 3_423_039_488
    assert GLP.count_params(GLPConfig(d_in=2048, n_blocks=3)) == 453_117_952
    assert GLP.count_params(GLPConfig(d_in=4096, n_blocks=6)) == 3_423_039_488
    assert GLP.count_params(GLPConfig(d_in=2048, n_blocks=12, n_sites=16)) == param_count_formula(2048, 12, multi_site=True) == 1_694_971_904
    small = GLP(GLPConfig(d_in=6, n_blocks=2, d_model=10, d_mlp=14))
    assert small.n_params == param_count_formula(6, 2, 10, 14)


def test_time_embedding_is_cos_first_and_fed_tau_1000t():
    e = sinusoid(torch.tensor([7.0]), 8)
    assert torch.allclose(e[0, 0], torch.cos(torch.tensor(7.0))) and torch.allclose(e[0, 4], torch.sin(torch.tensor(7.0)))
    glp = GLP(GLPConfig(d_in=3, n_blocks=1, d_model=8, d_mlp=12))
    t = torch.tensor([0.1, 0.5, 1.0])
    want = glp.time_proj(glp.time_embed(sinusoid(1000.0 * t, 8)))
    assert torch.allclose(glp.conditioning(t), want)
    assert not torch.allclose(glp.conditioning(t), glp.time_proj(glp.time_embed(sinusoid(t, 8))))


def test_multi_site_embedding_separates_sites_unlike_depth_in_unit_interval():
    for n in (2, 16, 64):
        idx = torch.arange(n).float()
        ours = torch.nn.functional.normalize(sinusoid(100.0 * idx, 512), dim=1)
        ref = torch.nn.functional.normalize(sinusoid(idx / (n - 1), 512), dim=1)
        c_ours = ours @ ours.T - 2 * torch.eye(n)
        c_ref = ref @ ref.T - 2 * torch.eye(n)
        assert c_ours.max() < 0.5
        assert c_ref.max() > 0.95
    glp = GLP(GLPConfig(d_in=3, n_blocks=1, d_model=16, d_mlp=8, n_sites=3),
              {"sites": ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]})
    z = torch.randn(5, 3)
    v0, v2 = glp(z, 0.3, site=0), glp(z, 0.3, site="blocks.2.resid_post")
    assert not torch.allclose(v0, v2)
    per_row = glp(z, 0.3, site=torch.tensor([0, 2, 0, 2, 0]))
    assert torch.allclose(per_row[1], v2[1], atol=1e-6) and torch.allclose(per_row[0], v0[0], atol=1e-6)
    y = glp.project(z, t_start=0.5, steps=4, seed=0, site=torch.tensor([0, 2, 0, 2, 0]), batch_size=2)
    assert y.shape == z.shape and torch.isfinite(y).all()
    with pytest.raises(InnardsError):
        glp(z, 0.3)


def test_grid_schedule_invariants():
    grid = sch.sdedit_grid(0.5, 20, "grid")
    assert grid[0] == pytest.approx(0.474211, abs=1e-6)
    assert sch.n_evaluations(grid) == 10 and grid[-1] == 0.0
    assert grid[-2] == pytest.approx(0.001)
    exact = sch.sdedit_grid(0.5, 20, "exact")
    assert exact[0] == 0.5 and exact[-1] == 0.0 and sch.n_evaluations(exact) == 19
    assert np.allclose(np.diff(exact), -0.5 / 19)
    ref = sch.reference_grid(1000)
    assert ref[math.floor(0.9 * 1000)] == pytest.approx(0.100) and ref[0] == 1.0 and min(ref) == pytest.approx(0.001)
    assert sch.sample_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert sch.n_evaluations(sch.sample_grid(4), "heun") == 8
    for bad in (-0.1, 1.5):
        with pytest.raises(InnardsError):
            sch.sdedit_grid(bad)


def test_project_noises_to_exactly_t_start_and_counts_evaluations(trained):
    glp, data = trained
    seen = []
    h = glp.register_forward_pre_hook(lambda m, args: seen.append(float(torch.as_tensor(args[1]).reshape(-1)[0])))
    try:
        glp.project(data[:8], t_start=0.5, steps=20, seed=0)
        assert len(seen) == 19 and seen[0] == 0.5
        seen.clear()
        glp.project(data[:8], t_start=0.5, steps=20, schedule="grid", seed=0)
        assert len(seen) == 10 and seen[0] == pytest.approx(0.474211, abs=1e-6)
    finally:
        h.remove()


def test_project_at_zero_is_identity_and_keeps_shape_dtype(trained):
    glp, data = trained
    x = data[:6].reshape(2, 3, D)
    assert torch.equal(glp.project(x, t_start=0.0), x)
    xb = x.to(torch.bfloat16)
    y = glp.project(xb, t_start=0.5, steps=5, seed=3)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, D)
    assert torch.equal(y, glp.project(xb, t_start=0.5, steps=5, seed=3))
    assert not torch.equal(y, glp.project(xb, t_start=0.5, steps=5, seed=4))
    near = glp.project(x, t_start=1e-4, steps=3, seed=0)
    assert torch.allclose(near, x, atol=1e-2)


def test_clean_estimate_identity():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(10, 5, generator=g), torch.randn(10, 5, generator=g)
    for t in (0.1, 0.5, 0.9):
        z = (1 - t) * x + t * eps
        assert torch.allclose(z - t * (eps - x), x, atol=1e-6)
    # one exact-velocity Euler step from t to 0 lands on the data
    z = 0.3 * eps + 0.7 * x
    assert torch.allclose(sch.integrate(lambda zz, tt: eps - x, z, [0.3, 0.0]), x, atol=1e-6)


def test_euler_1000_matches_heun_and_samples_cover_both_modes(trained):
    glp, data = trained
    e = glp.sample(512, steps=1000, solver="euler", seed=0, normalized=True)
    h = glp.sample(512, steps=200, solver="heun", seed=0, normalized=True)
    assert (e - h).abs().mean() < 0.01
    err = {s: (glp.sample(512, steps=10, solver=s, seed=0, normalized=True) - e).abs().mean() for s in ("euler", "ab2")}
    assert err["ab2"] < 0.5 * err["euler"]  # second order at the same number of evaluations
    s = glp.sample(2000, steps=50, solver="heun", seed=1)
    near0 = (s[:, 0] > 10.5).float().mean()
    assert 0.3 < near0 < 0.7  # both clusters (x0 = 13 and x0 = 8) are populated
    assert torch.allclose(s.mean(0), data.mean(0), atol=0.5)


def test_loss_typicality_and_meta_neurons(trained):
    glp, data = trained
    x = data[:64]
    per = glp.loss(x, 0.3, seed=0)
    assert per.shape == (64,) and torch.equal(per, glp.loss(x, 0.3, seed=0))
    per_t = glp.loss(x.reshape(8, 8, D), torch.rand(8, 8), seed=0)
    assert per_t.shape == (8, 8)
    typical = glp.typicality(x).mean()
    outliers = x + torch.tensor([0.0, 8.0, -6.0, 5.0])
    assert glp.typicality(outliers).mean() > 2 * typical
    mn = glp.meta_neurons(x, t=0.1, seed=0)
    assert mn.shape == (64, 2 * 64)
    assert torch.equal(mn, glp.meta_neurons(x, t=0.1, seed=0))
    xn = glp.normalize(x)
    z = 0.9 * xn + 0.1 * torch.randn(xn.shape, generator=torch.Generator().manual_seed(0))
    h = glp.in_proj(z)
    c = glp.conditioning(0.1).chunk(2, dim=-1)
    m0 = glp.blocks[0].hidden(h, c[0])
    assert torch.allclose(mn[:, :64], m0, atol=1e-5)


def test_normalize_roundtrip(trained):
    glp, data = trained
    x = data[:100]
    assert torch.allclose(glp.denormalize(glp.normalize(x)), x, atol=1e-4)
    assert glp.normalize(data).mean(0).abs().max() < 1e-3


def test_save_load_roundtrip_and_corruption(trained, tmp_path):
    glp, data = trained
    d = glp.save_pretrained(tmp_path / "g", training={"step": 400})
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["sites"] == ["blocks.0.resid_post"] and cfg["d_in"] == D and cfg["training"]["step"] == 400
    back = GLP.from_pretrained(d)
    z = torch.randn(7, D)
    assert torch.equal(back(z, 0.4), glp(z, 0.4))
    assert back.meta["stats"]["mean"].dtype == torch.float64
    assert torch.equal(back.meta["stats"]["var"], glp.meta["stats"]["var"])
    assert torch.equal(back.sample(5, steps=3, seed=1), glp.sample(5, steps=3, seed=1))
    # corrupt one byte, then truncate
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError):
        GLP.from_pretrained(d)
    w.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(InnardsError, match="truncated"):
        GLP.from_pretrained(d)


def test_bad_folders_and_compatibility(trained, tmp_path):
    glp, _ = trained
    with pytest.raises(InnardsError, match="not found"):
        GLP.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InnardsError, match="not a GLP folder"):
        GLP.from_pretrained(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InnardsError, match="not a GLP folder"):
        GLP.from_pretrained(tmp_path / "other")
    glp.check_compatible("toy", "blocks.0.resid_post", D)
    with pytest.raises(InnardsError, match="model"):
        glp.check_compatible("gpt2", "blocks.0.resid_post", D)
    with pytest.raises(InnardsError, match="site"):
        glp.check_compatible("toy", "blocks.1.resid_post", D)
    with pytest.raises(InnardsError, match="width"):
        glp.check_compatible("toy", "blocks.0.resid_post", D + 1)
    with pytest.raises(InnardsError, match="width"):
        glp.project(torch.randn(3, D + 1))


def test_sample_cli(trained, tmp_path):
    from innards.cli import main

    glp, _ = trained
    d = glp.save_pretrained(tmp_path / "g")
    out = tmp_path / "s.npy"
    assert main(["glp", "sample", "--glp", str(d), "-n", "10", "--steps", "4", "--solver", "heun", "--out", str(out)]) == 0
    arr = np.load(out)
    assert arr.shape == (10, D) and np.isfinite(arr).all()
    out2 = tmp_path / "s.safetensors"
    assert main(["glp", "sample", "--glp", str(d), "-n", "3", "--steps", "2", "--out", str(out2)]) == 0
    from safetensors.torch import load_file

    assert load_file(str(out2))["acts"].shape == (3, D)
    assert main(["glp", "sample", "--glp", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert np.load(out).shape == (10, D)  # the failed run did not touch the earlier output


def test_pc2_is_second_order_at_one_evaluation_per_step():
    A = torch.tensor([[-1.0, 2.0], [-2.0, -0.5]], dtype=torch.float64)
    z1 = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    calls = []

    def vel(z, t):
        calls.append(t)
        return z @ A.T

    exact = z1 @ torch.linalg.matrix_exp(-A).T  # from t = 1 to t = 0
    err = {}
    for solver in ("euler", "ab2", "pc2"):
        for k in (16, 32):
            calls.clear()
            z = sch.integrate(vel, z1, sch.sample_grid(k), solver)
            assert len(calls) == k == sch.n_evaluations(sch.sample_grid(k), solver)
            err[solver, k] = float((z - exact).abs().max())
    assert 1.7 < err["euler", 16] / err["euler", 32] < 2.3
    for solver in ("ab2", "pc2"):
        assert 3.3 < err[solver, 16] / err[solver, 32] < 4.7, (solver, err)
    assert err["pc2", 16] < err["ab2", 16]


def test_shift_schedules():
    assert sch.sample_grid(4, "shift:2") == sch.sample_grid(4, "shift", 2.0) != sch.sample_grid(4, "shift")
    g = sch.sample_grid(4, "shift:2")
    assert g[0] == 1.0 and g[-1] == 0.0 and all(a > b for a, b in zip(g, g[1:]))
    assert g[1] > 0.75  # denser near t = 1
    for bad in ("shift:x", "uniform:2", "cosine"):
        with pytest.raises(InnardsError):
            sch.sample_grid(4, bad)
