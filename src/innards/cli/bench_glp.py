"""``innards bench glp``: training throughput, MFU, memory, and FD / C2ST / projection quality against evaluations, as JSON."""

from __future__ import annotations

import json

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Run the GLP benchmark and print one JSON object."""
    from innards.bench.glp import BenchGLPConfig, bench_glp

    def run(cfg: BenchGLPConfig) -> int:
        print(json.dumps(bench_glp(cfg), indent=2, default=str))
        return 0

    return command(BenchGLPConfig, run, argv, prog="innards bench glp",
                   description="Benchmark GLP training (activations/s, FLOP/s, MFU against a measured matmul peak, "
                               "peak RSS) and quality against network evaluations for every solver and time grid (and a "
                               "distilled --student): FD and C2ST of samples, and the SDEdit projection's kept fraction of "
                               "a steering offset, error and delta LM loss against the 1000-step reference.")
