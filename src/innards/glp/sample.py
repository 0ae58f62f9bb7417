"""Unconditional samples from a meta-model, denormalised, written to one file (``innards glp sample``)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from innards.config import at_least, require
from innards.errors import InnardsError
from innards.glp.model import GLP
from innards.io import atomic_write_bytes
from innards.tensors import save_tensors
from innards.run import Run
from innards.runtime import default_device


@dataclass
class GLPSampleConfig:
    """Configuration of ``innards glp sample`` (and of :func:`sample_to_file`)."""

    glp: str = ""
    """GLP folder (innards glp train --out) or hub id"""
    n: int = 1024
    """number of activations"""
    steps: int = 100
    """solver steps from t = 1 to t = 0 (Heun spends two evaluations per step, the others one)"""
    solver: Literal["euler", "heun", "ab2", "pc2"] = "euler"
    """euler, heun, ab2 (second-order multistep, one evaluation per step) or pc2 (ab2 with a free corrector)"""
    schedule: Literal["uniform", "shift", "reference"] = "uniform"
    """time grid: uniform, shift (denser near t = 1) or the reference code's grid"""
    seed: int = 0
    """seed of the starting noise"""
    site: str | None = None
    """which site, for a multi-site GLP"""
    out: str = "samples.safetensors"
    """output file: .safetensors (tensor 'acts') or .npy"""
    device: str | None = None
    """device of the GLP (None: cuda if available, else cpu)"""
    batch_size: int = 16384
    """samples integrated at once"""
    restats: str | None = None
    """activation store whose whole-store statistics replace the GLP's normalisation (see glp/reference.py)"""
    overwrite: bool = False
    """replace a samples file made with other settings"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        at_least(self, 1, "n", "steps", "batch_size")
        require(Path(self.out).suffix in (".safetensors", ".npy"), f"--out must end in .safetensors or .npy, got {Path(self.out).name}")


def sample_to_file(cfg: GLPSampleConfig) -> Path:
    """Sample from a GLP and write the denormalised activations (N, d) atomically; returns the file."""
    if not cfg.glp:
        raise InnardsError("give --glp DIR")
    out = Path(cfg.out)
    with Run.open(out, "samples", cfg, file=True, overwrite=cfg.overwrite, free={"device", "batch_size"},
                  inputs={"glp": cfg.glp, "restats": cfg.restats}) as run:
        if run.state == "complete":
            run.say_complete()
            return out
        glp = GLP.from_pretrained(cfg.glp, device=default_device(cfg.device), restats=cfg.restats)
        x = glp.sample(cfg.n, steps=cfg.steps, solver=cfg.solver, seed=cfg.seed, site=cfg.site, schedule=cfg.schedule,
                       batch_size=cfg.batch_size, progress=cfg.progress).cpu().to(torch.float32)
        if out.suffix == ".npy":
            buf = io.BytesIO()
            np.save(buf, x.numpy())
            atomic_write_bytes(out, buf.getvalue())
        else:
            meta = {"glp": str(cfg.glp), "site": str(cfg.site or glp.meta.get("site")), "steps": str(cfg.steps),
                    "solver": cfg.solver, "schedule": cfg.schedule, "seed": str(cfg.seed)}
            save_tensors(out, {"acts": x}, metadata=meta)
        run.complete(headline={"n": cfg.n, "d": int(x.shape[1])}, outputs=[out.name])
        print(f"wrote {cfg.n:,} samples of width {x.shape[1]} to {out} ({cfg.solver}, {cfg.schedule} schedule, "
              f"{cfg.steps} steps)")
        return out
