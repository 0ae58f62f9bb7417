"""``innards steer sweep``: raw vs GLP steering over strengths, concept score vs fluency."""

from __future__ import annotations

from innards.config import command
from innards.steer.sweep import SweepConfig, run_sweep


def main(argv: list[str] | None = None) -> int:
    return command(SweepConfig, run_sweep, argv, prog="innards steer sweep",
                   description="Sweep steering strengths with and without GLP projection; offline concept "
                               "evaluator, unsteered-model NLL, distinct-2, bootstrap CIs, Pareto plot.")
