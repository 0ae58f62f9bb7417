"""`innards probe --features vpd:RUN`: VPD subcomponents (causal importance, component activation) as 1-D features."""

from __future__ import annotations

import json

import pytest
import torch
from test_probe import SITE, _task

from innards.cli.probe import main
from innards.errors import InnardsError


@pytest.fixture(scope="module")
def vpd_env(tmp_path_factory, tiny_model_dir):
    from innards.models.load import load_model
    from innards.vpd.config import load_config
    from innards.vpd.train import train

    root = tmp_path_factory.mktemp("probe_vpd")
    mdir = tiny_model_dir("llama")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"the fox {i} ran over the happy dog and the sad cat" for i in range(60)))
    cfg = load_config("demo-lm", {"out": str(root / "run"), "target.name": str(mdir), "steps": 2, "warmup_steps": 2,
                                  "batch_size": 2, "seq_len": 16, "text": str(text), "max_tokens": 2000,
                                  "progress": False, "eval_batches": 1, "eval_batch_size": 2, "adversary.eval_steps": 1,
                                  "modules": ["model.layers.0.mlp.*", "model.layers.1.mlp.down_proj"], "C": 5,
                                  "C_per_module": {}, "ci.d_model": 16, "ci.n_layers": 1, "ci.d_ffn": 32,
                                  "ci.n_heads": 2})
    run = train(cfg)
    tasks = root / "tasks"
    tasks.mkdir()
    _task(tasks / "1_sent.csv", 150, 0)
    return {"root": root, "run": run, "model_dir": mdir, "model": load_model(mdir), "tasks": tasks}


def test_vpd_features_at_the_benchmark_token(vpd_env):
    from innards.models.sites import resolve_site
    from innards.probe.vpd import VPDFeatures, matrix_layer

    model = vpd_env["model"]
    site = resolve_site(model, SITE)
    f = VPDFeatures(vpd_env["run"], model, site, batch_size=4)
    assert f.matrices == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                          "model.layers.1.mlp.down_proj"]
    assert f.n_features == 2 * 4 * 5 and f.n_groups == 8
    assert f.locate(0) == {"index": 0, "matrix": "model.layers.0.mlp.down_proj", "component": 0, "value": "ci"}
    assert f.locate(5)["value"] == "act" and f.locate(10)["matrix"] == "model.layers.0.mlp.gate_proj"
    prompts = ["the fox", "a happy dog ran over the lazy cat", "sad", "the fox ran", "dog cat", "a b c"]
    batched = f.compute(prompts)
    for i, p in enumerate(prompts):  # prompts of one length share a batch (no padding): equal to one at a time
        torch.testing.assert_close(batched[i], f.compute([p])[0], atol=1e-5, rtol=1e-4)
    # the CI part lies in the CI function's range; the activation part is x . V at the last token
    assert (batched[:, :5] >= 0).all()
    ids = torch.tensor([model.tokenizer(prompts[1])["input_ids"]])
    _, inputs = f.b.decomp.clean(ids)
    xv = inputs["model.layers.0.mlp.down_proj"][0, -1] @ f.b.decomp.comp("model.layers.0.mlp.down_proj").V
    torch.testing.assert_close(batched[1, 5:10], xv, atol=1e-5, rtol=1e-4)
    # only matrices up to the probed block
    early = VPDFeatures(vpd_env["run"], model, resolve_site(model, "blocks.0.resid_post"), part="ci")
    assert all(matrix_layer(n) == 0 for n in early.matrices) and early.n_features == 3 * 5


def test_probe_with_vpd_feature_sets(vpd_env, tmp_path):
    out = tmp_path / "p"
    run = vpd_env["run"]
    assert main(["--model", str(vpd_env["model_dir"]), "--site", SITE, "--tasks", str(vpd_env["tasks"]), "--out", str(out),
                 "--n-boot", "500", "--features", f"raw,vpd:{run},vpd:{run}#ci,vpd:{run}#act"]) == 0
    s = json.loads((out / "summary.json").read_text())
    name = f"vpd:{run.name}"
    assert list(s["features"]) == ["raw", name, f"{name}#ci", f"{name}#act"]
    assert s["features"][name]["n_features"] == 40 and s["features"][f"{name}#ci"]["n_features"] == 20
    rec = json.loads((out / "tasks" / "1_sent.json").read_text())
    best = rec["features"][name]["best"]
    assert set(best) == {"index", "matrix", "component", "value"}
    assert "delta_vs_raw" in s["features"][name]
    assert list((out / "cache").rglob("vpd-*/1_sent.safetensors"))
    assert json.loads((out / "run.json").read_text())["headline"][f"{name}/mean_auc"] > 0


def test_vpd_run_of_another_model_is_refused(vpd_env, tiny_model_dir):
    from innards.models.load import load_model
    from innards.models.sites import resolve_site
    from innards.probe.vpd import VPDFeatures

    other = load_model(tiny_model_dir("llama", hidden_size=48))
    with pytest.raises(InnardsError, match="decomposes model"):
        VPDFeatures(vpd_env["run"], other, resolve_site(other, SITE))
    with pytest.raises(InnardsError, match="#ci or #act"):
        from innards.probe.features import parse_features

        parse_features([f"vpd:{vpd_env['run']}#both2"])
