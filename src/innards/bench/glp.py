"""Benchmark: GLP training throughput and MFU, memory, and quality against network evaluations (NFE).

Throughput is measured on the real trainer (``train_glp``) reading a store on disk, in a fresh child
process so that its peak RSS is the trainer's own; the child then times bf16 (or fp32, whichever the
trainer used) matrix products of the model's own shapes and keeps the fastest as the peak, so MFU =
6 N (activations/s) / peak compares like with like on the same machine in the same minute. The
first logged interval (warm-up, compilation) is excluded from the throughput.

Quality against NFE (a GLP given with ``--glp``, or one trained here for ``fd_train_steps``), every
setting from the same noise as the 1000-step Euler reference:

- ``fd_by_nfe`` / ``c2st_by_nfe``: Fréchet distance and classifier two-sample AUC of ``fd_n`` samples
  against the store's held-out rows, for every solver (``--solvers``) on every time grid
  (``--schedules``, e.g. ``shift:2``) at every number of evaluations (``--nfe``); keys are ``solver`` on
  the uniform grid, ``solver_schedule`` otherwise (``pc2_shift2``), and ``student`` for a distilled
  student (``--student``, at the settings it was trained for). ``fd_to_max_nfe_samples_by_nfe`` is
  the FD to the reference samples of the same noise: the solver's error alone.
- ``project_by_nfe``: SDEdit projection (``glp.project``, exact schedule) of held-out rows at each
  ``--project-t``: ``kept_fraction`` of a random steering offset of ``--project-strength`` x ||a||
  (same noise with and without it; 1 = it survives whole), ``rmse_to_ref`` (normalised units) and
  ``rel_err_to_ref`` (error / the reference projection's displacement) against the 1000-step
  projection of the same rows and noise, and the cost of projecting clean activations downstream:
  ``delta_lm`` (LM loss increase on held-out documents, every non-BOS position projected) or, for a
  model without an LM head (an encoder), ``delta_hidden`` (the last hidden state's squared change over
  its variance).
- ``goals``: for 8 and 4 evaluations, the sampling setting closest to the 1000-step FD and whether it is
  within 10%, with its C2ST beside the reference's.
"""

from __future__ import annotations

import hashlib
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
from typing import Any, Callable, Literal

import numpy as np
import torch

from transformers import PreTrainedModel

from innards.bench.memory import peak_rss_mb
from innards.config import at_least, positive, require
from innards.data.harvest import HarvestConfig, harvest
from innards.data.shared import shared_data_dir
from innards.data.store import ActivationStore
from innards.errors import InnardsError
from innards.glp import schedule as sch
from innards.glp.c2st import c2st_auc
from innards.glp.delta_lm import delta_lm_loss, pad_batch, sequences_from_rows
from innards.glp.fd import frechet_distance
from innards.glp.model import GLP
from innards.glp.train import GLPOptimConfig, GLPTrainConfig, train_glp
from innards.models.hooks import edit
from innards.models.load import load_model
from innards.models.sites import n_layers
from innards.runlog import read_metrics
from innards.tensors import load_tensors, save_tensors


