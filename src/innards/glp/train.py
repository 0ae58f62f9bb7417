"""Train a GLP by flow matching on an activation store (or a live stream), resumably, with torchrun DDP.

Objective (glp-reference.md §3.1): :meth:`innards.glp.model.GLP.flow_matching_loss`. t is uniform on
[0, 1] by default (``t_dist=grid`` reproduces the reference's {0.001, ..., 1}; ``logit_normal`` is the
SD3 density). AdamW with linear warm-up from 0.01x, cosine to ``final_lr_frac`` x, clipping, optional
EMA, bf16 autocast (``innards.train``).

Data: batches of exactly ``batch_size`` rows. The store's loader reshuffles every epoch and ends an
epoch with a short batch; the trainer completes it with the head of the next epoch's permutation and
carries the rest over, so every step sees a full batch and ``--tokens N`` trains on
ceil(N / batch_size) x batch_size activations (N itself when N is a multiple of the batch).

Determinism: every rank draws t and eps for the whole global batch from one seeded generator on the
training device and keeps its own rows, so the result does not depend on the number of ranks (up to
the order of float reductions), and a resumed run repeats an uninterrupted one exactly on CPU.
Resume states are committed atomically (``innards.train.checkpoint``): a kill at any moment leaves
the previous or the next state, and ``--resume`` continues bit-exactly from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from innards.config import at_least, positive, require, within
from innards.data.harvest import HarvestConfig
from innards.data.sources import Source, StoreSource
from innards.data.stream import StreamExhausted, StreamSource
from innards.errors import InnardsError
from innards.glp import schedule as sch
from innards.glp.gaussian import GaussianFlow
from innards.glp.model import GLP, GLPConfig
from innards.io import remove_orphans
from innards.run import Run, read_run
from innards.runlog import MetricsLog
from innards.runtime import Dist, default_device, init_dist
from innards.train.checkpoint import flatten_optimizer, has_checkpoint, load_checkpoint, save_checkpoint, unflatten_optimizer
from innards.train.ema import EMA
from innards.train.optim import OptimConfig, adamw, clip_grads, lr_factor, set_lr
from innards.train.precision import autocast, resolve_precision

RESUME_DIR = "resume"
# settings that may change on --resume without changing the result
RESUME_FREE = {"stop_after", "wandb_project", "device", "log_every", "save_every", "stream_producer"}
PAPER_LR = 5e-5
PAPER_STEPS = 244_141  # the reference's one pass over 1B activations at batch 4096 (glp-reference.md §3.3)
AUTO_LR_MAX = 1e-3


@dataclass
class GLPOptimConfig(OptimConfig):
    """AdamW and its schedule, with the paper's GLP settings (glp-reference.md §3.3) and a learning rate sized to the run."""

    lr: float | None = None
    """peak learning rate; default auto: the paper's 5e-5 for its 244k-step runs, scaled by sqrt(244141 / steps) for shorter runs, at most 1e-3"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    warmup: float = 0.01
    """fraction of the steps spent warming up linearly from warmup_start x lr"""
    final_lr_frac: float = 0.1
    """learning rate at the end, as a fraction of lr"""
    clip: float = 1.0
    """global gradient-norm clip (0 = off)"""


def auto_lr(steps: int) -> float:
    """The default peak learning rate of a ``steps``-step run: 5e-5 x sqrt(244141 / steps), within [5e-5, 1e-3]."""
    return float(min(AUTO_LR_MAX, max(PAPER_LR, PAPER_LR * math.sqrt(PAPER_STEPS / max(1, steps)))))


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
    """model width (None: 2 x activation width)"""
    d_mlp: int | None = None
    """SwiGLU width (None: 4 x activation width)"""
    sites: list[str] | None = None
    """sites to model (None: every site of the store; several -> a multi-site GLP)"""
    tokens: int | None = None
    """activations to train on, in whole batches: ceil(tokens / batch_size) steps (repeats the store when larger than it)"""
    steps: int | None = None
    """optimiser steps (alternative to --tokens; default one pass over the store)"""
    batch_size: int = 4096
    """activations per optimiser step (global, over all ranks; several sites: batch_size // n_sites tokens x n_sites)"""
    optim: GLPOptimConfig = field(default_factory=GLPOptimConfig)
    """AdamW and its learning-rate schedule"""
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
    """training device (None: cuda if available, else cpu)"""
    val_rows: int = 8192
    """held-out activations (validation documents) for the validation loss (0 = none)"""
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
    """allow replacing a finished or started GLP run in --out"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project"""
    progress: bool = True
    """show a progress bar"""
    stream: bool = False
    """harvest --harvest.site of --harvest.model.name on --harvest.text while training, through a bounded on-disk buffer"""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    """stream mode: what to harvest and how (its tokens, out, overwrite and seed are unused: --tokens/--steps, --out and --seed decide)"""
    buffer_gb: float = 2.0
    """stream mode: disk bound of the buffer (GB)"""
    stats_rows: int = 262144
    """stream mode: activations of the warm-up pass used for the normalisation statistics"""
    stream_producer: Literal["process", "thread"] = "process"
    """stream mode: run the harvester in its own process (default) or in a thread"""

    def __post_init__(self) -> None:
        for name in ("depth", "batch_size", "tokens", "steps", "d_model", "d_mlp", "log_every", "save_every",
                     "checkpoints", "buckets", "stop_after", "val_every", "val_rows", "stats_rows"):
            v = getattr(self, name)
            require(v is None or (isinstance(v, int) and not isinstance(v, bool)),
                    f"--{name.replace('_', '-')} must be a whole number, got {v!r}")
        at_least(self, 1, "depth", "batch_size", "tokens", "steps", "d_model", "d_mlp", "log_every", "save_every",
                 "checkpoints", "buckets", "stop_after", "stats_rows")
        at_least(self, 0, "val_every", "val_rows")
        within(self, "ema", 0.0, 1.0, open_hi=True)
        positive(self, "logit_std", "buffer_gb")
        require(self.d_model is None or self.d_model % 2 == 0, f"--d-model must be even, got {self.d_model}")
        require(self.tokens is None or self.steps is None, "give --tokens or --steps, not both")


# ----- timesteps and checkpoints --------------------------------------------------------------------
def sample_t(n: int, cfg: GLPTrainConfig, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Timesteps for one global batch (t = 0 clean, 1 noise)."""
    if cfg.t_dist == "uniform":
        return torch.rand(n, generator=gen, device=device)
    if cfg.t_dist == "grid":  # the reference's sigma for u ~ U[0, 1), bit for bit
        return sch.reference_train_sigma(torch.rand(n, generator=gen, device=device))
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


# ----- data -----------------------------------------------------------------------------------------
def _rows_and_sites(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, d) -> rows, None; (B, S, d) -> (B*S, d) rows and their site indices."""
    if x.ndim == 2:
        return x, None
    b, s, d = x.shape
    return x.reshape(b * s, d), torch.arange(s).repeat(b)


class FullBatches:
    """Batches of exactly ``size`` rows from a source whose batches may be short (the end of an epoch).

    A short batch is completed with the head of the next batch (the next epoch's permutation); what
    is left of that batch is carried over to the next call. The carry is part of the resume state.
    """

    def __init__(self, source: Source, size: int):
        self.source = source
        self.size = size
        self.carry: torch.Tensor | None = None

    def next(self) -> torch.Tensor:
        """The next batch of exactly ``size`` rows (StreamExhausted when a stream ends first)."""
        parts = [self.carry] if self.carry is not None else []
        have = self.carry.shape[0] if self.carry is not None else 0
        self.carry = None
        while have < self.size:
            b = self.source.next_batch()
            parts.append(b)
            have += b.shape[0]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        if have > self.size:
            self.carry = x[self.size:].clone()
            x = x[:self.size]
        return x

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able position, tensors) for a checkpoint."""
        return self.source.state_dict(), ({"rows": self.carry.contiguous()} if self.carry is not None else {})

    def load(self, position: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state`."""
        self.source.load_state_dict(position)
        self.carry = tensors.get("rows")


class _Objective(nn.Module):
    """The GLP's loss as a module's forward, so DDP and torch.compile wrap the whole computation of a step."""

    def __init__(self, glp: GLP):
        super().__init__()
        self.glp = glp

    def forward(self, acts: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, site: torch.Tensor | None) -> torch.Tensor:
        return self.glp.flow_matching_loss(acts, t, eps, site)


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

    def flush(self, dist: Dist) -> dict[str, float | list[float | None]]:
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

    def dump(self) -> dict:
        return {"sum": self.sum.tolist(), "cnt": self.cnt.tolist(), "last": self.last_loss}

    def load(self, d: dict) -> None:
        self.sum.copy_(torch.tensor(d["sum"], dtype=torch.float64))
        self.cnt.copy_(torch.tensor(d["cnt"], dtype=torch.float64))
        self.last_loss = d.get("last")


class _ValSet:
    """Fixed held-out rows with fixed noise and t stratified over the buckets."""

    def __init__(self, source: Source, cfg: GLPTrainConfig, device: torch.device):
        self.nb = cfg.buckets
        raw = source.val_batch(cfg.val_rows, seed=cfg.seed + 12345)
        self.x: torch.Tensor | None = None
        if raw is None or raw.numel() == 0:
            return
        x, sid = _rows_and_sites(raw)
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
    def evaluate(self, glp: GLP, precision: str) -> tuple[float | None, list[float | None]]:
        """Mean validation loss and its per-bucket means, with the GLP's current weights."""
        if self.x is None:
            return None, []
        was = glp.training
        glp.eval()
        per = []
        for i in range(0, self.x.shape[0], 8192):
            sl = slice(i, i + 8192)
            with autocast(self.x.device, precision):
                per.append(glp.flow_matching_loss(self.x[sl], self.t[sl], self.eps[sl],
                                                  self.sid[sl] if self.sid is not None else None))
        glp.train(was)
        return self._summarise(torch.cat(per))

    def _summarise(self, per: torch.Tensor) -> tuple[float, list[float | None]]:
        p = per.double().to(self.b.device)
        s = torch.zeros(self.nb, dtype=torch.float64, device=p.device).index_add_(0, self.b, p)
        c = torch.zeros(self.nb, dtype=torch.float64, device=p.device).index_add_(0, self.b, torch.ones_like(p))
        return float(p.mean()), [float(a / b) if b > 0 else None for a, b in zip(s.tolist(), c.tolist())]

    def gaussian_loss(self, glp: GLP) -> float | None:
        """The same validation loss for the exact flow of a Gaussian with each site's mean and covariance.

        The no-structure prior: a GLP above it has not yet learned even what two moments say.
        """
        if self.x is None or self.x.shape[0] < 2:
            return None
        sites = [None] if self.sid is None else sorted(set(self.sid.tolist()))
        per = torch.empty(self.x.shape[0], dtype=torch.float64)
        for s in sites:
            m = torch.ones(self.x.shape[0], dtype=torch.bool, device=self.x.device) if s is None else self.sid == s
            x = self.x[m].cpu()
            if x.shape[0] < 2:
                return None
            flow = GaussianFlow.fit(x, glp, s)
            per[m.cpu()] = flow.flow_matching_loss(x, self.t[m].cpu(), self.eps[m].cpu())
        return self._summarise(per)[0]


# ----- the trainer ----------------------------------------------------------------------------------
class GLPTrainer:
    """One GLP training run: model, optimiser, noise generator and data position, with step / evaluate / save / load."""

    def __init__(self, cfg: GLPTrainConfig, source: Source, dist: Dist, out: Path):
        self.cfg, self.source, self.dist, self.out = cfg, source, dist, out
        device = default_device(cfg.device)
        if device.type == "cuda" and dist.world > 1:
            device = torch.device("cuda", dist.local_rank)
        self.device = device
        self.sites = list(source.sites)
        self.batch_tokens = max(1, cfg.batch_size // len(self.sites))
        self.rows_per_step = self.batch_tokens * len(self.sites)
        self.batches = FullBatches(source, self.batch_tokens)
        self.total = self._total_steps()
        self.nonfinite_in_store = 0
        self.stats = self._statistics()
        torch.manual_seed(cfg.seed)  # the default init draws from the global generator
        arch = GLPConfig(d_in=source.width, n_blocks=cfg.depth, d_model=cfg.d_model, d_mlp=cfg.d_mlp, n_sites=len(self.sites))
        self.glp = GLP(arch, {**source.meta(), "stats_by_site": self.stats}).to(device)
        self.precision = resolve_precision(cfg.precision, device, arch.d_model, arch.d_mlp, cfg.batch_size)
        self.precision = dist.from_main(self.precision)  # a timing-based choice must be the same on every rank
        self.optim = dataclasses.replace(cfg.optim, lr=cfg.optim.lr if cfg.optim.lr is not None else auto_lr(self.total))
        self.opt = adamw(self.glp.parameters(), self.optim, device)
        self.ema = EMA(self.glp.parameters(), cfg.ema) if cfg.ema > 0 else None
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(cfg.seed + 1)
        self.acc = _Accumulator(cfg.buckets, device)
        self.step_count = 0
        self.rows_seen = 0
        self.skipped = 0
        self.lr = self.optim.lr
        self.grad_norm = float("nan")
        self.val_loss: float | None = None
        self.summary_at_checkpoint: dict | None = None
        net: nn.Module = _Objective(self.glp)
        if cfg.compile:
            net = torch.compile(net)  # type: ignore[assignment]
        if dist.world > 1:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = net
        self.val = _ValSet(source, cfg, device) if dist.main else None
        self.val_loss_gaussian = self.val.gaussian_loss(self.glp) if self.val is not None else None

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.steps is not None:
            return cfg.steps
        rows = cfg.tokens
        if rows is None:
            n = self.source.train_rows()
            if not n:
                raise InnardsError("the store has no training rows")
            rows = n * len(self.sites)
        return max(1, math.ceil(rows / self.rows_per_step))

    def _statistics(self) -> dict[str, dict]:
        stats = {s: self.source.stats(s) for s in self.sites}
        finite = all(np.isfinite(np.asarray(st["mean"], dtype=np.float64)).all()
                     and np.isfinite(np.asarray(st["var"], dtype=np.float64)).all() for st in stats.values())
        if finite:
            return stats
        scanned = self.source.scan_nonfinite()
        if scanned is None:
            raise InnardsError("the activations' statistics are not finite (NaN or inf activations)")
        self.nonfinite_in_store, clean = scanned
        if self.cfg.nonfinite == "refuse":
            raise InnardsError(f"the store holds {self.nonfinite_in_store} activation rows with NaN or inf; refusing to "
                               "train on them (--nonfinite skip drops them)")
        return clean

    # ----- one optimiser step -----------------------------------------------------------------------
    def step(self) -> None:
        """Take one optimiser step on the next full batch (StreamExhausted when a stream has run dry)."""
        cfg, dist, device = self.cfg, self.dist, self.device
        x, site_ids = _rows_and_sites(self.batches.next())
        n_global = x.shape[0]
        # noise for the whole global batch on every rank: results independent of the world size
        t = sample_t(n_global, cfg, self.gen, device)
        eps = torch.randn(n_global, self.glp.config.d_in, generator=self.gen, device=device)
        x = x.to(device, non_blocking=True)
        ok = torch.isfinite(x).all(-1)
        n_bad = int((~ok).sum())
        if n_bad:
            if cfg.nonfinite == "refuse":
                raise InnardsError(f"{n_bad} activation rows with NaN or inf at step {self.step_count + 1}; refusing to "
                                   "train on them (--nonfinite skip drops them)")
            self.skipped += n_bad
        lo, hi = (dist.rank * n_global) // dist.world, ((dist.rank + 1) * n_global) // dist.world
        keep = ok[lo:hi]
        n_ok = int(ok.sum())
        xs, ts, es = x[lo:hi][keep], t[lo:hi][keep], eps[lo:hi][keep]
        sid = site_ids[lo:hi].to(device)[keep] if site_ids is not None else None
        self.lr = self.optim.lr * lr_factor(self.step_count, self.total, self.optim)
        set_lr(self.opt, self.lr)
        with autocast(device, self.precision):
            per = self.net(xs, ts, es, sid)
        # sum / global count (x world, undone by DDP's averaging) weighs every kept row equally
        loss = per.sum() * (dist.world / max(1, n_ok))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.grad_norm = clip_grads(self.glp.parameters(), self.optim.clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.glp.parameters())
        self.acc.add(per.detach(), ts)
        self.step_count += 1
        self.rows_seen += n_ok

    # ----- validation and summaries -----------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights a GLP folder gets: the EMA's when on, else the current ones."""
        if self.ema is not None:
            return self.ema.weights(self.glp)
        return {k: v.detach().clone() for k, v in self.glp.state_dict().items()}

    def evaluate(self) -> tuple[float | None, list[float | None]]:
        """Validation loss (and per-bucket losses) of the weights a GLP folder would get now."""
        if self.val is None:
            return None, []
        if self.ema is None:
            return self.val.evaluate(self.glp, self.precision)
        backup = {k: v.detach().clone() for k, v in self.glp.state_dict().items()}
        self.glp.load_state_dict(self.weights())
        try:
            return self.val.evaluate(self.glp, self.precision)
        finally:
            self.glp.load_state_dict(backup)

    def summary(self) -> dict:
        """The ``training`` record of a GLP folder written now."""
        n = self.glp.n_params
        return {"step": self.step_count, "total_steps": self.total, "activations": self.rows_seen, "n_params": n,
                "flops": 6.0 * n * self.rows_seen, "train_loss": self.acc.last_loss, "val_loss": self.val_loss,
                "val_loss_gaussian": self.val_loss_gaussian,
                "batch_size": self.rows_per_step, "lr": self.optim.lr, "t_dist": self.cfg.t_dist, "ema": self.cfg.ema,
                "precision": self.precision, "skipped_nonfinite_rows": self.skipped, "world_size": self.dist.world,
                "data": self.source.identity()}

    def save_glp(self, path: Path) -> None:
        """Write the current GLP (EMA weights when on) as a GLP folder; config.json last is its commit."""
        self.glp.save_pretrained(path, training=self.summary(), state_dict=self.weights())

    # ----- resume states ----------------------------------------------------------------------------
    def save(self) -> None:
        """Commit a resume state to OUT/resume atomically (rank 0); the stream may then free consumed shards."""
        if not self.dist.main:
            return
        opt_t, opt_plain = flatten_optimizer(self.opt)
        position, carry = self.batches.state()
        files = {"model.safetensors": self.glp.state_dict(), "optimizer.safetensors": opt_t,
                 "rng.safetensors": {"gen": self.gen.get_state()}}
        if self.ema is not None:
            files["ema.safetensors"] = self.ema.state_dict()
        if carry:
            files["carry.safetensors"] = carry
        save_checkpoint(self.out / RESUME_DIR, self.step_count, files, {
            "rows_seen": self.rows_seen, "skipped": self.skipped, "total_steps": self.total, "precision": self.precision,
            "lr": self.optim.lr, "optimizer": opt_plain, "source": _plain(self.source.identity()), "source_state": position,
            "acc": self.acc.dump(), "nonfinite_in_store": self.nonfinite_in_store, "val_loss": self.val_loss,
            "stats": {s: {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in st.items()} for s, st in self.stats.items()},
        })
        self.source.after_save(position)  # the stream may now delete shards the saved state no longer needs

    def load(self) -> None:
        """Continue exactly from the committed resume state in OUT/resume."""
        state, files = load_checkpoint(self.out / RESUME_DIR)
        if state.get("source") != _plain(self.source.identity()):
            raise InnardsError(f"--resume with a different data source: was {state.get('source')}, now {self.source.identity()}")
        if int(state["total_steps"]) != self.total:
            raise InnardsError(f"--resume with a different length: the run has {state['total_steps']} steps, now {self.total}")
        self.glp.load_state_dict(files["model.safetensors"])
        self.opt.load_state_dict(unflatten_optimizer(files["optimizer.safetensors"], state["optimizer"]))
        if self.ema is not None:
            self.ema.load_state_dict(files["ema.safetensors"])
        self.gen.set_state(files["rng.safetensors"]["gen"])
        self.batches.load(state["source_state"], files.get("carry.safetensors", {}))
        self.precision = state["precision"]
        self.step_count, self.rows_seen, self.skipped = int(state["step"]), int(state["rows_seen"]), int(state["skipped"])
        self.nonfinite_in_store = int(state.get("nonfinite_in_store", 0))
        self.val_loss = state.get("val_loss")
        self.acc.load(state["acc"])


def _plain(obj: object) -> object:
    return json.loads(json.dumps(obj, default=str))


# ----- the command ----------------------------------------------------------------------------------
def train_glp(cfg: GLPTrainConfig) -> Path:
    """Train a GLP; returns the output folder, which holds the final GLP (GLP.from_pretrained(out))."""
    dist = init_dist()
    out = Path(cfg.out)
    _check_inputs(cfg)
    store = None if cfg.stream else _store_source(cfg)  # a bad store fails before anything is written
    rec = read_run(out)
    # a run that died before its first resume state holds nothing to continue: start it again
    restart = (rec is not None and rec.get("kind") == "glp" and rec.get("status") == "running"
               and not has_checkpoint(out / RESUME_DIR))
    run = Run.open(out, "glp", cfg, inputs={"acts": cfg.acts} if cfg.acts else {}, resume=cfg.resume,
                   overwrite=cfg.overwrite or restart, free=RESUME_FREE, main=dist.main)
    try:
        state = dist.from_main(run.state)
        if state == "complete":
            if dist.main:
                run.say_complete()
            return out
        dist.barrier()
        source = store if store is not None else _stream_source(cfg, dist, resume=state == "resume")
        try:
            trainer = GLPTrainer(cfg, source, dist, out)
            if state == "resume":
                trainer.load()
                if dist.main:
                    remove_orphans(out)
                    for d in (out / "checkpoints").glob("step_*"):
                        remove_orphans(d)
            finished = _fit(trainer, resumed=state == "resume")
        finally:
            source.close()
        if finished and dist.main:
            s = trainer.summary()
            run.complete(headline={k: s[k] for k in ("val_loss", "train_loss", "step", "activations", "n_params")
                                   if s[k] is not None}, outputs=["model.safetensors", "config.json", "metrics.jsonl"])
            print(final_line(out, s))
        dist.barrier()
        return out
    finally:
        run.close()


def final_line(out: Path, s: dict) -> str:
    """The one line a finished training prints: where, how much, and the validation loss against the Gaussian's."""
    val = "" if s.get("val_loss") is None else f", validation loss {s['val_loss']:.4g}"
    gauss = "" if s.get("val_loss_gaussian") is None else f" (Gaussian flow {s['val_loss_gaussian']:.4g})"
    return (f"glp train: {out}: {s['n_params']:,} parameters, {s['step']:,} steps on {s['activations']:,} activations, "
            f"train loss {s['train_loss']:.4g}{val}{gauss}")


def _check_inputs(cfg: GLPTrainConfig) -> None:
    """What must be given (the ranges were checked when the config was built)."""
    if cfg.stream:
        h = cfg.harvest
        missing = [n for n, v in (("site", h.site), ("text", h.text)) if not v]
        if missing:
            raise InnardsError(f"--stream needs --harvest.{' --harvest.'.join(missing)}")
        if len(h.site) != 1:
            raise InnardsError(f"--stream models one site, got {len(h.site)}")
        if cfg.acts:
            raise InnardsError("--stream harvests its own activations; drop --acts")
        if cfg.tokens is None and cfg.steps is None:
            raise InnardsError("--stream needs --tokens or --steps (a stream has no natural end)")
        return
    if not cfg.acts:
        raise InnardsError("give --acts DIR (an activation store) or --stream with --harvest.site and --harvest.text")
    p = Path(cfg.acts)
    if not p.exists():
        raise InnardsError(f"activation store not found: {p}")
    if cfg.out and Path(cfg.out).resolve() == p.resolve():
        raise InnardsError(f"--out {cfg.out} is the activation store itself; choose another --out")


def _store_source(cfg: GLPTrainConfig) -> StoreSource:
    src = StoreSource(cfg.acts, cfg.sites, cfg.batch_size, cfg.seed)  # type: ignore[arg-type]
    # several sites: a loader batch of B tokens gives B x n_sites rows
    src.batch_tokens = max(1, cfg.batch_size // len(src.sites))
    return src


def _stream_source(cfg: GLPTrainConfig, dist: Dist, resume: bool) -> StreamSource:
    if dist.world > 1:
        raise InnardsError("--stream trains in one process (the producer is the other); do not launch it with torchrun")
    h = cfg.harvest
    steps = cfg.steps if cfg.steps is not None else -(-cfg.tokens // cfg.batch_size)  # type: ignore[operator]
    root = Path(cfg.out) / "stream"
    spec = {"model": h.model.name, "site": h.site[0], "text": h.text, "context": h.context, "harvest_batch": h.batch_size,
            "dtype": h.store_dtype, "model_dtype": h.model.dtype, "device": h.model.device or cfg.device,
            "shard_rows": h.shard_tokens,
            "bound_bytes": int(cfg.buffer_gb * 1e9), "target_rows": int(steps * cfg.batch_size),  # exactly what is taken
            "stats_rows": cfg.stats_rows, "val_rows": cfg.val_rows, "val_fraction": h.val_fraction, "seed": cfg.seed,
            "nonfinite": cfg.nonfinite, "dir": str(root)}
    return StreamSource(root, spec, cfg.batch_size, resume=resume, producer=cfg.stream_producer)


def _fit(tr: GLPTrainer, resumed: bool) -> bool:
    """The loop: steps, metrics, validation, checkpoints and resume states; True when the run finished."""
    cfg, dist, out = tr.cfg, tr.dist, tr.out
    ckpts = set(checkpoint_steps(tr.total, cfg.checkpoints))
    val_every = cfg.val_every or max(1, min(cfg.log_every, tr.total), tr.total // 20)
    log = MetricsLog(out, wandb_project=cfg.wandb_project, config=_plain(dataclasses.asdict(cfg)),
                     resume_step=tr.step_count if resumed else None, enabled=dist.main)
    tr.source.set_commit_hook(tr.save)  # the stream asks for a resume state before it deletes consumed shards
    bar = tqdm(total=tr.total, initial=tr.step_count, desc="glp train", unit="step", disable=not (cfg.progress and dist.main))
    clock = {"t": time.perf_counter(), "rows": 0}

    def report(force: bool = False) -> None:
        """Metrics, validation, checkpoints and resume states due after this step."""
        step = tr.step_count
        do_log = force or step % cfg.log_every == 0 or step == tr.total
        do_val = force or step % val_every == 0 or step in ckpts or step == tr.total
        if not (do_log or do_val):
            if step % cfg.save_every == 0:
                tr.save()
            return
        dt = time.perf_counter() - clock["t"]
        rec = tr.acc.flush(dist)
        entry = {"lr": tr.lr, "grad_norm": tr.grad_norm, "activations": tr.rows_seen,
                 "flops": 6.0 * tr.glp.n_params * tr.rows_seen, "act_per_s": clock["rows"] / dt if dt > 0 else None,
                 "skipped_nonfinite_rows": tr.skipped, **rec}
        if do_val and tr.val is not None:
            vloss, vb = tr.evaluate()
            if vloss is not None:
                tr.val_loss = vloss
                entry.update(val_loss=vloss, val_loss_t=vb, val_loss_gaussian=tr.val_loss_gaussian)
        if dist.main:
            log.log(step, **entry)
            bar.set_postfix(loss=f"{entry.get('train_loss', float('nan')):.4f}",
                            **({"val": f"{tr.val_loss:.4f}"} if do_val and tr.val_loss is not None else {}))
            if step in ckpts:
                tr.save_glp(out / "checkpoints" / f"step_{step:07d}")
        if step in ckpts or step % cfg.save_every == 0 or step == tr.total:
            tr.save()
        dist.barrier()
        clock["t"], clock["rows"] = time.perf_counter(), 0

    tr.glp.train()
    try:
        while tr.step_count < tr.total:
            before = tr.rows_seen
            try:
                tr.step()
            except StreamExhausted as e:
                if tr.step_count == 0:
                    raise InnardsError(f"{e}: nothing to train on") from None
                print(f"innards: warning: {e}; stopping at step {tr.step_count} of {tr.total}", file=sys.stderr)
                tr.total = tr.step_count
                ckpts.add(tr.step_count)
                report(force=True)
                break
            clock["rows"] += tr.rows_seen - before
            bar.update(1)
            report()
            if cfg.stop_after is not None and cfg.stop_after <= tr.step_count < tr.total:
                tr.save()
                if dist.main:
                    print(f"innards: stopped at step {tr.step_count} of {tr.total}; continue with --resume", file=sys.stderr)
                return False
    finally:
        bar.close()
        log.close()
    if dist.main:
        tr.save_glp(out)
        _warn_if_unconverged(tr)
    return True


def _warn_if_unconverged(tr: GLPTrainer) -> None:
    """Say so when the GLP ends worse than the exact Gaussian flow on the same validation rows and noise."""
    v, g = tr.val_loss, tr.val_loss_gaussian
    if v is not None and g is not None and v > g:
        print(f"innards: warning: validation loss {v:.4g} is above the {g:.4g} of the exact flow of a Gaussian with the "
              f"data's mean and covariance: the GLP is far from converged ({tr.step_count} steps at lr {tr.optim.lr:.3g}); "
              "train longer (--tokens/--steps) or raise --optim.lr", file=sys.stderr)
