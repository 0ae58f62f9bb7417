"""Typicality scores: the exact Gaussian flow, the ODE likelihood (checked against exact log-densities), glp score."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from innards.glp.gaussian import GaussianFlow
from innards.glp.model import GLP, GLPConfig
from innards.glp.score import denoising_scores, log_likelihood


def _gaussian(d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    cov = A @ A.T / d + 0.2 * np.eye(d)
    mu = rng.standard_normal(d) * 2.0
    return mu, cov, mu + 0.3 * rng.standard_normal(d), np.sqrt(np.diag(cov)) * rng.uniform(0.5, 2.0, d)


def test_gaussian_flow_is_exact():
    from scipy.stats import multivariate_normal

    mu, cov, nm, ns = _gaussian()
    g = GaussianFlow(mu, cov, nm, ns)
    x = torch.from_numpy(np.random.default_rng(1).multivariate_normal(mu, cov, size=50))
    assert torch.allclose(g.log_prob(x), torch.from_numpy(multivariate_normal(mu, cov).logpdf(x.numpy())), atol=1e-9)
    # the closed-form map is the flow of the velocity field: fine Euler steps from t = 1 land on it
    z1 = torch.randn(40, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = z1.clone()
    n = 4000
    for i in range(n):
        z = z - (1.0 / n) * g.velocity(z, 1.0 - i / n)
    assert torch.allclose(z, g.flow_to_clean(z1, 1.0), atol=2e-3)
    s = g.sample(20000, seed=0).double()
    assert torch.allclose(s.mean(0), torch.from_numpy(mu), atol=0.05)
    assert torch.allclose(torch.cov(s.T), torch.from_numpy(cov), atol=0.06)
    # projection keeps the distribution: projected Gaussian data is still N(mu, cov)
    xs = torch.from_numpy(np.random.default_rng(3).multivariate_normal(mu, cov, size=20000))
    p = g.project(xs, t_start=0.5, seed=4)
    assert p.dtype == xs.dtype and torch.allclose(torch.cov(p.T), torch.from_numpy(cov), atol=0.06)
    assert torch.equal(g.project(xs[:3], t_start=0.0), xs[:3])


def test_ode_likelihood_recovers_the_gaussian_log_density():
    mu, cov, nm, ns = _gaussian()
    g = GaussianFlow(mu, cov, nm, ns)
    x = torch.from_numpy(np.random.default_rng(5).multivariate_normal(mu, cov, size=200))
    exact = g.log_prob(x)
    ode = log_likelihood(g, x, steps=48, trace="exact")
    assert (ode - exact).abs().max() < 1e-2 and (ode - exact).abs().mean() < 1e-3  # Heun: second order in the steps
    hutch = log_likelihood(g, x, steps=48, probes=16, seed=3)
    assert torch.equal(hutch, log_likelihood(g, x, steps=48, probes=16, seed=3))  # seeded
    assert (hutch - exact).abs().mean() < 0.5 and abs(float((hutch - exact).mean())) < 0.1  # unbiased
    # far-away points are much less likely
    assert float(log_likelihood(g, x[:20] + 20.0, steps=48, trace="exact").mean()) < float(exact.mean()) - 50


def test_likelihood_through_a_glp_whose_velocity_is_the_gaussian_flow():
    """The GLP code path (float32 network, its normalisation, the Jacobian of the statistics) on an exact velocity."""
    mu, cov, _, _ = _gaussian(d=8, seed=7)
    glp = GLP(GLPConfig(d_in=8, n_blocks=1, d_model=16, d_mlp=16),
              {"sites": ["s"], "stats_by_site": {"s": {"mean": torch.from_numpy(mu), "var": torch.from_numpy(np.diag(cov).copy())}}})
    g = GaussianFlow.fit(torch.from_numpy(np.random.default_rng(8).multivariate_normal(mu, cov, size=50000)), glp)
    glp.forward = lambda z, t, site=None: g.velocity(z, t).float()  # type: ignore[method-assign]
    x = torch.from_numpy(np.random.default_rng(9).multivariate_normal(mu, cov, size=100)).float()
    ll = log_likelihood(glp, x, steps=48, trace="exact")
    assert ll.dtype == torch.float64 and (ll - g.log_prob(x)).abs().max() < 2e-2


def test_denoising_scores_are_the_typicality_per_t():
    glp = GLP(GLPConfig(d_in=4, n_blocks=1), {"sites": ["s"], "stats_by_site": {"s": {"mean": torch.zeros(4), "var": torch.ones(4)}}})
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    dn = denoising_scores(glp, x, n_t=5, seed=2)
    assert dn.shape == (30, 5) and torch.allclose(dn.mean(-1), glp.typicality(x, n_t=5, seed=2))
    assert torch.equal(dn, denoising_scores(glp, x, n_t=5, seed=2))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    from test_glp_eval import make_tiny_store

    from innards.glp.train import GLPOptimConfig, GLPTrainConfig, train_glp

    root = tmp_path_factory.mktemp("glp_score")
    model = tiny_model_dir("llama")
    store = make_tiny_store(root, model, tokens=4000)
    glp = train_glp(GLPTrainConfig(acts=str(store), out=str(root / "glp"), depth=1, steps=60, batch_size=128,
                                   optim=GLPOptimConfig(lr=2e-3), checkpoints=1, val_rows=128, progress=False,
                                   precision="fp32"))
    return {"root": root, "model": model, "store": store, "glp": glp}


def test_glp_score_writes_per_token_scores(tiny, tmp_path, capsys):
    from tiny_models import SENTENCES

    from innards.cli import main
    from innards.tensors import load_tensors

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(SENTENCES * 2))
    out = tmp_path / "score"
    args = ["glp", "score", "--glp", str(tiny["glp"]), "--text", str(text), "--out", str(out), "--ode-steps", "4",
            "--n-t", "3", "--no-progress"]
    assert main(args) == 0  # --model defaults to the one recorded in the GLP
    t = load_tensors(out / "scores.safetensors")
    n = t["doc"].numel()
    assert n > 50 and t["denoise_t"].shape == (n, 3) and t["loglik"].shape == (n,) and torch.isfinite(t["loglik"]).all()
    assert torch.isfinite(t["lm_nll"]).all()  # every kept token follows BOS
    rec = json.loads((out / "scores.json").read_text())
    assert rec["n_docs"] == 12 and rec["n_tokens"] == n
    d0 = rec["documents"][0]
    assert len(d0["tokens"]) == len(d0["positions"]) == len(d0["denoise"]) == len(d0["loglik"]) and d0["positions"][0] == 0
    assert json.loads((out / "run.json").read_text())["kind"] == "score"
    before = (out / "scores.safetensors").read_bytes()
    assert main(args) == 0 and "already complete" in capsys.readouterr().err
    assert (out / "scores.safetensors").read_bytes() == before
    assert main(args[:-1] + ["--n-t", "0"]) == 2
