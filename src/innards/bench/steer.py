"""Benchmark: generated tokens/s of steered generation with GLP projection, divided by the same without it.

Every variant generates the same number of new tokens (EOS ignored) from the same left-padded story
openings with the KV cache on, at each batch size: ``plain`` (no hook), ``raw`` (the steering offset
added, no GLP), and the SDEdit projection at each NFE (exact schedule from ``t_start``, ``--solver``
spending exactly NFE evaluations), eager and, with ``--compile``, with the denoiser step compiled. Variants are timed
side by side: each round runs every variant once, in an order rotated per round, and the median over
rounds is reported, so load on a shared machine hits all variants alike. Steered positions follow
the reference code (``last``: the last prompt token, then every generated token), all of one forward
call projected as one batch.

``projection_ms`` isolates the projection itself on the rows of one step: ``GLP.project`` against the
steering path's :class:`innards.steer.project.FastGLP` (conditioning cached per time, no host round
trip), eager and compiled.

A GLP folder can be given; otherwise a random GLP of the paper's shape for the site (depth
``--depth``, d_model = 2 d, d_mlp = 4 d) is timed: speed does not depend on the weights.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from innards.config import at_least, require, within
from innards.glp import schedule as sch
from innards.glp.model import GLP, GLPConfig
from innards.glp.projection import ProjectionConfig
from innards.models.config import MODEL_ALIASES, ModelConfig
from innards.models.load import load_model
from innards.models.sites import resolve_site
from innards.provenance import provenance
from innards.run import Run
from innards.steer.generate import Steering, apply_steering
from innards.steer.project import FastGLP
from innards.steer.texts import read_prompts
from innards.steer.tokens import encode, pad_id


@dataclass
class BenchSteerConfig:
    """``innards bench steer``: tokens/s of GLP-projected steered generation vs raw steering, side by side."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the language model (a plain string is taken as its name)"""
    site: str = "blocks.3.resid_post"
    """steered site"""
    glp: str | None = None
    """GLP folder of the site (None: a random GLP of the paper's shape: the speed is the same)"""
    depth: int = 3
    """depth of the random GLP"""
    nfe: list[int] = field(default_factory=lambda: [4, 8, 10, 20])
    """network evaluations of the projection (exact schedule)"""
    solver: str = "pc2"
    """ODE solver of the projection (pc2: the one `innards bench glp` finds closest to 1000 steps at 4 evaluations)"""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    """prompts generated together"""
    new_tokens: int = 64
    """tokens generated per prompt (EOS ignored)"""
    rounds: int = 5
    """timed rounds; each runs every variant once (median reported)"""
    t_start: float = 0.5
    """projection start time"""
    compile: bool = True
    """also time the projection with the denoiser step torch.compiled"""
    seed: int = 0
    """seed of the random GLP, the steering direction and the projection noise"""
    out: str = "bench_steer.json"
    """output JSON file (run record beside it)"""
    overwrite: bool = True
    """replace an earlier result"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        at_least(self, 1, "depth", "new_tokens", "rounds")
        require(bool(self.nfe) and all(n >= 1 for n in self.nfe), "--nfe must be positive integers")
        require(bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes), "--batch-sizes must be positive integers")
        within(self, "t_start", 0.0, 1.0, open_lo=True)
        require(self.solver in sch.SOLVERS, f"--solver must be one of {', '.join(sch.SOLVERS)}, got '{self.solver}'")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _glp(cfg: BenchSteerConfig, model: torch.nn.Module, site: str, width: int) -> GLP:
    if cfg.glp:
        g = GLP.from_pretrained(cfg.glp)
        g.check_compatible(model, site, width)
        return g
    torch.manual_seed(cfg.seed)
    stats = {"mean": torch.zeros(width, dtype=torch.float64), "var": torch.ones(width, dtype=torch.float64), "count": 1}
    return GLP(GLPConfig(d_in=width, n_blocks=cfg.depth), meta={"model": model.innards_source, "site": site,
                                                                 "stats_by_site": {site: stats}})


def bench_steer(cfg: BenchSteerConfig) -> dict:
    """Time every variant at every batch size; writes and returns the result."""
    out = Path(cfg.out)
    with Run.open(out, "bench", cfg, inputs={"glp": cfg.glp}, overwrite=cfg.overwrite, file=True) as run:
        if run.state == "complete":
            run.say_complete()
            return {}
        res = _bench(cfg)
        run.write_json(out.name, res)
        head = {f"ratio_b{r['batch']}_nfe{r['nfe']}{'_compiled' if r['compiled'] else ''}": round(r["ratio_vs_raw"], 3)
                for r in res["generation"] if r["nfe"]}
        run.complete(headline=head, outputs=[out.name])
    return res


def _bench(cfg: BenchSteerConfig) -> dict:
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
    device = next(model.parameters()).device
    s = resolve_site(model, cfg.site)
    glp = _glp(cfg, model, s.name, s.width).to(device).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    v = torch.randn(s.width, generator=g)
    v = v / v.norm()
    alpha = 0.5 * float(glp.meta["stats"]["var"].sum().sqrt())  # r = 0.5 of an rms-sized activation
    prompts = read_prompts("stories")
    variants: list[tuple[str, int, bool]] = [("plain", 0, False), ("raw", 0, False)]
    variants += [(f"glp-nfe{n}", n, False) for n in cfg.nfe]
    if cfg.compile:
        variants += [(f"glp-nfe{n}-compiled", n, True) for n in cfg.nfe]
    rows, compile_s = [], {}
    for b in cfg.batch_sizes:
        batch = encode(model.tokenizer, [prompts[i % len(prompts)] for i in range(b)], side="left")
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        kw = dict(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, max_length=None, do_sample=False,
                  pad_token_id=pad_id(model.tokenizer), eos_token_id=None, use_cache=True)
        steerings = {name: (None if name == "plain" else
                            Steering(s.name, v, alpha, "last", glp if nfe else None,
                                     _projection(cfg, nfe),
                                     seed=cfg.seed, compile=comp)) for name, nfe, comp in variants}

        def once(name: str) -> float:
            st = steerings[name]
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                if st is None:
                    model.generate(input_ids=ids, attention_mask=mask, **kw)
                else:
                    with apply_steering(model, st) as hook:  # the Steering keeps its cached GLP path across calls
                        hook.start_batch(batch.text_mask)
                        model.generate(input_ids=ids, attention_mask=mask, **kw)
            _sync(device)
            return time.perf_counter() - t0

        for name, _, comp in variants:  # warm-up (and compilation) outside the timed rounds
            t = once(name)
            if comp:
                compile_s[f"b{b}:{name}"] = round(t, 2)
        times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        for r in range(cfg.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name, _, _ in order:
                times[name].append(once(name))
        tps = {name: b * cfg.new_tokens / statistics.median(ts) for name, ts in times.items()}
        for name, nfe, comp in variants:
            rows.append({"batch": b, "variant": name, "nfe": nfe, "compiled": comp, "tokens_per_s": round(tps[name], 2),
                         "ratio_vs_raw": tps[name] / tps["raw"], "ratio_vs_plain": tps[name] / tps["plain"],
                         "seconds": [round(x, 4) for x in times[name]]})
    proj = _projection_ms(cfg, glp, s.name, device)
    return {"device": str(device), "threads": torch.get_num_threads(), "model": cfg.model.name, "site": s.name,
            "glp": cfg.glp or f"random GLP d_in={s.width} depth {cfg.depth} (speed only)",
            "glp_params": glp.n_params, "new_tokens": cfg.new_tokens, "rounds": cfg.rounds, "t_start": cfg.t_start,
            "solver": cfg.solver, "positions": "last", "generation": rows, "projection_ms": proj, "compile_seconds": compile_s,
            "goal": "ratio_vs_raw >= 0.5 at the NFE that meets issue 15 section 1's quality",
            "versions": provenance()}


def _projection(cfg: BenchSteerConfig, nfe: int) -> ProjectionConfig:
    """The exact-schedule projection from ``cfg.t_start`` that spends ``nfe`` evaluations with ``cfg.solver``."""
    return ProjectionConfig(t_start=cfg.t_start, steps=sch.steps_for_nfe(nfe, cfg.solver) + 1, schedule="exact",
                            solver=cfg.solver)


def _projection_ms(cfg: BenchSteerConfig, glp: GLP, site: str, device: torch.device) -> list[dict]:
    """Milliseconds per projection of one step's rows: GLP.project vs the cached path, eager and compiled."""
    out = []
    for b in cfg.batch_sizes:
        x = glp.denormalize(torch.randn(b, glp.config.d_in, device=device))
        for n in cfg.nfe:
            pc = _projection(cfg, n)
            fns = {"glp.project": lambda: glp.project(x, seed=1, site=site, **pc.kwargs())}
            fast = FastGLP(glp, site)
            fns["fast"] = lambda fast=fast: fast.project(x, pc, seed=1)
            if cfg.compile:
                comp = FastGLP(glp, site, compile=True)
                fns["fast-compiled"] = lambda comp=comp: comp.project(x, pc, seed=1)
            row = {"rows": b, "nfe": n}
            for k, fn in fns.items():
                fn()
                reps = max(5, 200 // n)
                ts = []
                for _ in range(3):
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    _sync(device)
                    ts.append((time.perf_counter() - t0) / reps * 1e3)
                row[f"{k}_ms"] = round(min(ts), 4)
            out.append(row)
    return out


BENCH_STEER_ALIASES = dict(MODEL_ALIASES)
