"""GLP training: outputs, exact resume, torchrun DDP, NaN handling, bad input."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from innards.errors import InnardsError
from innards.glp.model import GLP
from innards.glp.train import GLPTrainConfig, checkpoint_steps, lr_factor, train_glp
from innards.runlog import read_metrics

SITE = "blocks.1.resid_post"


def _text(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    from tiny_models import SENTENCES

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _harvest(out: Path, model_dir: Path, text: Path, sites: list[str], tokens: int = 12000, model=None) -> Path:
    from innards.data.harvest import HarvestConfig, harvest

    cfg = HarvestConfig(model=str(model_dir), site=sites, text=str(text), tokens=tokens, out=str(out),
                        shard_tokens=4096, context=64, val_fraction=0.1, dtype="fp32")
    return harvest(cfg, model=model)


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glp_store")
    return _harvest(root / "store", tiny_model_dir("llama"), _text(root / "text.txt"), [SITE])


def _cfg(store: Path, out: Path, **kw) -> GLPTrainConfig:
    base = dict(acts=str(store), out=str(out), depth=2, steps=24, batch_size=256, lr=1e-3, log_every=5,
                save_every=7, checkpoints=5, val_rows=512, progress=False)
    base.update(kw)
    return GLPTrainConfig(**base)


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_timestep_densities():
    from innards.glp.train import sample_t

    g = torch.Generator().manual_seed(0)
    for dist in ("uniform", "logit_normal", "grid"):
        t = sample_t(20000, GLPTrainConfig(t_dist=dist), g, torch.device("cpu"))
        assert t.min() >= 0 and t.max() <= 1
    grid = sample_t(20000, GLPTrainConfig(t_dist="grid"), g, torch.device("cpu"))
    assert grid.min() >= 0.001 - 1e-7 and torch.allclose(grid * 1000, (grid * 1000).round(), atol=1e-3)
    ln = sample_t(20000, GLPTrainConfig(t_dist="logit_normal"), g, torch.device("cpu"))
    assert abs(float(ln.mean()) - 0.5) < 0.01 and float(((ln > 0.3) & (ln < 0.7)).float().mean()) > 0.45


def test_schedules():
    assert lr_factor(0, 1000, 0.01, 0.1) == pytest.approx(0.01)
    assert lr_factor(10, 1000, 0.01, 0.1) == pytest.approx(1.0)
    assert lr_factor(1000, 1000, 0.01, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_factor(500, 1000, 0.01, 0.1) < 1.0
    steps = checkpoint_steps(1000, 10)
    assert steps[0] == 1 and steps[-1] == 1000 and len(steps) == 10
    ratios = [b / a for a, b in zip(steps[3:], steps[4:])]
    assert max(ratios) / min(ratios) < 1.2  # log-spaced


def test_train_writes_glp_checkpoints_and_metrics(store, tmp_path):
    out = train_glp(_cfg(store, tmp_path / "run", steps=30))
    glp = GLP.from_pretrained(out)
    assert glp.meta["sites"] == [SITE] and glp.meta["stats"]["mean"].dtype == torch.float64
    assert glp.meta["training"]["step"] == 30 and glp.meta["training"]["activations"] == 30 * 256
    assert glp.meta["training"]["flops"] == 6.0 * glp.n_params * 30 * 256
    glp.check_compatible(glp.meta["model"]["name"], SITE, 32)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts[0] == "step_0000001" and ckpts[-1] == "step_0000030" and len(ckpts) == 5
    early = GLP.from_pretrained(out / "checkpoints" / ckpts[1])
    assert early.meta["training"]["val_loss"] is not None
    m = read_metrics(out)
    assert m[-1]["step"] == 30 and len(m[-1]["train_loss_t"]) == 10 and len(m[-1]["val_loss_t"]) == 10
    assert m[-1]["val_loss"] < m[0]["val_loss"] - 0.2
    assert (out / "config.yaml").is_file()
    x = glp.sample(64, steps=8, seed=0)
    assert x.shape == (64, 32) and torch.isfinite(x).all()


def test_resume_is_exact(store, tmp_path):
    a = train_glp(_cfg(store, tmp_path / "a", ema=0.9))
    train_glp(_cfg(store, tmp_path / "b", ema=0.9, stop_after=11))
    assert not (tmp_path / "b" / "model.safetensors").exists()
    b = train_glp(_cfg(store, tmp_path / "b", ema=0.9, resume=True))
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = _weights(a / "resume"), _weights(b / "resume")
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "act_per_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))


def test_resume_and_output_guards(store, tmp_path):
    train_glp(_cfg(store, tmp_path / "r", stop_after=3))
    with pytest.raises(InnardsError, match="changed settings: lr"):
        train_glp(_cfg(store, tmp_path / "r", lr=2e-3, resume=True))
    with pytest.raises(InnardsError, match="already holds"):
        train_glp(_cfg(store, tmp_path / "r"))
    with pytest.raises(InnardsError, match="nothing to resume"):
        train_glp(_cfg(store, tmp_path / "fresh", resume=True))
    with pytest.raises(InnardsError, match="not found"):
        train_glp(_cfg(tmp_path / "missing", tmp_path / "x"))
    (tmp_path / "notastore").mkdir()
    with pytest.raises(InnardsError, match="no activation store"):
        train_glp(_cfg(tmp_path / "notastore", tmp_path / "y"))


def test_cli_bad_input_is_one_line(store, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "innards", "glp", "train", "--acts", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


def test_nonfinite_rows_refused_or_skipped(tiny_model_dir, tmp_path):
    from innards.models.load import load_model

    mdir = tiny_model_dir("llama")
    model = load_model(str(mdir))
    text = _text(tmp_path / "t.txt", 200, seed=1)
    tid = model.tokenizer(" fox", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.model.embed_tokens.weight[tid] = float("nan")
    bad = _harvest(tmp_path / "bad", mdir, text, [SITE], tokens=6000, model=model)
    with pytest.raises(InnardsError, match=r"\d+ activation rows with NaN or inf"):
        train_glp(_cfg(bad, tmp_path / "refused", steps=4))
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    out = train_glp(_cfg(bad, tmp_path / "skipped", steps=6, nonfinite="skip"))
    m = read_metrics(out)
    assert m[-1]["skipped_nonfinite_rows"] > 0
    glp = GLP.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in glp.parameters())
    assert torch.isfinite(glp.meta["stats"]["mean"]).all()


def test_multi_site(tiny_model_dir, tmp_path):
    sites = ["blocks.0.resid_post", "blocks.2.resid_post"]
    st = _harvest(tmp_path / "ms", tiny_model_dir("llama"), _text(tmp_path / "t.txt", 150), sites, tokens=4000)
    out = train_glp(_cfg(st, tmp_path / "run", steps=6, checkpoints=2))
    glp = GLP.from_pretrained(out)
    assert glp.config.n_sites == 2 and glp.meta["sites"] == sites and glp.site_embed is not None
    a = glp.sample(16, steps=4, seed=0, site=sites[0])
    b = glp.sample(16, steps=4, seed=0, site=sites[1])
    assert not torch.allclose(a, b)
    assert read_metrics(out)[-1]["activations"] == 6 * 256


def test_ddp_two_processes_match_one(store, tmp_path):
    args = ["--acts", str(store), "--depth", "2", "--steps", "6", "--batch-size", "128", "--lr", "1e-3",
            "--precision", "fp32", "--val-rows", "256", "--checkpoints", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", INNARDS_BACKEND="gloo")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "innards", "glp", "train", *args, "--out", str(tmp_path / "ddp")],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    one = train_glp(GLPTrainConfig(acts=str(store), out=str(tmp_path / "one"), depth=2, steps=6, batch_size=128, lr=1e-3,
                                   precision="fp32", val_rows=256, checkpoints=2, progress=False))
    assert GLP.from_pretrained(tmp_path / "ddp").meta["training"]["world_size"] == 2
    w1, w2 = _weights(one), _weights(tmp_path / "ddp")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert not all(torch.equal(w1[k], _weights(one / "checkpoints" / "step_0000001")[k]) for k in w1)
    m1, m2 = read_metrics(one), read_metrics(tmp_path / "ddp")
    assert [r["activations"] for r in m1] == [r["activations"] for r in m2]
    assert m2[-1]["train_loss"] == pytest.approx(m1[-1]["train_loss"], rel=1e-4)
