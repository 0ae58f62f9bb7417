"""``innards probe``: 1-D (or dense) probing of feature sets on SAE-Probes-style tasks."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards probe``."""
    from innards.probe.run import PROBE_ALIASES, ProbeConfig, run_probe

    return command(ProbeConfig, run_probe, argv, prog="innards probe", aliases=PROBE_ALIASES,
                   description="Probe feature sets (raw, mlp, glp:X, sae:X, pca:K, vpd:RUN) of one site on binary "
                               "tasks with the SAE-Probes split and the published 1-D protocol; writes per-task JSON, "
                               "summary.json (mean AUC, 95% bootstrap CI), table.md and summary.png.")
