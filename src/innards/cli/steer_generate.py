"""``innards steer generate``: generate with a steering vector, optionally through a GLP."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards steer generate``."""
    from innards.steer.config import STEER_ALIASES
    from innards.steer.generate import GenerateConfig, steer_generate

    return command(GenerateConfig, steer_generate, argv, prog="innards steer generate", aliases=STEER_ALIASES,
                   description="Add r*||a||*v at a site while generating (KV-cached, batched, seeded); "
                               "--glp projects each edited activation onto the meta-model's manifold "
                               "(or guides it with the meta-model's score: --glp-use prior).")
