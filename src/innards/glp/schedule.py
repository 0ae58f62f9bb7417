"""Time grids and ODE solvers for the flow-matching meta-model (t = 0 clean, t = 1 pure noise).

Conventions (paper time t; the reference code's sigma equals t, its user knob u = 1 - t):
- the network is fed tau = 1000 * t;
- a sampling grid lists the times at which the state is defined, from t_0 down to 0; a solver moves
  the state from one grid point to the next, so a grid of K + 1 points is K steps;
- Euler costs one network evaluation per step, Heun two (its second evaluation is at the step's end,
  also when that end is t = 0, which the model was trained on); ``ab2`` (two-step Adams-Bashforth
  with variable steps: the previous step's velocity extrapolates the current one) is second order at
  one evaluation per step, its first step being Euler; ``pc2`` is ab2 as a predictor with the
  trapezoidal (Adams-Moulton 2) corrector, UniPC-style: the evaluation at the start of each step,
  made at the predicted state, also corrects the step before, so it costs no extra evaluation (one
  per step; the last step is not corrected).

Few-step grids for sampling: the learned flows are most sensitive near t = 1 (an early error is
carried, and amplified, along the whole path), so ``shift`` grids (denser near t = 1) win at 4-8
evaluations; for projection from t_start <= 0.5 the flow is nearly straight and the uniform grid is
as good (``innards bench glp`` measures both, see docs/results/bench_glp_nfe_*.json).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from innards.errors import InnardsError

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
SOLVERS = ("euler", "heun", "ab2", "pc2")
SAMPLE_SCHEDULES = ("uniform", "shift", "reference")
_SIGMA_MIN = float(np.float32(0.001))  # diffusers' shift-1 sigma_min, as the float32 it stores


def sample_grid(steps: int, schedule: str = "uniform", shift: float = 3.0) -> list[float]:
    """Times for unconditional sampling from t = 1 to t = 0 (``steps`` + 1 points).

    ``uniform``: linspace(1, 0). ``shift``: the uniform grid warped by t -> s t / (1 + (s - 1) t)
    (SD3's shift; s > 1 puts more steps near t = 1, where few-step samplers lose the most; ``shift:S``
    names s inline, e.g. ``shift:2``). ``reference``: the reference code's grid linspace(1000, 1, steps) / 1000
    with the terminal 0 appended.
    """
    schedule, shift = parse_schedule(schedule, shift)
    if steps < 1:
        raise InnardsError(f"steps must be at least 1, got {steps}")
    if schedule == "uniform":
        return [1.0 - i / steps for i in range(steps)] + [0.0]
    if schedule == "shift":
        if shift <= 0:
            raise InnardsError(f"shift must be positive, got {shift}")
        u = [1.0 - i / steps for i in range(steps)] + [0.0]
        return [shift * x / (1.0 + (shift - 1.0) * x) for x in u]
    if schedule == "reference":
        return reference_grid(steps) + [0.0]
    raise InnardsError(f"unknown sampling schedule '{schedule}' (choose {', '.join(SAMPLE_SCHEDULES)})")


def parse_schedule(schedule: str, shift: float = 3.0) -> tuple[str, float]:
    """``"shift:2"`` -> ("shift", 2.0); any other name comes back with ``shift`` unchanged."""
    name, sep, arg = schedule.partition(":")
    if not sep:
        return schedule, shift
    if name != "shift":
        raise InnardsError(f"only the shift schedule takes a value (shift:S), got '{schedule}'")
    try:
        return name, float(arg)
    except ValueError:
        raise InnardsError(f"shift:S needs a number S, got '{schedule}'") from None


def reference_grid(n: int) -> list[float]:
    """The reference code's n-point grid, bit for bit: sigma_i = float32(linspace(1000, 1000 sigma_min, n) / 1000).

    diffusers' FlowMatchEulerDiscreteScheduler builds it in float64 with sigma_min = float32(0.001) and
    rounds to float32 once; every value here is that float32 number (so 1000 * sigma in float32 is the
    reference's network timestep, and Euler steps are the reference's float32 differences).
    """
    if n < 1:
        raise InnardsError(f"grid size must be at least 1, got {n}")
    return [float(v) for v in np.float32(np.linspace(1000.0, 1000.0 * _SIGMA_MIN, n) / 1000.0)]


def grid_index(u: float, n: int) -> int:
    """The reference's grid index floor(u * n), computed in float32 as it does (u = 0.9, n = 1000 gives 900)."""
    return int(np.floor(np.float32(u) * np.float32(n)))


