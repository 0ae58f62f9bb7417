"""Training runs end to end on tiny toys: exact resume, bad input, evaluation JSON, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from innards.errors import InnardsError
from innards.tensors import load_tensors
from innards.train.checkpoint import current_checkpoint
from innards.vpd.config import load_config
from innards.vpd.train import train

TINY = {"target.steps": 300, "target.batch_size": 256, "batch_size": 64, "steps": 12, "warmup_steps": 5,
        "checkpoint_every": 100, "log_every": 4, "eval_batches": 2, "eval_batch_size": 64, "progress": False,
        "adversary.eval_steps": 3}


def _cfg(name: str, out: Path, **over):
    return load_config(name, {**TINY, "out": str(out), **over})


@pytest.mark.parametrize("name", ["tms-5-2", "tms-5-2-spd"])
def test_resume_gives_identical_weights(tmp_path, name):
    a = train(_cfg(name, tmp_path / "a"))
    train(_cfg(name, tmp_path / "b"), stop_at=5)
    assert not (tmp_path / "b" / "decomposition.safetensors").exists()
    b = train(_cfg(name, tmp_path / "b", resume=True))
    ta = load_tensors(a / "decomposition.safetensors")
    tb = load_tensors(b / "decomposition.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    steps = [json.loads(l)["step"] for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(8) == 1


def test_resume_with_changed_settings_is_refused(tmp_path):
    train(_cfg("tms-5-2", tmp_path / "r"), stop_at=3)
    with pytest.raises(InnardsError, match="other settings.*imp_coeff"):
        train(_cfg("tms-5-2", tmp_path / "r", resume=True, imp_coeff=0.5))
    with pytest.raises(InnardsError, match="holds an unfinished vpd run"):
        train(_cfg("tms-5-2", tmp_path / "r"))


def test_corrupt_checkpoint_is_one_line_error(tmp_path):
    train(_cfg("tms-5-2-spd", tmp_path / "r"), stop_at=3)
    p = current_checkpoint(tmp_path / "r" / "ckpt") / "state.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(InnardsError, match="corrupted|does not load"):
        train(_cfg("tms-5-2-spd", tmp_path / "r", resume=True))


def test_eval_json_and_run_from_another_model(tmp_path, capsys):
    from innards.vpd.evaluate import EvalConfig, evaluate

    run = train(_cfg("tms-5-2", tmp_path / "r"))
    res = evaluate(EvalConfig(run=str(run), batches=1, batch_size=128, pgd_steps=2))
    data = json.loads((run / "eval.json").read_text())
    for k in ("mse_unmasked", "mse_stochastic", "mse_ci", "mse_rounded", "mse_zero", "mse_adversarial", "l0", "alive",
              "delta_l2", "ground_truth"):
        assert k in data, k
    gt = data["ground_truth"]
    for k in ("mmcs", "ml2r", "min_cosine", "components_that_matter", "ci_error"):
        assert k in gt
    assert set(data["l0"]) == {"linear1", "linear2"}
    assert Path(data["ci_spectrum_png"]).is_file()
    assert "adversarial" in capsys.readouterr().out
    assert res["mse_zero"] > res["mse_unmasked"]
    # swap in another target's weights: the run no longer belongs to this model
    other = train(_cfg("tms-5-2", tmp_path / "o", **{"target.seed": 5}), stop_at=1)
    (run / "target.safetensors").write_bytes((other / "target.safetensors").read_bytes())
    with pytest.raises(InnardsError, match="another model"):
        evaluate(EvalConfig(run=str(run), batches=1))


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "innards", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_bad_input_one_line_exit_2(tmp_path):
    from innards.cli import main

    cases = [
        (["vpd", "train", "--config", "tms-5-2", "--out", str(tmp_path / "x"), "nonsense_key=1"], "unknown config key 'nonsense_key'"),
        (["vpd", "train", "--config", "tms-5-2", "--out", str(tmp_path / "x"), "modules=[mlp.*]", "target.steps=10"],
         "matches no Linear/Conv1D weight (weights: linear1, linear2)"),
        (["vpd", "train", "--config", "no-such-config", "--out", str(tmp_path / "x")], "no config named"),
        (["vpd", "eval", "--run", str(tmp_path / "missing")], "not a VPD run folder"),
        (["vpd", "train", "--out", str(tmp_path / "y"), "--resume"], "nothing to resume"),
    ]
    for argv, msg in cases:
        rc = main(argv)
        assert rc == 2, argv


def test_cli_messages(tmp_path, capsys):
    from innards.cli import main

    assert main(["vpd", "train", "--config", "tms-5-2", "--out", str(tmp_path / "x"), "nonsense_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'nonsense_key'" in err[0]
    assert main(["vpd", "train", "--config", "tms-5-2", "--out", str(tmp_path / "x"), "modules=[mlp.*]", "target.steps=10",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights: linear1, linear2" in err[0]


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "dp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INNARDS_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "innards",
           "vpd", "train", "--config", "tms-5-2", "--out", str(out), "--no-progress"]
    cmd += [f"{k}={v}" for k, v in TINY.items() if k != "progress"] + ["steps=4"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((out / "decomposition.json").read_text())
    assert meta["world"] == 2 and meta["step"] == 4
    assert (current_checkpoint(out / "ckpt") / "rank1.safetensors").is_file()


def test_tms_spd_short_run_learns_the_features(tmp_path):
    from innards.vpd.evaluate import EvalConfig, evaluate
    from innards.runlog import read_metrics

    run = train(load_config("tms-5-2-spd", {"out": str(tmp_path / "r"), "steps": 500, "batch_size": 1024, "progress": False,
                                            "target.steps": 3000, "eval_batches": 1, "adversary.eval_steps": 2,
                                            "log_every": 50}))
    logs = [m for m in read_metrics(run) if "stochastic" in m]
    assert logs[-1]["stochastic"] < 0.5 * logs[0]["stochastic"]  # from step 50 (already well down) to 500
    res = evaluate(EvalConfig(run=str(run), batches=1, batch_size=1024, pgd_steps=2, png=False))
    gt = res["ground_truth"]
    assert gt["mmcs"] > 0.97  # every feature already has a well-aligned subcomponent
    assert res["mse_ci"] < res["mse_zero"] / 3


def test_target_that_misses_features_is_retrained_with_next_seed(monkeypatch):
    from innards.vpd import toys
    from innards.vpd.config import TargetConfig

    calls = []
    real = toys.learned_features

    def fake(model, cfg):
        out = real(model, cfg)
        calls.append(1)
        if len(calls) == 1:
            out = out.clone()
            out[0] = False  # the first seed "missed" a feature
        return out

    monkeypatch.setattr(toys, "learned_features", fake)
    model, rep = toys.train_target(TargetConfig(kind="tms", steps=400, batch_size=256, seed=3, retries=2), progress=False)
    assert rep["failed_seeds"] == [{"seed": 3, "learned": 4}]
    assert rep["seed"] == 4 and rep["all_learned"]


def test_spd_constant_lr_run_can_be_extended_exactly(tmp_path):
    over = {"lr_schedule": "constant", "checkpoint_every": 3}
    a = train(_cfg("tms-5-2-spd", tmp_path / "a", steps=8, **over))
    b = train(_cfg("tms-5-2-spd", tmp_path / "b", steps=5, **over))
    b = train(_cfg("tms-5-2-spd", tmp_path / "b", steps=8, resume=True, **over))
    ta, tb = load_tensors(a / "decomposition.safetensors"), load_tensors(b / "decomposition.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(InnardsError, match="other settings.*steps"):
        train(_cfg("tms-5-2-spd", tmp_path / "b", steps=4, resume=True, **over))


def test_every_issue_config_ships_and_loads():
    from innards.vpd.config import load_config, shipped_configs

    names = {"tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp-1", "resid-mlp-2", "resid-mlp-3", "demo-lm"}
    shipped = shipped_configs()
    assert names <= set(shipped)
    assert {n + "-spd" for n in names - {"demo-lm"}} <= set(shipped)
    for name in shipped:
        cfg = load_config(name)
        assert cfg.objective == ("spd" if name.endswith("-spd") else "vpd"), name
        assert cfg.target.kind == ("lm" if name == "demo-lm" else "tms" if name.startswith("tms") else "resid_mlp"), name
        if name.startswith("tms"):
            assert cfg.target.hidden_identity == ("-id" in name), name
            assert (cfg.target.n_features, cfg.target.n_hidden) == ((40, 10) if "40-10" in name else (5, 2)), name
        if name.startswith("resid-mlp"):
            assert cfg.target.n_layers == int(name.split("-")[2]), name


def test_curve_reads_the_evaluations_of_a_run(tmp_path, capsys):
    from innards.cli import main

    run = train(_cfg("tms-5-2-spd", tmp_path / "r", steps=12, eval_every=4))
    out = tmp_path / "c" / "curve.md"
    assert main(["vpd", "curve", "--run", str(run), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["step"] for r in res["rows"]] == [4, 8, 12]
    assert res["C_total"] == 40 and all(0 <= r["l0_frac_of_C"] <= 1 for r in res["rows"])
    assert {"mse_ci", "train_l0", "stochastic"} <= set(res["rows"][-1])
    assert out.with_suffix(".png").is_file() and "| step |" in capsys.readouterr().out
    assert main(["vpd", "curve", "--run", str(tmp_path / "nothing")]) == 2


def test_kill9_anywhere_then_resume_equals_uninterrupted(tmp_path):
    """SIGKILL while training (checkpoints every step), then --resume: the same weights, no duplicate metrics."""
    import signal
    import time

    over = {**TINY, "steps": 40, "checkpoint_every": 1}
    argv = ["vpd", "train", "--config", "tms-5-2", "--no-progress", *[f"{k}={v}" for k, v in over.items() if k != "progress"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = train(_cfg("tms-5-2", tmp_path / "a", steps=40, checkpoint_every=1))
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-m", "innards", *argv, "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while current_checkpoint(out / "ckpt") is None or json.loads((out / "ckpt" / "LATEST").read_text())["step"] < 15:
        assert time.time() < deadline and p.poll() is None, "the run ended or stalled before it could be killed"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "decomposition.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "innards", *argv, "--out", str(out), "--resume"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ta, tb = load_tensors(a / "decomposition.safetensors"), load_tensors(out / "decomposition.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    steps = [[json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, out)]
    assert steps[1] == steps[0]  # each logged step once, as in the uninterrupted run
    assert [d.name for d in (out / "ckpt").iterdir() if d.name.startswith(".")] == []  # nothing half-written is left


def test_config_ranges_checked_when_built():
    """Zero or negative sizes are one-line errors before any work; 0 where it means "off" is accepted."""
    for bad, msg in (({"C": -5}, "--C must be at least 1"), ({"batch_size": 0}, "--batch-size must be at least 1"),
                     ({"steps": 0}, "--steps must be at least 1"), ({"lr": 0.0}, "--lr must be positive")):
        with pytest.raises(InnardsError, match=msg):
            _cfg("tms-5-2", Path("unused"), **bad)
    cfg = _cfg("tms-5-2", Path("unused"), checkpoint_every=0, eval_every=0, warmup_steps=0)
    assert cfg.checkpoint_every == 0
