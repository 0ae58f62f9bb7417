"""``innards glp score``: per-token typicality of a text under a GLP (denoising loss, ODE likelihood)."""

from __future__ import annotations

from innards.config import command
from innards.models.config import MODEL_ALIASES


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards glp score`."""
    from innards.glp.score import ScoreConfig, score_text

    def run(cfg: ScoreConfig) -> int:
        score_text(cfg)
        return 0

    return command(ScoreConfig, run, argv, prog="innards glp score",
                   description="Score every token of a text under a GLP: the denoising loss over a fixed t grid and "
                               "log p(x) from the probability-flow ODE (Hutchinson trace), with the LM's own loss; "
                               "JSON + safetensors per document and position.",
                   aliases=MODEL_ALIASES)
