"""Steering and probing configs: every field documented, shared pieces, old spellings, early input checks,
GLP/SAE loading options passed through, provenance of hub ids."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap

import pytest
import torch
from test_steer_helpers import NEG, POS, SITE, make_glp, write_lines

from innards.cli import main as cli
from innards.config import parse
from innards.errors import InnardsError
from innards.glp.model import GLP
from innards.glp.projection import ProjectionConfig
from innards.models.config import ModelConfig
from innards.probe.run import PROBE_ALIASES, ProbeConfig
from innards.steer.config import STEER_ALIASES, GenerationConfig, GLPSource, PriorConfig, SteerInputs, glp_provenance
from innards.steer.generate import GenerateConfig
from innards.steer.sweep import SWEEP_ALIASES, SweepConfig
from innards.steer.vectors import VECTOR_ALIASES, VectorConfig, diff_means, save_vector


def _documented(cls: type) -> dict[str, bool]:
    """field -> whether a string literal follows its annotation in the class body that declares it."""
    out: dict[str, bool] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                nxt = body[i + 1] if i + 1 < len(body) else None
                out[node.target.id] = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                                       and isinstance(nxt.value.value, str) and bool(nxt.value.value.strip()))
    return {f.name: out.get(f.name, False) for f in dataclasses.fields(cls)}


CONFIGS = [GenerateConfig, SweepConfig, VectorConfig, ProbeConfig, GenerationConfig, GLPSource, PriorConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    missing = [name for name, ok in _documented(cls).items() if not ok]
    assert not missing, f"{cls.__name__}: undocumented fields {missing}"


def test_shared_pieces_are_embedded_once():
    for cls in (GenerateConfig, SweepConfig):
        f = {x.name: x for x in dataclasses.fields(cls)}
        assert f["model"].default_factory is ModelConfig and f["project"].default_factory is ProjectionConfig
        assert f["generation"].default_factory is GenerationConfig and f["glp"].default_factory is GLPSource
        assert not {"t_start", "steps", "schedule", "max_new_tokens", "temperature", "dtype"} & set(f)
        assert issubclass(cls, SteerInputs)
    assert {x.name for x in dataclasses.fields(ProbeConfig)} >= {"model", "context", "n_boot"}
    assert "max_length" not in {x.name for x in dataclasses.fields(ProbeConfig)}
    assert "max_length" not in {x.name for x in dataclasses.fields(VectorConfig)}


def test_old_spellings_still_parse():
    cfg = parse(SweepConfig, ["--model", "demo", "--t-start", "0.3", "--steps", "7", "--schedule", "grid",
                              "--n-bootstrap", "500", "--max-new-tokens", "9", "--temperature", "0.5", "--seed", "4",
                              "--glp", "g", "--restats", "s", "--checkpoint", "step_0000010", "--dtype", "bf16"],
                prog="t", aliases=SWEEP_ALIASES)
    assert (cfg.project.t_start, cfg.project.steps, cfg.project.schedule) == (0.3, 7, "grid")
    assert cfg.n_boot == 500 and cfg.generation.max_new_tokens == 9 and cfg.generation.temperature == 0.5
    assert cfg.generation.seed == 4 and cfg.model.dtype == "bf16"
    assert (cfg.glp.path, cfg.glp.restats, cfg.glp.checkpoint) == ("g", "s", "step_0000010")
    assert parse(VectorConfig, ["--max-length", "64"], prog="t", aliases=VECTOR_ALIASES).context == 64
    p = parse(ProbeConfig, ["--max-length", "64", "--n-bootstrap", "300", "--checkpoint", "c"], prog="t",
              aliases=PROBE_ALIASES)
    assert (p.context, p.n_boot, p.glp_checkpoint) == (64, 300, "c")
    assert parse(GenerateConfig, ["--top-k", "5", "--top-p", "0.9"], prog="t", aliases=STEER_ALIASES).generation.top_k == 5
    # the Python API takes a plain model name and GLP folder
    c = SweepConfig(model="demo", glp="somewhere")
    assert c.model.name == "demo" and c.glp.path == "somewhere"


@pytest.mark.parametrize("argv, match", [
    (["--t-start", "1.5"], "--project.t-start must be in"),
    (["--max-new-tokens", "0"], "--generation.max-new-tokens must be at least 1"),
    (["--top-p", "0"], "--generation.top-p must be in"),
    (["--n-boot", "5"], "--n-boot must be at least 100"),
    (["--strengths", "0,x"], "--strengths"),
    (["--methods", "raw,magic"], "--methods must be among"),
    (["--norm", "-1"], "--norm must be positive"),
    (["--prior.weight", "2"], "--prior.weight must be in"),
])
def test_ranges_fail_when_the_config_is_built(argv, match):
    with pytest.raises(InnardsError, match=match):
        parse(SweepConfig, argv, prog="t", aliases=SWEEP_ALIASES)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    from innards.models.load import load_model

    d = tiny_model_dir("llama")
    model = load_model(str(d))
    tmp = tmp_path_factory.mktemp("steer_cfg")
    save_vector(tmp / "v.safetensors", diff_means(model, SITE, POS, NEG))
    make_glp(model, out=tmp / "glp")
    write_lines(tmp / "prompts.txt", ["Once upon a time", "The fox liked"])
    write_lines(tmp / "pos.txt", POS)
    write_lines(tmp / "neg.txt", NEG)
    return {"dir": d, "model": model, "tmp": tmp}


def _sweep_args(env, out, **over):
    tmp = env["tmp"]
    a = {"--model": str(env["dir"]), "--site": SITE, "--vector": str(tmp / "v.safetensors"), "--glp": str(tmp / "glp"),
         "--strengths": "0,1", "--prompts": str(tmp / "prompts.txt"), "--concept": "joy",
         "--concept-pos": str(tmp / "pos.txt"), "--concept-neg": str(tmp / "neg.txt"), "--max-new-tokens": "3",
         "--steps": "3", "--n-boot": "200", "--out": str(out)} | over
    return ["steer", "sweep", *[x for kv in a.items() for x in kv]]


def test_sweep_checks_inputs_before_the_evaluator_trains(env, monkeypatch, capsys):
    """issue 13 item 8: a missing --vector or --glp used to fail only after the evaluator had trained."""
    def boom(*a, **k):
        raise AssertionError("the evaluator was trained before the inputs were checked")

    monkeypatch.setattr("innards.steer.sweep.load_or_train_evaluator", boom)
    monkeypatch.setattr("innards.steer.sweep.load_model", boom)
    out = env["tmp"] / "early"
    for over, msg in ((({"--vector": "/nonexistent/v.safetensors"}), "steering vector not found"),
                      (({"--glp": "/nonexistent/glp"}), "no GLP folder"),
                      (({"--prompts": "/nonexistent/p.txt"}), "prompts file not found"),
                      (({"--concept-pos": "/nonexistent/pos.txt"}), "not found"),
                      (({"--acts": "/nonexistent/store"}), "activation store not found"),
                      (({"--vector": "sae:x:notanint"}), "sae:SAE:LATENT")):
        assert cli(_sweep_args(env, out, **over)) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists()


def test_glp_loading_options_pass_through(env, monkeypatch):
    seen = {}
    real = GLP.from_pretrained.__func__

    def spy(cls, path, *a, **k):
        seen.update(k, path=str(path))
        k.pop("restats", None)
        return real(cls, path, *a, **{x: v for x, v in k.items() if x not in ("revision", "checkpoint")})

    monkeypatch.setattr(GLP, "from_pretrained", classmethod(spy))
    store = env["tmp"] / "fake_store"
    store.mkdir(exist_ok=True)
    tmp = env["tmp"]
    out = tmp / "g.jsonl"
    assert cli(["steer", "generate", "--model", str(env["dir"]), "--site", SITE, "--vector", str(tmp / "v.safetensors"),
                "--prompts", str(tmp / "prompts.txt"), "--glp", str(tmp / "glp"), "--restats", str(store),
                "--glp.revision", "abc", "--checkpoint", "final", "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert seen == {"path": str(tmp / "glp"), "revision": "abc", "checkpoint": "final", "restats": str(store)}
    rec = json.loads((tmp / "g.jsonl.run.json").read_text())
    assert rec["kind"] == "generation" and rec["headline"]["glp"] == str(tmp / "glp")


def test_provenance_of_hub_ids(env, monkeypatch):
    glp = make_glp(env["model"])
    assert glp_provenance(glp, "/some/dir") == "/some/dir"
    glp.meta["hub"] = {"name": "org/glp", "repo_id": "org/glp", "revision": "0" * 40}
    assert glp_provenance(glp, "org/glp")["repo_id"] == "org/glp"
    # an SAE by hub id or SAELens release/sae_id: recorded as given, not as a path under the cwd
    from innards.sae.model import TopKSAE
    from innards.steer import vectors

    sae = TopKSAE(32, 16, k=2)
    sae.init_weights_(seed=0)
    monkeypatch.setattr(vectors, "load_sae", lambda spec: sae)
    sv = vectors.load_vector("sae:some-release/blocks.1.hook_resid_post:3")
    assert sv.meta["source"] == "sae:some-release/blocks.1.hook_resid_post:3"
    assert torch.allclose(sv.vector, sae.W_dec[3].detach() / sae.W_dec[3].norm())


def test_vector_is_a_file_run(env, capsys):
    tmp = env["tmp"]
    out = tmp / "vec.safetensors"
    args = ["steer", "vector", "--model", str(env["dir"]), "--site", SITE, "--pos", str(tmp / "pos.txt"),
            "--neg", str(tmp / "neg.txt"), "--out", str(out)]
    assert cli(args) == 0
    rec = json.loads((tmp / "vec.safetensors.run.json").read_text())
    assert rec["kind"] == "vector" and rec["status"] == "complete" and rec["headline"]["n_pos"] == len(POS)
    assert {i["role"] for i in rec["inputs"]} == {"pos", "neg"}
    capsys.readouterr()
    assert cli(args) == 0  # same settings: already complete, not redone
    assert "already complete" in capsys.readouterr().err
    assert cli(args + ["--token", "mean"]) == 2 and "other settings" in capsys.readouterr().err


def test_sweep_and_probe_folders_are_runs(env):
    out = env["tmp"] / "sw"
    assert cli(_sweep_args(env, out, **{"--methods": "raw,prior"})) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["kind"] == "sweep" and rec["status"] == "complete"
    assert "evaluator_accuracy" in rec["headline"] and "prior_concept_at_r1" in rec["headline"]
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"raw", "prior"} and "comparison_prior" in res
    # adding a strength reuses the folder and the finished cells
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert cli(_sweep_args(env, out, **{"--methods": "raw,prior", "--strengths": "0,1,2"})) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert {k: after[k] for k in cells} == cells and len(after) == len(cells) + 2
