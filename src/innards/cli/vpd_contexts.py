"""innards vpd contexts"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Top-activating token contexts (by causal importance) per component; JSON + HTML + Markdown."""
    from innards.config import command
    from innards.vpd.analysis import ContextsConfig, contexts

    return command(ContextsConfig, contexts, argv, prog="innards vpd contexts", description="Top-activating token contexts (by causal importance) per component; JSON + HTML + Markdown.")
