"""Benchmark: GLP training throughput and MFU, memory, and sample quality against solver evaluations.

Throughput is measured on the real trainer (``train_glp``) reading a store on disk, in a fresh child
process so that its peak RSS is the trainer's own; the child then times bf16 (or fp32, whichever the
trainer used) matrix products of the model's own shapes and keeps the fastest as the peak, so MFU =
6 N (activations/s) / peak compares like with like on the same machine in the same minute. The
first logged interval (warm-up, compilation) is excluded from the throughput.

``fd_by_nfe``: a GLP (``--glp``, or one trained here for ``fd_train_steps``) samples ``fd_n``
activations from the same noise with Euler, Heun and Adams-Bashforth 2 on a uniform time grid and
on a shifted grid (denser near t = 1, where few-step samplers lose the most) at each number of
network evaluations (below 100 only for the shifted grid and AB2); the Fréchet distance to the
store's held-out rows is reported with the train-vs-held-out floor for scale, and so is the FD to
the 1000-step Euler samples of the same noise, which isolates the solver's error from the model's.
``closest_at_most_8_nfe`` is the entry at <= 8 evaluations whose FD is closest to the many-step one.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from innards.bench.memory import peak_rss_mb
from innards.config import at_least, positive
from innards.data.harvest import HarvestConfig, harvest
from innards.data.shared import shared_data_dir
from innards.data.store import ActivationStore
from innards.errors import InnardsError
from innards.glp import schedule as sch
from innards.glp.fd import frechet_distance
from innards.glp.model import GLP
from innards.glp.train import GLPOptimConfig, GLPTrainConfig, train_glp
from innards.models.load import load_model
from innards.models.sites import n_layers
from innards.runlog import read_metrics


@dataclass
class BenchGLPConfig:
    """What to benchmark."""

    acts: str | None = None
    """activation store to train from (default: harvest --tokens rows of --model's middle layer)"""
    glp: str | None = None
    """GLP folder to sample from for fd_by_nfe (default: train one on the store)"""
    model: str = "demo"
    """model to harvest from when --acts is not given"""
    site: str | None = None
    """site to harvest (default: resid_post of the middle block)"""
    text: str | None = None
    """text to harvest (default: ../shared/data children's books when present, else random tokens)"""
    tokens: int = 400_000
    """rows to harvest when --acts is not given"""
    depth: int = 3
    """GLP depth"""
    batch_size: int = 4096
    """activations per optimiser step"""
    steps: int = 40
    """optimiser steps timed for the throughput"""
    log_every: int = 5
    """steps per timed interval (the first interval is warm-up and not counted)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast or fp32 (see innards glp train)"""
    compile: bool = False
    """torch.compile the denoiser"""
    threads: int | None = None
    """torch threads in the timed child (default: torch's default)"""
    fd_n: int = 2048
    """samples (and held-out rows) per Fréchet distance"""
    fd_train_steps: int = 1500
    """steps of the GLP trained for fd_by_nfe when --glp is not given"""
    fd_lr: float = 1e-3
    """peak learning rate of the GLP trained for fd_by_nfe"""
    nfe: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 1000])
    """numbers of network evaluations for fd_by_nfe"""
    schedules: list[str] = field(default_factory=lambda: ["uniform", "shift"])
    """time grids for fd_by_nfe: uniform, shift"""
    out: str | None = None
    """work folder (default: a temporary folder, removed afterwards)"""
    seed: int = 0
    """seed of the harvest, the training and the samples"""

    def __post_init__(self) -> None:
        at_least(self, 1, "tokens", "depth", "batch_size", "steps", "log_every", "threads", "fd_n", "fd_train_steps")
        positive(self, "fd_lr")
        if any(n < 1 for n in self.nfe):
            raise InnardsError(f"--nfe must list positive numbers of evaluations, got {self.nfe}")


def _rss_mb() -> dict[str, float]:
    """Resident memory now: total, anonymous (heap, tensors) and file-backed (memory-mapped files), MB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def mapped_rss_mb(prefix: str) -> float:
    """Resident MB of this process's memory maps of files under ``prefix`` (the store's memmaps)."""
    total_kb, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if not head:
                    continue
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    inside = len(head) >= 6 and head[5].startswith(prefix)
                elif inside and head[0] == "Rss:":
                    total_kb += int(head[1])
    except OSError:
        return float("nan")
    return total_kb / 1024


def matmul_peak(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """Fastest FLOP/s over plain (m, k) @ (k, n) products of the given shapes and dtype."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if dt > seconds and reps >= 3:
                break
        best = max(best, 2.0 * m * k * n * reps / dt)
    return best


