"""``innards bench harvest``: harvest throughput against the bare forward pass, as one JSON object."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards bench harvest``."""
    from innards.bench.harvest import BenchHarvestConfig, run

    return command(BenchHarvestConfig, run, argv, prog="innards bench harvest",
                   description="Harvest and run the bare forward pass over the same batches, interleaved; "
                               "prints one JSON object (harvest_tokens_per_s, forward_tokens_per_s, ratio, peak_rss_mb).")
