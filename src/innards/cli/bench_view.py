"""``innards bench view``: how fast the viewer opens big runs (20k meta-neurons, 50k subcomponents)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards bench view`."""
    from innards.bench.view import BenchViewConfig, bench_view
    from innards.config import command

    return command(BenchViewConfig, bench_view, argv, prog="innards bench view",
                   description="Write synthetic runs of real size (a meta-neuron folder with 20k neurons, a VPD run "
                               "with 50k subcomponents), then time discovery, the server's first and later list pages, "
                               "item pages, the static report and the size of its files; prints JSON.")
