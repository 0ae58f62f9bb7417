"""``innards bench harvest``: harvest throughput against the bare forward pass, as one JSON object."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards bench harvest``."""
    from innards.bench.harvest import BenchHarvestConfig, run
    from innards.data.harvest import old_dtype_hint
    from innards.models.config import MODEL_ALIASES

    old_dtype_hint(argv)
    return command(BenchHarvestConfig, run, argv, prog="innards bench harvest", aliases=MODEL_ALIASES,
                   description="Harvest and run the bare forward pass over the same batches, interleaved, at the middle "
                               "block (the harvest stops early) and the last; prints one JSON object (per run: "
                               "harvest_tokens_per_s, forward_tokens_per_s, ratio, ratio_body; peak_rss_mb).")
