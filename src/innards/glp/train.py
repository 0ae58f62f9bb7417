"""Train a GLP by flow matching on an activation store (or a live stream), resumably, with torchrun DDP.

Objective (glp-reference.md §3): x = normalised activation, eps ~ N(0, I), z_t = (1 - t) x + t eps,
target eps - x, MSE over all elements. t is uniform on [0, 1] by default (``t_dist=grid`` reproduces the
reference's {0.001, ..., 1}; ``logit_normal`` is the SD3 density). AdamW, linear warm-up from 0.01x,
cosine to ``final_lr_frac`` x, clipping, optional EMA, bf16 autocast.

Determinism: every rank draws t and eps for the whole global batch from one seeded generator on the
training device and keeps its own rows, so the result does not depend on the number of ranks (up to
the order of float reductions), and a resumed run repeats an uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from innards.config import save_config, to_dict
from innards.errors import InnardsError
from innards.data.sources import Source, StoreSource
from innards.glp.model import GLP, GLPConfig
from innards.glp.stream import StreamExhausted
from innards.io import load_tensors, read_json, save_tensors, write_json
from innards.runlog import MetricsLog
from innards.runtime import Dist, default_device, init_dist

RESUME_DIR = "resume"
# settings that may change on --resume without changing the result
_RESUME_FREE = {"resume", "stop_after", "overwrite", "wandb_project", "progress", "device", "log_every", "save_every",
                "stream_producer"}


@dataclass
class GLPTrainConfig:
    """Configuration of ``innards glp train`` (and of :func:`train_glp`)."""

    acts: str | None = None
    """activation store folder (innards harvest)"""
    out: str = "runs/glp"
    """output folder: final GLP, checkpoints/, metrics.jsonl, resume/"""
    depth: int = 3
    """number of denoiser blocks"""
    d_model: int | None = None
    """model width (default 2 x activation width)"""
    d_mlp: int | None = None
    """SwiGLU width (default 4 x activation width)"""
    sites: list[str] | None = None
    """sites to model (default: every site of the store; several -> a multi-site GLP)"""
    tokens: int | None = None
    """activations to train on (rows; repeats the store when larger than it)"""
    steps: int | None = None
    """optimiser steps (alternative to --tokens; default one pass over the store)"""
    batch_size: int = 4096
    """activations per optimiser step (global, over all ranks)"""
    lr: float = 5e-5
    """peak learning rate of AdamW (paper: 5e-5)"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    warmup: float = 0.01
    """fraction of the steps spent warming up linearly from 0.01 x lr"""
    final_lr_frac: float = 0.1
    """the cosine decay ends at this fraction of lr"""
    clip: float = 1.0
    """global gradient-norm clip (0 = off)"""
    t_dist: Literal["uniform", "logit_normal", "grid"] = "uniform"
    """timestep density: uniform (default), logit_normal, or the reference's discrete grid"""
    logit_mean: float = 0.0
    """mean of the logit-normal timestep density"""
    logit_std: float = 1.0
    """standard deviation of the logit-normal timestep density"""
    ema: float = 0.0
    """EMA decay of the weights (0 = off); checkpoints then hold the EMA weights"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast or fp32; auto = bf16 on CUDA, and on CPU when a quick matmul test finds it faster"""
    compile: bool = False
    """torch.compile the denoiser"""
    seed: int = 0
    """seed of the initialisation, data order, timesteps and noise"""
    device: str | None = None
    """training device (default: cuda if available, else cpu)"""
    val_rows: int = 8192
    """held-out activations (validation documents) for the validation loss"""
    val_every: int = 0
    """steps between validation losses (0 = at every checkpoint and ~20 times per run)"""
    log_every: int = 50
    """steps between metrics lines"""
    checkpoints: int = 10
    """number of log-spaced checkpoints (checkpoints/step_XXXXXXX, GLP format)"""
    save_every: int = 500
    """steps between resume states (also written at every checkpoint)"""
    buckets: int = 10
    """t buckets for the per-timestep train and validation losses"""
    nonfinite: Literal["refuse", "skip"] = "refuse"
    """NaN/inf activations: refuse (default) or skip the rows (counted in metrics)"""
    resume: bool = False
    """continue the run in --out exactly where its resume state left it"""
    stop_after: int | None = None
    """end this invocation after N steps in total, leaving a resume state (time-limited jobs)"""
    overwrite: bool = False
    """allow replacing a finished or started run in --out"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project"""
    progress: bool = True
    # streaming mode: harvest while training, through a bounded on-disk buffer (innards.glp.stream)
    stream: bool = False
    """harvest --model/--site/--text while training, through a bounded buffer"""
    model: str | None = None
    site: str | None = None
    text: str | None = None
    buffer_gb: float = 2.0
    """disk bound of the stream buffer (GB)"""
    shard_rows: int = 65536
    """activations per stream shard"""
    stats_rows: int = 262144
    """stream mode: activations of the warm-up pass used for the normalisation statistics"""
    val_fraction: float = 0.05
    """stream mode: fraction of documents held out for validation (hash of the document id)"""
    context: int | None = None
    """stream mode: tokens per sequence (default: the model's, at most 1024)"""
    harvest_batch: int = 16
    """stream mode: sequences per forward pass of the model"""
    model_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    """stream mode: dtype the model runs in"""
    stream_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """stream mode: dtype of the activations in the buffer"""
    stream_producer: Literal["process", "thread"] = "process"
    """stream mode: run the harvester in its own process (default) or in a thread"""


