"""innards.hub: one resolver for local folders and hub ids, offline through a cache laid out like the hub's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from innards import hub
from innards.errors import InnardsError
from innards.models.load import load_model

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
HF = FIX / "hf-cache"
needs_cache = pytest.mark.skipif(not HF.is_dir(), reason="../shared/fixtures is absent")


def test_parse_hub_id():
    p = hub.parse_hub_id
    assert p("org/name") == hub.HubId("org/name")
    assert p("org/name@v1.0") == hub.HubId("org/name", None, "v1.0")
    assert p("org/name/layer_12/width_16k@abc") == hub.HubId("org/name", "layer_12/width_16k", "abc")
    assert p("org/name", revision="main") == hub.HubId("org/name", None, "main")
    assert p("gpt2") is None and p("gpt2", single=True) == hub.HubId("gpt2")
    for bad in ("/abs/path", "./rel", "~/x", "a//b", "", "org/na me"):
        assert p(bad) is None, bad
    with pytest.raises(InnardsError, match="revision"):
        p("org/name@v1", revision="v2")


def test_local_paths_win_and_missing_paths_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    r = hub.resolve("org/name", what="GLP")
    assert r.path == (tmp_path / "org" / "name").resolve() and r.repo_id is None
    assert not hub.is_hub_id("org/name") and hub.is_hub_id("org/other")
    with pytest.raises(InnardsError, match="GLP folder not found: /nope"):
        hub.resolve("/nope", what="GLP")
    with pytest.raises(InnardsError, match="local GLP folder"):
        hub.resolve("org/name", what="GLP", revision="main")


def test_cache_dir_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == str(tmp_path / "c") and hub.cache_dir(tmp_path / "x") == str(tmp_path / "x")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    assert hub.cache_dir() is None


@needs_cache
def test_resolve_offline_from_the_fake_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = hub.resolve("innards-test/saelens-tiny/topk", what="SAE", cache=HF)
    assert r.path.name == "topk" and (r.path / "cfg.json").is_file()
    assert r.source() == {"name": "innards-test/saelens-tiny/topk", "path": str(r.path), "repo_id": "innards-test/saelens-tiny",
                          "revision": "72834a96d5192683d85354a8060d15d19e8b198c", "subfolder": "topk"}
    assert hub.resolve("innards-test/saelens-tiny", what="SAE", cache=HF, subfolder="jumprelu").path.name == "jumprelu"
    with pytest.raises(InnardsError, match="has no folder 'gated'"):
        hub.resolve("innards-test/saelens-tiny/gated", what="SAE", cache=HF)
    # a cached snapshot that lacks what the caller needs, while offline: say so, and how to fetch it
    with pytest.raises(InnardsError, match="without the files needed.*hf download innards-test/saelens-tiny") as e:
        hub.resolve("innards-test/saelens-tiny/topk", what="SAE", cache=HF, complete=lambda d: (d / "nope").exists())
    assert "\n" not in str(e.value)
    with pytest.raises(InnardsError, match=r"not in the Hugging Face cache.*--revision v2"):
        hub.resolve("innards-test/saelens-tiny@v2", what="SAE", cache=HF)


def _fake_model_cache(root: Path, model_dir: Path, repo: str, sha: str) -> Path:
    """A hub cache holding one model repo in the models--ORG--NAME/{refs,snapshots} layout."""
    d = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(model_dir, d / "snapshots" / sha)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(sha)
    return root


def test_load_model_by_hub_id_and_revision_offline(tiny_model_dir, tmp_path, monkeypatch):
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    cache = _fake_model_cache(tmp_path / "hub", tiny_model_dir("llama"), "tiny-org/tiny-llama", sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for name, rev in (("tiny-org/tiny-llama", None), (f"tiny-org/tiny-llama@{sha}", None), ("tiny-org/tiny-llama", "main")):
        m = load_model(name, revision=rev, device="cpu")
        assert m.innards_source["revision"] == sha and m.innards_source["repo_id"] == "tiny-org/tiny-llama"
        assert type(m).__name__ == "LlamaForCausalLM" and m.tokenizer is not None
    with pytest.raises(InnardsError, match="unknown model or path.*not in the Hugging Face cache.*hf download tiny-org/other"):
        load_model("tiny-org/other")
    # a GLP recorded against the hub id accepts the model loaded by it
    from innards.glp.model import GLP, GLPConfig

    d = m.config.hidden_size
    glp = GLP(GLPConfig(d_in=d, n_blocks=1), meta={"model": {"name": "tiny-org/tiny-llama"}, "sites": ["blocks.1.resid_post"]})
    glp.check_compatible(m, "blocks.1.resid_post", d)
    with pytest.raises(InnardsError, match="width"):
        glp.check_compatible(m, "blocks.1.resid_post", d + 1)
    with pytest.raises(InnardsError, match="trained on model"):
        GLP(GLPConfig(d_in=d, n_blocks=1), meta={"model": {"name": "meta-llama/Llama-3.2-1B"},
                                                 "sites": ["blocks.1.resid_post"]}).check_compatible(m, "blocks.1.resid_post", d)
