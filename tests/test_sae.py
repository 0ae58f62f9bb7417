import json

import pytest
import torch
from safetensors.torch import save_file

from innards.errors import InnardsError
from innards.glp.sae import TopKSAE, fit_topk_sae, load_sae, parse_latents


def _write_saelens(path, cfg, weights):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "sae_weights.safetensors"))
    return path


def _weights(d_in=6, d_sae=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}


def test_load_standard_topk_jumprelu_match_their_definitions(tmp_path):
    w = _weights()
    x = torch.randn(5, 6)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]

    std = load_sae(_write_saelens(tmp_path / "std", {"architecture": "standard", "d_in": 6, "d_sae": 10}, w))
    torch.testing.assert_close(std.encode(x), pre.relu())
    torch.testing.assert_close(std.reconstruct(x), pre.relu() @ w["W_dec"] + w["b_dec"])

    topk = load_sae(_write_saelens(tmp_path / "topk", {"architecture": "topk", "d_in": 6, "d_sae": 10, "k": 3,
                                                       "metadata": {"hook_name": "blocks.1.resid_post"}}, w))
    z = topk.encode(x)
    assert ((z > 0).sum(-1) <= 3).all()
    vals, idx = pre.topk(3, dim=-1)
    torch.testing.assert_close(z.gather(-1, idx), vals.relu())
    assert topk.d_sae == 10 and topk.hook_name == "blocks.1.resid_post"

    thr = torch.full((10,), 0.5)
    jr = load_sae(_write_saelens(tmp_path / "jr", {"architecture": "jumprelu", "d_in": 6, "d_sae": 10},
                                 {**w, "threshold": thr}))
    torch.testing.assert_close(jr.encode(x), pre * (pre > 0.5))
    # SAELens < 6 spelling of a TopK SAE, and a folded-in decoder-norm rescaling flag
    old = load_sae(_write_saelens(tmp_path / "old", {"architecture": "standard", "d_in": 6, "d_sae": 10,
                                                     "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}}, w))
    torch.testing.assert_close(old.encode(x), z)


def test_normalisation_modes(tmp_path):
    w = _weights()
    x = torch.randn(4, 6) * 7
    cfg = {"architecture": "standard", "d_in": 6, "d_sae": 10, "normalize_activations": "expected_average_only_in"}
    path = _write_saelens(tmp_path / "ea", cfg, w)
    with pytest.raises(InnardsError, match="scaling_factor"):
        load_sae(path)
    s = 0.3
    sae = load_sae(path, scaling_factor=s)
    expected = (((x * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu() @ w["W_dec"] + w["b_dec"]) / s
    torch.testing.assert_close(sae.reconstruct(x), expected)
    cn = load_sae(_write_saelens(tmp_path / "cn", {**cfg, "normalize_activations": "constant_norm_rescale"}, w))
    c = 6 ** 0.5 / x.norm(dim=-1, keepdim=True)
    expected = (((x * c - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu() @ w["W_dec"] + w["b_dec"]) / c
    torch.testing.assert_close(cn.reconstruct(x), expected)


def test_save_round_trip_and_fold(tmp_path):
    sae = TopKSAE(8, 32, k=4)
    sae.init_weights_(mean=torch.ones(8), seed=1)
    x = torch.randn(16, 8) * 5 + 2
    s = 0.25
    before = sae.reconstruct(x * s) / s
    sae.fold_input_scale_(s)
    torch.testing.assert_close(sae.reconstruct(x), before, rtol=1e-4, atol=1e-4)
    sae.save_pretrained(tmp_path / "sae", hook_name="blocks.0.resid_post", model_name="demo")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 32 and cfg["d_in"] == 8
    loaded = load_sae(tmp_path / "sae")
    torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x))
    assert loaded.model_name == "demo"


def test_topk_sae_learns_a_sparse_dictionary():
    torch.manual_seed(0)
    d, m, k_true = 16, 48, 2
    D = torch.nn.functional.normalize(torch.randn(m, d), dim=-1)

    def batches():
        g = torch.Generator().manual_seed(1)
        while True:
            idx = torch.rand(512, m, generator=g).topk(k_true, dim=-1).indices
            coef = torch.zeros(512, m).scatter_(-1, idx, torch.rand(512, k_true, generator=g) + 0.5)
            yield coef @ D + 3.0

    sae = TopKSAE(d, 96, k=4)
    sae.init_weights_(mean=torch.full((d,), 3.0), seed=0)
    res = fit_topk_sae(sae, batches(), steps=400, lr=3e-3, aux_k=8, dead_tokens=20_000, progress=False)
    x = next(batches())
    fvu = ((sae.reconstruct(x) - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()).item()
    assert fvu < 0.1, fvu
    assert res.steps == 400 and res.tokens == 400 * 512


def test_bad_folders(tmp_path):
    with pytest.raises(InnardsError, match="not found"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InnardsError, match="cfg.json"):
        load_sae(tmp_path / "empty")
    p = _write_saelens(tmp_path / "gated", {"architecture": "gated", "d_in": 6, "d_sae": 10}, _weights())
    with pytest.raises(InnardsError, match="architecture"):
        load_sae(p)
    p = _write_saelens(tmp_path / "bad", {"architecture": "topk", "d_in": 7, "d_sae": 10, "k": 2}, _weights())
    with pytest.raises(InnardsError, match="do not match"):
        load_sae(p)
    (p / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(InnardsError):
        load_sae(p)


def test_parse_latents():
    assert parse_latents("8*d", 64) == 512
    assert parse_latents("d*4", 64) == 256
    assert parse_latents("8x", 64) == 512
    assert parse_latents(1000, 64) == 1000
    with pytest.raises(InnardsError):
        parse_latents("lots", 64)


def test_train_sae_cli_on_a_store(tiny_model_dir, tmp_path):
    from test_glp_eval import make_tiny_store

    from innards.cli import main

    store = make_tiny_store(tmp_path, tiny_model_dir("llama"))
    out = tmp_path / "sae"
    args = ["sae", "train", "--acts", str(store), "--k", "8", "--latents", "8*d", "--out", str(out), "--tokens", "60000",
            "--batch-size", "256", "--dead-tokens", "20000", "--no-progress"]
    assert main(args) == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == 8 * 32 and cfg["k"] == 8
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"  # TransformerLens name, for SAELens users
    assert cfg["metadata"]["innards_site"] == "blocks.1.resid_post"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_fvu"] < 0.2 and summary["val_l0"] <= 8
    sae = load_sae(out)
    assert sae.site == "blocks.1.resid_post"
    before = (out / "sae_weights.safetensors").read_bytes()
    assert main(args) == 2  # refuses to replace without --overwrite, and leaves it intact
    assert (out / "sae_weights.safetensors").read_bytes() == before
    assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
