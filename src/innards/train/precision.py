"""bf16 autocast or fp32: chosen once per run, by measurement on CPU."""

from __future__ import annotations

import contextlib
import time
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]
_CACHE: dict[tuple[int, int, int], str] = {}


def resolve_precision(name: str, device: torch.device, d_model: int, d_mlp: int, batch: int) -> str:
    """'bf16' or 'fp32'; 'auto' times a matmul of the model's shape on CPU and keeps the faster."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu":
        return "fp32"
    key = (d_model, d_mlp, min(batch, 2048))
    if key not in _CACHE:
        times = {}
        for dt in (torch.float32, torch.bfloat16):
            a = torch.randn(key[2], d_model, dtype=dt)
            b = torch.randn(d_model, d_mlp, dtype=dt)
            a @ b
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            times[dt] = time.perf_counter() - t0
        _CACHE[key] = "bf16" if times[torch.bfloat16] * 1.3 < times[torch.float32] else "fp32"
    return _CACHE[key]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision ('bf16' or 'fp32')."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
