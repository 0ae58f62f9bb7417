"""Every shipped -spd config pins the reference's shipped settings (goodfire-ai/spd 3f0bb61); VPD configs their own.

The table below is the reference's YAML, setting by setting, in innards' names. When a reference checkout is
present (INNARDS_SPD_REFERENCE, default /work/ref/spd), its YAML files are read and compared as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from innards.vpd.config import load_config

TIE = [["linear1", "linear2"]]
COMMON_SPD = {"objective": "spd", "use_delta": True, "delta_coeff": 0.0, "weight_decay": 0.0, "clip_uv": 0.0,
              "warmup_steps": 200, "warmup_lr": 0.01, "ci_threshold": 0.1}
# name: (C per matrix, CI kind, hidden, imp_coeff, p, steps, batch, lr, schedule, final frac, warm-up wd, losses, tie)
SPD = {
    "tms-5-2-spd": (20, "mlp", [16], 3e-3, 1.0, 10000, 4096, 1e-3, "cosine", 0.0, 0.1, "stoch+layerwise", TIE),
    "tms-5-2-id-spd": (20, "mlp", [16], 3e-3, 1.0, 10000, 4096, 1e-3, "cosine", 0.0, 0.1, "stoch+layerwise", TIE),
    "tms-40-10-spd": (200, "mlp", [16], 1e-4, 2.0, 10000, 4096, 1e-3, "cosine", 0.0, 0.1, "stoch+layerwise", TIE),
    "tms-40-10-id-spd": (200, "mlp", [16], 1e-4, 2.0, 20000, 4096, 1e-3, "cosine", 0.0, 0.1, "stoch+layerwise", TIE),
    "resid-mlp-1-spd": (100, "mlp", [16], 1e-5, 2.0, 20000, 2048, 2e-3, "constant", 0.0, 0.1, "stoch+layerwise", []),
    "resid-mlp-2-spd": (400, "layerwise_mlp", [256], 1e-4, 2.0, 25000, 2048, 3e-4, "constant", 0.0, 0.0,
                        "subset2+pgd2", []),
    "resid-mlp-3-spd": (500, "mlp", [128], 1e-5, 2.0, 50000, 2048, 1e-3, "constant", 0.0, 0.1, "stoch+layerwise", []),
}


def _losses(cfg) -> str:
    if cfg.spd_routing == "all" and cfg.layerwise_coeff == 1.0 and cfg.stoch_coeff == 1.0 and not cfg.train_pgd.coeff:
        return "stoch+layerwise"
    p = cfg.train_pgd
    if (cfg.spd_routing, cfg.stoch_coeff, cfg.layerwise_coeff) == ("uniform_k", 2.0, 0.0) and \
            (p.coeff, p.n_steps, p.step_size, p.scope, p.routing) == (2.0, 1, 1.0, "shared", "uniform_k"):
        return "subset2+pgd2"
    return "other"


@pytest.mark.parametrize("name", sorted(SPD))
def test_spd_config_pins_the_reference(name):
    cfg = load_config(name)
    C, kind, hidden, imp, p, steps, batch, lr, sched, final, wwd, losses, tie = SPD[name]
    assert cfg.C == C and not cfg.C_per_module
    assert (cfg.ci.kind, cfg.ci.hidden) == (kind, hidden)
    assert cfg.imp_coeff == pytest.approx(imp) and cfg.p_start == cfg.p_end == p and cfg.p_end_frac == 1.0
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.lr_schedule, cfg.lr_final_frac) == (steps, batch, lr, sched, final)
    assert cfg.warmup_wd == wwd
    assert _losses(cfg) == losses
    assert cfg.tie == tie
    for k, v in COMMON_SPD.items():
        assert getattr(cfg, k) == v, (name, k)
    # the reference's bf16 autocast where it is faster on CPU (ResidMLP); fp32 for TMS (docs/vpd-configs.md)
    assert cfg.autocast_bf16 == name.startswith("resid"), name
    assert cfg.skip_inert_rows
    assert cfg.loss_kind == "mse"
    if name.startswith("tms"):
        expect = ["linear1", "hidden_layers.0", "linear2"] if "-id" in name else ["linear1", "linear2"]
        assert cfg.modules == expect
        assert cfg.target.feature_prob == 0.05 and cfg.target.lr_schedule == "constant" and cfg.target.lr == 5e-3
    else:
        assert cfg.modules == ["layers.*.mlp_in", "layers.*.mlp_out"]
        assert cfg.target.feature_prob == 0.01 and cfg.target.batch_size == 2048 and cfg.target.lr == 3e-3


def test_vpd_configs_keep_their_own_objective():
    for name in ("tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp-1", "resid-mlp-2", "resid-mlp-3"):
        cfg = load_config(name)
        assert cfg.objective == "vpd" and cfg.tie == [] and cfg.adv_coeff > 0 and cfg.freq_coeff > 0, name
    lm = load_config("demo-lm")
    # the VPD paper's LM settings: n_adv 3, 0.5/0.5, 2e-4/1e-4, p 2 -> 0.4, Δ-L2 1e7, 400 warm-up, clip 0.01, bf16
    assert (lm.adversary.n_steps, lm.stoch_coeff, lm.adv_coeff, lm.imp_coeff, lm.freq_coeff) == (3, 0.5, 0.5, 2e-4, 1e-4)
    assert (lm.p_start, lm.p_end, lm.delta_coeff, lm.warmup_steps, lm.clip_uv) == (2.0, 0.4, 1e7, 400, 0.01)
    assert lm.autocast_bf16 and lm.ci.kind == "transformer" and lm.loss_kind == "kl"


def _reference() -> Path | None:
    p = Path(os.environ.get("INNARDS_SPD_REFERENCE", "/work/ref/spd"))
    return p if (p / "spd" / "experiments").is_dir() else None


REF_FILES = {
    "tms-5-2-spd": "tms/tms_5-2_config.yaml", "tms-5-2-id-spd": "tms/tms_5-2-id_config.yaml",
    "tms-40-10-spd": "tms/tms_40-10_config.yaml", "tms-40-10-id-spd": "tms/tms_40-10-id_config.yaml",
    "resid-mlp-1-spd": "resid_mlp/resid_mlp1_config.yaml", "resid-mlp-2-spd": "resid_mlp/resid_mlp2_config.yaml",
    "resid-mlp-3-spd": "resid_mlp/resid_mlp3_config.yaml",
}


@pytest.mark.parametrize("name", sorted(REF_FILES))
def test_spd_config_matches_the_reference_yaml_when_present(name):
    import yaml

    ref = _reference()
    if ref is None:
        pytest.skip("no goodfire-ai/spd checkout (set INNARDS_SPD_REFERENCE)")
    r = yaml.safe_load((ref / "spd" / "experiments" / REF_FILES[name]).read_text())
    cfg = load_config(name)
    Cs = {m["module_pattern"]: m["C"] for m in r["module_info"]}
    assert set(Cs.values()) == {cfg.C}
    assert sorted(Cs) == sorted(cfg.modules)
    assert (r["ci_fn_type"].replace("shared_mlp", "layerwise_mlp"), r["ci_fn_hidden_dims"]) == (cfg.ci.kind, cfg.ci.hidden)
    assert r["use_delta_component"] == cfg.use_delta and r["output_loss_type"] == cfg.loss_kind
    assert r.get("autocast_bf16", True) and (cfg.autocast_bf16 or name.startswith("tms"))
    assert (r["batch_size"], r["steps"]) == (cfg.batch_size, cfg.steps)
    ls = r["lr_schedule"]
    assert (float(ls["start_val"]), ls["fn_type"]) == (cfg.lr, cfg.lr_schedule)
    if ls["fn_type"] == "cosine":
        assert float(ls.get("final_val_frac", 1.0)) == cfg.lr_final_frac
    assert (r["faithfulness_warmup_steps"], r["faithfulness_warmup_lr"], r["faithfulness_warmup_weight_decay"]) == \
        (cfg.warmup_steps, cfg.warmup_lr, cfg.warmup_wd)
    assert r.get("grad_clip_norm_components") in (None, 0) and cfg.clip_uv == 0
    assert r["task_config"]["feature_probability"] == cfg.target.feature_prob
    assert r["ci_alive_threshold"] == cfg.ci_threshold
    terms = {lc["classname"]: lc for lc in r["loss_metric_configs"]}
    imp = terms.pop("ImportanceMinimalityLoss")
    assert (float(imp["coeff"]), imp["pnorm"], imp["beta"]) == (cfg.imp_coeff, cfg.p_start, 0)
    assert float(terms.pop("FaithfulnessLoss", {"coeff": 0.0})["coeff"]) == cfg.delta_coeff
    stoch = terms.pop("StochasticReconLoss", None)
    sub = terms.pop("StochasticReconSubsetLoss", None)
    if stoch is not None:
        assert cfg.spd_routing == "all" and float(stoch["coeff"]) == cfg.stoch_coeff
    else:
        assert cfg.spd_routing == "uniform_k" and float(sub["coeff"]) == cfg.stoch_coeff
    lw = terms.pop("StochasticReconLayerwiseLoss", {"coeff": 0.0})
    assert float(lw["coeff"]) == cfg.layerwise_coeff
    pgd = terms.pop("PGDReconSubsetLoss", None)
    if pgd is None:
        assert cfg.train_pgd.coeff == 0
    else:
        p = cfg.train_pgd
        assert (float(pgd["coeff"]), pgd["n_steps"], pgd["step_size"], pgd["init"]) == (p.coeff, p.n_steps, p.step_size, "random")
        assert pgd["mask_scope"] == {"shared": "shared_across_batch", "per_datapoint": "unique_per_datapoint"}[p.scope]
        assert p.routing == "uniform_k"
    assert not terms, f"reference loss terms without an innards counterpart: {sorted(terms)}"
    assert (cfg.tie == TIE) == name.startswith("tms")
