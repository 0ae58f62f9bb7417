"""The main job (`make demo`): harvest the demo LM's middle layer, train a GLP, evaluate it, use it, report it.

Every stage calls the same public API a user would and writes its own run folder under ``out``. A
finished stage is not redone when the job runs again: it is skipped, and the summary says so. The
corpus is the demo LM's own writing, shipped with the package (``--text demo-samples``), so nothing
is generated at run time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from innards.config import at_least, positive, save_config
from innards.data.harvest import HarvestConfig, harvest
from innards.data.shared import shared_data_dir
from innards.glp.evaluate import EvalConfig, evaluate_glp
from innards.glp.train import GLPOptimConfig, GLPTrainConfig, train_glp
from innards.io import read_json, write_json
from innards.models.config import ModelConfig
from innards.models.load import load_model
from innards.models.sites import n_layers
from innards.probe.features import meaning
from innards.probe.run import ProbeConfig, run_probe
from innards.run import read_run
from innards.sae.train import SAETrainConfig, train_sae
from innards.steer.config import GLPSource
from innards.steer.sweep import SweepConfig, run_sweep
from innards.steer.vectors import VectorConfig, build_vector
from innards.viewer.report import build_report

PROBE_TASKS = ["117_us_state_FL", "118_us_state_CA", "126_art_type_book", "127_art_type_song", "119_us_state_TX"]


@dataclass
class DemoConfig:
    """Harvest the demo LM's middle layer, train a GLP, evaluate it, steer and probe with it, and write a report."""

    out: str = "results/demo"
    """output folder: one run folder per stage, summary.json, report/"""
    model: str = "demo"
    """language model (the shipped demo LM by default)"""
    site: str | None = None
    """activation site (None: resid_post of the middle layer)"""
    text: str = "demo-samples"
    """text source of the store (demo-samples: the demo LM's own 4,096 shipped documents)"""
    tokens: int = 250_000
    """activations to harvest (the shipped samples hold about 220k tokens: all of them)"""
    glp_depth: int = 3
    """blocks of the GLP"""
    glp_steps: int = 1500
    """GLP optimiser steps"""
    glp_batch_size: int = 1024
    """activations per GLP step"""
    glp_lr: float = 1e-3
    """GLP peak learning rate"""
    eval_n: int = 4000
    """held-out activations for FD and C2ST (at most what the validation split holds)"""
    eval_steps: int = 100
    """Euler steps of the GLP's samples in the evaluation"""
    sae_k: int = 32
    """active latents of the TopK SAE baseline"""
    sae_steps: int = 600
    """steps of the SAE baseline (on the demo store: validation FVU 0.084, against 0.065 after 2,000 steps)"""
    steer: bool = True
    """run the steering stage"""
    steer_concept: str = "sea"
    """packaged concept to steer towards (steer/prompts/<concept>.*.txt)"""
    steer_strengths: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0])
    """steering strengths, in units of the mean activation norm"""
    probe: bool = True
    """run the probing stage (when the SAE-Probes tasks are found)"""
    probe_tasks: str | None = None
    """SAE-Probes task folder (None: ../shared/data/sae_probes/cleaned_data when present)"""
    probe_filter: list[str] = field(default_factory=lambda: list(PROBE_TASKS))
    """tasks probed"""
    report: bool = True
    """write the static report (report/index.html)"""
    seed: int = 0
    """seed of every stage"""

    def __post_init__(self) -> None:
        at_least(self, 1, "tokens", "glp_depth", "glp_steps", "glp_batch_size", "eval_n", "eval_steps", "sae_k",
                 "sae_steps")
        positive(self, "glp_lr")


@dataclass
class Stage:
    """What one stage did: its time, whether it was skipped, and a one-line result."""

    name: str
    seconds: float
    skipped: bool
    line: str
    path: str


def _stage(name: str, path: Path, run: Callable[[], object], describe: Callable[[], str]) -> Stage:
    """Run one stage unless its folder is complete; its result line is always read back from what it wrote."""
    done = (read_run(path) or {}).get("status") == "complete"
    print(f"\n== {name}{' (complete: skipped)' if done else ''} ==", flush=True)
    t0 = time.time()
    if not done:
        run()
    return Stage(name, time.time() - t0, done, describe(), str(path))


