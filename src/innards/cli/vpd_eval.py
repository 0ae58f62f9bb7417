"""innards vpd eval --run DIR [--out FILE.json]"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Evaluate a decomposition under mask types and a fresh adversary."""
    from innards.config import command
    from innards.vpd.evaluate import EvalConfig, evaluate

    return command(EvalConfig, evaluate, argv, prog="innards vpd eval",
                   description="Evaluate a VPD/SPD run: CE/KL (MSE for toys) under unmasked, stochastic, CI, rounded, "
                               "random and zero masks and a fresh adversary; L0 and alive counts per matrix; Δ-L2; "
                               "ground truth for toys. Writes JSON (default RUN/eval.json) and a CI-spectrum PNG.")
