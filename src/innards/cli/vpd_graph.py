"""innards vpd graph"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Attribution graph among the components active on a prompt; JSON + PNG."""
    from innards.config import command
    from innards.vpd.analysis import GraphConfig, graph

    return command(GraphConfig, graph, argv, prog="innards vpd graph", description="Attribution graph among the components active on a prompt; JSON + PNG.")
