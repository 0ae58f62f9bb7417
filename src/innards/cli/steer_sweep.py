"""``innards steer sweep``: raw vs GLP steering over strengths, concept score vs fluency."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards steer sweep``."""
    from innards.steer.sweep import SWEEP_ALIASES, SweepConfig, run_sweep

    return command(SweepConfig, run_sweep, argv, prog="innards steer sweep", aliases=SWEEP_ALIASES,
                   description="Sweep steering strengths with and without the GLP (SDEdit projection, prior-guided); "
                               "offline concept evaluator, unsteered-model NLL, distinct-2, bootstrap CIs, Pareto plot.")
