"""``innards steer vector``: difference-of-means steering vector from two sentence files."""

from __future__ import annotations

from innards.config import command
from innards.steer.vectors import VectorConfig, build_vector


def main(argv: list[str] | None = None) -> int:
    return command(VectorConfig, build_vector, argv, prog="innards steer vector",
                   description="Difference of means of two labelled sentence sets' activations, unit-normalised.")
