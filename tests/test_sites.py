"""Site names and the index convention, checked against HF output_hidden_states on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from innards.errors import InnardsError
from innards.models.hooks import capture
from innards.models.load import load_model
from innards.models.sites import (INDEX_CONVENTION, KINDS, expand_sites, list_sites, n_layers, resolve_site,
                                  site_metadata)

VARIANTS = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox_seq": ("gpt_neox", {"use_parallel_residual": False}),
    "bert": ("bert", {}),
}
MLP_WIDTH = {"llama": 48, "gpt2": 128, "gpt_neox": 64, "gpt_neox_seq": 64, "bert": 56}
FINAL_NORM = {"llama": "model.norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
              "gpt_neox_seq": "gpt_neox.final_layer_norm"}


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    cache = {}

    def get(variant):
        if variant not in cache:
            arch, over = VARIANTS[variant]
            cache[variant] = load_model(tiny_model_dir(arch, **over))
        return cache[variant]

    return get


def _ids(model):
    enc = model.tokenizer(["the fox jumps over the bear", "hello"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_index_convention_matches_hidden_states(models, variant):
    model = models(variant)
    ids, mask = _ids(model)
    n = n_layers(model)
    with capture(model, [s.name for s in list_sites(model)]) as c:
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hs) == n + 1
    for layer in range(n):
        assert torch.equal(c[f"blocks.{layer}.resid_pre"], hs[layer])
        if layer + 1 < n:
            assert torch.equal(c[f"blocks.{layer}.resid_post"], hs[layer + 1])
            assert torch.equal(c[f"blocks.{layer}.resid_post"], c[f"blocks.{layer + 1}.resid_pre"])
    last = c[f"blocks.{n - 1}.resid_post"]
    if variant in FINAL_NORM:  # HF's last hidden state is after the final norm; ours is before it
        torch.testing.assert_close(model.get_submodule(FINAL_NORM[variant])(last), hs[n])
        assert not torch.allclose(last, hs[n])
    else:
        assert torch.equal(last, hs[n])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_widths_and_reconstruction(models, variant):
    model = models(variant)
    ids, mask = _ids(model)
    sites = list_sites(model)
    assert len(sites) == len(KINDS) * n_layers(model) == len(KINDS) * 3
    d = model.config.hidden_size
    for s in sites:
        assert s.width == (MLP_WIDTH[variant] if s.kind == "mlp_hidden" else d)
    with capture(model, [s.name for s in sites]) as c:
        model(input_ids=ids, attention_mask=mask)
    for s in sites:
        assert c[s.name].shape == (*ids.shape, s.width), s.name
    for layer in range(3):
        pre, post = c[f"blocks.{layer}.resid_pre"], c[f"blocks.{layer}.resid_post"]
        total = pre + c[f"blocks.{layer}.attn_out"] + c[f"blocks.{layer}.mlp_out"]
        if variant == "bert":  # post-LN: the sub-layer outputs do not sum to the normalised stream
            assert not torch.allclose(total, post, atol=1e-4)
        else:
            torch.testing.assert_close(total, post, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "gpt2", "gpt_neox", "bert"])
def test_aliases_map_to_the_same_tensors(models, variant):
    model = models(variant)
    ids, mask = _ids(model)
    base = model.base_model_prefix
    blocks = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "bert": "encoder.layer"}[variant]
    down = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "bert": "output.dense"}[variant]
    pairs = {
        "blocks.1.hook_resid_pre": "blocks.1.resid_pre",
        "blocks.1.hook_resid_post": "blocks.1.resid_post",
        "blocks.1.hook_attn_out": "blocks.1.attn_out",
        "blocks.1.hook_mlp_out": "blocks.1.mlp_out",
        "blocks.1.mlp.hook_post": "blocks.1.mlp_hidden",
        "blocks.-2.resid_post": "blocks.1.resid_post",
        f"{blocks}.1": "blocks.1.resid_post",
        f"{blocks}.1:input": "blocks.1.resid_pre",
        f"{blocks}.1:output": "blocks.1.resid_post",
        f"{blocks}.1.{down}:input": "blocks.1.mlp_hidden",
    }
    if variant != "bert":
        pairs[f"{blocks}.1.{down}"] = "blocks.1.mlp_hidden"
        pairs[f"{blocks}.1.mlp"] = "blocks.1.mlp_out"
    # module paths relative to the base model (without "model." / "transformer.") work too
    if blocks.startswith(base + "."):
        pairs[f"{blocks.removeprefix(base + '.')}.1"] = "blocks.1.resid_post"
    for alias, canon in pairs.items():
        assert resolve_site(model, alias) == resolve_site(model, canon), alias
        assert resolve_site(model, alias).name == canon
    with capture(model, list(pairs) + list(set(pairs.values()))) as c:
        model(input_ids=ids, attention_mask=mask)
    for alias, canon in pairs.items():
        assert torch.equal(c[alias], c[canon]), alias


def test_errors_are_one_line_innards_errors(models):
    model = models("llama")
    with pytest.raises(InnardsError, match=r"unknown site 'blocks.1.resid_middle'.*resid_pre\|.*L in 0\.\.2") as e:
        resolve_site(model, "blocks.1.resid_middle")
    assert "\n" not in str(e.value)
    with pytest.raises(InnardsError, match="layer 3 out of range.*3 layers"):
        resolve_site(model, "blocks.3.resid_post")
    with pytest.raises(InnardsError, match="out of range"):
        resolve_site(model, "blocks.-4.hook_mlp_out")
    with pytest.raises(InnardsError, match="out of range"):
        resolve_site(model, "model.layers.7")
    with pytest.raises(InnardsError, match="unknown site"):
        resolve_site(model, "model.layers.1.self_attn.q_proj")
    with pytest.raises(InnardsError, match="unknown site"):
        resolve_site(model, "model.layers.1:sideways")
    with pytest.raises(InnardsError):
        resolve_site(model, 3)
    with pytest.raises(InnardsError, match="matches nothing"):
        expand_sites(model, "blocks.*.resid_middle")


def test_patterns_and_metadata(models):
    model = models("gpt2")
    names = [s.name for s in expand_sites(model, "blocks.*.resid_post")]
    assert names == ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]
    assert [s.name for s in expand_sites(model, ["blocks.1.hook_mlp_*"])] == ["blocks.1.mlp_out"]
    meta = site_metadata(model, "transformer.h.1")
    assert meta["site"] == "blocks.1.resid_post" and meta["tl_name"] == "blocks.1.hook_resid_post"
    assert meta["hf_module"] == "transformer.h.1" and meta["hidden_states_index"] == 2
    assert meta["index_convention"] == INDEX_CONVENTION
    assert INDEX_CONVENTION.startswith("resid_post[L] == resid_pre[L+1] == hidden_states[L+1]")
    json.dumps(meta)


def test_sites_cli(tiny_model_dir, capsys):
    from innards.cli.sites import main

    d = tiny_model_dir("gpt_neox")
    assert main([str(d)]) == 0
    out = capsys.readouterr().out
    assert "blocks.2.mlp_hidden" in out and "gpt_neox.layers.2.mlp.dense_4h_to_h (input)" in out
    assert "blocks.0.hook_resid_pre" in out and "parallel" in out
    assert main([str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_layers"] == 3 and len(info["sites"]) == 15
    assert {s["width"] for s in info["sites"]} == {32, 64}
    assert main(["--model", str(d / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("innards: error:") and err.count("\n") == 1


@pytest.mark.parametrize("name,family", [("Qwen2", "llama"), ("Mistral", "llama"), ("Qwen3", "llama"),
                                         ("Gemma2", "llama_sandwich"), ("Olmo2", "llama_sandwich")])
def test_llama_family_relatives(name, family):
    import transformers as T

    from innards.models.sites import layout

    cfg = getattr(T, name + "Config")(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = getattr(T, name + "ForCausalLM")(cfg).eval()
    assert layout(model).family.name == family and layout(model).matched_by == "model_type"
    ids = torch.randint(3, 64, (2, 7))
    with capture(model, [s.name for s in list_sites(model)]) as c:
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(c["blocks.0.resid_post"], hs[1]) and torch.equal(c["blocks.1.resid_pre"], hs[1])
    for layer in range(2):
        total = c[f"blocks.{layer}.resid_pre"] + c[f"blocks.{layer}.attn_out"] + c[f"blocks.{layer}.mlp_out"]
        torch.testing.assert_close(total, c[f"blocks.{layer}.resid_post"], atol=1e-5, rtol=1e-5)
        assert c[f"blocks.{layer}.mlp_hidden"].shape[-1] == 48
