"""``innards steer generate``: generate with a steering vector, optionally GLP-projected."""

from __future__ import annotations

from innards.config import command
from innards.steer.generate import GenerateConfig, steer_generate


def main(argv: list[str] | None = None) -> int:
    return command(GenerateConfig, steer_generate, argv, prog="innards steer generate",
                   description="Add r*||a||*v at a site while generating (KV-cached, batched, seeded); "
                               "--glp projects each edited activation onto the meta-model's manifold.")
