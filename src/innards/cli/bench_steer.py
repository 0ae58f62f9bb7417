"""``innards bench steer``: tokens/s of steered generation with GLP projection vs without, as JSON."""

from __future__ import annotations

import json

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Run the steering benchmark and print one JSON object."""
    from innards.bench.steer import BENCH_STEER_ALIASES, BenchSteerConfig, bench_steer

    def run(cfg: BenchSteerConfig) -> int:
        print(json.dumps(bench_steer(cfg), indent=2, default=str))
        return 0

    return command(BenchSteerConfig, run, argv, prog="innards bench steer", aliases=BENCH_STEER_ALIASES,
                   description="Generated tokens/s of steered generation with GLP projection at several NFE, divided "
                               "by raw steering (and plain generation), measured side by side on the same prompts "
                               "with the KV cache on; plus the projection's own cost per step.")
