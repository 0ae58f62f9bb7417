"""A GLP folder written by innards 0.2 before the trainer rewrite (tests/fixtures/glp-v1) still loads, with identical outputs.

The fixture was made with the code at commit 1caec1f: a tiny llama store of blocks.1.resid_post, then
``train_glp(depth=1, d_model=16, d_mlp=32, steps=20, batch_size=128, lr=1e-3, precision="fp32")``;
``expected.safetensors`` holds that code's outputs on fixed inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from innards.glp.model import GLP
from innards.tensors import load_tensors
from innards.run import detect_kind

FIXTURE = Path(__file__).parent / "fixtures" / "glp-v1"


def test_v1_glp_loads_with_identical_outputs():
    glp = GLP.from_pretrained(FIXTURE)
    exp = load_tensors(FIXTURE / "expected.safetensors")
    x = exp["x"]
    assert glp.meta["sites"] == ["blocks.1.resid_post"] and glp.config.n_blocks == 1
    assert glp.meta["training"]["step"] == 20
    with torch.no_grad():
        got = {"normalized": glp.normalize(x), "velocity": glp(glp.normalize(x), 0.3),
               "sample": glp.sample(8, steps=4, seed=0), "project": glp.project(x, t_start=0.5, steps=5, seed=1),
               "loss": glp.loss(x, 0.5, seed=2), "meta_neurons": glp.meta_neurons(x, t=0.1, seed=3)}
    for k, v in got.items():
        assert torch.equal(v, exp[k]), k
    assert detect_kind(FIXTURE) == "glp"


def test_a_config_edited_away_from_its_weights_is_one_line(tmp_path, capsys):
    import json
    import shutil

    import pytest

    from innards.cli import main
    from innards.errors import InnardsError

    for key, value in (("d_model", 24), ("n_blocks", 2), ("d_mlp", 8), ("d_in", 16)):
        d = tmp_path / key
        shutil.copytree(FIXTURE, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["architecture"][key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(InnardsError, match="does not match"):
            GLP.from_pretrained(d)
        assert main(["glp", "sample", "--glp", str(d), "-n", "2", "--out", str(tmp_path / f"{key}.safetensors")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("innards: error:") and "does not match" in err[0], err
