import math
import os

import pytest
import torch

from innards.errors import InnardsError
from innards.train import checkpoint as ck
from innards.train.ema import EMA
from innards.train.optim import OptimConfig, lr_factor


def test_schedules():
    glp = OptimConfig(lr=1.0, warmup=0.01, warmup_start=0.01, final_lr_frac=0.1)
    assert lr_factor(0, 1000, glp) == pytest.approx(0.01)
    assert lr_factor(10, 1000, glp) == pytest.approx(1.0)
    assert lr_factor(505, 1000, glp) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(1000, 1000, glp) == pytest.approx(0.1)
    wsd = OptimConfig(schedule="wsd", final_lr_frac=0.0, decay=0.2)
    assert [lr_factor(s, 100, wsd) for s in (0, 79, 80, 90, 99)] == pytest.approx([1, 1, 1, 0.5, 0.05])
    assert lr_factor(7, 10, OptimConfig(schedule="constant")) == 1.0
    cos0 = OptimConfig(final_lr_frac=0.0)
    assert lr_factor(25, 100, cos0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    with pytest.raises(InnardsError, match="--optim.lr must be positive"):
        OptimConfig(lr=0)


def _files(v):
    return {"model.safetensors": {"w": torch.full((3,), float(v))}}


def test_checkpoint_roundtrip_and_prune(tmp_path):
    d = tmp_path / "resume"
    assert not ck.has_checkpoint(d)
    ck.save_checkpoint(d, 1, _files(1), {"step_info": "a"})
    ck.save_checkpoint(d, 2, _files(2), {"step_info": "b"})
    ck.save_checkpoint(d, 2, _files(3), {"step_info": "c"})  # same step again
    state, files = ck.load_checkpoint(d)
    assert state["step"] == 2 and state["step_info"] == "c" and files["model.safetensors"]["w"][0] == 3
    assert sorted(p.name for p in d.iterdir()) == ["LATEST", "step_0000002-1"]


@pytest.mark.parametrize("crash_at", ["files", "rename", "latest"])
def test_a_crash_inside_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, crash_at):
    d = tmp_path / "resume"
    ck.save_checkpoint(d, 1, _files(1), {})
    real_replace, real_write = os.replace, ck.write_json

    class Killed(Exception):
        pass

    def replace(a, b):
        if crash_at == "rename":
            raise Killed
        return real_replace(a, b)

    def write(path, obj, **kw):
        if crash_at == "latest" and path.name == "LATEST":
            raise Killed
        if crash_at == "files" and path.name == "state.json":
            raise Killed
        return real_write(path, obj, **kw)

    monkeypatch.setattr(ck.os, "replace", replace)
    monkeypatch.setattr(ck, "write_json", write)
    with pytest.raises(Killed):
        ck.save_checkpoint(d, 2, _files(2), {})
    monkeypatch.undo()
    state, files = ck.load_checkpoint(d)
    assert state["step"] == 1 and files["model.safetensors"]["w"][0] == 1  # the commit point was not reached
    ck.save_checkpoint(d, 3, _files(3), {})
    assert sorted(p.name for p in d.iterdir()) == ["LATEST", "step_0000003"]  # leftovers cleaned


def test_damaged_checkpoint_is_refused(tmp_path):
    d = tmp_path / "resume"
    path = ck.save_checkpoint(d, 1, _files(1), {})
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InnardsError, match="corrupted"):
        ck.load_checkpoint(d)


def test_optimizer_flatten_roundtrip_and_ema():
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(4)
    opt.step()
    t, plain = ck.flatten_optimizer(opt)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.ones(4))], lr=0.1)
    opt2.load_state_dict(ck.unflatten_optimizer(t, plain))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    ema = EMA([w], 0.5)
    with torch.no_grad():
        w.add_(2.0)
    ema.update([w])
    assert torch.allclose(ema.shadow[0], w.detach() - 1.0)