def model_shapes(d_in: int, d_model: int, d_mlp: int, n_blocks: int, batch: int) -> list[tuple[int, int, int]]:
    """The GEMM shapes of one training step (forward, input grads and weight grads)."""
    fwd = [(batch, d_in, d_model), (batch, d_model, 2 * d_mlp), (batch, d_model, n_blocks * d_mlp), (batch, d_mlp, d_model)]
    out = []
    for m, k, n in fwd:
        out += [(m, k, n), (m, n, k), (k, m, n)]
    return out


def _child_train(args: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: train, sample RSS, then measure the matmul peak of the same shapes."""
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    samples: list[dict[str, float]] = []
    stop = threading.Event()

    prefix = str(Path(args["train"]["acts"]).resolve())
    store_rss = [0.0]

    def watch() -> None:
        i = 0
        while not stop.is_set():
            samples.append(_rss_mb())
            if i % 10 == 0:  # smaps is slow to read
                store_rss[0] = max(store_rss[0], mapped_rss_mb(prefix))
            i += 1
            time.sleep(0.1)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    cfg = GLPTrainConfig(**args["train"])
    out = train_glp(cfg)
    stop.set()
    th.join()
    recs = [r for r in read_metrics(out) if r.get("act_per_s")]
    timed = recs[1:] if len(recs) > 1 else recs
    # every interval holds the same rows (log_every x batch), so the harmonic mean is the overall rate
    rate = len(timed) / sum(1.0 / r["act_per_s"] for r in timed) if timed else float("nan")
    glp = GLP.from_pretrained(out)
    c = glp.config
    dtype = torch.bfloat16 if glp.meta["training"]["precision"] == "bf16" else torch.float32
    peak = matmul_peak(model_shapes(c.d_in, c.d_model, c.d_mlp, c.n_blocks, cfg.batch_size), dtype, torch.device("cpu")
                       if not torch.cuda.is_available() else torch.device("cuda"))
    n = glp.n_params
    flops = 6.0 * n * rate
    k = max(1, len(samples) // 10)

    def avg(part: list[dict[str, float]], key: str) -> float | None:
        vals = [x[key] for x in part if key in x]
        return sum(vals) / len(vals) if vals else None

    return {"train_activations_per_s": rate, "train_flops_per_s": flops, "matmul_peak_flops_per_s": peak,
            "mfu": flops / peak if peak else None, "precision": glp.meta["training"]["precision"], "n_params": n,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_anon_mb": max((x.get("RssAnon", 0.0) for x in samples), default=None),
            "peak_rss_file_mb": max((x.get("RssFile", 0.0) for x in samples), default=None),
            "peak_store_pages_rss_mb": store_rss[0],
            "rss_mb_early": avg(samples[k:2 * k], "VmRSS"), "rss_mb_late": avg(samples[-k:], "VmRSS"),
            "rss_anon_mb_early": avg(samples[k:2 * k], "RssAnon"), "rss_anon_mb_late": avg(samples[-k:], "RssAnon"),
            "threads": torch.get_num_threads(), "timed_steps": len(timed) * cfg.log_every}


def _default_text(tokens: int, context: int = 256) -> str:
    data = shared_data_dir()
    if data is not None and (data / "corpus" / "children-pd").is_dir():
        return str(data / "corpus" / "children-pd" / "children-pd-00.txt.gz")
    return f"random:{math.ceil(tokens / (context - 1)) + 1}"


def _store(cfg: BenchGLPConfig, work: Path) -> Path:
    if cfg.acts:
        return Path(cfg.acts)
    site = cfg.site
    model = load_model(cfg.model)
    if site is None:
        site = f"blocks.{n_layers(model) // 2 - 1}.resid_post"
    out = work / "store"
    harvest(HarvestConfig(model=cfg.model, site=[site], text=cfg.text or _default_text(cfg.tokens), tokens=cfg.tokens,
                          out=str(out), store_dtype="bf16", val_fraction=0.05, seed=cfg.seed), model=model)
    return out


def fd_by_nfe(glp: GLP, real: torch.Tensor, nfes: list[int], schedules: list[str], seed: int = 0,
              solvers: tuple[str, ...] = ("euler", "heun", "ab2")) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """FD of samples vs real rows, and vs the many-step Euler samples of the same noise (solver error alone).

    Keys are ``solver`` (uniform grid) or ``solver_schedule``; every run starts from the same noise.
    Many-step runs (>= 100 evaluations) use the uniform grid and Euler or Heun only: they are the reference.
    """
    top = max(nfes)
    ref = glp.sample(real.shape[0], steps=top, solver="euler", seed=seed)
    vs_real: dict[str, dict[int, float]] = {}
    vs_ref: dict[str, dict[int, float]] = {}
    for schedule in schedules:
        for solver in solvers:
            key = solver if schedule == "uniform" else f"{solver}_{schedule}"
            vs_real[key], vs_ref[key] = {}, {}
            for nfe in nfes:
                if nfe >= 100 and (schedule != "uniform" or solver == "ab2"):
                    continue
                if solver == "euler" and nfe == top and schedule == "uniform":
                    x = ref
                else:
                    x = glp.sample(real.shape[0], steps=sch.steps_for_nfe(nfe, solver), solver=solver, seed=seed,
                                   schedule=schedule)
                vs_real[key][nfe] = frechet_distance(x, real)
                vs_ref[key][nfe] = frechet_distance(x, ref)
    return vs_real, vs_ref


def bench_glp(cfg: BenchGLPConfig) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    if cfg.steps < 2 * cfg.log_every:
        raise InnardsError(f"--steps must be at least {2 * cfg.log_every} (the first {cfg.log_every} are warm-up)")
    work = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="innards-bench-glp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store_dir = _store(cfg, work)
        store = ActivationStore(store_dir)
        t0 = time.perf_counter()
        train = dict(acts=str(store_dir), out=str(work / "throughput"), depth=cfg.depth, batch_size=cfg.batch_size,
                     steps=cfg.steps, log_every=cfg.log_every, val_every=10**9, checkpoints=1, save_every=10**9,
                     precision=cfg.precision, compile=cfg.compile, seed=cfg.seed, val_rows=0, overwrite=True,
                     progress=False)
        spec = work / "child.json"
        spec.write_text(json.dumps({"train": train, "threads": cfg.threads}))
        r = subprocess.run([sys.executable, "-m", "innards.bench.glp", "--child", str(spec)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"benchmark child failed:\n{r.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        result["throughput_wall_s"] = time.perf_counter() - t0
        result["store_rows"] = len(store)
        result["width"] = store.width(store.sites[0])

        # sample quality against solver evaluations
        if cfg.glp:
            glp = GLP.from_pretrained(cfg.glp)
        else:
            fd_out = train_glp(GLPTrainConfig(acts=str(store_dir), out=str(work / "fd_glp"), depth=cfg.depth,
                                              batch_size=min(cfg.batch_size, 1024), steps=cfg.fd_train_steps,
                                              optim=GLPOptimConfig(lr=cfg.fd_lr),
                                              precision=cfg.precision, seed=cfg.seed, checkpoints=1, val_rows=2048,
                                              overwrite=True))
            glp = GLP.from_pretrained(fd_out)
        val_idx = store.split_rows("val")
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.fd_n, len(val_idx))
        real = store.rows(np.sort(rng.choice(val_idx, n, replace=False)), site=glp.meta["site"])
        tr_idx = store.split_rows("train")
        floor = frechet_distance(store.rows(np.sort(rng.choice(tr_idx, n, replace=False)), site=glp.meta["site"]), real)
        with torch.inference_mode():
            fds, fds_ref = fd_by_nfe(glp, real, cfg.nfe, cfg.schedules, seed=cfg.seed)
        top = max(cfg.nfe)
        ref = min(v[top] for v in fds.values() if top in v)
        best = None
        for k, v in fds.items():
            for nfe, fd in v.items():
                # closest to the many-step FD, from either side (a few-step FD can also come out lower)
                if nfe <= 8 and (best is None or abs(fd / ref - 1.0) < abs(best["rel_to_max_nfe"])):
                    best = {"solver": k, "nfe": nfe, "fd": fd, "rel_to_max_nfe": fd / ref - 1.0,
                            "fd_to_max_nfe_samples": fds_ref[k][nfe]}
        result.update({"fd_by_nfe": fds, "fd_to_max_nfe_samples_by_nfe": fds_ref, "fd_max_nfe": ref,
                       "fd_floor_train_vs_val": floor, "fd_n": n,
                       "fd_glp_val_loss": glp.meta.get("training", {}).get("val_loss"), "closest_at_most_8_nfe": best,
                       "fd_within_10pct_at_8_nfe": bool(best and abs(best["rel_to_max_nfe"]) <= 0.10)})
        result["config"] = {k: getattr(cfg, k) for k in ("depth", "batch_size", "steps", "precision", "compile", "threads")}
        return result
    finally:
        if not cfg.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        res = _child_train(json.loads(Path(sys.argv[2]).read_text()))
        print(json.dumps(res))