@dataclass
class BenchGLPConfig:
    """What to benchmark."""

    acts: str | None = None
    """activation store to train from (None: harvest --tokens rows of --model's middle layer)"""
    glp: str | None = None
    """GLP folder to sample from for fd_by_nfe (None: train one on the store)"""
    model: str = "demo"
    """model to harvest from when --acts is not given"""
    site: str | None = None
    """site to harvest (None: resid_post of the middle block)"""
    text: str | None = None
    """text to harvest (None: ../shared/data children's books when present, else random tokens)"""
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
    """torch threads in the timed child (None: torch's default)"""
    fd_n: int = 2048
    """samples (and held-out rows) per Fréchet distance and C2ST"""
    fd_train_steps: int = 1500
    """steps of the GLP trained for the quality part when --glp is not given"""
    fd_lr: float = 1e-3
    """peak learning rate of the GLP trained for the quality part"""
    throughput: bool = True
    """measure training throughput, MFU and memory (off: only quality against evaluations)"""
    nfe: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 1000])
    """numbers of network evaluations for sampling; the largest is the Euler reference"""
    solvers: list[str] = field(default_factory=lambda: ["euler", "heun", "ab2", "pc2"])
    """solvers for sampling (innards.glp.schedule.SOLVERS)"""
    schedules: list[str] = field(default_factory=lambda: ["uniform", "shift:2"])
    """time grids for sampling: uniform, shift (s = 3), shift:S"""
    student: str | None = None
    """a distilled student GLP (innards glp distill) of the GLP, measured at the settings it was trained for"""
    c2st: bool = True
    """classifier two-sample tests of the samples (up to --c2st-max-nfe evaluations, and the reference)"""
    c2st_max_nfe: int = 16
    """largest number of evaluations (below the reference) that gets a C2ST"""
    project: bool = True
    """measure the SDEdit projection against evaluations"""
    project_t: list[float] = field(default_factory=lambda: [0.3, 0.5])
    """t_start values of the projection"""
    project_nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 1000])
    """numbers of network evaluations for the projection; the largest is the Euler reference"""
    project_solvers: list[str] = field(default_factory=lambda: ["euler", "ab2", "pc2"])
    """solvers for the projection"""
    project_rows: int = 1024
    """held-out activations for the kept fraction and the error against the reference"""
    project_strength: float = 1.0
    """steering offset of the kept fraction, in units of the site's RMS norm ||a||"""
    lm_docs: int = 32
    """held-out documents for the downstream cost of projecting clean activations (0 = off)"""
    lm_max_len: int = 64
    """tokens per held-out document (special tokens included)"""
    out: str | None = None
    """work folder (None: a temporary folder, removed afterwards); it caches the 1000-step references"""
    seed: int = 0
    """seed of the harvest, the training and the samples"""

    def __post_init__(self) -> None:
        at_least(self, 1, "tokens", "depth", "batch_size", "steps", "log_every", "threads", "fd_n", "fd_train_steps",
                 "c2st_max_nfe", "project_rows", "lm_max_len")
        at_least(self, 0, "lm_docs")
        positive(self, "fd_lr", "project_strength")
        require(all(n >= 1 for n in self.nfe) and all(n >= 1 for n in self.project_nfe),
                f"--nfe and --project-nfe must list positive numbers of evaluations, got {self.nfe} and {self.project_nfe}")
        require(all(0.0 < t <= 1.0 for t in self.project_t), f"--project-t must be in (0, 1], got {self.project_t}")
        for s in (*self.solvers, *self.project_solvers):
            require(s in sch.SOLVERS, f"unknown solver '{s}' (choose {', '.join(sch.SOLVERS)})")
        for g in self.schedules:
            sch.sample_grid(2, g)  # a one-line error for a bad name


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


def _key(solver: str, schedule: str) -> str:
    """Table key of a sampler: the solver on the uniform grid, else solver_schedule (pc2_shift2)."""
    return solver if schedule == "uniform" else f"{solver}_{schedule.replace(':', '')}"


class _Cache:
    """Tensors kept in the work folder between runs (the expensive 1000-step references), keyed by name."""

    def __init__(self, folder: Path | None, glp: GLP):
        self.folder = folder
        h = hashlib.sha256()
        for v in glp.state_dict().values():
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        self.tag = h.hexdigest()[:12]

    def get(self, name: str, fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return fn()
        path = self.folder / "cache" / f"{name}-{self.tag}.safetensors"
        if path.is_file():
            return load_tensors(path, what="bench cache")
        out = fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {k: v.contiguous() for k, v in out.items()})
        return out


def sample_by_nfe(glp: GLP, real: torch.Tensor, nfes: list[int], solvers: list[str], schedules: list[str], seed: int = 0,
                  c2st: bool = True, c2st_max_nfe: int = 16, student: GLP | None = None,
                  cache: _Cache | None = None) -> dict[str, Any]:
    """FD and C2ST AUC of samples against real rows, and FD against the many-step Euler samples of the same noise.

    The largest of ``nfes`` is the Euler reference on the uniform grid; the other settings stay below 100
    evaluations. A ``student`` is measured at the settings it records (``meta["student"]["sample"]``).
    """
    top = max(nfes)
    n = real.shape[0]
    ref = (cache or _Cache(None, glp)).get(f"sample-euler{top}-n{n}-s{seed}",
                                           lambda: {"x": glp.sample(n, steps=top, solver="euler", seed=seed)})["x"]
    fd: dict[str, dict[int, float]] = {}
    fd_ref: dict[str, dict[int, float]] = {}
    auc: dict[str, dict[int, float]] = {}

    def add(key: str, nfe: int, x: torch.Tensor) -> None:
        fd.setdefault(key, {})[nfe] = frechet_distance(x, real)
        fd_ref.setdefault(key, {})[nfe] = frechet_distance(x, ref)
        if c2st and (nfe <= c2st_max_nfe or nfe == top):
            auc.setdefault(key, {})[nfe] = c2st_auc(real, x, seed=seed)

    add("euler", top, ref)
    for schedule in schedules:
        for solver in solvers:
            for nfe in nfes:
                if nfe >= min(100, top) or (solver == "heun" and nfe % 2):
                    continue
                add(_key(solver, schedule), nfe,
                    glp.sample(n, steps=sch.steps_for_nfe(nfe, solver), solver=solver, seed=seed, schedule=schedule))
    if student is not None:
        st = _student_settings(student)
        add("student", sch.n_evaluations(sch.sample_grid(st["steps"], st["schedule"]), st["solver"]),
            student.sample(n, seed=seed, **st))
    return {"fd_by_nfe": fd, "fd_to_max_nfe_samples_by_nfe": fd_ref, "c2st_by_nfe": auc}


