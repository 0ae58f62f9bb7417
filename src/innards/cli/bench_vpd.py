"""innards bench vpd [--steps N] [--cases NAME[:STEPS],...] [--reference PATH] [--memory] [--out FILE.json]"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Benchmark VPD/SPD training steps per second (training only), per phase, against the reference."""
    from innards.bench.vpd import BenchVPDConfig, bench_vpd
    from innards.config import command

    return command(BenchVPDConfig, bench_vpd, argv, prog="innards bench vpd",
                   description="Training-only steps/s (wall and CPU time) and a per-phase breakdown of shipped "
                               "decomposition configs (default TMS 5-2 SPD and VPD, ResidMLP-1 SPD) on one thread. "
                               "With --reference PATH (a goodfire-ai/spd checkout importable here) the reference is "
                               "timed interleaved in the same run and the speed-up is the ratio of the two; without "
                               "it, innards alone is reported. --memory adds peak RSS per process of 1 vs 2 processes "
                               "(replicated, FSDP2, FSDP2 + activation checkpointing) on language-model targets.")
