"""``innards glp sample``: draw activations from a meta-model and write them (denormalised)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from innards.config import command
from innards.errors import InnardsError


@dataclass
class GLPSampleConfig:
    """Configuration of ``innards glp sample``."""

    glp: str = ""
    """GLP folder (innards glp train --out)"""
    n: int = 1024
    """number of activations"""
    steps: int = 100
    """solver steps from t = 1 to t = 0 (Heun spends two evaluations per step, the others one)"""
    solver: Literal["euler", "heun", "ab2"] = "euler"
    """euler, heun, or ab2 (second-order multistep, one evaluation per step)"""
    schedule: Literal["uniform", "shift", "reference"] = "uniform"
    """time grid: uniform, shift (denser near t = 0) or the reference code's grid"""
    seed: int = 0
    site: str | None = None
    """which site, for a multi-site GLP"""
    out: str = "samples.safetensors"
    """output file: .safetensors (tensor 'acts') or .npy"""
    device: str | None = None
    batch_size: int = 16384


def sample_to_file(cfg: GLPSampleConfig) -> Path:
    """Sample from a GLP and write the denormalised activations (N, d) atomically."""
    import numpy as np
    import torch

    from innards.glp.model import GLP
    from innards.io import atomic_write_bytes, save_tensors
    from innards.runtime import default_device

    if not cfg.glp:
        raise InnardsError("give --glp DIR")
    out = Path(cfg.out)
    if out.suffix not in (".safetensors", ".npy"):
        raise InnardsError(f"--out must end in .safetensors or .npy, got {out.name}")
    if cfg.n < 1:
        raise InnardsError("-n must be at least 1")
    glp = GLP.from_pretrained(cfg.glp, device=default_device(cfg.device))
    x = glp.sample(cfg.n, steps=cfg.steps, solver=cfg.solver, seed=cfg.seed, site=cfg.site, schedule=cfg.schedule,
                   batch_size=cfg.batch_size, progress=True).cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, x.numpy())
        atomic_write_bytes(out, buf.getvalue())
    else:
        meta = {"glp": str(cfg.glp), "site": str(cfg.site or glp.meta.get("site")), "steps": str(cfg.steps),
                "solver": cfg.solver, "schedule": cfg.schedule, "seed": str(cfg.seed)}
        save_tensors(out, {"acts": x.to(torch.float32)}, metadata=meta)
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse GLPSampleConfig and write samples."""

    def run(cfg: GLPSampleConfig) -> int:
        print(sample_to_file(cfg))
        return 0

    return command(GLPSampleConfig, run, argv, prog="innards glp sample",
                   description="Sample activations from a GLP (Euler, Heun or AB2 from t = 1 to 0), denormalised.",
                   aliases={"-n": "--n"})
