"""``innards harvest``: activations of a model on a text into a sharded, resumable store."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards harvest`` (also under ``torchrun -m innards harvest``)."""
    from innards.data.harvest import HarvestConfig, harvest, old_dtype_hint
    from innards.models.config import MODEL_ALIASES

    old_dtype_hint(argv)
    return command(HarvestConfig, lambda cfg: harvest(cfg) and 0, argv, prog="innards harvest", aliases=MODEL_ALIASES,
                   description="Harvest activations of a model at one or more sites into an activation store "
                               "(resumable: rerun the same command after a crash; torchrun splits documents by rank).")
