"""VPD on language models: HF Linear and Conv1D matrices, the shared CI transformer, and the analysis commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from innards.errors import InnardsError
from innards.vpd.components import Decomposition, Mask


@pytest.fixture(scope="module")
def demo():
    from innards.models.load import load_model

    try:
        return load_model("demo")
    except InnardsError as e:
        pytest.skip(str(e))


def test_demo_exact_reconstruction_and_clean_target(demo):
    d = Decomposition(demo, ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"], 8, seed=0)
    try:
        assert len(d.names) == 7 * demo.config.num_hidden_layers
        ids = torch.randint(3, 200, (2, 12))
        clean, inputs = d.clean(ids)
        d2 = demo(ids, use_cache=False).logits
        assert torch.equal(clean, d2)
        masks = {n: Mask(torch.ones(2, 12, c.C), torch.ones(2, 12)) for n, c in zip(d.names, d.components)}
        assert torch.allclose(d.masked(ids, masks), clean, atol=1e-4)
        # q, k and v read the same normed residual
        L0 = "model.layers.0.self_attn."
        assert torch.equal(inputs[L0 + "q_proj"], inputs[L0 + "v_proj"])
    finally:
        d.remove_hooks()


def test_gpt2_conv1d_exact_reconstruction():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    d = Decomposition(model, ["transformer.h.*.attn.c_*", "transformer.h.*.mlp.c_*"], 5, seed=0)
    assert d.names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                       "transformer.h.0.mlp.c_proj"]
    assert d.comp("transformer.h.0.attn.c_attn").d_out == 48
    ids = torch.randint(0, 50, (2, 7))
    clean, _ = d.clean(ids)
    masks = {n: Mask(torch.ones(2, 7, c.C), torch.ones(2, 7)) for n, c in zip(d.names, d.components)}
    assert torch.allclose(d.masked(ids, masks), clean, atol=1e-5)


def test_ci_transformer_is_bidirectional_and_sorted(demo):
    from innards.vpd.ci import build_ci
    from innards.vpd.config import CIConfig

    d = Decomposition(demo, ["model.layers.0.*"], 4, {"*.mlp.*": 6}, seed=0)
    try:
        ci = build_ci(d, CIConfig(kind="transformer", d_model=32, n_layers=1, n_heads=2, d_ffn=64))
        ids = torch.randint(3, 200, (1, 10))
        _, inputs = d.clean(ids)
        z = ci(inputs, d)
        assert list(z) == sorted(d.names)
        assert z["model.layers.0.mlp.up_proj"].shape == (1, 10, 6)
        ids2 = ids.clone()
        ids2[0, -1] = (ids2[0, -1] + 7) % 200 + 3
        _, inputs2 = d.clean(ids2)
        z2 = ci(inputs2, d)
        # a change at the last token reaches the CI of the first token: non-causal attention
        assert not torch.allclose(z["model.layers.0.mlp.up_proj"][0, 0], z2["model.layers.0.mlp.up_proj"][0, 0])
    finally:
        d.remove_hooks()


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, demo):
    from innards.vpd.config import load_config
    from innards.vpd.train import train

    tmp = tmp_path_factory.mktemp("lm")
    text = tmp / "text.txt"
    text.write_text("\n\n".join(f"Once upon a time a little fox number {i} ran into the wood and met a bear." for i in range(60)))
    cfg = load_config("demo-lm", {"out": str(tmp / "run"), "steps": 2, "warmup_steps": 2, "batch_size": 2, "seq_len": 16,
                                  "text": str(text), "max_tokens": 4000, "progress": False, "eval_batches": 1,
                                  "eval_batch_size": 2, "adversary.eval_steps": 1, "modules": ["model.layers.0.*", "model.layers.1.mlp.*"],
                                  "ci.d_model": 32, "ci.n_layers": 1, "ci.d_ffn": 64, "ci.n_heads": 2})
    return train(cfg), text


def test_lm_eval_table(lm_run, capsys):
    from innards.vpd.evaluate import EvalConfig, evaluate

    run, _ = lm_run
    res = evaluate(EvalConfig(run=str(run), batches=1, batch_size=2, pgd_steps=2))
    for k in ("ce_target", "ce_unmasked", "ce_stochastic", "ce_ci", "ce_rounded", "ce_zero", "kl_adversarial",
              "kl_stochastic", "l0", "alive", "ce_unrecovered", "delta_l2"):
        assert k in res, k
    assert res["ce_zero"] > res["ce_target"]
    assert len(res["l0"]) == 10
    assert "unrecov." in capsys.readouterr().out


def test_ablate_graph_contexts(lm_run, tmp_path, capsys):
    from innards.vpd.analysis import AblateConfig, ContextsConfig, GraphConfig, ablate, contexts, graph

    run, text = lm_run
    r = ablate(AblateConfig(run=str(run), component="layers.1.mlp.down_proj:3", prompt="Once upon a time", top=5))
    assert r["kl_target_to_ablated"] >= 0 and len(r["top_target"]) == 5
    with pytest.raises(InnardsError, match="matches 0"):
        ablate(AblateConfig(run=str(run), component="layers.5.mlp.down_proj:3", prompt="x"))
    with pytest.raises(InnardsError, match="out of range"):
        ablate(AblateConfig(run=str(run), component="layers.1.mlp.down_proj:999", prompt="x"))
    long = "fox " * 400
    ablate(AblateConfig(run=str(run), component="layers.1.mlp.down_proj:3", prompt=long, top=3))
    assert "keeping the last 256" in capsys.readouterr().err
    g = graph(GraphConfig(run=str(run), prompt="a little fox ran", out=str(tmp_path / "g"), max_nodes=20))
    assert (tmp_path / "g" / "graph.png").is_file()
    data = json.loads((tmp_path / "g" / "graph.json").read_text())
    ids = {n["id"] for n in data["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in data["edges"])
    assert any(e["target"].startswith("output:") for e in data["edges"])
    c = contexts(ContextsConfig(run=str(run), text=str(text), out=str(tmp_path / "c"), max_tokens=500, top=3, threshold=0.0))
    assert (tmp_path / "c" / "contexts.html").is_file() and c["components"]
    ex = next(iter(c["components"].values()))["examples"][0]
    assert {"ci", "left", "token", "right"} <= set(ex)
    # the same from the top-level API, in memory, for one component: the same examples, no files
    import innards

    b = innards.load_run(run)
    key = next(iter(c["components"]))
    one = innards.top_contexts(b, innards.text_windows(b, str(text), 500), top=3, threshold=0.0, component=key,
                               progress=False)
    assert list(one["components"]) == [key] and one["components"][key] == c["components"][key]


def test_toy_run_refused_by_lm_commands(tmp_path):
    from innards.vpd.analysis import AblateConfig, ablate
    from innards.vpd.config import load_config
    from innards.vpd.train import train

    run = train(load_config("tms-5-2", {"out": str(tmp_path / "t"), "steps": 1, "warmup_steps": 1, "target.steps": 50,
                                         "batch_size": 16, "progress": False, "eval_batches": 1, "adversary.eval_steps": 1}))
    with pytest.raises(InnardsError, match="needs a language model"):
        ablate(AblateConfig(run=str(run), component="linear1:0", prompt="x"))
