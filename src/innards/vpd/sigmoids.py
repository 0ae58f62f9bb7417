"""The two leaky hard sigmoids applied to causal-importance logits."""

from __future__ import annotations

import torch

LEAK = 0.01


class _LowerLeaky(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        inside = (z > 0) & (z <= 1)
        # below 0 the leak only lets descent raise the output (grad < 0), so dead components can recover
        # but are never pushed further down; z == 0 belongs to this lower branch
        below = (z <= 0) & (grad < 0)
        return torch.where(inside, grad, torch.where(below, grad * LEAK, torch.zeros_like(grad)))


def lower_leaky(z: torch.Tensor) -> torch.Tensor:
    """Forward clamp(z, 0, 1); backward passes in (0, 1], 0 above 1, 0.01*grad below 0 only if grad < 0."""
    return _LowerLeaky.apply(z)


def upper_leaky(z: torch.Tensor) -> torch.Tensor:
    """clamp(z, 0, 1) with slope 0.01 above 1 (ordinary autograd); used only in minimality losses."""
    return torch.where(z > 1, 1 + LEAK * (z - 1), z.clamp(0.0, 1.0))
