"""``innards glp scale``: a GLP depth sweep, its compute-efficient envelope and a fitted scaling law."""

from __future__ import annotations

from innards.config import command
from innards.glp.scale import ScaleConfig, scale


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards glp scale`."""
    def run(cfg: ScaleConfig) -> int:
        scale(cfg)
        return 0

    return command(ScaleConfig, run, argv, prog="innards glp scale",
                   description="Train GLPs of several depths with log-spaced checkpoints, fit L(C) = E + A C^-alpha "
                               "(C = 6 N D) to the compute-efficient envelope of validation loss, and plot it.",
                   aliases={"--lr": "--optim.lr", "--max-len": "--context"})
