"""The main job (`make demo`): harvest the demo LM's middle layer, train a GLP, evaluate it, and use it.

Every stage calls the same public API a user would; each writes into its own folder under ``out``.
A finished stage is not redone when the job is run again (each stage resumes or is skipped).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from innards.config import save_config


@dataclass
class DemoConfig:
    """Configuration of ``innards demo``."""

    out: str = "results/demo"
    model: str = "demo"
    site: str | None = None  # default: resid_post of the middle layer
    text: str = "generate:600"
    tokens: int = 150_000
    glp_depth: int = 3
    glp_steps: int = 1500
    glp_batch_size: int = 1024
    glp_lr: float = 1e-3
    eval_n: int = 4000
    eval_steps: int = 100
    steer: bool = True
    probe: bool = True
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
    resume = (glp_dir / "config.yaml").exists()
    train_glp(GLPTrainConfig(acts=str(acts), out=str(glp_dir), depth=cfg.glp_depth, steps=cfg.glp_steps,
                             batch_size=cfg.glp_batch_size, lr=cfg.glp_lr, seed=cfg.seed, resume=resume))
    summary["stages"]["glp_train"] = {"dir": str(glp_dir), "seconds": round(time.time() - t0, 1)}

    t0 = _stage("3. evaluate the GLP (FD vs floor and baselines, C2ST, delta LM loss)")
    result = evaluate_glp(EvalConfig(glp=str(glp_dir), acts=str(acts), model=cfg.model, n=cfg.eval_n,
                                     steps=cfg.eval_steps, out=str(out / "eval.json"), seed=cfg.seed))
    summary["stages"]["eval"] = {"file": str(out / "eval.json"), "seconds": round(time.time() - t0, 1)}
    summary["eval"] = {k: v for k, v in result.items() if isinstance(v, (int, float)) or v is None}

    write_json(out / "summary.json", summary)
    print(f"\nresults in {out}/ (summary.json, eval.json, PNGs)")
    print(json.dumps(summary["eval"], indent=1))
    return summary
