"""`innards demo`: the main job on the embedded demo model."""

from __future__ import annotations

from innards.config import command
from innards.demo import DemoConfig, run_demo


def main(argv: list[str] | None = None) -> int:
    return command(DemoConfig, run_demo, argv, prog="innards demo",
                   description="Harvest the demo LM's middle layer, train a GLP, evaluate and use it.")
