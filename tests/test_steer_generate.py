"""Steered generation: exactness at strength 0, GLP identity at t_start -> 0, positions, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from test_steer_helpers import NEG, POS, SITE, make_glp, write_lines

from innards.cli import main as cli
from innards.models.hooks import edit
from innards.glp.projection import ProjectionConfig
from innards.steer.config import GenerationConfig
from innards.steer.generate import Steering, SteeringHook, generate_steered
from innards.steer.vectors import diff_means, save_vector

PROMPTS = ["Once upon a time", "The fox liked to run", "One day she met a bear, and"]


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    from innards.models.load import load_model

    d = tiny_model_dir("llama")
    model = load_model(str(d))
    tmp = tmp_path_factory.mktemp("steer_gen")
    sv = diff_means(model, SITE, POS, NEG)
    save_vector(tmp / "v.safetensors", sv)
    glp = make_glp(model, out=tmp / "glp")
    write_lines(tmp / "prompts.txt", PROMPTS)
    return {"dir": d, "model": model, "sv": sv, "glp": glp, "tmp": tmp}


def _logits(model, hook=None):
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    if hook is None:
        return model(**enc).logits
    with edit(model, {SITE: hook}):
        return model(**enc).logits


@pytest.mark.parametrize("positions", ["all", "prompt", "last", "generated"])
def test_strength_zero_leaves_logits_unchanged(env, positions):
    model, v = env["model"], env["sv"].vector
    base = _logits(model)
    hook = SteeringHook(Steering(SITE, v, 0.0, positions))
    assert torch.equal(_logits(model, hook), base)


def test_nonzero_strength_changes_logits_only_where_steered(env):
    model, v = env["model"], env["sv"].vector
    base = _logits(model)
    moved = _logits(model, SteeringHook(Steering(SITE, v, 10.0, "all")))
    assert not torch.allclose(moved, base)
    # "generated" never edits the prompt's forward call
    assert torch.equal(_logits(model, SteeringHook(Steering(SITE, v, 10.0, "generated"))), base)
    # "last" edits only the final position: earlier positions are causally untouched
    last = _logits(model, SteeringHook(Steering(SITE, v, 10.0, "last")))
    assert torch.equal(last[:, :-1], base[:, :-1]) and not torch.allclose(last[:, -1], base[:, -1])


def test_glp_projection_identity_as_t_start_goes_to_zero(env):
    model, v, glp = env["model"], env["sv"].vector, env["glp"]
    base = _logits(model)
    exact = _logits(model, SteeringHook(Steering(SITE, v, 0.0, "all", glp=glp, project=ProjectionConfig(t_start=0.0))))
    assert torch.equal(exact, base)
    near = _logits(model, SteeringHook(Steering(SITE, v, 0.0, "all", glp=glp, project=ProjectionConfig(t_start=1e-5, steps=2))))
    assert torch.allclose(near, base, atol=1e-3)
    far = _logits(model, SteeringHook(Steering(SITE, v, 0.0, "all", glp=glp, project=ProjectionConfig(t_start=0.9))))
    assert not torch.allclose(far, base, atol=1e-3)


def test_strength_zero_generation_equals_unsteered(env):
    model, v = env["model"], env["sv"].vector
    gen = GenerationConfig(max_new_tokens=6, batch_size=2)
    plain = generate_steered(model, PROMPTS, None, gen, progress=False)
    zero = generate_steered(model, PROMPTS, Steering(SITE, v, 0.0, "all"), gen, progress=False)
    assert [r["continuation_ids"] for r in plain] == [r["continuation_ids"] for r in zero]
    assert [r["prompt_index"] for r in plain] == [0, 1, 2]
    assert plain[0]["prompt_ids"] == model.tokenizer(PROMPTS[0])["input_ids"]


@pytest.mark.parametrize("positions", ["generated", "prompt", "all", "last"])
def test_positions_under_kv_cache(env, positions):
    model, v = env["model"], env["sv"].vector
    s = Steering(SITE, v, 1.0, positions)
    hook = SteeringHook(s)
    from innards.steer.tokens import encode

    b = encode(model.tokenizer, PROMPTS, side="left")
    hook.start_batch(b.text_mask)
    with edit(model, {SITE: hook}):
        model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=5, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    n_prompt_text = int(b.text_mask.sum())  # BOS and padding are never steered
    calls, B = hook.calls, len(PROMPTS)
    assert calls == 5  # one prompt call, then one call per further new token
    want = {"generated": B * (calls - 1), "prompt": n_prompt_text, "all": n_prompt_text + B * (calls - 1),
            "last": B * calls}[positions]
    assert hook.n_edited == want


def test_sampling_is_seeded_and_glp_runs(env):
    model, v, glp = env["model"], env["sv"].vector, env["glp"]
    s = Steering(SITE, v, 2.0, "last", glp=glp, project=ProjectionConfig(t_start=0.5, steps=4))
    gen = GenerationConfig(max_new_tokens=5, temperature=1.0, seed=3)
    a = generate_steered(model, PROMPTS, s, gen, progress=False)
    b = generate_steered(model, PROMPTS, s, gen, progress=False)
    assert [r["continuation_ids"] for r in a] == [r["continuation_ids"] for r in b]


def test_cli_generate_and_bad_inputs(env, capsys):
    d, tmp = env["dir"], env["tmp"]
    out = tmp / "gen.jsonl"
    base = ["steer", "generate", "--model", str(d), "--site", SITE, "--vector", str(tmp / "v.safetensors"),
            "--prompts", str(tmp / "prompts.txt"), "--max-new-tokens", "4", "--batch-size", "2"]
    assert cli(base + ["--strength", "1.5", "--glp", str(tmp / "glp"), "--t-start", "0.3", "--steps", "5",
                       "--positions", "last", "--out", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 3 and all(r["method"] == "glp" and r["strength"] == 1.5 for r in recs)
    # alpha = r * ||a|| with ||a|| from the GLP's statistics when no --norm / --acts
    assert recs[0]["alpha"] == pytest.approx(1.5 * env["glp"].meta["stats"]["mean_norm"])
    assert (tmp / "gen.jsonl.config.yaml").is_file()
    rec = json.loads((tmp / "gen.jsonl.run.json").read_text())
    assert rec["kind"] == "generation" and rec["status"] == "complete" and rec["headline"]["generations"] == 3
    # other settings into the same file: refused unless --overwrite
    assert cli(base + ["--strength", "1", "--norm", "2.0", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    assert cli(base + ["--strength", "1", "--norm", "2.0", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text().splitlines()[0])["alpha"] == pytest.approx(2.0)
    # no norm source at all
    assert cli(base + ["--strength", "1", "--out", str(tmp / "x.jsonl")]) == 2
    assert "norm" in capsys.readouterr().err
    # a GLP of another site, a vector of another site
    make_glp(env["model"], site="blocks.0.resid_post", out=tmp / "glp0")
    assert cli(base + ["--strength", "1", "--glp", str(tmp / "glp0"), "--out", str(tmp / "x.jsonl")]) == 2
    assert "site" in capsys.readouterr().err
    assert cli(["steer", "generate", "--model", str(d), "--site", "blocks.0.resid_post", "--vector",
                str(tmp / "v.safetensors"), "--prompts", str(tmp / "prompts.txt"), "--norm", "1",
                "--out", str(tmp / "x.jsonl")]) == 2
    assert "site" in capsys.readouterr().err
    assert not (tmp / "x.jsonl").exists()


def test_norm_from_activation_store(env, capsys):
    from innards.data.harvest import HarvestConfig, harvest
    from innards.data.store import ActivationStore
    from innards.steer.generate import resolve_norm

    d, tmp = env["dir"], env["tmp"]
    (tmp / "docs.txt").write_text("\n\n".join(POS + NEG) + "\n")
    harvest(HarvestConfig(model=str(d), site=[SITE], text=str(tmp / "docs.txt"), tokens=120, out=str(tmp / "store"),
                          context=32, store_dtype="fp32"))
    st = ActivationStore(tmp / "store").stats(SITE)
    assert resolve_norm(SITE, acts=str(tmp / "store"), model=env["model"])[0] == pytest.approx(st["mean_norm"])
    assert resolve_norm(SITE, acts=str(tmp / "store"), stat="rms_norm")[0] == pytest.approx(st["rms_norm"])
    out = tmp / "acts.jsonl"
    assert cli(["steer", "generate", "--model", str(d), "--site", SITE, "--vector", str(tmp / "v.safetensors"),
                "--prompts", str(tmp / "prompts.txt"), "--max-new-tokens", "3", "--strength", "2",
                "--acts", str(tmp / "store"), "--out", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["alpha"] == pytest.approx(2 * st["mean_norm"])
    with pytest.raises(Exception, match="not in store"):
        resolve_norm("blocks.0.resid_post", acts=str(tmp / "store"))


def test_encoder_cannot_generate(tiny_model_dir):
    from innards.errors import InnardsError
    from innards.models.load import load_model

    bert = load_model(str(tiny_model_dir("bert")))
    with pytest.raises(InnardsError, match="cannot generate"):
        generate_steered(bert, PROMPTS, None, GenerationConfig(max_new_tokens=2), progress=False)
    # vectors work on encoders too (no generation needed)
    sv = diff_means(bert, SITE, POS, NEG, token="mean")
    assert abs(sv.vector.norm().item() - 1) < 1e-6


@pytest.mark.parametrize("schedule, solver", [("exact", "euler"), ("grid", "euler"), ("exact", "heun")])
def test_fast_projection_equals_glp_project(env, schedule, solver):
    from innards.steer.project import FastGLP

    glp = env["glp"]
    torch.manual_seed(1)
    a = glp.denormalize(torch.randn(7, glp.config.d_in))
    cfg = ProjectionConfig(t_start=0.5, steps=6, schedule=schedule, solver=solver)
    want = glp.project(a, seed=11, site=SITE, **cfg.kwargs())
    got = FastGLP(glp, SITE).project(a, cfg, seed=11)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(FastGLP(glp, SITE).project(a, ProjectionConfig(t_start=0.0), seed=1), a)


def test_steering_hook_needs_no_device_sync_for_generated_tokens(env, monkeypatch):
    """The per-token path decides on the host: no .any()/.nonzero() on device tensors, no per-step conditioning."""
    model, v, glp = env["model"], env["sv"].vector, env["glp"]
    hook = SteeringHook(Steering(SITE, v, 1.0, "generated", glp=glp, project=ProjectionConfig(t_start=0.5, steps=5)))
    calls = {"cond": 0}
    real = glp.conditioning

    def counting(*a, **k):
        calls["cond"] += 1
        return real(*a, **k)

    monkeypatch.setattr(glp, "conditioning", counting)
    hook.start_batch(None)
    x = torch.randn(3, 1, glp.config.d_in)
    hook(x)  # the prompt call: "generated" leaves it alone
    for _ in range(4):
        out = hook(torch.randn(3, 1, glp.config.d_in))
        assert out.shape == (3, 1, glp.config.d_in)
    assert calls["cond"] == 4  # one per grid time (5 points, 4 steps), computed once for all calls
