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


# ----- the sweep, end to end on a tiny store -----------------------------------------------------------

def test_sweep_fits_plots_and_reuses_runs(tiny_model_dir, tmp_path):
    import json

    from innards.cli import main
    from innards.glp.scale import ScaleConfig, scale
    from innards.glp.train import GLPOptimConfig

    model_dir = tiny_model_dir("llama")
    from test_glp_eval import make_tiny_store

    store = make_tiny_store(tmp_path, model_dir)
    cfg = ScaleConfig(acts=str(store), out=str(tmp_path / "scale"), depths=[1, 2], tokens=20000, batch_size=256, optim=GLPOptimConfig(lr=1e-3),
                      checkpoints=4, val_rows=1000, precision="fp32", model=str(model_dir), eval_n=150, eval_steps=4,
                      lm_docs=6, progress=False)
    res = scale(cfg)
    on_disk = json.loads((tmp_path / "scale" / "scale.json").read_text())
    assert [r["depth"] for r in on_disk["runs"]] == [1, 2]
    assert on_disk["runs"][1]["n_params"] > on_disk["runs"][0]["n_params"]
    env = on_disk["envelope"]
    assert len(env) >= 3
    assert all(a["compute"] < b["compute"] and a["loss"] > b["loss"] for a, b in zip(env, env[1:]))
    for p in on_disk["runs"][0]["checkpoints"]:
        assert p["compute"] == pytest.approx(6 * p["n_params"] * p["activations"])
    fit = on_disk["fit"]
    assert fit is not None and {"E", "A", "alpha", "r2"} <= set(fit)
    down = on_disk["downstream"]
    assert len(down) == len(env) and all(0 <= d["c2st_auc_glp"] <= 1 and d["delta_lm_glp"] is not None for d in down)
    for png in ("scaling.png", "downstream.png"):
        assert (tmp_path / "scale" / png).stat().st_size > 1000
    # a second call reuses the finished runs; changed settings are refused without --overwrite
    stamp = (tmp_path / "scale" / "d1" / "model.safetensors").stat().st_mtime_ns
    cfg.downstream = False
    scale(cfg)
    assert (tmp_path / "scale" / "d1" / "model.safetensors").stat().st_mtime_ns == stamp
    rc = main(["glp", "scale", "--acts", str(store), "--out", str(tmp_path / "scale"), "--depths", "1", "--tokens", "9999",
               "--no-progress"])
    assert rc == 2
    assert res["fit"] == on_disk["fit"]
