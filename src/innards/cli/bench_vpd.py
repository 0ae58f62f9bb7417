"""innards bench vpd [--steps N] [--objectives spd,vpd] [--out FILE.json]"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Benchmark VPD/SPD training steps per second on TMS 5-2."""
    from innards.bench.vpd import BenchVPDConfig, bench_vpd
    from innards.config import command

    return command(BenchVPDConfig, bench_vpd, argv, prog="innards bench vpd",
                   description="TMS 5-2 decomposition (C=20, batch 4096) on one thread for a fixed number of steps, "
                               "SPD objective and full VPD; prints JSON with steps_per_s and the recovery achieved. "
                               "Reference: goodfire-ai/spd at 22.6 steps/s.")
