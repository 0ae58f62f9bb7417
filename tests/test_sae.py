import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from innards.errors import InnardsError
from innards.sae.load import load_sae
from innards.sae.model import TopKSAE
from innards.sae.train import fit_topk_sae, parse_latents


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
    assert main(args) == 0  # the same run again: already complete, nothing redone
    assert main([*args, "--k", "4"]) == 2  # other settings: refused without --overwrite, the SAE left intact
    assert (out / "sae_weights.safetensors").read_bytes() == before
    assert (out / "metrics.jsonl").is_file() and (out / "config.yaml").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "sae" and run["status"] == "complete" and run["headline"]["val_fvu"] == summary["val_fvu"]
    assert not (out / "resume").exists()


def test_train_sae_resume_is_exact(tiny_model_dir, tmp_path):
    from test_glp_eval import make_tiny_store

    from innards.sae.train import SAETrainConfig, train_sae

    store = make_tiny_store(tmp_path, tiny_model_dir("llama"))
    kw = dict(acts=str(store), k=4, latents="4*d", steps=30, batch_size=128, dead_tokens=2000, save_every=7,
              log_every=5, progress=False)
    whole = train_sae(SAETrainConfig(out=str(tmp_path / "whole"), **kw))
    part = tmp_path / "part"
    train_sae(SAETrainConfig(out=str(part), stop_after=17, **kw))
    assert (part / "resume").is_dir() and not (part / "cfg.json").exists()
    with pytest.raises(InnardsError, match="--resume"):
        train_sae(SAETrainConfig(out=str(part), **kw))
    train_sae(SAETrainConfig(out=str(part), resume=True, **kw))
    a, b = load_file(str(whole / "sae_weights.safetensors")), load_file(str(part / "sae_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    def metrics(d: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(ln).items() if k != "time"} for ln in (d / "metrics.jsonl").read_text().splitlines()]

    assert metrics(whole) == metrics(part) and len(metrics(part)) == 7
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, part))
    assert sa == sb and sa["steps"] == 30


