"""innards glp distill: a few-step student that follows the teacher better than the teacher's own few-step solvers,
saved as a GLP that records its teacher, with exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from innards.errors import InnardsError
from innards.glp import schedule as sch
from innards.glp.distill import DistillConfig, distill_glp, fine_grid, teacher_trajectories
from innards.glp.model import GLP, GLPConfig

D = 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny GLP fitted to a curved 2-cluster mixture, saved as a folder."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 0.0, 1.0, -1.0], [-2.0, 1.0, 0.0, 2.0]])
    data = centers[torch.randint(0, 2, (4096,), generator=g)] + 0.3 * torch.randn(4096, D, generator=g)
    x64 = data.double()
    glp = GLP(GLPConfig(d_in=D, n_blocks=2, d_model=32, d_mlp=64),
              {"model": {"name": "toy"}, "sites": ["blocks.0.resid_post"],
               "stats_by_site": {"blocks.0.resid_post": {"mean": x64.mean(0), "var": x64.var(0), "count": 4096}}})
    opt = torch.optim.AdamW(glp.parameters(), lr=3e-3)
    for _ in range(300):
        x = glp.normalize(data[torch.randint(0, 4096, (256,), generator=g)])
        t = torch.rand(256, generator=g)
        eps = torch.randn(256, D, generator=g)
        loss = (glp((1 - t[:, None]) * x + t[:, None] * eps, t) - (eps - x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("distill") / "teacher"
    glp.eval().save_pretrained(out)
    return str(out)


def _cfg(teacher: str, out, **kw) -> DistillConfig:
    base = dict(glp=teacher, out=str(out), steps=2, schedule="shift:2", teacher_steps=6, n=1024, val_n=256, epochs=4,
                batch_size=128, val_every=16, save_every=5, progress=False)
    return DistillConfig(**{**base, **kw})


def test_teacher_trajectories_hit_the_grid_points(teacher):
    glp = GLP.from_pretrained(teacher)
    grid = sch.sample_grid(3, "shift:2")
    assert fine_grid(grid, 4)[::4] == grid
    eps = torch.randn(64, D, generator=torch.Generator().manual_seed(3))
    traj = teacher_trajectories(glp, eps, grid, 4, batch_size=24)
    assert traj.shape == (4, 64, D) and torch.equal(traj[0], eps)
    end = glp.sample(64, steps=12, solver="pc2", noise=eps, normalized=True, schedule="uniform")
    assert (traj[-1] - end).abs().max() < 0.05  # a 12-step pc2 on another grid agrees closely


def test_student_beats_the_teachers_own_few_step_solvers_and_records_its_teacher(teacher, tmp_path):
    out = distill_glp(_cfg(teacher, tmp_path / "s"))
    student = GLP.from_pretrained(out)
    rec = student.meta["student"]
    assert rec["sample"] == {"steps": 2, "solver": "euler", "schedule": "shift:2"}
    assert rec["teacher"]["path"] == str(Path(teacher).resolve())
    assert len(rec["teacher"]["sha256"]) == 64 and rec["teacher_evaluations"] == 12
    base = rec["teacher_val_rmse_same_nfe"]
    assert rec["val_rmse"] < 0.7 * min(base.values()), (rec["val_rmse"], base)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["student"]["sample"]["steps"] == 2 and cfg["training"]["val_rmse"] == rec["val_rmse"]
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "glp" and run["status"] == "complete"
    assert not (out / "resume").exists() and not (out / "teacher_trajectories.safetensors").exists()
    s = student.sample(8, seed=0, **rec["sample"])
    assert s.shape == (8, D) and torch.isfinite(s).all()
    # a student is not distilled again, and a finished run is not redone
    with pytest.raises(InnardsError, match="student"):
        distill_glp(_cfg(str(out), tmp_path / "s2"))
    assert distill_glp(_cfg(teacher, tmp_path / "s")) == out


def test_resume_is_exact(teacher, tmp_path):
    whole = distill_glp(_cfg(teacher, tmp_path / "whole", epochs=2))
    part = tmp_path / "part"
    distill_glp(_cfg(teacher, part, epochs=2, stop_after=7))
    assert (part / "resume").is_dir() and (part / "teacher_trajectories.safetensors").is_file()
    with pytest.raises(InnardsError, match="--resume"):
        distill_glp(_cfg(teacher, part, epochs=2))
    distill_glp(_cfg(teacher, part, epochs=2, resume=True))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings(teacher, tmp_path):
    from innards.cli import main

    with pytest.raises(InnardsError):
        DistillConfig(glp=teacher, schedule="cosine")
    with pytest.raises(InnardsError):
        DistillConfig(glp=teacher, n=100, batch_size=512)
    assert main(["glp", "distill", "--glp", teacher, "--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert main(["glp", "distill", "--out", str(tmp_path / "y")]) == 2
