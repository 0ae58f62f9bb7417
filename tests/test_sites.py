"""Site names and the index convention, checked against HF output_hidden_states on tiny models."""

from __future__ import annotations

import json
import re

import pytest
import torch

from innards.errors import InnardsError
from innards.models.hooks import capture
from innards.models.load import load_model
from innards.models.sites import (BLOCK_KINDS, INDEX_CONVENTION, KINDS, TL_NAMES, expand_sites, list_sites, n_layers,
                                  resolve_site, site_metadata)

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
    sites = [s for s in list_sites(model) if s.kind in KINDS]
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
    # parallel NeoX: no resid_mid; 13 block sites x 3 + embed + ln_final_out
    assert info["n_layers"] == 3 and len(info["sites"]) == 13 * 3 + 2
    assert {s["width"] for s in info["sites"] if s["heads"] == 0} == {32, 64}
    assert {s["shape"] for s in info["sites"] if s["heads"]} == {"4x8", "4xTxT"}
    assert main(["--model", str(d / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("innards: error:") and err.count("\n") == 1


TL_PAIRS = {
    "hook_embed": "embed", "ln_final.hook_normalized": "ln_final_out",
    **{f"blocks.1.{tl}": f"blocks.1.{k}" for k, tl in TL_NAMES.items()},
}


@pytest.mark.parametrize("variant", ["llama", "gpt2", "bert"])
def test_transformerlens_names_are_the_canonical_sites(models, variant):
    model = models(variant)
    ids, mask = _ids(model)
    pairs = dict(TL_PAIRS)
    if variant == "gpt2":
        pairs["hook_pos_embed"] = "pos_embed"
    if variant == "bert":  # no final norm; post-LN, so its resid_mid is the attention LayerNorm's input
        del pairs["ln_final.hook_normalized"]
        pairs["hook_pos_embed"] = "pos_embed"
    for tl, canon in pairs.items():
        s = resolve_site(model, tl)
        assert s == resolve_site(model, canon) and s.name == canon, tl
        assert s.tl_name == tl
    with capture(model, list(pairs)) as c:
        model(input_ids=ids, attention_mask=mask)
    with capture(model, list(pairs.values())) as ref:
        model(input_ids=ids, attention_mask=mask)
    for tl, canon in pairs.items():
        assert torch.equal(c[tl], ref[canon]), tl
    assert c["blocks.1.attn.hook_q"].shape == (2, ids.shape[1], 4, 8)
    assert c["blocks.1.attn.hook_pattern"].shape == (2, 4, ids.shape[1], ids.shape[1])
    if variant == "llama":  # known TransformerLens names the model has no tensor for are refused with the reason
        with pytest.raises(InnardsError, match="hook_pos_embed' does not exist in this llama model: positions are rotary"):
            resolve_site(model, "hook_pos_embed")


def _accepted(message: str) -> list[str]:
    """Every concrete name the unknown-site error lists (block names at layer 0)."""
    body = message.split("accepted: ", 1)[1]
    names = re.findall(r"\b(embed|pos_embed|ln_final_out|hook_embed|hook_pos_embed|ln_final\.hook_normalized)\b",
                       body.split("blocks.{L}")[0] + body.split(";")[1].split("blocks.{L}")[0])
    for group in re.findall(r"blocks\.\{L\}\.\{([^}]*)\}", body):
        names += [f"blocks.0.{k}" for k in group.split("|")]
    return names


@pytest.mark.parametrize("variant", ["llama", "gpt2", "gpt_neox", "bert"])
def test_unknown_site_error_lists_exactly_what_is_accepted(models, variant):
    model = models(variant)
    with pytest.raises(InnardsError) as e:
        resolve_site(model, "blocks.0.nope")
    msg = str(e.value)
    assert "\n" not in msg and "L in 0..2" in msg
    listed = _accepted(msg)
    for name in listed:
        resolve_site(model, name)  # every listed name is accepted
    sites = [s for s in list_sites(model) if s.layer == 0 or not s.name.startswith("blocks.")]
    assert set(listed) == {s.name for s in sites} | {s.tl_name for s in sites}  # and every accepted name is listed
    refused = [f"blocks.0.{k}" for k in BLOCK_KINDS if f"blocks.0.{k}" not in listed]
    for name in refused + [n for n in ("pos_embed", "ln_final_out") if n not in listed]:
        with pytest.raises(InnardsError, match="does not exist in this"):
            resolve_site(model, name)
