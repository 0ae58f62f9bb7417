"""Adversarial sources: persistent PGD with Adam ascent (training) and fresh sign-PGD (evaluation)."""

from __future__ import annotations

from typing import Any

import torch

from innards.vpd.components import Decomposition
from innards.vpd.config import AdversaryConfig, FreshPGDTermConfig
from innards.vpd.losses import divergence
from innards.vpd.masks import Draws, rand, source_masks, uniform_k_routing


def adv_loss(decomp: Decomposition, x: torch.Tensor, clean: torch.Tensor, g: dict[str, torch.Tensor],
             sources: dict[str, torch.Tensor], kind: str, use_delta: bool = True,
             route: dict[str, torch.Tensor] | None = None, pre: dict[str, torch.Tensor] | None = None,
             **kw: Any) -> torch.Tensor:
    """Divergence from the target under masks g + (1 − g)·r with the adversary's sources r."""
    out = decomp.masked(x, source_masks(g, sources, use_delta, route), pre=pre, **kw)
    return divergence(clean, out, kind)


def _all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as td

        td.all_reduce(t)
        t /= world
    return t


def fresh_pgd_term(decomp: Decomposition, x: torch.Tensor, clean: torch.Tensor, g: dict[str, torch.Tensor], kind: str,
                   cfg: FreshPGDTermConfig, use_delta: bool, draws: Draws, world: int = 1,
                   pre: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Training-time fresh PGD: new U(0, 1) sources, ``n_steps`` sign ascents, then the loss in the main graph.

    Sources are (1, …, C+1) shared across the batch (initial values from rank 0, gradients averaged across
    ranks) or one per datapoint; routing is drawn once and kept for the ascents and the final loss.
    """
    first = next(iter(g.values()))
    lead, dev = tuple(first.shape[:-1]), first.device
    src = {}
    for n, v in g.items():
        width = v.shape[-1] + (1 if use_delta else 0)
        if cfg.scope == "shared":
            s = rand((1,) * len(lead) + (width,), draws.generator if hasattr(draws, "generator") else draws, dev)
            if world > 1:
                import torch.distributed as td

                td.broadcast(s, 0)
        else:
            s = rand(lead + (width,), draws, dev)
        src[n] = s if use_delta else torch.cat([s, torch.zeros_like(s[..., :1])], -1)
    route = None
    if cfg.routing == "uniform_k":
        r = uniform_k_routing(lead, len(g), draws, dev)
        route = {n: r[..., i] for i, n in enumerate(g)}
    gd = {n: v.detach() for n, v in g.items()}
    pre_d = None if pre is None else {n: v.detach() for n, v in pre.items()}
    for _ in range(cfg.n_steps):
        leaves = {n: s.clone().requires_grad_(True) for n, s in src.items()}
        loss = adv_loss(decomp, x, clean, gd, leaves, kind, use_delta, route, pre=pre_d)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        with torch.no_grad():
            for (n, s), gr in zip(src.items(), grads):
                if cfg.scope == "shared":
                    gr = _all_reduce_mean(gr.contiguous(), world)
                s.add_(cfg.step_size * gr.sign()).clamp_(0.0, 1.0)
    return adv_loss(decomp, x, clean, g, src, kind, use_delta, route, pre=pre)


class PersistentPGD:
    """Per-matrix sources (…, C+1) in [0, 1] that persist across steps, moved by bias-corrected Adam ascent."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], cfg: AdversaryConfig, generator: torch.Generator,
                 device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.sources = {n: torch.rand(s, generator=generator).to(device) for n, s in shapes.items()}
        self.m = {n: torch.zeros_like(s) for n, s in self.sources.items()}
        self.v = {n: torch.zeros_like(s) for n, s in self.sources.items()}
        self.t = 0  # one counter shared across matrices, +1 per ascent

    def lr_at(self, step: int, total: int) -> float:
        """Linear warm-up from 0 over the first warmup_frac of steps, then constant."""
        warm = self.cfg.warmup_frac * total
        if warm <= 0 or step >= warm:
            return self.cfg.lr
        return self.cfg.lr * step / warm

    def leaves(self) -> dict[str, torch.Tensor]:
        """The current sources as fresh leaves that record gradients."""
        return {n: s.detach().clone().requires_grad_(True) for n, s in self.sources.items()}

    @torch.no_grad()
    def ascend(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        """One Adam ascent step on every matrix's sources, then clamp to [0, 1]."""
        c = self.cfg
        self.t += 1
        bc1, bc2 = 1 - c.beta1 ** self.t, 1 - c.beta2 ** self.t
        for n, gr in grads.items():
            m, v, s = self.m[n], self.v[n], self.sources[n]
            m.mul_(c.beta1).add_(gr, alpha=1 - c.beta1)
            v.mul_(c.beta2).addcmul_(gr, gr, value=1 - c.beta2)
            # ε outside the square root, as in Adam
            s.add_(lr * (m / bc1) / ((v / bc2).sqrt() + c.eps)).clamp_(0.0, 1.0)

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.sources:
            out[f"adv.r.{n}"], out[f"adv.m.{n}"], out[f"adv.v.{n}"] = self.sources[n], self.m[n], self.v[n]
        out["adv.t"] = torch.tensor(self.t)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for n in self.sources:
            self.sources[n] = tensors[f"adv.r.{n}"].clone()
            self.m[n] = tensors[f"adv.m.{n}"].clone()
            self.v[n] = tensors[f"adv.v.{n}"].clone()
        self.t = int(tensors["adv.t"])


def fresh_pgd(decomp: Decomposition, x: torch.Tensor, clean: torch.Tensor, g: dict[str, torch.Tensor], kind: str,
              steps: int = 20, step_size: float = 0.1, use_delta: bool = True,
              generator: torch.Generator | None = None, world: int = 1, return_trace: bool = False,
              **kw: Any) -> torch.Tensor | tuple[torch.Tensor, list[float]]:
    """Divergence under a fresh adversary: one source per subcomponent (+Δ) shared across batch and positions.

    Sign-gradient ascent ``steps`` times with ``step_size``, clamped to [0, 1], then one final evaluation.
    Under torchrun the initial sources come from rank 0 and gradients are averaged across ranks.
    """
    g = {n: v.detach() for n, v in g.items()}
    lead = (1,) * (next(iter(g.values())).dim() - 1)
    dev = clean.device
    src = {n: torch.rand(*lead, v.shape[-1] + 1, generator=generator).to(dev) for n, v in g.items()}
    if world > 1:
        import torch.distributed as td

        for s in src.values():
            td.broadcast(s, 0)
    trace = []
    for _ in range(steps):
        leaves = {n: s.clone().requires_grad_(True) for n, s in src.items()}
        loss = adv_loss(decomp, x, clean, g, leaves, kind, use_delta, **kw)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        trace.append(float(loss.detach()))
        with torch.no_grad():
            for (n, s), gr in zip(src.items(), grads):
                if world > 1:
                    import torch.distributed as td

                    td.all_reduce(gr)
                    gr /= world
                s.add_(step_size * gr.sign()).clamp_(0.0, 1.0)
    with torch.no_grad():
        final = adv_loss(decomp, x, clean, g, src, kind, use_delta, **kw)
    trace.append(float(final))
    return (final, trace) if return_trace else final
