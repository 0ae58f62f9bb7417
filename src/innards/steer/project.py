"""The GLP on the steering hot path: conditioning computed once per time, no host round trips, optionally compiled.

Every steered forward call projects (or guides) its edited activations. ``GLP.project`` rebuilds the
time embedding from a host scalar at every Euler step (a host-to-device copy and an MLP per step);
here the per-block gate multipliers c(t) are computed once per (site, t) and kept on the device, so a
step is the denoiser's blocks alone, and the whole projection of one forward call (all its steered
positions, as one batch) issues no host synchronisation. Same arithmetic, same noise stream for the
same seed: the output equals ``GLP.project`` (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from innards.glp import schedule as sch
from innards.glp.model import GLP
from innards.glp.projection import ProjectionConfig


class FastGLP:
    """A GLP of one site with cached conditioning; ``compile`` wraps the denoiser step in torch.compile."""

    def __init__(self, glp: GLP, site: str | None = None, compile: bool = False):
        self.glp = glp
        self.site = site
        self._cond: dict[float, tuple[torch.Tensor, ...]] = {}
        self._grids: dict[tuple[float, int, str], list[float]] = {}
        self._step: Callable[..., torch.Tensor] = torch.compile(self._denoise, dynamic=False) if compile else self._denoise

    def cond(self, t: float) -> tuple[torch.Tensor, ...]:
        """The blocks' gate multipliers at time t (one row each, broadcast over the batch), computed once."""
        c = self._cond.get(t)
        if c is None:
            with torch.no_grad():
                c = self.glp.conditioning(t, self.site).chunk(self.glp.config.n_blocks, dim=-1)
            self._cond[t] = c
        return c

    def _denoise(self, z: torch.Tensor, *cs: torch.Tensor) -> torch.Tensor:
        # GLP.forward with the conditioning given
        g = self.glp
        h = g.in_proj(z)
        for block, c in zip(g.blocks, cs):
            h = block(h, c)
        return g.out_proj(g.out_norm(h))

    def velocity(self, z: torch.Tensor, t: float) -> torch.Tensor:
        """v(z, t) for normalised rows z (n, d)."""
        return self._step(z, *self.cond(float(t)))

    def grid(self, cfg: ProjectionConfig) -> list[float]:
        """The projection's time grid (built once per setting)."""
        key = (cfg.t_start, cfg.steps, cfg.schedule)
        g = self._grids.get(key)
        if g is None:
            g = self._grids[key] = sch.sdedit_grid(cfg.t_start, cfg.steps, cfg.schedule)
        return g

    @torch.no_grad()
    def project(self, acts: torch.Tensor, cfg: ProjectionConfig, seed: int | None = None) -> torch.Tensor:
        """SDEdit of rows (n, d) as :meth:`GLP.project` does it; dtype and device of ``acts`` kept."""
        grid = self.grid(cfg)
        if len(grid) < 2:
            return acts.clone()
        g = self.glp
        x = g.normalize(acts.to(g.device), self.site)
        gen = None if seed is None else torch.Generator(device=g.device).manual_seed(int(seed))
        eps = torch.randn(tuple(x.shape), generator=gen, device=g.device, dtype=torch.float32)
        z, _ = sch.flow_matching_inputs(x, eps, grid[0])
        z = sch.integrate(self.velocity, z, grid, cfg.solver)
        return g.denormalize(z, self.site).to(device=acts.device, dtype=acts.dtype)