def reference_train_sigma(u: torch.Tensor) -> torch.Tensor:
    """Training noise levels of the reference for code-convention u in [0, 1): sigma on the 1000-point grid (float32)."""
    grid = torch.tensor(reference_grid(1000), dtype=torch.float32, device=u.device)
    return grid[(u.to(torch.float32) * 1000).long().clamp(0, 999)]


def sdedit_grid(t_start: float, steps: int = 20, schedule: str = "exact") -> list[float]:
    """Times for SDEdit projection: the first is the noise level, the last is 0.

    ``exact`` (paper): linspace(t_start, 0, steps), i.e. steps - 1 evaluations.
    ``grid`` (reference code): u = 1 - t_start, i = floor(u * steps) (in float32) on the ``steps``-point grid,
    start at sigma_i and visit sigma_i ... sigma_{steps-1}, then 0 (steps - i evaluations; for
    t_start = 0.5 and 20 steps that is sigma = 0.474211 and 10 evaluations).
    """
    if not (0.0 <= t_start <= 1.0) or math.isnan(t_start):
        raise InnardsError(f"t_start must be in [0, 1], got {t_start}")
    if steps < 1:
        raise InnardsError(f"steps must be at least 1, got {steps}")
    if schedule == "exact":
        if t_start == 0.0 or steps == 1:
            return [t_start]
        return [t_start * (1.0 - i / (steps - 1)) for i in range(steps)]
    if schedule == "grid":
        i = grid_index(1.0 - t_start, steps)
        if i >= steps:
            return [0.0]
        return reference_grid(steps)[i:] + [0.0]
    raise InnardsError(f"unknown projection schedule '{schedule}' (choose exact or grid)")


def n_evaluations(grid: list[float], solver: str = "euler") -> int:
    """Network evaluations a solver spends on a grid."""
    steps = len(grid) - 1
    return steps * (2 if solver == "heun" else 1)


def integrate(velocity: Velocity, z: torch.Tensor, grid: list[float], solver: str = "euler",
              progress: str | None = None, trace: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Solve dz/dt = v(z, t) along ``grid`` (decreasing times) with Euler, Heun, Adams-Bashforth 2 or pc2.

    ``progress``: a description to show a progress bar over the steps (long 1000-step samplers).
    ``trace``: called with (i, state at grid[i]) for every grid point (pc2: the corrected state; the
    last one is the result).
    """
    if solver not in SOLVERS:
        raise InnardsError(f"unknown solver '{solver}' (choose {', '.join(SOLVERS)})")
    prev: tuple[torch.Tensor, float] | None = None  # the previous step's velocity and size
    start = z  # the state the previous step started from (pc2 corrects that step)
    steps = zip(grid[:-1], grid[1:])
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=len(grid) - 1, desc=progress, unit="step", leave=False)
    for i, (t0, t1) in enumerate(steps):
        dt = t1 - t0
        v0 = velocity(z, t0)
        if solver == "pc2" and prev is not None:
            # trapezoidal corrector of the previous step with v0, which was evaluated at its predicted end
            z = start + (0.5 * prev[1]) * (prev[0] + v0)
        if trace is not None:
            trace(i, z)
        if solver == "heun":
            v1 = velocity(z + dt * v0, t1)
            z = z + (0.5 * dt) * (v0 + v1)
            continue
        start = z
        if solver == "euler" or prev is None:
            z = z + dt * v0
        else:
            # the linear extrapolation of v through the last two evaluations, integrated over the step
            r = dt / (2.0 * prev[1])
            z = z + dt * ((1.0 + r) * v0 - r * prev[0])
        prev = (v0, dt)
    if trace is not None:
        trace(len(grid) - 1, z)
    return z


def steps_for_nfe(nfe: int, solver: str) -> int:
    """Steps that spend exactly ``nfe`` evaluations (Heun: nfe must be even)."""
    if solver == "heun":
        if nfe % 2:
            raise InnardsError(f"Heun spends two evaluations per step; {nfe} is odd")
        return nfe // 2
    return nfe


def flow_matching_inputs(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input z_t = (1 - t) x + t eps and velocity target eps - x (t: scalar or one per row, float32 arithmetic)."""
    if isinstance(t, torch.Tensor):
        t = t.to(device=x.device, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return (1.0 - t) * x + t * eps, eps - x
