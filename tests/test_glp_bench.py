"""innards bench glp on a tiny store: the timed training (in-process here), and quality against evaluations
(FD, C2ST, projection kept fraction / error / delta LM) for every solver and grid, and a student."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    from test_glp_eval import make_tiny_store

    from innards.bench.glp import _child_train

    root = tmp_path_factory.mktemp("bench_glp")
    store = make_tiny_store(root, tiny_model_dir("llama"), tokens=3000)
    train = dict(acts=str(store), out=str(root / "t"), depth=1, batch_size=128, steps=4, log_every=2, val_every=10**9,
                 checkpoints=1, save_every=10**9, precision="fp32", val_rows=0, overwrite=True, progress=False)
    res = _child_train({"train": train, "threads": None})
    return {"root": root, "store": store, "glp": root / "t", "child": res, "model": tiny_model_dir("llama")}


def test_throughput_child(tiny):
    res = tiny["child"]
    assert res["precision"] == "fp32" and res["train_activations_per_s"] > 0 and 0 < res["mfu"]


def test_quality_by_nfe_tables(tiny):
    from innards.bench.glp import fd_by_nfe, project_by_nfe, sample_by_nfe
    from innards.data.store import ActivationStore
    from innards.glp.model import GLP
    from innards.models.load import load_model

    glp = GLP.from_pretrained(tiny["glp"])
    st = ActivationStore(tiny["store"])
    real = st.rows(st.split_rows("val")[:64], site=st.sites[0])
    q = sample_by_nfe(glp, real, [2, 4, 30], ["euler", "heun", "pc2"], ["uniform", "shift:2"], c2st_max_nfe=2)
    assert set(q["fd_by_nfe"]) == {"euler", "heun", "pc2", "euler_shift2", "heun_shift2", "pc2_shift2"}
    assert set(q["fd_by_nfe"]["euler"]) == {2, 4, 30} and set(q["fd_by_nfe"]["pc2"]) == {2, 4}
    assert abs(q["fd_to_max_nfe_samples_by_nfe"]["euler"][30]) < 1e-9
    assert set(q["c2st_by_nfe"]["euler"]) == {2, 30} and all(0 <= v <= 1 for d in q["c2st_by_nfe"].values() for v in d.values())
    assert all(math.isfinite(v) for d in q["fd_by_nfe"].values() for v in d.values())
    fds, ref = fd_by_nfe(glp, real, [2, 4], ["uniform", "shift"])
    assert set(fds) == {"euler", "heun", "ab2", "pc2", "euler_shift", "heun_shift", "ab2_shift", "pc2_shift"}
    assert abs(ref["euler"][4]) < 1e-9

    model = load_model(tiny["model"])
    pj = project_by_nfe(glp, real[:32], [0.5], [1, 2, 20], ["euler", "pc2"], model=model, store=st, lm_docs=4, lm_max_len=16)
    lm = pj.pop("_lm")
    assert lm["t0.5"]["docs"] == 4 and lm["t0.5"]["lm_loss_clean"] > 0
    ref = pj["euler"]["t0.5"][20]
    assert ref["rmse_to_ref"] == 0.0 and math.isfinite(ref["delta_lm"]) and math.isfinite(ref["kept_fraction"])
    assert set(pj["pc2"]["t0.5"]) == {1, 2} and pj["pc2"]["t0.5"][2]["rel_err_to_ref"] > 0
    # one evaluation: every solver is Euler
    assert pj["pc2"]["t0.5"][1] == pytest.approx(pj["euler"]["t0.5"][1])


def test_bench_command_quality_only(tiny, tmp_path, capsys):
    from innards.cli import main

    args = ["bench", "glp", "--acts", str(tiny["store"]), "--glp", str(tiny["glp"]), "--no-throughput", "--fd-n", "48",
            "--nfe", "2", "12", "--solvers", "euler", "pc2", "--schedules", "uniform", "--no-c2st", "--project-t", "0.3",
            "--project-nfe", "2", "8", "--project-solvers", "pc2", "--project-rows", "16", "--lm-docs", "2",
            "--lm-max-len", "12", "--out", str(tmp_path / "work")]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["fd_by_nfe"]) == {"euler", "pc2"} and "train_activations_per_s" not in res
    assert res["goals"]["at_most_4_nfe"]["nfe"] == 2 and res["project_by_nfe"]["pc2"]["t0.3"]["2"]["delta_lm"] is not None
    assert list((tmp_path / "work" / "cache").glob("sample-euler12-*.safetensors"))
    assert main(args) == 0  # the references come from the cache the second time
    assert json.loads(capsys.readouterr().out)["fd_by_nfe"] == res["fd_by_nfe"]
    assert main([*args[:-2], "--solvers", "rk9"]) == 2