def fd_by_nfe(glp: GLP, real: torch.Tensor, nfes: list[int], schedules: list[str], seed: int = 0,
              solvers: tuple[str, ...] = ("euler", "heun", "ab2", "pc2")) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """FD of samples vs real rows, and vs the many-step Euler samples of the same noise (no C2ST)."""
    r = sample_by_nfe(glp, real, nfes, list(solvers), schedules, seed=seed, c2st=False)
    return r["fd_by_nfe"], r["fd_to_max_nfe_samples_by_nfe"]


def _student_settings(student: GLP) -> dict[str, Any]:
    rec = (student.meta.get("student") or {}).get("sample")
    if not rec:
        raise InnardsError("--student is not a distilled student (its config records no sampling settings); "
                           "make one with innards glp distill")
    return {"steps": int(rec["steps"]), "solver": rec["solver"], "schedule": rec["schedule"]}


def _project_steps(nfe: int, solver: str) -> int:
    """Grid points of the exact projection schedule that spend ``nfe`` evaluations."""
    return sch.steps_for_nfe(nfe, solver) + 1


def _documents(store: ActivationStore, model: PreTrainedModel, n_docs: int, max_len: int, seed: int) -> tuple[list[np.ndarray], set[int]]:
    """Held-out documents of the store framed as harvested (BOS, or CLS ... SEP), and the special ids not to edit."""
    rows = store.split_rows("val")
    tok = model.tokenizer
    special = (store.manifest or {}).get("special_tokens") or {}
    prefix, suffix = list(special.get("prefix") or []), list(special.get("suffix") or [])
    if not prefix and tok.bos_token_id is not None:
        prefix = [tok.bos_token_id]
    body = max_len - len(suffix)
    seqs = sequences_from_rows(store.doc_ids[rows], store.positions[rows], store.token_ids[rows],
                               prefix[0] if prefix else None, max_len=body, max_docs=n_docs, seed=seed)
    seqs = [np.r_[s, np.asarray(suffix, dtype=np.int64)] for s in seqs]
    skip = set(int(i) for i in special.get("excluded_ids") or []) | set(prefix) | set(suffix)
    return seqs, skip


