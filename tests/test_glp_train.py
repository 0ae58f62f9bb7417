"""GLP training: outputs, exact resume, torchrun DDP, NaN handling, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from innards.errors import InnardsError
from innards.glp.model import GLP
from innards.glp.train import GLPOptimConfig, GLPTrainConfig, checkpoint_steps, train_glp
from innards.train.checkpoint import load_checkpoint
from innards.train.optim import lr_factor
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
                        shard_tokens=4096, context=64, val_fraction=0.1, store_dtype="fp32")
    return harvest(cfg, model=model)


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glp_store")
    return _harvest(root / "store", tiny_model_dir("llama"), _text(root / "text.txt"), [SITE])


def _cfg(store: Path, out: Path, **kw) -> GLPTrainConfig:
    base = dict(acts=str(store), out=str(out), depth=2, steps=24, batch_size=256, lr=1e-3, log_every=5,
                save_every=7, checkpoints=5, val_rows=512, progress=False)
    base.update(kw)
    base["optim"] = GLPOptimConfig(lr=base.pop("lr"))
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
    o = GLPOptimConfig()  # the paper's: 1% warm-up from 0.01 x lr, cosine to 0.1 x lr
    assert lr_factor(0, 1000, o) == pytest.approx(0.01)
    assert lr_factor(10, 1000, o) == pytest.approx(1.0)
    assert lr_factor(1000, 1000, o) == pytest.approx(0.1)
    assert 0.1 < lr_factor(500, 1000, o) < 1.0
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
    ra, rb = load_checkpoint(a / "resume")[1], load_checkpoint(b / "resume")[1]
    assert ra.keys() == rb.keys() and all(torch.equal(ra[f][k], rb[f][k]) for f in ra for k in ra[f])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "act_per_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))


def test_resume_and_output_guards(store, tmp_path):
    train_glp(_cfg(store, tmp_path / "r", stop_after=3))
    with pytest.raises(InnardsError, match=r"other settings \(optim.lr: 0.001 -> 0.002\)"):
        train_glp(_cfg(store, tmp_path / "r", lr=2e-3, resume=True))
    with pytest.raises(InnardsError, match="holds an unfinished glp run; use --resume"):
        train_glp(_cfg(store, tmp_path / "r"))
    with pytest.raises(InnardsError, match="nothing to resume"):
        train_glp(_cfg(store, tmp_path / "fresh", resume=True))
    with pytest.raises(InnardsError, match="not found"):
        train_glp(_cfg(tmp_path / "missing", tmp_path / "x"))
    (tmp_path / "notastore").mkdir()
    with pytest.raises(InnardsError, match="no activation store"):
        train_glp(_cfg(tmp_path / "notastore", tmp_path / "y"))
    assert not (tmp_path / "y").exists()  # a bad store fails before anything is written
    # outputs that would damage other data
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(InnardsError, match="activation store itself"):
        train_glp(_cfg(store, store))
    other = tmp_path / "sae"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"format": "innards.run", "kind": "sae", "status": "complete"}))
    for overwrite in (False, True):
        with pytest.raises(InnardsError, match="holds a sae run, not a glp run"):
            train_glp(_cfg(store, other, overwrite=overwrite))
    assert sorted(p.name for p in other.iterdir() if not p.name.startswith(".")) == ["run.json"]
    assert sorted(p.name for p in store.iterdir()) == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InnardsError, match="not a folder"):
        train_glp(_cfg(store, tmp_path / "afile"))
    with pytest.raises(InnardsError, match="is a file"):
        train_glp(_cfg(store, tmp_path / "afile" / "run"))
    assert (tmp_path / "afile").read_text() == "x"


def test_finished_run_is_not_redone(store, tmp_path, capsys):
    out = train_glp(_cfg(store, tmp_path / "done", steps=6, checkpoints=2))
    cfg_json = (out / "config.json").read_bytes()
    assert GLP.from_pretrained(out).meta["training"]["val_loss"] is not None
    for again in (_cfg(store, out, steps=6, checkpoints=2), _cfg(store, out, steps=6, checkpoints=2, resume=True)):
        train_glp(again)
        assert "already complete" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == cfg_json  # val_loss is not rewritten to null
    rec = json.loads((out / "run.json").read_text())
    assert rec["kind"] == "glp" and rec["status"] == "complete" and rec["headline"]["step"] == 6
    assert rec["inputs"][0]["role"] == "acts" and rec["inputs"][0]["kind"] == "store"


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
    one = train_glp(GLPTrainConfig(acts=str(store), out=str(tmp_path / "one"), depth=2, steps=6, batch_size=128,
                                   optim=GLPOptimConfig(lr=1e-3), precision="fp32", val_rows=256, checkpoints=2,
                                   progress=False))
    assert GLP.from_pretrained(tmp_path / "ddp").meta["training"]["world_size"] == 2
    w1, w2 = _weights(one), _weights(tmp_path / "ddp")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert not all(torch.equal(w1[k], _weights(one / "checkpoints" / "step_0000001")[k]) for k in w1)
    m1, m2 = read_metrics(one), read_metrics(tmp_path / "ddp")
    assert [r["activations"] for r in m1] == [r["activations"] for r in m2]
    assert m2[-1]["train_loss"] == pytest.approx(m1[-1]["train_loss"], rel=1e-4)


# ----- --tokens is a promise: full batches across epoch boundaries --------------------------------------
class _ShortEpochs:
    """A fake source: rows 0, 1, 2, ... in batches of `b`, with a short batch at the end of every epoch of `n` rows."""

    def __init__(self, n: int, b: int):
        self.n, self.b, self.pos = n, b, 0  # pos counts rows handed out over all epochs

    def next_batch(self) -> torch.Tensor:
        epoch, i = divmod(self.pos, self.n)
        k = min(self.b, self.n - i)
        rows = torch.arange(i, i + k, dtype=torch.float32) + 1000 * epoch
        self.pos += k
        return rows[:, None].expand(k, 3).clone()

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def test_full_batches_cross_epochs_without_loss_or_repeat():
    from innards.glp.train import FullBatches

    fb = FullBatches(_ShortEpochs(n=10, b=4), 4)
    got = torch.cat([fb.next() for _ in range(7)])[:, 0]
    want = torch.cat([torch.arange(10) + 1000 * e for e in range(3)])[:28].float()
    assert torch.equal(got, want)  # every batch full, the epochs concatenated: nothing dropped or repeated
    # resume in the middle of a carried-over batch gives the same continuation
    a = FullBatches(_ShortEpochs(10, 4), 4)
    for _ in range(3):
        a.next()
    pos, carry = a.state()
    assert carry["rows"].shape[0] > 0
    b = FullBatches(_ShortEpochs(10, 4), 4)
    b.load(pos, carry)
    assert all(torch.equal(a.next(), b.next()) for _ in range(5))


def test_tokens_trains_on_exactly_that_many_activations(store, tmp_path):
    from innards.data.store import ActivationStore

    n_train = len(ActivationStore(store).split_rows("train"))
    tokens = 256 * (2 * n_train // 256 + 3)  # crosses two epoch boundaries, a multiple of the batch
    out = train_glp(_cfg(store, tmp_path / "t", steps=None, tokens=tokens, depth=1, log_every=10, checkpoints=1,
                         save_every=1000, val_rows=64))
    m = read_metrics(out)
    assert m[-1]["activations"] == tokens == GLP.from_pretrained(out).meta["training"]["activations"]
    acts = [0] + [r["activations"] for r in m]
    steps = [0] + [r["step"] for r in m]
    assert all((a1 - a0) == 256 * (s1 - s0) for a0, a1, s0, s1 in zip(acts, acts[1:], steps, steps[1:]))  # full batches
    # not a multiple of the batch: rounded up to whole batches, as --tokens' help says
    out2 = train_glp(_cfg(store, tmp_path / "t2", steps=None, tokens=1000, depth=1, checkpoints=1, val_rows=64))
    tr = GLP.from_pretrained(out2).meta["training"]
    assert tr["step"] == 4 and tr["activations"] == 1024


def test_auto_learning_rate_follows_the_run_length(store, tmp_path):
    from innards.glp.train import PAPER_LR, auto_lr

    assert auto_lr(244_141) == pytest.approx(PAPER_LR) and auto_lr(10**7) == pytest.approx(PAPER_LR)
    assert auto_lr(489) == pytest.approx(1e-3) and auto_lr(24_414) == pytest.approx(5e-5 * 10 ** 0.5, rel=1e-4)
    out = train_glp(GLPTrainConfig(acts=str(store), out=str(tmp_path / "a"), depth=1, steps=4, batch_size=64,
                                   checkpoints=1, val_rows=64, progress=False))
    assert GLP.from_pretrained(out).meta["training"]["lr"] == pytest.approx(auto_lr(4))


def test_a_run_worse_than_a_gaussian_says_it_is_far_from_converged(store, tmp_path, capsys):
    slow = train_glp(_cfg(store, tmp_path / "slow", steps=4, lr=1e-6, depth=1, checkpoints=1))
    tr = GLP.from_pretrained(slow).meta["training"]
    assert tr["val_loss"] > tr["val_loss_gaussian"] > 0
    assert "far from converged" in capsys.readouterr().err
    good = train_glp(_cfg(store, tmp_path / "good", steps=150, lr=3e-3, depth=1, checkpoints=1, log_every=50))
    tr = GLP.from_pretrained(good).meta["training"]
    assert tr["val_loss"] < tr["val_loss_gaussian"] and "far from converged" not in capsys.readouterr().err


def test_bad_ranges_are_one_line_errors_before_anything_runs(tmp_path, capsys):
    from innards.cli import main

    base = ["glp", "train", "--acts", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    bad = [["--log-every", "0"], ["--steps", "0"], ["--steps", "-3"], ["--batch-size", "1.5"], ["batch_size=1.5"],
           ["--tokens", "0"], ["--ema", "1"], ["--optim.lr", "-1"], ["--lr", "0"], ["--depth", "0"],
           ["--tokens", "10", "--steps", "3"], ["--optim.warmup", "1.5"]]
    for extra in bad:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("innards: error:") and "not found" not in err[0], (extra, err)
    with pytest.raises(InnardsError, match="whole number"):
        GLPTrainConfig(batch_size=1.5)
    assert not (tmp_path / "o").exists()


def test_old_flat_flags_still_work():
    from innards.cli.glp_train import ALIASES
    from innards.config import parse

    cfg = parse(GLPTrainConfig, ["--acts", "a", "--lr", "1e-3", "--weight-decay", "0", "--warmup", "0.1",
                                 "--final-lr-frac", "0.2", "--clip", "0.5", "--stream", "--model", "demo",
                                 "--site", "blocks.0.resid_post", "--text", "generate:5", "--context", "32",
                                 "--harvest-batch", "4", "--model-dtype", "bf16", "--stream-dtype", "fp32",
                                 "--val-fraction", "0.2", "--shard-rows", "700"], prog="t", aliases=ALIASES)
    o, h = cfg.optim, cfg.harvest
    assert (o.lr, o.weight_decay, o.warmup, o.final_lr_frac, o.clip) == (1e-3, 0.0, 0.1, 0.2, 0.5)
    assert (h.model.name, h.site, h.text, h.context, h.batch_size) == ("demo", ["blocks.0.resid_post"], "generate:5", 32, 4)
    assert (h.model.dtype, h.store_dtype, h.val_fraction, h.shard_tokens) == ("bf16", "fp32", 0.2, 700)
    d = GLPTrainConfig()
    assert (d.optim.lr, d.optim.weight_decay, d.optim.warmup, d.optim.final_lr_frac, d.optim.clip) == (None, 0.01, 0.01, 0.1, 1.0)


def test_trainer_is_an_object_with_step_evaluate_save_load(store, tmp_path):
    from innards.glp.train import GLPTrainer, _store_source
    from innards.runtime import Dist

    cfg = _cfg(store, tmp_path / "o", steps=5, depth=1, val_rows=128)
    (tmp_path / "o").mkdir()
    a = GLPTrainer(cfg, _store_source(cfg), Dist(), tmp_path / "o")
    v0, buckets = a.evaluate()
    for _ in range(3):
        a.step()
    a.save()
    a.step()
    b = GLPTrainer(cfg, _store_source(cfg), Dist(), tmp_path / "o")
    b.load()
    assert b.step_count == 3
    b.step()
    assert all(torch.equal(p, q) for p, q in zip(a.glp.parameters(), b.glp.parameters()))
    assert a.evaluate()[0] < v0 and len(buckets) == 10


# ----- crash consistency: kill -9 inside checkpoint writes, then again during the resumed run ------------
def _killed(cfg: GLPTrainConfig, where: str, nth: int = 1) -> None:
    """Train in a forked child that SIGKILLs itself at the nth occurrence of the moment `where`."""
    import signal

    pid = os.fork()
    if pid == 0:  # the child: arm the trap, train, and never return to pytest
        try:
            _arm(where, nth, Path(cfg.out))
            train_glp(cfg)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {where} #{nth}"


def _arm(where: str, nth: int, out: Path) -> None:
    import signal

    import innards.glp.model as gm
    import innards.io as iom
    import innards.run as rm
    import innards.train.checkpoint as ck

    count = [0]

    def trap(mod, name, when):
        orig = getattr(mod, name)

        def hooked(*a, **k):
            if when(*a, **k):
                count[0] += 1
                if count[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return orig(*a, **k)

        setattr(mod, name, hooked)

    if where == "optimizer file":  # inside the temporary folder of a resume state
        trap(ck, "save_tensors", lambda path, *a, **k: Path(path).name == "optimizer.safetensors")
    elif where == "before LATEST":  # the new state renamed into place, the pointer not yet switched
        trap(ck, "write_json", lambda path, *a, **k: Path(path).name == "LATEST")
    elif where == "before prune":  # switched, the old state not yet removed
        trap(ck, "_prune", lambda *a, **k: True)
    elif where == "glp checkpoint":  # checkpoints/step_X has its weights but not yet its config.json
        trap(gm, "write_json", lambda path, *a, **k: Path(path).parent.parent.name == "checkpoints")
    elif where == "final weights rename":  # the final model.safetensors written to its temporary name
        trap(iom.os, "replace", lambda src, dst, *a, **k: Path(dst) == out / "model.safetensors")
    elif where == "final config":  # final weights in place, config.json not yet written
        trap(gm, "write_json", lambda path, *a, **k: Path(path) == out / "config.json")
    elif where == "complete":  # the GLP is written, run.json still says running
        trap(rm.Run, "complete", lambda *a, **k: True)
    else:
        raise AssertionError(where)


@pytest.fixture(scope="module")
def reference_run(store, tmp_path_factory):
    return train_glp(_cfg(store, tmp_path_factory.mktemp("ref") / "run", ema=0.9))


@pytest.mark.parametrize("first,second", [("optimizer file", "before LATEST"), ("before prune", "glp checkpoint"),
                                          ("glp checkpoint", "final weights rename"), ("final config", "complete")])
def test_kill_inside_checkpoint_writes_then_again_resumes_bit_exactly(store, tmp_path, reference_run, first, second):
    out = tmp_path / "run"
    cfg = _cfg(store, out, ema=0.9)
    nth = 3 if first in ("optimizer file", "before LATEST", "before prune", "glp checkpoint") else 1
    _killed(cfg, first, nth)
    with pytest.raises(InnardsError, match="unfinished glp run; use --resume"):
        train_glp(cfg)  # the plain command refuses; it never silently restarts
    resumed = dataclasses.replace(cfg, resume=True)
    _killed(resumed, second, 1)  # a second kill during the resumed run
    train_glp(resumed)
    wa, wb = _weights(reference_run), _weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert ca == sorted(p.name for p in (out / "checkpoints").iterdir())
    for c in ca:
        x, y = _weights(reference_run / "checkpoints" / c), _weights(out / "checkpoints" / c)
        assert all(torch.equal(x[k], y[k]) for k in x)
    ta, tb = (GLP.from_pretrained(d).meta["training"] for d in (reference_run, out))
    assert tb["val_loss"] is not None and {k: v for k, v in ta.items() if k != "data"} == {k: v for k, v in tb.items() if k != "data"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "act_per_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(reference_run)) == strip(read_metrics(out))
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert not [p for p in out.rglob(".*.tmp*")]  # no orphan temporary files
    assert [p.name for p in (out / "resume").iterdir() if p.name != "LATEST"] == ["step_0000024"]


def test_a_run_killed_before_its_first_resume_state_starts_again(store, tmp_path, reference_run):
    out = tmp_path / "run"
    cfg = _cfg(store, out, ema=0.9)
    _killed(cfg, "optimizer file", 1)  # inside the very first resume state: nothing to continue
    train_glp(cfg)  # the plain command starts again (no --resume needed, nothing is lost)
    wa, wb = _weights(reference_run), _weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
