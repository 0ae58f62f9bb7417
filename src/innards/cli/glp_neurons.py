"""``innards glp neurons``: top-activating contexts of GLP meta-neurons."""

from __future__ import annotations

from innards.config import command
from innards.models.config import MODEL_ALIASES

# the flat spellings of innards 0.1: --dtype and --device were the model's
ALIASES = {**MODEL_ALIASES, "--dtype": "--model.dtype"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards glp neurons`."""
    from innards.glp.neurons import NeuronsConfig, glp_neurons

    return command(NeuronsConfig, glp_neurons, argv, prog="innards glp neurons",
                   description="For each (selected) meta-neuron, its top-activating contexts over a text "
                               "source, as JSON, HTML and Markdown.", aliases=ALIASES)