def test_sae_schedule_is_the_skeletons_wsd():
    from innards.sae.train import SAEOptimConfig
    from innards.train.optim import lr_factor

    for steps in (37, 1000, 5000):
        o = SAEOptimConfig(lr=1.0).resolved(steps, 512)
        assert (o.schedule, o.final_lr_frac, o.decay) == ("wsd", 0.0, 0.2)
        w, start = min(100, steps // 20), int(0.8 * steps)
        for i in range(steps):
            old = (i + 1) / w if i < w else (max(0.0, (steps - i) / (steps - start)) if i >= start else 1.0)
            new = lr_factor(i, steps, o)
            # flat and decay exactly as before; the warm-up ramp is the skeleton's (lr/w at step 0, as before)
            assert new == pytest.approx(old, abs=1e-12) if (i >= w or i == 0) else abs(new - old) < 1.0 / w
    assert SAEOptimConfig().resolved(1000, 2 ** 14).lr == pytest.approx(2e-4)
    with pytest.raises(InnardsError, match="--optim.lr"):
        SAEOptimConfig(lr=-1.0)


# ----- SAELens's own files and outputs (../shared/fixtures/saelens, written by sae-lens 6.54.12) ---------
FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
ARCHS = ("standard", "topk", "jumprelu")
needs_fixtures = pytest.mark.skipif(not (FIX / "saelens" / "topk" / "expected.safetensors").is_file(),
                                    reason="../shared/fixtures is absent")


def _saelens_outputs(sae, e):
    xin = e["x"] - sae.b_dec * sae.apply_b_dec_to_input
    return {"sae_in": xin, "hidden_pre": sae.pre_activations(e["x"]), "feature_acts": sae.encode(e["x"]),
            "decoded": sae.decode(e["feature_acts"]), "forward": sae(e["x"]), "feature_acts_3d": sae.encode(e["x3"]),
            "forward_3d": sae(e["x3"]), "decode_output": sae.decode(e["decode_input"])}


@needs_fixtures
@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_fixture_parity(arch):
    e = load_file(str(FIX / "saelens" / arch / "expected.safetensors"))
    sae = load_sae(FIX / "saelens" / arch)
    assert sae.architecture == arch and (sae.d_in, sae.d_sae) == (16, 64)
    assert sae.hook_name == "blocks.1.hook_resid_post" and sae.model_name == "innards-test/tiny-llm-d16"
    for k, v in _saelens_outputs(sae, e).items():
        torch.testing.assert_close(v, e[k], atol=1e-6, rtol=1e-6, msg=f"{arch} {k}")
    if arch == "topk":
        assert ((e["feature_acts"] > 0).sum(-1) <= 8).all() and torch.equal(sae.encode(e["x"]) > 0, e["feature_acts"] > 0)


@needs_fixtures
@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_by_hub_id_offline(arch, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = load_file(str(FIX / "saelens" / arch / "expected.safetensors"))
    a = load_sae(f"innards-test/saelens-tiny/{arch}", cache_dir=FIX / "hf-cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(FIX / "hf-cache"))
    b = load_sae("innards-test/saelens-tiny", sae_id=arch)
    for sae in (a, b):
        assert torch.equal(sae(e["x"]), load_sae(FIX / "saelens" / arch)(e["x"]))
        assert sae.cfg["innards_source"]["repo_id"] == "innards-test/saelens-tiny"
    with pytest.raises(InnardsError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE") as err:
        load_sae("innards-test/not-cached/topk")
    assert "\n" not in str(err.value)


@needs_fixtures
def test_fold_W_dec_norm_keeps_outputs_like_saelens():
    for arch in ("standard", "jumprelu"):
        e = load_file(str(FIX / "saelens" / arch / "expected.safetensors"))
        sae = load_sae(FIX / "saelens" / arch, fold_W_dec_norm=True)
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
        torch.testing.assert_close(sae(e["x"]), e["forward"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.encode(e["x"]) > 0, e["feature_acts"] > 0)
    with pytest.raises(InnardsError, match="TopK"):
        load_sae(FIX / "saelens" / "topk", fold_W_dec_norm=True)


@needs_fixtures
def test_topk_rescaled_by_decoder_norm_folds(tmp_path):
    src = FIX / "saelens" / "topk"
    cfg = json.loads((src / "cfg.json").read_text())
    d = _write_saelens(tmp_path / "r", {**cfg, "rescale_acts_by_decoder_norm": True}, load_file(str(src / "sae_weights.safetensors")))
    x = load_file(str(src / "expected.safetensors"))["x"]
    sae = load_sae(d)
    w = sae.W_dec.detach()
    pre = (x @ sae.W_enc + sae.b_enc) * w.norm(dim=-1)
    vals, idx = pre.topk(8, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    torch.testing.assert_close(sae(x), (z * (1 / w.norm(dim=-1))) @ w + sae.b_dec)
    folded = load_sae(d, fold_W_dec_norm=True)
    torch.testing.assert_close(folded(x), sae(x), atol=1e-5, rtol=1e-5)


def test_gated_and_other_architectures_name_themselves(tmp_path):
    w = _weights()
    gated = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"], "b_gate": torch.zeros(10),
             "b_mag": torch.zeros(10), "r_mag": torch.zeros(10)}
    for arch in ("gated", "batchtopk", "transcoder"):
        p = _write_saelens(tmp_path / arch, {"architecture": arch, "d_in": 6, "d_sae": 10}, gated)
        with pytest.raises(InnardsError, match=f"architecture '{arch}', which innards does not support") as e:
            load_sae(p)
        assert "b_enc" not in str(e.value) and "\n" not in str(e.value)


def _fake_saelens(root: Path, monkeypatch, registry: dict) -> None:
    """An importable ``sae_lens`` that is only its registry file: what innards reads without importing sae-lens."""
    import importlib

    from innards.sae import load as sae_load

    pkg = root / "sae_lens"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pretrained_saes.yaml").write_text(yaml.safe_dump(registry))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "sae_lens", raising=False)  # a real one imported by another test
    importlib.invalidate_caches()
    sae_load._registry_text.cache_clear()
    monkeypatch.setattr(sae_load, "_registry_text", sae_load._registry_text.__wrapped__)


@needs_fixtures
def test_saelens_registry_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(FIX / "hf-cache"))
    _fake_saelens(tmp_path, monkeypatch, {
        "tiny-res": {"repo_id": "innards-test/saelens-tiny", "model": "innards-test/tiny-llm-d16", "conversion_func": None,
                     "saes": [{"id": "layer_1/topk", "path": "topk"}],
                     "config_overrides": {"hook_name": "blocks.1.hook_resid_pre"}},
        "tiny-scaled": {"repo_id": "innards-test/saelens-tiny", "model": "innards-test/tiny-llm-d16",
                        "saes": [{"id": "std", "path": "standard", "norm_scaling_factor": 0.5}],
                        "config_overrides": {"normalize_activations": "expected_average_only_in"}}})
    e = load_file(str(FIX / "saelens" / "topk" / "expected.safetensors"))
    sae = load_sae("tiny-res/layer_1/topk")
    torch.testing.assert_close(sae(e["x"]), e["forward"], atol=1e-6, rtol=1e-6)
    assert sae.hook_name == "blocks.1.hook_resid_pre" and sae.cfg["innards_source"]["saelens_release"] == "tiny-res"
    assert torch.equal(load_sae("tiny-res", sae_id="layer_1/topk")(e["x"]), sae(e["x"]))
    # the registry's activation-norm factor, folded as SAELens folds it: same as running on 0.5 x
    s = load_sae("tiny-scaled/std")
    e2 = load_file(str(FIX / "saelens" / "standard" / "expected.safetensors"))
    raw = load_sae(FIX / "saelens" / "standard")
    torch.testing.assert_close(s(e2["x"]), raw(0.5 * e2["x"]) / 0.5, atol=1e-5, rtol=1e-5)
    with pytest.raises(InnardsError, match="has no SAE 'layer_9'.*layer_1/topk"):
        load_sae("tiny-res/layer_9")


@needs_fixtures
@pytest.mark.parametrize("arch", ARCHS)
def test_real_saelens_agrees(arch):
    sae_lens = pytest.importorskip("sae_lens")
    e = load_file(str(FIX / "saelens" / arch / "expected.safetensors"))
    theirs = sae_lens.SAE.load_from_disk(str(FIX / "saelens" / arch))
    ours = load_sae(FIX / "saelens" / arch)
    with torch.no_grad():
        torch.testing.assert_close(ours(e["x"]), theirs(e["x"]), atol=1e-6, rtol=1e-6)


@needs_fixtures
def test_other_release_formats_go_through_saelens_converters(monkeypatch):
    """A release with a conversion_func is loaded by SAELens itself, then copied into innards' SAE."""
    sae_lens = pytest.importorskip("sae_lens")
    from innards.sae import load as sae_load

    calls = []

    def from_pretrained(release, sae_id, device="cpu"):
        calls.append((release, sae_id))
        return sae_lens.SAE.load_from_disk(str(FIX / "saelens" / "jumprelu"))

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(sae_load, "_registry_text", lambda: yaml.safe_dump(
        {"scope-like": {"repo_id": "x/y", "conversion_func": "gemma_2", "saes": [{"id": "layer_1", "path": "l1"}]}}))
    e = load_file(str(FIX / "saelens" / "jumprelu" / "expected.safetensors"))
    sae = load_sae("scope-like/layer_1")
    assert calls == [("scope-like", "layer_1")] and sae.architecture == "jumprelu"
    torch.testing.assert_close(sae(e["x"]), e["forward"], atol=1e-6, rtol=1e-6)