# ----- schedules and noise --------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: float, final: float) -> float:
    """Linear warm-up 0.01 -> 1 over ``warmup`` x total steps, then cosine 1 -> ``final``."""
    w = max(1, int(round(warmup * total))) if warmup > 0 else 0
    if step < w:
        return 0.01 + 0.99 * step / w
    rest = max(1, total - w)
    p = min(1.0, (step - w) / rest)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))


def sample_t(n: int, cfg: GLPTrainConfig, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Timesteps for one global batch (t = 0 clean, 1 noise)."""
    if cfg.t_dist == "uniform":
        return torch.rand(n, generator=gen, device=device)
    if cfg.t_dist == "grid":
        i = torch.randint(0, 1000, (n,), generator=gen, device=device)
        return (1000 - i).float() / 1000.0
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=gen, device=device))


def checkpoint_steps(total: int, n: int) -> list[int]:
    """Log-spaced steps (1-based counts of completed steps) from ~total/1000 to total."""
    if total <= 0:
        return []
    if n <= 1:
        return [total]
    first = max(1.0, total / 1000.0)
    pts = np.unique(np.round(np.geomspace(first, total, n)).astype(int))
    return sorted({int(p) for p in pts if p >= 1} | {total})


_PRECISION_CACHE: dict[tuple, str] = {}


def resolve_precision(name: str, device: torch.device, d_model: int, d_mlp: int, batch: int) -> str:
    """'bf16' or 'fp32'; 'auto' measures a matmul of the model's shape on CPU and keeps the faster."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu":
        return "fp32"
    key = (d_model, d_mlp, min(batch, 2048))
    if key not in _PRECISION_CACHE:
        times = {}
        for dt in (torch.float32, torch.bfloat16):
            a = torch.randn(key[2], d_model, dtype=dt)
            b = torch.randn(d_model, d_mlp, dtype=dt)
            a @ b
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            times[dt] = time.perf_counter() - t0
        _PRECISION_CACHE[key] = "bf16" if times[torch.bfloat16] * 1.3 < times[torch.float32] else "fp32"
    return _PRECISION_CACHE[key]


# ----- resume state ---------------------------------------------------------------------------------
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, plain = {}, {"param_groups": sd["param_groups"], "state": {}}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{i}.{k}"] = v
            else:
                plain["state"].setdefault(str(i), {})[k] = v
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    for i, st in plain.get("state", {}).items():
        state.setdefault(int(i), {}).update(st)
    return {"state": state, "param_groups": plain["param_groups"]}


def _save_resume(out: Path, files: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """Write resume/ as a whole: fill a temporary folder, then swap it in by renames."""
    final = out / RESUME_DIR
    tmp = out / f".{RESUME_DIR}.tmp"
    old = out / f".{RESUME_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = dict(state, files={})
    for name, tensors in files.items():
        state["files"][name] = save_tensors(tmp / name, tensors)
    write_json(tmp / "state.json", state)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_resume(out: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    d = out / RESUME_DIR
    if not (d / "state.json").is_file() and (out / f".{RESUME_DIR}.old" / "state.json").is_file():
        d = out / f".{RESUME_DIR}.old"  # interrupted between the two renames of _save_resume
    if not (d / "state.json").is_file():
        raise InnardsError(f"nothing to resume: {out} has no {RESUME_DIR}/state.json")
    state = read_json(d / "state.json", what="resume state")
    files = {name: load_tensors(d / name, sha256=digest, what="resume state file")
             for name, digest in state.get("files", {}).items()}
    return state, files


def _settings(cfg: GLPTrainConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in _RESUME_FREE}


def _check_same_settings(saved: dict[str, Any], cfg: GLPTrainConfig) -> None:
    now = _settings(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        k = diff[0]
        raise InnardsError(f"--resume with changed settings: {k} was {saved.get(k)!r}, now {now.get(k)!r}"
                           + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))


# ----- the trainer ----------------------------------------------------------------------------------
def train_glp(cfg: GLPTrainConfig) -> Path:
    """Train a GLP; returns the output folder, which holds the final GLP (GLP.from_pretrained(out))."""
    dist = init_dist()
    out = Path(cfg.out)
    _check_config(cfg)
    if cfg.resume and not (out / RESUME_DIR / "state.json").is_file() and not (out / f".{RESUME_DIR}.old").is_dir():
        raise InnardsError(f"nothing to resume: {out} has no {RESUME_DIR}/state.json")
    if not cfg.resume and not cfg.overwrite and ((out / RESUME_DIR).exists() or (out / "config.json").exists()):
        raise InnardsError(f"{out} already holds a GLP run; use --resume to continue it, --overwrite to replace it, or another --out")
    if dist.main and not cfg.resume and cfg.overwrite:
        for p in (RESUME_DIR, "checkpoints", "config.json", "model.safetensors"):
            q = out / p
            shutil.rmtree(q) if q.is_dir() else q.unlink(missing_ok=True)
    dist.barrier()
    source = _make_source(cfg, dist)
    try:
        return _train(cfg, source, dist, out)
    finally:
        source.close()


def _check_config(cfg: GLPTrainConfig) -> None:
    if cfg.stream:
        missing = [n for n in ("model", "site", "text") if not getattr(cfg, n)]
        if missing:
            raise InnardsError(f"--stream needs --{' --'.join(missing)}")
        if cfg.acts:
            raise InnardsError("--stream harvests its own activations; drop --acts")
        if cfg.tokens is None and cfg.steps is None:
            raise InnardsError("--stream needs --tokens or --steps (a stream has no natural end)")
    elif not cfg.acts:
        raise InnardsError("give --acts DIR (an activation store) or --stream with --model/--site/--text")
    if cfg.tokens is not None and cfg.steps is not None:
        raise InnardsError("give --tokens or --steps, not both")
    for name in ("batch_size", "depth"):
        if getattr(cfg, name) < 1:
            raise InnardsError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.lr <= 0:
        raise InnardsError("--lr must be positive")
    if not 0.0 <= cfg.ema < 1.0:
        raise InnardsError("--ema must be in [0, 1)")
    if cfg.buckets < 1:
        raise InnardsError("--buckets must be at least 1")


def _make_source(cfg: GLPTrainConfig, dist: Dist) -> Source:
    if cfg.stream:
        if dist.world > 1:
            raise InnardsError("--stream trains in one process (the producer is the other); do not launch it with torchrun")
        from innards.glp.stream import StreamSource

        return StreamSource.from_config(cfg)
    p = Path(cfg.acts)
    if not p.exists():
        raise InnardsError(f"activation store not found: {p}")
    src = StoreSource(p, cfg.sites, cfg.batch_size, cfg.seed)
    # several sites: a loader batch of B tokens gives B x n_sites rows
    src.batch_tokens = max(1, cfg.batch_size // len(src.sites))
    return src


def _total_steps(cfg: GLPTrainConfig, rows_per_step: int, source: Source) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.tokens is not None:
        return max(1, math.ceil(cfg.tokens / rows_per_step))
    n = source.train_rows()
    if not n:
        raise InnardsError("the store has no training rows")
    return max(1, math.ceil(n * len(source.sites) / rows_per_step))


def _build_model(cfg: GLPTrainConfig, source: Source, stats: dict[str, dict[str, Any]]) -> GLP:
    arch = GLPConfig(d_in=source.width, n_blocks=cfg.depth, d_model=cfg.d_model, d_mlp=cfg.d_mlp, n_sites=len(source.sites))
    torch.manual_seed(cfg.seed)  # the default init draws from the global generator
    return GLP(arch, {**source.meta(), "stats_by_site": stats})


def _rows_and_sites(x: torch.Tensor, n_sites: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, d) -> rows, None; (B, S, d) -> (B*S, d) rows and their site indices."""
    if x.ndim == 2:
        return x, None
    b, s, d = x.shape
    return x.reshape(b * s, d), torch.arange(s).repeat(b)


def _train(cfg: GLPTrainConfig, source: Source, dist: Dist, out: Path) -> Path:
    device = default_device(cfg.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    resume_state, resume_files = (None, None)
    if cfg.resume:
        resume_state, resume_files = _load_resume(out)
        _check_same_settings(resume_state["settings"], cfg)
        if resume_state.get("source") != json.loads(json.dumps(source.identity(), default=str)):
            raise InnardsError(f"--resume with a different data source: was {resume_state.get('source')}, now {source.identity()}")

    # statistics and non-finite rows
    nonfinite_total = 0
    if resume_state is not None:
        stats = {s: {k: (torch.tensor(v, dtype=torch.float64) if k in ("mean", "var") else v) for k, v in st.items()}
                 for s, st in resume_state["stats"].items()}
        nonfinite_total = int(resume_state.get("nonfinite_in_store", 0))
    else:
        stats = {s: source.stats(s) for s in source.sites}
        if any(not np.isfinite(np.asarray(st["mean"], dtype=np.float64)).all()
               or not np.isfinite(np.asarray(st["var"], dtype=np.float64)).all() for st in stats.values()):
            if not hasattr(source, "scan_nonfinite"):
                raise InnardsError("the activations' statistics are not finite (NaN or inf activations)")
            nonfinite_total, clean = source.scan_nonfinite()  # type: ignore[attr-defined]
            if cfg.nonfinite == "refuse":
                raise InnardsError(f"the store holds {nonfinite_total} activation rows with NaN or inf; refusing to train "
                                   "on them (--nonfinite skip drops them)")
            stats = clean

    glp = _build_model(cfg, source, stats).to(device)
    n_params = glp.n_params
    rows_per_step = cfg.batch_size
    total = _total_steps(cfg, rows_per_step, source)
    precision = resume_state["precision"] if resume_state else resolve_precision(
        cfg.precision, device, glp.config.d_model, glp.config.d_mlp, cfg.batch_size)
    if dist.world > 1:  # a timing-based choice must be the same on every rank
        box = [precision]
        torch.distributed.broadcast_object_list(box, src=0)
        precision = box[0]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    opt = torch.optim.AdamW(glp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    ema = [p.detach().clone() for p in glp.parameters()] if cfg.ema > 0 else None
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed + 1)
    step = 0
    rows_seen = 0
    skipped = 0
    acc = _Accumulator(cfg.buckets, device)
    if resume_state is not None:
        glp.load_state_dict(resume_files["model.safetensors"])
        opt.load_state_dict(_unflatten_optimizer(resume_files["optimizer.safetensors"], resume_state["optimizer"]))
        if ema is not None:
            e = resume_files["ema.safetensors"]
            for i, p in enumerate(ema):
                p.copy_(e[str(i)])
        gen.set_state(resume_files["rng.safetensors"]["gen"])
        source.load_state_dict(resume_state["source_state"])
        step, rows_seen, skipped = int(resume_state["step"]), int(resume_state["rows_seen"]), int(resume_state["skipped"])
        acc.load(resume_state["acc"])

    model: Any = glp
    if cfg.compile:
        model = torch.compile(glp)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    ckpts = set(checkpoint_steps(total, cfg.checkpoints))
    val_every = cfg.val_every or max(1, min(cfg.log_every, total), total // 20)
    log = MetricsLog(out, wandb_project=cfg.wandb_project, config=to_dict(cfg),
                     resume_step=step if resume_state is not None else None, enabled=dist.main)
    if dist.main:
        save_config(cfg, out)
    val = _ValSet(source, cfg, device) if dist.main else None

    def snapshot_state() -> dict[str, torch.Tensor]:
        if ema is None:
            return {k: v.detach().clone() for k, v in glp.state_dict().items()}
        names = [n for n, _ in glp.named_parameters()]
        sd = {k: v.detach().clone() for k, v in glp.state_dict().items()}
        sd.update({n: e.detach().clone() for n, e in zip(names, ema)})
        return sd

    def save_resume() -> None:
        if not dist.main:
            return
        opt_t, opt_plain = _flatten_optimizer(opt)
        files = {"model.safetensors": glp.state_dict(), "optimizer.safetensors": opt_t,
                 "rng.safetensors": {"gen": gen.get_state()}}
        if ema is not None:
            files["ema.safetensors"] = {str(i): p for i, p in enumerate(ema)}
        _save_resume(out, files, {
            "step": step, "rows_seen": rows_seen, "skipped": skipped, "total_steps": total,
            "settings": _settings(cfg), "precision": precision, "optimizer": opt_plain,
            "source": json.loads(json.dumps(source.identity(), default=str)),
            "source_state": source.state_dict(), "acc": acc.dump(), "nonfinite_in_store": nonfinite_total,
            "stats": {s: {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in st.items()} for s, st in stats.items()},
        })
        if hasattr(source, "after_save"):  # the stream may now delete shards the saved state no longer needs
            source.after_save(source.state_dict())  # type: ignore[attr-defined]

    if hasattr(source, "set_commit_hook"):
        # the stream asks for a resume state before it deletes consumed shards (see stream.py)
        source.set_commit_hook(save_resume)  # type: ignore[attr-defined]

    def summary(val_loss: float | None, train_loss: float | None) -> dict[str, Any]:
        return {"step": step, "total_steps": total, "activations": rows_seen, "n_params": n_params,
                "flops": 6.0 * n_params * rows_seen, "train_loss": train_loss, "val_loss": val_loss,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "t_dist": cfg.t_dist, "ema": cfg.ema, "precision": precision,
                "skipped_nonfinite_rows": skipped, "world_size": dist.world, "data": source.identity()}

    bar = tqdm(total=total, initial=step, desc="glp train", unit="step", disable=not (cfg.progress and dist.main))
    last: dict[str, Any] = {"train": acc.last_loss, "summary": None, "lr": cfg.lr, "gnorm": float("nan")}
    clock = {"t": time.perf_counter(), "rows": 0}

    def report(force: bool = False) -> None:
        """Metrics, validation, checkpoints and resume states due after ``step``."""
        do_log = force or step % cfg.log_every == 0 or step == total
        do_val = force or step % val_every == 0 or step in ckpts or step == total
        if not (do_log or do_val):
            if step % cfg.save_every == 0:
                save_resume()
            return
        dt = time.perf_counter() - clock["t"]
        rec = acc.flush(dist)
        last["train"] = rec.get("train_loss", last["train"])
        entry: dict[str, Any] = {"lr": last["lr"], "grad_norm": last["gnorm"], "activations": rows_seen,
                                 "flops": 6.0 * n_params * rows_seen, "act_per_s": clock["rows"] / dt if dt > 0 else None,
                                 "skipped_nonfinite_rows": skipped, **rec}
        vloss = None
        if do_val and val is not None:
            vloss, vb = val.evaluate(glp, amp, snapshot_state() if ema is not None else None)
            if vloss is not None:
                entry.update(val_loss=vloss, val_loss_t=vb)
        if dist.main:
            log.log(step, **entry)
            bar.set_postfix(loss=f"{entry.get('train_loss', float('nan')):.4f}",
                            **({"val": f"{vloss:.4f}"} if vloss is not None else {}))
        if step in ckpts and dist.main:
            last["summary"] = summary(vloss, last["train"])
            _save_glp(glp, out / "checkpoints" / f"step_{step:07d}", snapshot_state(), last["summary"])
        if step in ckpts or step % cfg.save_every == 0 or step == total:
            save_resume()
        dist.barrier()
        clock["t"], clock["rows"] = time.perf_counter(), 0

    glp.train()
    while step < total:
        try:
            raw = source.next_batch()
        except StreamExhausted as e:
            if step == 0:
                raise InnardsError(f"{e}: nothing to train on") from None
            print(f"innards: warning: {e}; stopping at step {step} of {total}", file=sys.stderr)
            total = step
            ckpts.add(step)
            report(force=True)
            break
        x, site_ids = _rows_and_sites(raw, len(source.sites))
        n_global = x.shape[0]
        # noise for the whole global batch on every rank: results independent of the world size
        t = sample_t(n_global, cfg, gen, device)
        eps = torch.randn(n_global, glp.config.d_in, generator=gen, device=device)
        x = x.to(device, non_blocking=True)
        ok = torch.isfinite(x).all(-1)
        n_bad = int((~ok).sum())
        if n_bad:
            if cfg.nonfinite == "refuse":
                raise InnardsError(f"{n_bad} activation rows with NaN or inf at step {step + 1}; refusing to train on them "
                                   "(--nonfinite skip drops them)")
            skipped += n_bad
        lo, hi = (dist.rank * n_global) // dist.world, ((dist.rank + 1) * n_global) // dist.world
        keep = ok[lo:hi]
        n_ok_global = int(ok.sum())
        xs, ts, es = x[lo:hi][keep], t[lo:hi][keep], eps[lo:hi][keep]
        sid = site_ids[lo:hi].to(device)[keep] if site_ids is not None else None
        lr = cfg.lr * lr_factor(step, total, cfg.warmup, cfg.final_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        xn = glp.normalize(xs, sid)
        z = (1.0 - ts[:, None]) * xn + ts[:, None] * es
        with amp:
            v = model(z, ts, sid)
        per = (v.float() - (es - xn)).pow(2).mean(-1)
        # sum / global count (x world, undone by DDP's averaging) weighs every kept row equally
        loss = per.sum() * (dist.world / max(1, n_ok_global))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(glp.parameters(), cfg.clip) if cfg.clip > 0 else torch.tensor(float("nan"))
        opt.step()
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in glp.parameters()], 1.0 - cfg.ema)
        acc.add(per.detach(), ts)
        step += 1
        rows_seen += n_ok_global
        clock["rows"] += n_ok_global
        last["lr"], last["gnorm"] = lr, float(gnorm)
        bar.update(1)
        report()
        if cfg.stop_after is not None and step >= cfg.stop_after and step < total:
            save_resume()
            bar.close()
            if dist.main:
                print(f"innards: stopped at step {step} of {total}; continue with --resume", file=sys.stderr)
            log.close()
            dist.barrier()
            return out
    bar.close()
    if dist.main:
        _save_glp(glp, out, snapshot_state(), last["summary"] or summary(None, last["train"]))
    log.close()
    dist.barrier()
    return out


def _save_glp(glp: GLP, path: Path, state: dict[str, torch.Tensor], training: dict[str, Any]) -> None:
    glp.save_pretrained(path, training=training, state_dict=state)


class _Accumulator:
    """Per-t-bucket sums of the per-sample training loss between two log lines."""

    def __init__(self, buckets: int, device: torch.device):
        self.nb = buckets
        self.sum = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.cnt = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.last_loss: float | None = None

    def add(self, per: torch.Tensor, t: torch.Tensor) -> None:
        b = (t * self.nb).long().clamp_(0, self.nb - 1)
        self.sum.index_add_(0, b, per.double())
        self.cnt.index_add_(0, b, torch.ones_like(per, dtype=torch.float64))

    def flush(self, dist: Dist) -> dict[str, Any]:
        s, c = self.sum.clone(), self.cnt.clone()
        if dist.world > 1:
            torch.distributed.all_reduce(s)
            torch.distributed.all_reduce(c)
        self.sum.zero_()
        self.cnt.zero_()
        if c.sum() == 0:
            return {}
        loss = float(s.sum() / c.sum())
        self.last_loss = loss
        per_b = [float(a / b) if b > 0 else None for a, b in zip(s.tolist(), c.tolist())]
        return {"train_loss": loss, "train_loss_t": per_b}

    def dump(self) -> dict[str, Any]:
        return {"sum": self.sum.tolist(), "cnt": self.cnt.tolist(), "last": self.last_loss}

    def load(self, d: dict[str, Any]) -> None:
        self.sum.copy_(torch.tensor(d["sum"], dtype=torch.float64))
        self.cnt.copy_(torch.tensor(d["cnt"], dtype=torch.float64))
        self.last_loss = d.get("last")


class _ValSet:
    """Fixed held-out rows with fixed noise and t stratified over the buckets."""

    def __init__(self, source: Source, cfg: GLPTrainConfig, device: torch.device):
        self.nb = cfg.buckets
        raw = source.val_batch(cfg.val_rows, seed=cfg.seed + 12345)
        self.x = None
        if raw is None or raw.numel() == 0:
            return
        x, sid = _rows_and_sites(raw, len(source.sites))
        ok = torch.isfinite(x).all(-1)
        x = x[ok]
        sid = sid[ok] if sid is not None else None
        g = torch.Generator(device="cpu")
        g.manual_seed(cfg.seed + 999)
        n = x.shape[0]
        b = torch.arange(n) % self.nb
        self.t = ((b + torch.rand(n, generator=g)) / self.nb).to(device)
        self.eps = torch.randn(n, x.shape[1], generator=g).to(device)
        self.b = b.to(device)
        self.x = x.to(device)
        self.sid = sid.to(device) if sid is not None else None

    @torch.no_grad()
    def evaluate(self, glp: GLP, amp: Any, state: dict[str, torch.Tensor] | None = None) -> tuple[float | None, list]:
        if self.x is None:
            return None, []
        backup = None
        if state is not None:
            backup = {k: v.detach().clone() for k, v in glp.state_dict().items()}
            glp.load_state_dict(state)
        was = glp.training
        glp.eval()
        per = []
        for i in range(0, self.x.shape[0], 8192):
            sl = slice(i, i + 8192)
            sid = self.sid[sl] if self.sid is not None else None
            xn = glp.normalize(self.x[sl], sid)
            t = self.t[sl]
            z = (1.0 - t[:, None]) * xn + t[:, None] * self.eps[sl]
            with amp:
                v = glp(z, t, sid)
            per.append((v.float() - (self.eps[sl] - xn)).pow(2).mean(-1))
        glp.train(was)
        if backup is not None:
            glp.load_state_dict(backup)
        p = torch.cat(per).double()
        s = torch.zeros(self.nb, dtype=torch.float64, device=p.device).index_add_(0, self.b, p)
        c = torch.zeros(self.nb, dtype=torch.float64, device=p.device).index_add_(0, self.b, torch.ones_like(p))
        return float(p.mean()), [float(a / b) if b > 0 else None for a, b in zip(s.tolist(), c.tolist())]


def config_fields() -> list[str]:
    """Names of GLPTrainConfig's fields (for CLI help and tests)."""
    return [f.name for f in dataclasses.fields(GLPTrainConfig)]