def _g(v: object, digits: int = 3) -> str:
    return "-" if v is None else f"{float(v):.{digits}g}"


def run_demo(cfg: DemoConfig) -> dict:
    """Run the main job end to end; returns the summary (also written to ``out/summary.json``)."""
    out = Path(cfg.out)
    save_config(cfg, out)
    model = ModelConfig(name=cfg.model)
    site = cfg.site or f"blocks.{n_layers(load_model(cfg.model, device='meta')) // 2}.resid_post"
    acts, sae_dir, glp_dir, eval_json = out / "acts", out / "sae", out / "glp", out / "eval.json"
    t_start = time.time()
    stages = [
        _stage("harvest", acts,
               lambda: harvest(HarvestConfig(model=model, site=[site], text=cfg.text, tokens=cfg.tokens, out=str(acts),
                                             seed=cfg.seed)),
               lambda: _store_line(acts, cfg.model, site)),
        _stage("glp train", glp_dir,
               lambda: train_glp(GLPTrainConfig(acts=str(acts), out=str(glp_dir), depth=cfg.glp_depth,
                                                steps=cfg.glp_steps, batch_size=cfg.glp_batch_size,
                                                optim=GLPOptimConfig(lr=cfg.glp_lr), seed=cfg.seed)),
               lambda: _glp_line(glp_dir)),
        _stage("sae baseline", sae_dir,
               lambda: train_sae(SAETrainConfig(acts=str(acts), out=str(sae_dir), k=cfg.sae_k, steps=cfg.sae_steps,
                                                seed=cfg.seed)),
               lambda: _sae_line(sae_dir, cfg.sae_k)),
        _stage("glp eval", eval_json,
               lambda: evaluate_glp(EvalConfig(glp=str(glp_dir), acts=str(acts), model=model, sae=str(sae_dir),
                                               n=cfg.eval_n, steps=cfg.eval_steps, out=str(eval_json), seed=cfg.seed)),
               lambda: _eval_line(read_json(eval_json, "evaluation"))),
    ]
    if cfg.steer:
        vec, sweep_dir = out / "vectors" / f"{cfg.steer_concept}.safetensors", out / "steer"
        sweep = SweepConfig(model=model, site=site, vector=str(vec), glp=GLPSource(path=str(glp_dir)), acts=str(acts),
                            concept=cfg.steer_concept, strengths=list(cfg.steer_strengths), out=str(sweep_dir),
                            n_boot=2000)

        def steer() -> None:
            build_vector(VectorConfig(model=model, site=site, concept=cfg.steer_concept, out=str(vec)))
            run_sweep(sweep)
        stages.append(_stage("steering", sweep_dir, steer,
                             lambda: _steer_line(read_json(sweep_dir / "results.json", "sweep results"),
                                                 cfg.steer_concept)))

    shared = shared_data_dir()
    tasks = cfg.probe_tasks or (str(shared / "sae_probes" / "cleaned_data") if shared else None)
    if cfg.probe and tasks and Path(tasks).is_dir():
        probe_dir = out / "probe"
        probe = ProbeConfig(model=model, site=site, tasks=tasks, tasks_filter=list(cfg.probe_filter),
                            features=["raw", "mlp", f"glp:{glp_dir}", "pca:16"], out=str(probe_dir), n_boot=2000)
        stages.append(_stage("probing", probe_dir, lambda: run_probe(probe),
                             lambda: _probe_line(read_json(probe_dir / "summary.json", "probe summary"))))
    elif cfg.probe:
        print(f"\n== probing: skipped (no SAE-Probes tasks{f' at {tasks}' if tasks else ''}; pass --probe-tasks DIR) ==")

    if cfg.report:
        # the report is rebuilt every time: it shows whatever the stages hold now
        index = build_report([out], out / "report")
        stages.append(Stage("report", 0.0, False, f"open {index}", str(out / "report")))

    summary = {"model": cfg.model, "site": site, "total_seconds": round(time.time() - t_start, 1),
               "stages": {s.name: {"seconds": round(s.seconds, 1), "skipped": s.skipped, "result": s.line, "path": s.path}
                          for s in stages},
               "eval": _numbers(read_json(eval_json, "evaluation"))}
    write_json(out / "summary.json", summary)
    print(format_summary(summary, cfg))
    return summary


