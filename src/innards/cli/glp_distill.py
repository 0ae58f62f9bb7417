"""``innards glp distill``: distil a GLP into a few-step student GLP (its own K Euler steps follow the teacher's flow)."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Parse DistillConfig and train the student."""
    from innards.glp.distill import DistillConfig, distill_glp

    def run(cfg: DistillConfig) -> int:
        distill_glp(cfg)
        return 0

    return command(DistillConfig, run, argv, prog="innards glp distill",
                   description="Distil a GLP into a few-step student: a GLP whose --steps Euler steps on --schedule land on "
                               "the teacher's ODE trajectory (trained on the student's own rollouts); saved as a GLP "
                               "whose config records its teacher and the settings to sample with.")