@torch.no_grad()
def delta_hidden(model: PreTrainedModel, site: str, seqs: list[np.ndarray], replacements: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                 skip: set[int], pad_id: int = 0, batch_size: int = 16) -> dict[str, float]:
    """For a model without an LM head: mean squared change of the last hidden state over its variance, per replacement."""
    device = next(model.parameters()).device
    num = {k: 0.0 for k in replacements}
    den = 0.0
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i:i + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        sel = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(skip), dtype=torch.long, device=device))
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()[mask.bool()]
        den += float((h - h.mean(0)).pow(2).sum())
        for name, fn in replacements.items():
            def replace(act: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> torch.Tensor:
                out = act.clone()
                out[sel] = fn(act[sel]).to(device=act.device, dtype=act.dtype)
                return out

            with edit(model, {site: replace}):
                h2 = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()[mask.bool()]
            num[name] += float((h2 - h).pow(2).sum())
    return {k: v / max(den, 1e-30) for k, v in num.items()}


def project_by_nfe(glp: GLP, a: torch.Tensor, t_starts: list[float], nfes: list[int], solvers: list[str],
                   strength: float = 1.0, seed: int = 0, model: PreTrainedModel | None = None,
                   store: ActivationStore | None = None, lm_docs: int = 32, lm_max_len: int = 64,
                   student: GLP | None = None, cache: _Cache | None = None) -> dict[str, Any]:
    """Kept fraction of a steering offset, error against the 1000-step projection, and the downstream cost, per setting.

    ``a``: held-out raw activations. Keys: solver (and ``student``) -> ``t{t_start}`` -> nfe -> metrics; the
    largest of ``nfes`` is the Euler reference.
    """
    cache = cache or _Cache(None, glp)
    site = glp.meta["site"]
    top = max(nfes)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(a.shape[1], generator=g)
    v = v / v.norm()
    alpha = strength * float(glp.meta["stats"]["rms_norm"])
    noise = torch.randn(a.shape, generator=g)
    seqs: list[np.ndarray] = []
    skip: set[int] = set()
    if model is not None and store is not None and lm_docs > 0:
        seqs, skip = _documents(store, model, lm_docs, lm_max_len, seed)
    lm_head = model is not None and model.get_output_embeddings() is not None
    settings = [("euler", top, glp)] + [(s, n, glp) for s in solvers for n in nfes
                                         if n < top and not (s == "heun" and n % 2)]
    if student is not None:
        settings += [("student", n, student) for n in nfes if n < top]
    out: dict[str, Any] = {}
    for t in t_starts:
        def proj(m: GLP, x: torch.Tensor, solver: str, nfe: int, eps: torch.Tensor | None = None,
                 s: int | None = None) -> torch.Tensor:
            sv = "euler" if solver == "student" else solver
            return m.project(x, t_start=t, steps=_project_steps(nfe, sv), schedule="exact", solver=sv, noise=eps, seed=s)

        ref = cache.get(f"project-t{t:g}-euler{top}-n{a.shape[0]}-s{seed}",
                        lambda: {"base": proj(glp, a, "euler", top, noise), "moved": proj(glp, a + alpha * v, "euler", top, noise)})
        disp = float((glp.normalize(ref["base"]) - glp.normalize(a)).pow(2).mean().sqrt())
        for solver, nfe, m in settings:
            if (solver, nfe) == ("euler", top):
                base, moved = ref["base"], ref["moved"]
            else:
                base, moved = proj(m, a, solver, nfe, noise), proj(m, a + alpha * v, solver, nfe, noise)
            kept = ((moved - base) @ v) / alpha
            err = float((glp.normalize(base) - glp.normalize(ref["base"])).pow(2).mean().sqrt())
            out.setdefault(solver, {}).setdefault(f"t{t:g}", {})[nfe] = {
                "kept_fraction": float(kept.mean()), "kept_fraction_sd": float(kept.std()),
                "rmse_to_ref": err, "rel_err_to_ref": err / max(disp, 1e-12)}
        if not seqs:
            continue
        calls: dict[str, int] = {}

        def replacement(solver: str, nfe: int, m: GLP) -> Callable[[torch.Tensor], torch.Tensor]:
            name = f"{solver}:{nfe}"

            def fn(x: torch.Tensor) -> torch.Tensor:
                calls[name] = calls.get(name, 0) + 1  # the same noise for every setting, batch by batch
                return proj(m, x.float(), solver, nfe, s=seed + 1000 + calls[name])
            return fn

        reps = {f"{s}:{n}": replacement(s, n, m) for s, n, m in settings}
        tok = model.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if lm_head:
            bos = tok.bos_token_id
            res = delta_lm_loss(model, site, seqs, reps, bos_id=bos, pad_id=pad, max_len=lm_max_len, progress=False)
            cost = {k: {"delta_lm": res[f"delta_lm_{k}"], "delta_lm_se": res[f"delta_lm_{k}_se"]} for k in reps}
            lm_clean = res["lm_loss_clean"]
        else:
            cost = {k: {"delta_hidden": d} for k, d in delta_hidden(model, site, seqs, reps, skip, pad_id=pad).items()}
            lm_clean = None
        for k, c in cost.items():
            solver, nfe = k.rsplit(":", 1)
            out[solver][f"t{t:g}"][int(nfe)].update(c)
        out.setdefault("_lm", {})[f"t{t:g}"] = {"lm_loss_clean": lm_clean, "docs": len(seqs)}
    return out


def _goals(fd: dict[str, dict[int, float]], auc: dict[str, dict[int, float]], fd_ref: dict[str, dict[int, float]],
           top: int) -> dict[str, Any]:
    """For 8 and 4 evaluations: the sampling setting whose FD is closest to the reference's, and whether within 10%."""
    ref = fd["euler"][top]
    out: dict[str, Any] = {"fd_1000": ref, "c2st_1000": auc.get("euler", {}).get(top)}
    for limit in (8, 4):
        best = None
        for k, row in fd.items():
            for nfe, v in row.items():
                if nfe <= limit and (best is None or abs(v / ref - 1.0) < abs(best["rel_to_ref"])):
                    best = {"setting": k, "nfe": nfe, "fd": v, "rel_to_ref": v / ref - 1.0,
                            "fd_to_ref_samples": fd_ref[k][nfe], "c2st": auc.get(k, {}).get(nfe)}
        if best is not None:
            best["within_10pct"] = abs(best["rel_to_ref"]) <= 0.10
        out[f"at_most_{limit}_nfe"] = best
    return out


def bench_glp(cfg: BenchGLPConfig) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    if cfg.throughput and cfg.steps < 2 * cfg.log_every:
        raise InnardsError(f"--steps must be at least {2 * cfg.log_every} (the first {cfg.log_every} are warm-up)")
    work = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="innards-bench-glp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store_dir = _store(cfg, work)
        store = ActivationStore(store_dir)
        result: dict[str, Any] = {"store_rows": len(store), "width": store.width(store.sites[0])}
        if cfg.throughput:
            result.update(_throughput(cfg, store_dir, work))

        # quality against solver evaluations
        if cfg.glp:
            glp = GLP.from_pretrained(cfg.glp)
        else:
            fd_out = train_glp(GLPTrainConfig(acts=str(store_dir), out=str(work / "fd_glp"), depth=cfg.depth,
                                              batch_size=min(cfg.batch_size, 1024), steps=cfg.fd_train_steps,
                                              optim=GLPOptimConfig(lr=cfg.fd_lr),
                                              precision=cfg.precision, seed=cfg.seed, checkpoints=1, val_rows=2048,
                                              overwrite=True))
            glp = GLP.from_pretrained(fd_out)
        student = GLP.from_pretrained(cfg.student) if cfg.student else None
        if student is not None and student.config != glp.config:
            raise InnardsError("--student has another architecture than the GLP it is compared with")
        site = glp.meta["site"]
        cache = _Cache(work if cfg.out else None, glp)
        val_idx = store.split_rows("val")
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.fd_n, len(val_idx))
        real = store.rows(np.sort(rng.choice(val_idx, n, replace=False)), site=site)
        tr_idx = store.split_rows("train")
        train_rows = store.rows(np.sort(rng.choice(tr_idx, n, replace=False)), site=site)
        top = max(cfg.nfe)
        t0 = time.perf_counter()
        with torch.inference_mode():
            q = sample_by_nfe(glp, real, cfg.nfe, cfg.solvers, cfg.schedules, seed=cfg.seed, c2st=cfg.c2st,
                              c2st_max_nfe=cfg.c2st_max_nfe, student=student, cache=cache)
        result.update(q)
        result.update({"fd_max_nfe": q["fd_by_nfe"]["euler"][top], "fd_floor_train_vs_val": frechet_distance(train_rows, real),
                       "c2st_floor_train_vs_val": c2st_auc(real, train_rows, seed=cfg.seed) if cfg.c2st else None,
                       "fd_n": n, "fd_glp_val_loss": glp.meta.get("training", {}).get("val_loss"),
                       "goals": _goals(q["fd_by_nfe"], q["c2st_by_nfe"], q["fd_to_max_nfe_samples_by_nfe"], top),
                       "sample_seconds": round(time.perf_counter() - t0, 1)})
        if student is not None:
            result["student"] = {"path": cfg.student, **(student.meta.get("student") or {})}
        if cfg.project:
            t0 = time.perf_counter()
            pick = np.sort(np.random.default_rng(cfg.seed + 1).choice(val_idx, min(cfg.project_rows, len(val_idx)), replace=False))
            a = store.rows(pick, site=site).float()
            model = None
            if cfg.lm_docs > 0 and glp.source_model:
                model = load_model(glp.source_model)
            with torch.inference_mode():
                pj = project_by_nfe(glp, a, cfg.project_t, cfg.project_nfe, cfg.project_solvers, cfg.project_strength,
                                    seed=cfg.seed, model=model, store=store, lm_docs=cfg.lm_docs,
                                    lm_max_len=cfg.lm_max_len, student=student, cache=cache)
            result["project_lm"] = pj.pop("_lm", None)
            result["project_by_nfe"] = pj
            result["project_rows"] = int(a.shape[0])
            result["project_seconds"] = round(time.perf_counter() - t0, 1)
        result["config"] = {k: getattr(cfg, k) for k in ("glp", "student", "depth", "batch_size", "steps", "precision",
                                                          "compile", "threads", "nfe", "solvers", "schedules", "project_t",
                                                          "project_nfe", "project_solvers", "project_strength", "seed")}
        return result
    finally:
        if not cfg.out:
            shutil.rmtree(work, ignore_errors=True)


def _throughput(cfg: BenchGLPConfig, store_dir: Path, work: Path) -> dict[str, Any]:
    """Training throughput, MFU and memory of the real trainer, in a fresh child process."""
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
    res: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    res["throughput_wall_s"] = time.perf_counter() - t0
    return res


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        res = _child_train(json.loads(Path(sys.argv[2]).read_text()))
        print(json.dumps(res))
