"""``innards glp eval``: FD against floor and baselines, classifier two-sample AUCs, delta LM losses."""

from __future__ import annotations

from innards.config import command
from innards.models.config import MODEL_ALIASES

# the flat spellings of innards 0.1: the projection now lives in --project.*, the LM in --model.*
ALIASES = {"-n": "--n", "--t-start": "--project.t-start", "--project-steps": "--project.steps",
           "--project-schedule": "--project.schedule", "--max-len": "--context", **MODEL_ALIASES}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards glp eval`."""
    from innards.glp.evaluate import EvalConfig, evaluate_glp

    def run(cfg: EvalConfig) -> int:
        evaluate_glp(cfg)
        return 0

    return command(EvalConfig, run, argv, prog="innards glp eval",
                   description="Evaluate a GLP on held-out activations: Fréchet distance (with floor, Gaussian, "
                               "Gaussian-flow, PCA and SAE baselines), classifier two-sample AUCs and delta LM losses.",
                   aliases=ALIASES)
