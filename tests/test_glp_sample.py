"""innards glp sample: a file Run, every solver and schedule reachable, --restats, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from innards.cli import main
from innards.tensors import load_tensors

FIXTURE = Path(__file__).parent / "fixtures" / "glp-v1"


def test_sample_writes_a_file_run(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    args = ["glp", "sample", "--glp", str(FIXTURE), "-n", "40", "--steps", "3", "--solver", "heun", "--schedule", "shift",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    x = load_tensors(out)["acts"]
    assert x.shape == (40, 32) and torch.isfinite(x).all()
    rec = json.loads((tmp_path / "s.safetensors.run.json").read_text())
    assert rec["kind"] == "samples" and rec["status"] == "complete" and rec["outputs"] == ["s.safetensors"]
    stamp = out.stat().st_mtime_ns
    assert main(args) == 0 and out.stat().st_mtime_ns == stamp and "already complete" in capsys.readouterr().err
    assert main(args + ["--seed", "1"]) == 2  # other settings: refused without --overwrite
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert not torch.equal(load_tensors(out)["acts"], x)
    npy = tmp_path / "s.npy"
    assert main(["glp", "sample", "--glp", str(FIXTURE), "-n", "5", "--steps", "2", "--solver", "ab2", "--out", str(npy),
                 "--no-progress"]) == 0
    import numpy as np

    assert np.load(npy).shape == (5, 32)


def test_bad_sample_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign.npy").write_text("not ours")
    base = ["glp", "sample", "--glp", str(FIXTURE), "--no-progress", "--steps", "2"]
    for extra in (["-n", "0"], ["--steps", "0"], ["--out", str(tmp_path / "afile" / "x.safetensors")],
                  ["--out", str(tmp_path / "x.pt")], ["--out", str(tmp_path / "foreign.npy")], ["--solver", "rk4"]):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("innards: error:"), (extra, err)
    assert (tmp_path / "afile").read_text() == "x" and (tmp_path / "foreign.npy").read_text() == "not ours"


def test_restats_replaces_the_normalisation(tiny_model_dir, tmp_path):
    from test_glp_eval import make_tiny_store

    from innards.data.store import ActivationStore
    from innards.glp.model import GLP, GLPConfig

    store = make_tiny_store(tmp_path, tiny_model_dir("llama"), tokens=2000)
    st = ActivationStore(store)
    site = st.sites[0]
    glp = GLP(GLPConfig(d_in=32, n_blocks=1, d_model=16, d_mlp=16),
              {"model": st.manifest["model"], "sites": [site],
               "stats_by_site": {site: {"mean": torch.zeros(32, dtype=torch.float64), "var": torch.ones(32, dtype=torch.float64)}}})
    glp.save_pretrained(tmp_path / "glp")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["glp", "sample", "--glp", str(tmp_path / "glp"), "-n", "2000", "--steps", "2", "--no-progress"]
    assert main(common + ["--out", str(a)]) == 0
    assert main(common + ["--out", str(b), "--restats", str(store)]) == 0
    xa, xb = load_tensors(a)["acts"].double(), load_tensors(b)["acts"].double()
    mean = torch.as_tensor(st.stats(site)["mean"])
    # same noise and network: b is a denormalised with the store's statistics instead of (0, 1)
    std = torch.as_tensor(st.stats(site)["var"]).sqrt()
    assert torch.allclose(xb, xa * std + mean, atol=1e-4)
    assert json.loads((tmp_path / "b.safetensors.run.json").read_text())["inputs"][1]["role"] == "restats"
