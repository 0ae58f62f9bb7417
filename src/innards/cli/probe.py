"""``innards probe``: 1-D (or dense) probing of feature sets on SAE-Probes-style tasks."""

from __future__ import annotations

from innards.config import command
from innards.probe.run import ProbeConfig, run_probe


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards probe``."""
    return command(ProbeConfig, run_probe, argv, prog="innards probe",
                   description="Probe feature sets (raw, mlp, glp:DIR, sae:DIR, pca:K) of one site on binary tasks "
                               "with the SAE-Probes split and the published 1-D protocol; writes per-task JSON, "
                               "summary.json (mean AUC, 95% bootstrap CI), table.md and summary.png.")
