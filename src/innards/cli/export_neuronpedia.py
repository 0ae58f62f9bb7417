"""``innards export neuronpedia RUN --out DIR``: meta-neurons or VPD subcomponents as feature dashboards."""

from __future__ import annotations

from innards.config import command
from innards.export.neuronpedia import NeuronpediaConfig, export_neuronpedia


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards export neuronpedia`."""
    return command(NeuronpediaConfig, export_neuronpedia, argv, prog="innards export neuronpedia", positional="run",
                   description="Write the meta-neurons of an innards glp neurons folder, or the subcomponents of a VPD "
                               "run (with its vpd contexts), as SAEDashboard/Neuronpedia feature-dashboard batch JSON "
                               "(docs/export-neuronpedia.md: the mapping and what has no counterpart).")
