"""Masks m = g + (1 − g)·r from causal importance g and sources r, and uniform-k-subset routing."""

from __future__ import annotations

import torch

from innards.vpd.components import Mask


def interpolate(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """m = g + (1 − g)·r."""
    return g + (1 - g) * r


class SlicedDraws:
    """Random draws for one process's rows of the global batch: every process draws for the whole batch (same
    generator state everywhere) and keeps rows [rank·n, (rank+1)·n), so results do not depend on the world size."""

    def __init__(self, generator: torch.Generator, rank: int, world: int):
        self.generator, self.rank, self.world = generator, rank, world

    def _rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[self.rank * n:(self.rank + 1) * n]

    def rand(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        full = torch.rand((shape[0] * self.world, *shape[1:]), generator=self.generator).to(device)
        return self._rows(full, shape[0])

    def randint(self, low: int, high: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        full = torch.randint(low, high, (shape[0] * self.world, *shape[1:]), generator=self.generator).to(device)
        return self._rows(full, shape[0])


Draws = torch.Generator | SlicedDraws | None


def rand(shape: tuple[int, ...], generator: Draws = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """U(0, 1) of ``shape`` from a generator or from this process's rows of a global draw."""
    if isinstance(generator, SlicedDraws):
        return generator.rand(tuple(shape), device)
    if generator is not None and generator.device != torch.device(device):
        return torch.rand(tuple(shape), generator=generator).to(device)  # a CPU generator for GPU tensors
    return torch.rand(tuple(shape), generator=generator, device=device)


def uniform_k_routing(prefix: tuple[int, ...], L: int, generator: Draws = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (*prefix, L): per position k ~ U{1..L}, then a uniformly random k-subset of the L matrices."""
    if isinstance(generator, SlicedDraws):
        k = generator.randint(1, L + 1, tuple(prefix), device)
    elif generator is not None and generator.device != torch.device(device):
        k = torch.randint(1, L + 1, prefix, generator=generator).to(device)
    else:
        k = torch.randint(1, L + 1, prefix, generator=generator, device=device)
    ranks = rand((*prefix, L), generator, device).argsort(-1).argsort(-1)
    return ranks < k.unsqueeze(-1)


def stochastic_masks(g: dict[str, torch.Tensor], generator: Draws = None, use_delta: bool = True,
                     routing: str = "all", only: str | None = None) -> dict[str, Mask]:
    """Uniform sources per (position, component) and per position for Δ; optional routing.

    ``routing``: "all" masks every matrix, "uniform_k" routes a random k-subset per position.
    ``only``: mask just this matrix (SPD's layerwise term); the others keep the frozen weight.
    """
    names = list(g)
    first = g[names[0]]
    prefix, dev = tuple(first.shape[:-1]), first.device
    route = uniform_k_routing(prefix, len(names), generator, dev) if routing == "uniform_k" else None
    out = {}
    for i, n in enumerate(names):
        if only is not None and n != only:
            continue
        r = rand(g[n].shape, generator, dev)
        d = rand(prefix, generator, dev) if use_delta else None
        out[n] = Mask(interpolate(g[n], r), d, None if route is None else route[..., i])
    return out


def source_masks(g: dict[str, torch.Tensor], sources: dict[str, torch.Tensor], use_delta: bool = True,
                 route: dict[str, torch.Tensor] | None = None) -> dict[str, Mask]:
    """Masks from adversarial sources of shape (..., C+1): last channel is the raw Δ mask (never CI-interpolated)."""
    out = {}
    for n, gn in g.items():
        s = sources[n]
        C = gn.shape[-1]
        m = interpolate(gn, s[..., :C])
        d = s[..., C] if use_delta else None
        if d is not None and d.dim() < gn.dim() - 1:
            d = d.expand(gn.shape[:-1])
        out[n] = Mask(m, d, None if route is None else route[n])
    return out


def constant_masks(g: dict[str, torch.Tensor], kind: str, threshold: float = 0.0,
                   generator: torch.Generator | None = None) -> dict[str, Mask]:
    """Evaluation masks: unmasked (1), ci (g), rounded (g > τ), random (U(0,1)), zero (0); Δ off."""
    out = {}
    for n, gn in g.items():
        if kind == "unmasked":
            m = torch.ones_like(gn)
        elif kind == "ci":
            m = gn
        elif kind == "rounded":
            m = (gn > threshold).to(gn.dtype)
        elif kind == "random":
            m = rand(gn.shape, generator, gn.device)
        elif kind == "zero":
            m = torch.zeros_like(gn)
        else:
            raise ValueError(kind)
        out[n] = Mask(m, None, None)
    return out
