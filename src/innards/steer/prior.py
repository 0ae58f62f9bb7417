"""Prior-guided steering: add the steering offset while the meta-model's score pulls towards typical activations.

The GLP predicts the velocity v(z, t) ~ eps - x of the path z_t = (1 - t) x + t eps (glp-reference.md
§3.1), so it also gives the noise estimate eps_hat = z + (1 - t) v, the denoised estimate
x_hat = z - t v, and the score of the noised density, grad log p_t(z) ~ -eps_hat / t (Tweedie:
E[(1 - t) x | z] = z + t^2 grad log p_t(z)). For a candidate activation x (normalised) the model is read
at z = (1 - t) x, where x sits on the noising path without noise; the move towards the denoised
estimate, x_hat - x = -t / (1 - t) eps_hat, points along the score.

Each of ``steps`` steps adds ``offset / steps`` and then moves ``weight`` of the way to the denoised
estimate. ``weight`` = 0 is raw addition exactly; larger weights trade concept for typicality. Unlike
SDEdit no noise is drawn, so the edit is deterministic, and it costs ``steps`` evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from innards.glp.model import GLP
from innards.steer.config import PriorConfig


@torch.no_grad()
def prior_guided(glp: GLP, acts: torch.Tensor, offset: torch.Tensor, cfg: PriorConfig, site: str | None = None,
                 velocity: Callable[[torch.Tensor, float], torch.Tensor] | None = None) -> torch.Tensor:
    """``acts`` (rows, d) steered by ``offset`` (d,) with ``cfg.steps`` score-guided steps; dtype and device kept.

    ``velocity``: the GLP's v(z, t) to use (e.g. :class:`innards.steer.project.FastGLP`'s cached one).
    """
    v = velocity or (lambda z, t: glp(z, t, site))
    x = glp.normalize(acts.to(glp.device), site)
    off = glp.normalize(acts.to(glp.device) + offset.to(glp.device), site) - x  # offset / std, per dimension
    t = float(cfg.t)
    for _ in range(cfg.steps):
        x = x + off / cfg.steps
        if cfg.weight > 0:
            z = (1.0 - t) * x
            x_hat = z - t * v(z, t)
            x = x + cfg.weight * (x_hat - x)
    return glp.denormalize(x, site).to(device=acts.device, dtype=acts.dtype)