def _numbers(res: dict) -> dict:
    return {k: v for k, v in res.items() if v is None or isinstance(v, (int, float)) and not isinstance(v, bool)}


def _store_line(acts: Path, model: str, site: str) -> str:
    man = read_json(acts / "manifest.json", "store manifest")
    docs = man["text"].get("documents_with_rows", 0)
    return f"{man['tokens']:,} activations of {model} at {site} from {docs:,} documents"


def _glp_line(glp_dir: Path) -> str:
    tr = read_json(glp_dir / "config.json", "GLP config").get("training", {})
    return (f"{int(tr.get('n_params') or 0):,} parameters, {tr.get('step')} steps, validation loss "
            f"{_g(tr.get('val_loss'))} (Gaussian flow {_g(tr.get('val_loss_gaussian'))})")


def _sae_line(sae_dir: Path, k: int) -> str:
    s = read_json(sae_dir / "summary.json", "SAE summary")
    return f"TopK SAE (k={k}), validation FVU {_g(s.get('val_fvu'))}"


def _eval_line(r: dict) -> str:
    return (f"FD {_g(r.get('fd'))} (floor {_g(r.get('fd_floor'))}, Gaussian {_g(r.get('fd_gaussian'))}); "
            f"C2ST AUC {_g(r.get('c2st_auc_glp'), 2)} (floor {_g(r.get('c2st_auc_floor'), 2)}, Gaussian "
            f"{_g(r.get('c2st_auc_gaussian'), 2)}); delta LM {_g(r.get('delta_lm_glp'), 2)} nats "
            f"(Gaussian {_g(r.get('delta_lm_gaussian'), 2)}, SAE {_g(r.get('delta_lm_sae'), 2)})")


def _steer_line(res: dict, concept: str) -> str:
    """Unsteered vs the largest strength, raw and GLP; says plainly when plain steering did not move the concept."""
    rows = res["methods"]
    raw = {r["strength"]: r for r in rows["raw"]}
    r0, top = min(raw, key=abs), max(raw, key=abs)
    line = f"'{concept}' score unsteered {raw[r0]['concept']:.2f}; at r={top:g} (NLL in brackets):"
    for m in ("raw", "glp", "prior"):
        hit = [r for r in rows.get(m, []) if r["strength"] == top]
        if hit:
            line += f" {m} {hit[0]['concept']:.2f} ({hit[0]['nll']:.2f})"
    if raw[top]["concept_ci"][0] <= raw[r0]["concept"]:
        line += "; raw steering did not raise the score here, so raw vs GLP says nothing at these strengths"
    return line


def _probe_line(summary: dict) -> str:
    feats = summary.get("features") or {}
    return f"mean 1-D AUC over {summary.get('n_tasks', 0)} tasks: " + ", ".join(
        f"{meaning(k)} {_g(v.get('mean_auc'))}" for k, v in feats.items())


def format_summary(summary: dict, cfg: DemoConfig) -> str:
    """The demo's closing summary: one line per stage with its time, then how to look at the results."""
    rows = [f"\ninnards demo: {summary['model']} at {summary['site']}, results in {cfg.out}/ "
            f"({summary['total_seconds']:.0f} s in all)", ""]
    width = max(len(n) for n in summary["stages"])
    for name, s in summary["stages"].items():
        when = "skipped" if s["skipped"] else f"{s['seconds']:.0f} s"
        rows.append(f"  {name:<{width}}  {when:>8}  {s['result']}")
    rows += ["", f"browse every result: innards view {cfg.out} --model {cfg.model}"]
    return "\n".join(rows)

