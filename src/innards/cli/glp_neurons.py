"""``innards glp neurons``: top-activating contexts of GLP meta-neurons."""

from __future__ import annotations

from innards.config import command
from innards.glp.neurons import NeuronsConfig, glp_neurons


def main(argv: list[str] | None = None) -> int:
    return command(NeuronsConfig, glp_neurons, argv, prog="innards glp neurons",
                   description="For each (selected) meta-neuron, its top-activating contexts over a text "
                               "source, as JSON, HTML and Markdown.")
