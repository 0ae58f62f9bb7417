"""``innards steer showcase``: packaged concepts steered raw, by GLP projection, prior-guided and by prompting."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards steer showcase``."""
    from innards.steer.showcase import SHOWCASE_ALIASES, ShowcaseConfig, run_showcase

    return command(ShowcaseConfig, run_showcase, argv, prog="innards steer showcase", aliases=SHOWCASE_ALIASES,
                   description="Steer the packaged concepts (sea, royalty, food, night, winter, happy): show that raw "
                               "steering moves each, then compare raw, GLP projection, prior-guided steering and "
                               "prompting at equal concept (NLL, distinct-2, paired bootstrap CIs over prompts), and "
                               "measure what survives projection.")
