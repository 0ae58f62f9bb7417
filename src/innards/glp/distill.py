"""Distil a GLP into a few-step student: a GLP whose K Euler steps on a fixed grid follow the teacher's flow.

Why: a learned flow is curved (``innards bench glp`` measures it), so a K-step solver of the teacher
carries an O(step^p) error that only more evaluations remove. The student is a copy of the teacher
fine-tuned so that its own K Euler steps on the grid t_0 = 1 > t_1 > ... > t_K = 0 land on the
teacher's ODE trajectory at every grid point: the velocity it learns at t_i is the teacher's *average*
velocity over [t_{i+1}, t_i], which a straight step then integrates exactly.

Method (trajectory distillation on the student's own rollouts):

1. targets: for ``n`` noise draws eps, the teacher's trajectory z(t_i) at the student's grid points,
   integrated with pc2 and ``teacher_steps`` steps per student step (32 evaluations for K = 4: within
   0.01 RMS of the 1000-step Euler trajectory on the demo GLP); held-out draws (``val_n``) likewise;
2. loss: the student rolls out its K Euler steps from eps and is penalised at every grid point,
   mean_i ||z_i^student - z(t_i)||^2, with the gradient through the whole rollout (so it learns from
   the states it will actually visit, not the teacher's);
3. AdamW from the teacher's weights; per-epoch permutations seeded by (seed, epoch), so a resumed run
   repeats an uninterrupted one exactly.

The output is a GLP folder (``GLP.from_pretrained``) whose ``config.json`` has a ``student`` record: the
teacher (path, weights SHA-256, training record), the method, the grid, and ``sample`` = the settings
to sample with (``glp.sample(n, **meta["student"]["sample"])``). The student is a *sampler*: its velocity
at other times, and so SDEdit projection with it, is not what it was trained for (``innards bench glp
--student`` measures both; project with the teacher).
"""

from __future__ import annotations

import copy
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from innards.config import at_least, require
from innards.errors import InnardsError
from innards.glp import schedule as sch
from innards.glp.model import GLP, file_sha256
from innards.io import remove_orphans
from innards.run import Run
from innards.runlog import MetricsLog
from innards.runtime import default_device
from innards.tensors import load_tensors, save_tensors
from innards.train.checkpoint import flatten_optimizer, has_checkpoint, load_checkpoint, save_checkpoint, unflatten_optimizer
from innards.train.optim import OptimConfig, adamw, clip_grads, lr_factor, set_lr

RESUME_DIR = "resume"
TARGETS = "teacher_trajectories.safetensors"
FREE = {"device", "log_every", "save_every", "stop_after"}


@dataclass
class DistillOptimConfig(OptimConfig):
    """AdamW and its schedule for the student (fine-tuning from the teacher's weights)."""

    lr: float = 3e-4
    """peak learning rate"""
    warmup: float = 0.02
    """fraction of the steps spent warming up linearly from warmup_start x lr"""
    final_lr_frac: float = 0.0
    """learning rate at the end, as a fraction of lr"""


@dataclass
class DistillConfig:
    """Configuration of ``innards glp distill`` (and of :func:`distill_glp`)."""

    glp: str = ""
    """teacher GLP folder (innards glp train) or hub id"""
    out: str = "runs/glp-student"
    """output folder: the student GLP (GLP.from_pretrained(out)), metrics.jsonl, resume/"""
    steps: int = 4
    """network evaluations of the student's sampler (Euler steps on --schedule)"""
    schedule: str = "shift:2"
    """the student's time grid from t = 1 to 0: uniform, shift (s = 3) or shift:S (denser near t = 1)"""
    teacher_steps: int = 8
    """pc2 steps of the teacher per student step, for the targets"""
    n: int = 131072
    """noise draws whose teacher trajectories the student is trained on"""
    val_n: int = 2048
    """held-out noise draws for the validation error"""
    epochs: int = 3
    """passes over the n trajectories"""
    batch_size: int = 512
    """trajectories per optimiser step"""
    optim: DistillOptimConfig = field(default_factory=DistillOptimConfig)
    """AdamW and its learning-rate schedule"""
    site: str | None = None
    """site of a multi-site teacher (None: its only site)"""
    seed: int = 0
    """seed of the noise draws and the data order"""
    device: str | None = None
    """device (None: cuda if available, else cpu)"""
    log_every: int = 20
    """optimiser steps between metrics lines"""
    val_every: int = 200
    """optimiser steps between validation errors (and at the end)"""
    save_every: int = 200
    """optimiser steps between resume states"""
    stop_after: int | None = None
    """end this invocation after N optimiser steps in total, leaving a resume state (continue with --resume)"""
    resume: bool = False
    """continue the run in --out exactly where its resume state left it"""
    overwrite: bool = False
    """replace a run in --out made with other settings"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        at_least(self, 1, "steps", "teacher_steps", "n", "val_n", "epochs", "batch_size", "log_every", "val_every",
                 "save_every", "stop_after")
        require(self.batch_size <= self.n, f"--batch-size {self.batch_size} exceeds --n {self.n}")
        sch.sample_grid(self.steps, self.schedule)  # a one-line error for a bad grid


def fine_grid(grid: list[float], per_step: int) -> list[float]:
    """``grid`` with every step cut into ``per_step`` equal sub-steps (grid[i] is point i * per_step)."""
    out = [grid[0]]
    for a, b in zip(grid[:-1], grid[1:]):
        out += [a + (b - a) * (j + 1) / per_step for j in range(per_step)]
    out[-1] = grid[-1]
    return out


@torch.no_grad()
def teacher_trajectories(glp: GLP, eps: torch.Tensor, grid: list[float], per_step: int, site: object = None,
                         batch_size: int = 4096, progress: bool = False) -> torch.Tensor:
    """The teacher's pc2 trajectory of each noise row at the points of ``grid``: (len(grid), n, d), normalised space."""
    fine = fine_grid(grid, per_step)
    keep = {i * per_step: k for k, i in enumerate(range(len(grid)))}
    out = torch.empty(len(grid), *eps.shape, dtype=torch.float32)
    bar = tqdm(total=eps.shape[0], desc="teacher", unit="traj", disable=not progress)
    for i in range(0, eps.shape[0], batch_size):
        z = eps[i:i + batch_size].to(glp.device)

        def record(j: int, state: torch.Tensor, i: int = i) -> None:
            if j in keep:
                out[keep[j], i:i + state.shape[0]] = state.float().cpu()

        sch.integrate(lambda x, t: glp(x, t, site), z, fine, "pc2", trace=record)
        bar.update(z.shape[0])
    bar.close()
    return out


