"""``innards steer vector``: difference-of-means steering vector from two sentence files."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards steer vector``."""
    from innards.steer.vectors import VECTOR_ALIASES, VectorConfig, build_vector

    return command(VectorConfig, build_vector, argv, prog="innards steer vector", aliases=VECTOR_ALIASES,
                   description="Difference of means of two labelled sentence sets' activations (--pos/--neg files or a "
                               "packaged --concept), or an SAE latent's decoder row (--from-sae SAE:LATENT), "
                               "unit-normalised, saved with its provenance.")
