"""``innards bench ood``: a GLP's typicality as an out-of-distribution detector, against the usual baselines."""

from __future__ import annotations

from innards.config import command
from innards.models.config import MODEL_ALIASES


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards bench ood`."""
    from innards.bench.ood import BenchOODConfig, bench_ood

    def run(cfg: BenchOODConfig) -> int:
        bench_ood(cfg)
        return 0

    return command(BenchOODConfig, run, argv, prog="innards bench ood",
                   description="ROC-AUC of GLP typicality (denoising loss, ODE likelihood), a Gaussian (Mahalanobis), "
                               "SAE reconstruction error, k-NN distance and the LM's own loss for in-distribution vs "
                               "shifted text (shuffled words, random tokens, probing prompts, --shift NAME=SRC), with "
                               "bootstrap CIs.", aliases={**MODEL_ALIASES, "--bootstrap": "--n-boot"})
