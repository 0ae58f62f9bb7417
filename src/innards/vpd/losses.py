"""Loss terms: output divergence, importance and frequency minimality, p annealing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def divergence(target: torch.Tensor, out: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(softmax(target) ‖ softmax(out)) summed over the vocabulary and averaged over positions, or MSE.

    The target is detached: it is the frozen model's output, never a training signal.
    """
    target = target.detach()
    if kind == "kl":
        logp = F.log_softmax(target.float(), -1)
        logq = F.log_softmax(out.float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()
    return ((out.float() - target.float()) ** 2).mean()


def p_at(step: int, total: int, p_start: float, p_end: float, end_frac: float = 1.0) -> float:
    """Linearly annealed p: p(0) = p_start, p(end_frac·total) = p_end, constant afterwards."""
    if total <= 0 or end_frac <= 0:
        return p_end
    return p_start + (p_end - p_start) * min(max(step / (end_frac * total), 0.0), 1.0)


def minimality(g_upper: dict[str, torch.Tensor], p: float, eps: float = 1e-12,
               world: int = 1, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance, frequency) minimality, grouped per matrix.

    s_{l,c} = Σ_{b,t} |g + ε|^p over the local batch; importance = Σ_{l,c} s/N; frequency =
    Σ_{l,c} (s/N)·log2(1 + s·world), the local sum scaled by the world size to estimate the global one.
    ``weights`` (one per row of a 2-D g): how many batch rows each row stands for.
    """
    imp = torch.zeros((), device=next(iter(g_upper.values())).device)
    freq = torch.zeros_like(imp)
    for g in g_upper.values():
        e = (g.float() + eps).pow(p).reshape(-1, g.shape[-1])
        if weights is None:
            n = g[..., 0].numel()
            s = e.sum(0)
        else:
            n = float(weights.sum())
            s = weights @ e
        imp = imp + s.sum() / n
        freq = freq + (s / n * torch.log2(1 + s * world)).sum()
    return imp, freq
