"""AdamW settings and the one learning-rate schedule: linear warm-up, then cosine, constant or a final linear decay."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from innards.config import at_least, positive, within


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-3
    """peak learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    clip: float = 1.0
    """global gradient-norm clip (0 = off)"""
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    """after warm-up: cosine to final_lr_frac, constant, or wsd (flat, then linear to final_lr_frac over `decay`)"""
    warmup: float = 0.0
    """fraction of the steps spent warming up linearly from warmup_start x lr"""
    warmup_start: float = 0.01
    """learning rate at step 0 of the warm-up, as a fraction of lr"""
    final_lr_frac: float = 0.1
    """learning rate at the end, as a fraction of lr"""
    decay: float = 0.2
    """wsd only: fraction of the steps in the final linear decay"""

    FLAG_PREFIX = "optim"

    def __post_init__(self) -> None:
        positive(self, "lr")
        at_least(self, 0.0, "weight_decay", "clip")
        within(self, "warmup", 0.0, 1.0, open_hi=True)
        within(self, "warmup_start", 0.0, 1.0)
        within(self, "final_lr_frac", 0.0, 1.0)
        within(self, "decay", 0.0, 1.0)


def warmup_steps(total: int, cfg: OptimConfig) -> int:
    """Number of warm-up steps of a ``total``-step run (at least one when warm-up is on)."""
    return max(1, int(round(cfg.warmup * total))) if cfg.warmup > 0 else 0


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` before optimiser step ``step`` (0-based) of ``total``."""
    w = warmup_steps(total, cfg)
    if step < w:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / w
    final = cfg.final_lr_frac
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        start = int((1.0 - cfg.decay) * total)
        if step < start:
            return 1.0
        return final + (1.0 - final) * max(0.0, (total - step) / max(1, total - start))
    p = min(1.0, (step - w) / max(1, total - w))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in opt.param_groups:
        g["lr"] = lr


def adamw(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, device: torch.device,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CUDA and the foreach one elsewhere."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas,
                             **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def clip_grads(params: Iterable[torch.nn.Parameter], clip: float) -> float:
    """Clip the global gradient norm (0 = off); returns the norm before clipping (NaN when off)."""
    if clip <= 0:
        return float("nan")
    return float(torch.nn.utils.clip_grad_norm_(list(params), clip))