def rollout(glp: GLP, z: torch.Tensor, grid: list[float], site: object = None) -> list[torch.Tensor]:
    """The student's Euler states at every grid point (differentiable)."""
    states = [z]
    for t0, t1 in zip(grid[:-1], grid[1:]):
        z = z + (t1 - t0) * glp(z, t0, site)
        states.append(z)
    return states


def trajectory_loss(glp: GLP, traj: torch.Tensor, grid: list[float], site: object = None) -> torch.Tensor:
    """Mean over the grid points after the first of the squared error of the student's rollout against ``traj``."""
    states = rollout(glp, traj[0], grid, site)
    return torch.stack([(s - traj[i]).pow(2).mean() for i, s in enumerate(states) if i > 0]).mean()


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def distill_glp(cfg: DistillConfig) -> Path:
    """Distil ``cfg.glp`` into a ``cfg.steps``-step student; returns the output folder (a GLP folder)."""
    if not cfg.glp:
        raise InnardsError("give --glp DIR (the teacher GLP)")
    out = Path(cfg.out)
    device = default_device(cfg.device)
    teacher = GLP.from_pretrained(cfg.glp, device=device)
    if teacher.meta.get("student"):
        raise InnardsError(f"{cfg.glp} is itself a distilled student; distil its teacher instead")
    sites = teacher.meta.get("sites") or []
    site = cfg.site or (sites[0] if len(sites) == 1 else None)
    if len(sites) > 1 and site is None:
        raise InnardsError(f"the teacher models several sites ({', '.join(sites)}); choose one with --site")
    if sites and site not in sites:
        raise InnardsError(f"the teacher models {', '.join(sites)}, not '{site}'")
    grid = sch.sample_grid(cfg.steps, cfg.schedule)
    per_epoch = cfg.n // cfg.batch_size
    total = cfg.epochs * per_epoch
    d = teacher.config.d_in

    run = Run.open(out, "glp", cfg, inputs={"teacher": cfg.glp}, resume=cfg.resume, overwrite=cfg.overwrite, free=FREE)
    try:
        if run.state == "complete":
            run.say_complete()
            return out
        for p in teacher.parameters():
            p.requires_grad_(False)
        targets = _targets(cfg, teacher, grid, site, out, d)
        train_traj, val_traj = targets["train"], targets["val"]
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        opt = adamw(student.parameters(), cfg.optim, device)
        step = 0
        resumed = run.state == "resume" and has_checkpoint(out / RESUME_DIR)
        if resumed:
            state, files = load_checkpoint(out / RESUME_DIR)
            student.load_state_dict(files["model.safetensors"])
            opt.load_state_dict(unflatten_optimizer(files["optimizer.safetensors"], state["optimizer"]))
            step = int(state["step"])
            remove_orphans(out)
        with torch.no_grad():
            baseline = {s: _rms(teacher.sample(cfg.val_n, steps=cfg.steps, solver=s, schedule=cfg.schedule,
                                               noise=val_traj[0], normalized=True, site=site), val_traj[-1])
                        for s in ("euler", "pc2")}

        def validate() -> float:
            student.eval()
            with torch.no_grad():
                end = torch.cat([rollout(student, val_traj[0][i:i + 4096].to(device), grid, site)[-1].cpu()
                                 for i in range(0, cfg.val_n, 4096)])
            student.train()
            return _rms(end, val_traj[-1])

        def save() -> None:
            opt_t, opt_plain = flatten_optimizer(opt)
            save_checkpoint(out / RESUME_DIR, step, {"model.safetensors": student.state_dict(),
                                                     "optimizer.safetensors": opt_t}, {"optimizer": opt_plain, "total": total})

        log = MetricsLog(out, resume_step=step if resumed else None)
        end = min(total, cfg.stop_after) if cfg.stop_after is not None else total
        bar = tqdm(total=end, initial=step, desc="distill", unit="step", disable=not cfg.progress)
        val = None
        student.train()
        try:
            while step < end:
                epoch, b = divmod(step, per_epoch)
                perm = torch.randperm(cfg.n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                traj = train_traj[:, idx].to(device)
                lr = cfg.optim.lr * lr_factor(step, total, cfg.optim)
                set_lr(opt, lr)
                loss = trajectory_loss(student, traj, grid, site)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = clip_grads(student.parameters(), cfg.optim.clip)
                opt.step()
                step += 1
                bar.update(1)
                loss_v = float(loss.detach())
                if not math.isfinite(loss_v):
                    raise InnardsError(f"distillation diverged at step {step} (non-finite loss); lower --optim.lr")
                rec = {}
                if step % cfg.val_every == 0 or step == total:
                    val = validate()
                    rec["val_rmse"] = val
                if step % cfg.log_every == 0 or rec:
                    log.log(step, loss=loss_v, lr=lr, grad_norm=gn, **rec)
                    bar.set_postfix(loss=f"{loss_v:.4g}", **({"val": f"{val:.4g}"} if val is not None else {}))
                if step % cfg.save_every == 0 and step < total:
                    save()
        finally:
            bar.close()
            log.close()
        if step < total:
            save()
            print(f"innards: distillation stopped at step {step} of {total}; continue with --resume")
            return out
        val = validate() if val is None else val
        teacher_rec = {"path": str(Path(cfg.glp).resolve()) if Path(cfg.glp).exists() else cfg.glp,
                       "sha256": file_sha256(cfg.glp), "training": teacher.meta.get("training") or {}}
        student.meta["student"] = {
            "teacher": teacher_rec, "method": "trajectory distillation on the student's own Euler rollouts",
            "sample": {"steps": cfg.steps, "solver": "euler", "schedule": cfg.schedule}, "grid": grid,
            "teacher_solver": "pc2", "teacher_evaluations": cfg.steps * cfg.teacher_steps,
            "val_rmse": val, "val_n": cfg.val_n,
            "teacher_val_rmse_same_nfe": {f"{s}_{cfg.schedule.replace(':', '')}": v for s, v in baseline.items()},
            "note": "val_rmse: RMS (normalised units) of the student's endpoint against the teacher's pc2 trajectory "
                    f"({cfg.steps * cfg.teacher_steps} evaluations) on held-out noise; teacher_val_rmse_same_nfe: the "
                    f"teacher's own {cfg.steps}-evaluation samplers on the same grid and noise"}
        summary = {"step": step, "total_steps": total, "trajectories": cfg.n, "epochs": cfg.epochs,
                   "batch_size": cfg.batch_size, "lr": cfg.optim.lr, "val_rmse": val, "n_params": student.n_params,
                   "distilled_from": teacher_rec["path"]}
        student.eval()
        student.save_pretrained(out, training=summary)
        run.complete(headline={"val_rmse": val, "steps": cfg.steps, **{f"teacher_{k}_rmse": v for k, v in baseline.items()}},
                     outputs=["model.safetensors", "config.json", "metrics.jsonl"])
        shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
        (out / TARGETS).unlink(missing_ok=True)
        print(f"innards glp distill: {cfg.steps}-step student, held-out RMS error {val:.4g} vs the teacher's "
              + ", ".join(f"{k} {v:.4g}" for k, v in baseline.items()) + f" at {cfg.steps} evaluations -> {out}")
        return out
    finally:
        run.close()


def _targets(cfg: DistillConfig, teacher: GLP, grid: list[float], site: object, out: Path, d: int) -> dict[str, torch.Tensor]:
    """Train and held-out teacher trajectories, computed once and kept in the run folder until it completes."""
    path = out / TARGETS
    if path.is_file():
        t = load_tensors(path, what="teacher trajectories")
        if t["train"].shape == (len(grid), cfg.n, d) and t["val"].shape == (len(grid), cfg.val_n, d):
            return t
    g = torch.Generator().manual_seed(cfg.seed)
    eps = torch.randn(cfg.n, d, generator=g)
    eps_val = torch.randn(cfg.val_n, d, generator=torch.Generator().manual_seed(cfg.seed + 1))
    t = {"train": teacher_trajectories(teacher, eps, grid, cfg.teacher_steps, site, progress=cfg.progress),
         "val": teacher_trajectories(teacher, eps_val, grid, cfg.teacher_steps, site)}
    save_tensors(path, {k: v.contiguous() for k, v in t.items()})
    return t
