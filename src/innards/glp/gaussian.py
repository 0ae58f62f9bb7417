"""The exact flow-matching model of a Gaussian: the honest "no structure" prior a GLP must beat.

For data x ~ N(mu, S) (in a GLP's normalised space) and the GLP's path z_t = (1 - t) x + t eps, the
marginal z_t is N((1 - t) mu, (1 - t)^2 S + t^2 I) and the exact velocity E[eps - x | z_t] is linear
in z. In the eigenbasis of S (eigenvalues lam) each coordinate keeps its standardised value along
the probability-flow ODE, so the flow from t to 0 is the affine map

    z_0 = mu + V diag(sqrt(lam) / s_t) V^T (z_t - (1 - t) mu),   s_t = sqrt((1 - t)^2 lam + t^2),

with no discretisation error. :class:`GaussianFlow` offers the GLP's ``sample`` / ``project`` /
``normalize`` / ``velocity`` on that map, and the exact log-density, so every GLP number (FD, C2ST,
delta LM loss, likelihood) has a Gaussian counterpart computed the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from innards.errors import InnardsError
from innards.glp import schedule as sch
from innards.glp.model import GLP


class GaussianFlow:
    """Exact flow of N(mean, cov) in the normalised space of a GLP (per-dimension mean/std of the data)."""

    def __init__(self, mean: np.ndarray, cov: np.ndarray, norm_mean: np.ndarray, norm_std: np.ndarray):
        self.norm_mean = torch.as_tensor(np.asarray(norm_mean, dtype=np.float64))
        self.norm_std = torch.as_tensor(np.asarray(norm_std, dtype=np.float64))
        d = self.norm_mean.numel()
        mu = np.asarray(mean, dtype=np.float64).reshape(-1)
        S = np.asarray(cov, dtype=np.float64)
        if mu.size != d or S.shape != (d, d):
            raise InnardsError(f"Gaussian flow: moments of width {mu.size} do not fit statistics of width {d}")
        # the moments are given on the raw scale; the flow lives where the GLP does, in normalised space
        s = self.norm_std.numpy()
        mu_n = (mu - self.norm_mean.numpy()) / s
        S_n = S / np.outer(s, s)
        lam, V = np.linalg.eigh((S_n + S_n.T) / 2)
        self.lam = torch.as_tensor(np.clip(lam, 0.0, None))
        self.V = torch.as_tensor(V)
        self.mu = torch.as_tensor(mu_n)
        self.d = d

    @classmethod
    def fit(cls, x: torch.Tensor, glp: GLP, site: str | int | None = None) -> GaussianFlow:
        """The Gaussian with the mean and covariance of the rows ``x`` (raw scale), in ``glp``'s normalised space."""
        i = glp.site_index(site)
        x64 = x.detach().to("cpu", torch.float64).reshape(-1, x.shape[-1])
        if x64.shape[0] < 2:
            raise InnardsError("a Gaussian flow needs at least 2 rows")
        mu = x64.mean(0)
        xc = x64 - mu
        cov = xc.T @ xc / (x64.shape[0] - 1)
        return cls(mu.numpy(), cov.numpy(), glp.norm_mean[i].double().cpu().numpy(), glp.norm_std[i].double().cpu().numpy())

    # ----- spaces ---------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations -> the normalised space (float64)."""
        return (x.double().cpu() - self.norm_mean) / self.norm_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised space -> raw activations (float64)."""
        return z.double().cpu() * self.norm_std + self.norm_mean

    def _std(self, t: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.sqrt((1 - t) ** 2 * self.lam + t ** 2)

    # ----- the flow -------------------------------------------------------------------------------
    def velocity(self, z: torch.Tensor, t: float) -> torch.Tensor:
        """Exact velocity E[eps - x | z_t = z] (normalised space, rows of z)."""
        z = z.double().cpu()
        coef = (t - (1 - t) * self.lam) / self._std(t) ** 2
        u = (z - (1 - t) * self.mu) @ self.V
        return -self.mu + (u * coef) @ self.V.T

    def flow_to_clean(self, z: torch.Tensor, t: float) -> torch.Tensor:
        """The probability-flow map from time t to 0 (normalised space), exactly."""
        u = (z.double().cpu() - (1 - t) * self.mu) @ self.V
        return self.mu + (u * (torch.sqrt(self.lam) / self._std(t))) @ self.V.T

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """n draws (raw scale, float32): the flow of N(0, I) noise from t = 1."""
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        z = torch.randn(n, self.d, generator=g, dtype=torch.float64)
        return self.denormalize(self.flow_to_clean(z, 1.0)).float()

    def project(self, acts: torch.Tensor, t_start: float = 0.5, steps: int = 20, schedule: str = "exact",
                seed: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """SDEdit with the exact flow: normalise, noise to the schedule's start time, map back to t = 0.

        Same leading shape, dtype and device as ``acts``; ``schedule`` only sets the start time (the
        reference's grid snaps t_start = 0.5 to 0.474), the map itself is exact.
        """
        t = sch.sdedit_grid(t_start, steps, schedule)[0]
        flat = acts.reshape(-1, acts.shape[-1])
        if t == 0.0:
            return acts.clone()
        if noise is None:
            g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            noise = torch.randn(flat.shape, generator=g, dtype=torch.float64)
        z = (1 - t) * self.normalize(flat) + t * noise.reshape(flat.shape).double()
        y = self.denormalize(self.flow_to_clean(z, t))
        return y.to(device=acts.device, dtype=acts.dtype).reshape(acts.shape)

    def log_prob(self, acts: torch.Tensor) -> torch.Tensor:
        """Exact log-density of raw activations under the Gaussian (nats, one per row; the normalisation's Jacobian included)."""
        x = self.normalize(acts.reshape(-1, acts.shape[-1]))
        u = (x - self.mu) @ self.V
        lam = self.lam.clamp_min(1e-300)
        quad = (u ** 2 / lam).sum(-1)
        logdet = torch.log(lam).sum() + 2 * torch.log(self.norm_std).sum()
        return (-0.5 * (quad + logdet + self.d * math.log(2 * math.pi))).reshape(acts.shape[:-1])

    def flow_matching_loss(self, acts: torch.Tensor, t: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
        """The GLP training objective per row with the exact Gaussian velocity: the loss of a model that knows only the mean and covariance."""
        x = self.normalize(acts.reshape(-1, acts.shape[-1]))
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        e = eps.reshape(x.shape).double().cpu()
        z = (1 - tt) * x + tt * e
        coef = (tt - (1 - tt) * self.lam) / ((1 - tt) ** 2 * self.lam + tt ** 2)
        v = -self.mu + (((z - (1 - tt) * self.mu) @ self.V) * coef) @ self.V.T
        return (v - (e - x)).pow(2).mean(-1)
