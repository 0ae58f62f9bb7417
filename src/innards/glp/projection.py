"""The settings of an on-manifold projection (SDEdit with a GLP), declared once for every command that projects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from innards.config import at_least, within


@dataclass
class ProjectionConfig:
    """How activations are projected onto the GLP's manifold: noise to t_start, integrate back to t = 0."""

    t_start: float = 0.5
    """noise level the edited activation is taken to before denoising (0 = no projection, 1 = pure noise)"""
    steps: int = 20
    """grid points from t_start to 0 (the exact schedule spends steps - 1 network evaluations)"""
    schedule: Literal["exact", "grid"] = "exact"
    """exact: linspace(t_start, 0, steps) as in the paper; grid: the reference code's snapped grid"""
    solver: Literal["euler", "heun", "ab2", "pc2"] = "euler"
    """ODE solver along the grid (pc2: second order at one evaluation per step, see innards.glp.schedule)"""

    FLAG_PREFIX = "project"

    def __post_init__(self) -> None:
        within(self, "t_start", 0.0, 1.0)
        at_least(self, 1, "steps")

    def kwargs(self) -> dict[str, float | int | str]:
        """Keyword arguments for :meth:`innards.glp.model.GLP.project`."""
        return {"t_start": self.t_start, "steps": self.steps, "schedule": self.schedule, "solver": self.solver}
