"""The main job (`make demo`): harvest the demo LM's middle layer, train a GLP, evaluate it, and use it.

Every stage calls the same public API a user would; each writes into its own folder under ``out``.
A finished stage is not redone when the job is run again (each stage resumes or is skipped).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from innards.config import save_config
from innards.data.shared import shared_data_dir

PROMPTS = Path(__file__).parent / "steer" / "prompts"




@dataclass
class DemoConfig:
    """Configuration of ``innards demo``."""

    out: str = "results/demo"
    model: str = "demo"
    site: str | None = None  # default: resid_post of the middle layer
    text: str = "generate:1200"
    tokens: int = 70_000  # ~60 tokens per generated document
    glp_depth: int = 3
    glp_steps: int = 1500
    glp_batch_size: int = 1024
    glp_lr: float = 1e-3
    eval_n: int = 4000
    eval_steps: int = 100
    steer: bool = True
    steer_strengths: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0])
    probe: bool = True
    probe_tasks: str | None = None  # default: ../shared/data/sae_probes/cleaned_data when present
    probe_filter: list[str] = field(default_factory=lambda: ["117_us_state_FL", "118_us_state_CA", "126_art_type_book",
                                                             "127_art_type_song", "119_us_state_TX"])
    seed: int = 0


def _middle_site(model_name: str) -> str:
    from innards.models.load import load_model
    from innards.models.sites import n_layers

    model = load_model(model_name, device="meta")
    return f"blocks.{n_layers(model) // 2}.resid_post"


def _stage(name: str) -> float:
    print(f"\n== {name} ==", flush=True)
    return time.time()


def run_demo(cfg: DemoConfig) -> dict:
    """Run the main job end to end and return a summary dict (also written to ``out/summary.json``)."""
    from innards.data.harvest import HarvestConfig, harvest
    from innards.glp.evaluate import EvalConfig, evaluate_glp
    from innards.glp.train import GLPTrainConfig, train_glp
    from innards.io import write_json

    out = Path(cfg.out)
    save_config(cfg, out)
    site = cfg.site or _middle_site(cfg.model)
    summary: dict = {"model": cfg.model, "site": site, "stages": {}}

    t0 = _stage(f"1. harvest {cfg.model} {site} on {cfg.text}")
    acts = out / "acts"
    harvest(HarvestConfig(model=cfg.model, site=[site], text=cfg.text, tokens=cfg.tokens, out=str(acts), seed=cfg.seed))
    summary["stages"]["harvest"] = {"dir": str(acts), "seconds": round(time.time() - t0, 1)}

    t0 = _stage(f"2. train a depth-{cfg.glp_depth} GLP")
    glp_dir = out / "glp"
    resume = (glp_dir / "resume" / "state.json").exists()
    train_glp(GLPTrainConfig(acts=str(acts), out=str(glp_dir), depth=cfg.glp_depth, steps=cfg.glp_steps,
                             batch_size=cfg.glp_batch_size, lr=cfg.glp_lr, seed=cfg.seed, resume=resume))
    summary["stages"]["glp_train"] = {"dir": str(glp_dir), "seconds": round(time.time() - t0, 1)}

    t0 = _stage("3. evaluate the GLP (FD vs floor and baselines, C2ST, delta LM loss)")
    result = evaluate_glp(EvalConfig(glp=str(glp_dir), acts=str(acts), model=cfg.model, n=cfg.eval_n,
                                     steps=cfg.eval_steps, out=str(out / "eval.json"), seed=cfg.seed))
    summary["stages"]["eval"] = {"file": str(out / "eval.json"), "seconds": round(time.time() - t0, 1)}
    summary["eval"] = {k: v for k, v in result.items() if isinstance(v, (int, float)) or v is None}

    if cfg.steer:
        t0 = _stage("4. steering: raw vs GLP-projected, happy-minus-sad direction")
        summary["steer"] = _steer(cfg, site, acts, glp_dir, out / "steer")
        summary["stages"]["steer"] = {"dir": str(out / "steer"), "seconds": round(time.time() - t0, 1)}

    if cfg.probe:
        t0 = _stage("5. 1-D probing: raw, MLP neurons, GLP meta-neurons, PCA")
        summary["probe"] = _probe(cfg, site, glp_dir, out / "probe")
        summary["stages"]["probe"] = {"dir": str(out / "probe"), "seconds": round(time.time() - t0, 1)}

    write_json(out / "summary.json", summary)
    print(f"\nresults in {out}/ (summary.json, eval.json, PNGs)")
    print(json.dumps(summary["eval"], indent=1))
    return summary


def _steer(cfg: DemoConfig, site: str, acts: Path, glp_dir: Path, out: Path) -> dict:
    """A short sweep: the packaged happy/sad sentences give the vector (and the judge when no shared data)."""
    from innards.steer.sweep import SweepConfig, run_sweep
    from innards.steer.vectors import VectorConfig, build_vector

    out.mkdir(parents=True, exist_ok=True)
    vec = build_vector(VectorConfig(model=cfg.model, site=site, pos=str(PROMPTS / "happy.txt"),
                                    neg=str(PROMPTS / "sad.txt"), out=str(out / "happy_sad.safetensors")))
    data = shared_data_dir()
    sentiment = data is not None and (data / "sentiment").is_dir()
    concept = dict(concept="sentiment", data_dir=str(data), evaluator_max_per_class=2000) if sentiment else \
        dict(concept="happy", concept_pos=str(PROMPTS / "happy.txt"), concept_neg=str(PROMPTS / "sad.txt"))
    res = run_sweep(SweepConfig(model=cfg.model, site=site, vector=str(vec), glp=str(glp_dir), acts=str(acts),
                                strengths=cfg.steer_strengths, out=str(out), seed=cfg.seed, n_bootstrap=2000,
                                **concept))
    return {k: res[k] for k in ("concept", "evaluator_accuracy", "methods", "comparison") if k in res}


def _probe(cfg: DemoConfig, site: str, glp_dir: Path, out: Path) -> dict:
    """A handful of SAE-Probes tasks, when the benchmark's files are available."""
    from innards.probe.run import ProbeConfig, run_probe

    data = shared_data_dir()
    tasks = cfg.probe_tasks or (str(data / "sae_probes" / "cleaned_data") if data else "../shared/data/sae_probes/cleaned_data")
    if not Path(tasks).exists():
        print(f"no probing tasks at {tasks}: skipping the probing stage (pass --probe-tasks DIR)")
        return {"skipped": f"no tasks at {tasks}"}
    res = run_probe(ProbeConfig(model=cfg.model, site=site, tasks=tasks, tasks_filter=cfg.probe_filter,
                                features=["raw", "mlp", f"glp:{glp_dir}", "pca:16"], out=str(out), n_boot=2000))
    return res
