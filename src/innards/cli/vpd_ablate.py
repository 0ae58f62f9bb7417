"""innards vpd ablate"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """How removing one subcomponent changes the next-token distribution after a prompt."""
    from innards.config import command
    from innards.vpd.analysis import AblateConfig, ablate

    return command(AblateConfig, ablate, argv, prog="innards vpd ablate", description="How removing one subcomponent changes the next-token distribution after a prompt.")
