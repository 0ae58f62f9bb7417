"""Meta-neuron inspection: streaming top-k, end-to-end pages on a tiny model and GLP, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_steer_helpers import NEG, POS, SITE, make_glp

from innards.cli import main as cli
from innards.errors import InnardsError
from innards.glp.neurons import TopContexts, parse_neurons


def test_top_contexts_matches_brute_force():
    torch.manual_seed(0)
    n_ctx, n_neurons, T, k = 23, 7, 5, 4
    acts = torch.randn(n_ctx, n_neurons, T)
    tr = TopContexts(n_neurons, k, T)
    for start in range(0, n_ctx, 6):
        chunk = acts[start:start + 6]
        tr.update(chunk.amax(-1), chunk, torch.arange(start, start + chunk.shape[0]))
    want_vals, want_idx = acts.amax(-1).topk(k, dim=0)
    assert torch.equal(tr.vals, want_vals) and torch.equal(tr.ctx, want_idx)
    for j in range(n_neurons):
        for r in range(k):
            assert torch.allclose(tr.tok[r, j].float(), acts[want_idx[r, j], j], atol=1e-2)


def test_parse_neurons():
    assert parse_neurons([], 2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert parse_neurons(["1:2", "0:0", "1:2"], 2, 3) == [(1, 2), (0, 0)]
    for bad in (["2:0"], ["0:3"], ["5"], ["a:b"]):
        with pytest.raises(InnardsError):
            parse_neurons(bad, 2, 3)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    from innards.models.load import load_model

    d = tiny_model_dir("llama")
    model = load_model(str(d))
    tmp = tmp_path_factory.mktemp("neurons")
    make_glp(model, out=tmp / "glp")
    (tmp / "docs.txt").write_text("\n\n".join(POS + NEG) + "\n")
    return d, model, tmp


def test_glp_neurons_end_to_end(env):
    d, model, tmp = env
    out = tmp / "out"
    assert cli(["glp", "neurons", "--glp", str(tmp / "glp"), "--model", str(d), "--text", str(tmp / "docs.txt"),
                "--neuron", "0:3,1:10", "--neuron", "1:0", "--top", "5", "--batch-size", "7", "--max-docs", "20",
                "--out", str(out)]) == 0
    rep = json.loads((out / "neurons.json").read_text())
    assert rep["site"] == SITE and rep["n_contexts"] == 20 and rep["n_neurons"] == 3
    assert [n["neuron"] for n in rep["neurons"]] == ["0:3", "1:10", "1:0"]
    for n in rep["neurons"]:
        maxes = [e["max"] for e in n["examples"]]
        assert len(maxes) == 5 and maxes == sorted(maxes, reverse=True) and len({e["context"] for e in n["examples"]}) == 5
        for e in n["examples"]:
            ctx = rep["contexts"][str(e["context"])]
            kept = [a for a, s in zip(e["acts"], ctx["special"]) if not s]
            assert max(kept) == pytest.approx(e["max"], rel=1e-2, abs=1e-2)
            assert ctx["special"][0] and ctx["tokens"][0] == "<s>"  # BOS is never scored
            assert ctx["doc_id"].startswith("docs.txt:") and len(ctx["tokens"]) == len(e["acts"])
    md = (out / "neurons.md").read_text()
    html = (out / "neurons.html").read_text()
    assert "## 1:10" in md and "[[**" in md and "neuron 1:10" in html and "class='m" in html
    assert (out / "config.yaml").is_file()


def test_glp_neurons_defaults_to_the_glps_model_and_site(env):
    d, model, tmp = env
    out = tmp / "out2"
    # a GLP saved with a real path as its model name finds the model by itself
    assert cli(["glp", "neurons", "--glp", str(tmp / "glp"), "--text", str(tmp / "docs.txt"), "--neuron", "0:1",
                "--top", "2", "--max-docs", "4", "--out", str(out)]) == 0
    assert len(json.loads((out / "neurons.json").read_text())["neurons"][0]["examples"]) == 2


def test_glp_neurons_bad_input(env, capsys):
    d, model, tmp = env
    base = ["glp", "neurons", "--glp", str(tmp / "glp"), "--model", str(d), "--text", str(tmp / "docs.txt"),
            "--out", str(tmp / "bad")]
    assert cli(base + ["--neuron", "9:0"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli(base + ["--site", "blocks.0.resid_post"]) == 2
    assert "site" in capsys.readouterr().err
    assert cli(["glp", "neurons", "--glp", str(tmp / "nothere"), "--text", str(tmp / "docs.txt")]) == 2
    assert not (tmp / "bad").exists()


def test_glp_neurons_is_a_run_folder_and_keeps_old_flags(env, capsys):
    from innards.cli.glp_neurons import ALIASES
    from innards.config import parse
    from innards.glp.neurons import NeuronsConfig

    d, model, tmp = env
    out = tmp / "out3"
    args = ["glp", "neurons", "--glp", str(tmp / "glp"), "--text", str(tmp / "docs.txt"), "--neuron", "0:1",
            "--top", "2", "--max-docs", "4", "--out", str(out)]
    assert cli(args) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["kind"] == "neurons" and rec["status"] == "complete" and "neurons.html" in rec["outputs"]
    stamp = (out / "neurons.json").stat().st_mtime_ns
    assert cli(args) == 0 and (out / "neurons.json").stat().st_mtime_ns == stamp
    assert "already complete" in capsys.readouterr().err
    assert cli(args + ["--t", "0.3"]) == 2  # other settings are refused without --overwrite
    cfg = parse(NeuronsConfig, ["--model", "m", "--dtype", "bf16", "--device", "cpu", "--t", "0.2"], prog="t", aliases=ALIASES)
    assert (cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.t) == ("m", "bf16", "cpu", 0.2)
    for bad in (["--t", "2"], ["--top", "0"], ["--context", "1"]):
        with pytest.raises(InnardsError):
            parse(NeuronsConfig, bad, prog="t", aliases=ALIASES)
