"""``innards glp train``: flow-matching meta-model on an activation store (or a live stream)."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Parse GLPTrainConfig from the command line and train."""
    from innards.glp.train import GLPTrainConfig, train_glp

    def run(cfg: GLPTrainConfig) -> int:
        out = train_glp(cfg)
        print(out)
        return 0

    return command(GLPTrainConfig, run, argv, prog="innards glp train",
                   description="Train a GLP (flow matching on normalised activations). Launch with torchrun for "
                               "data parallelism; --resume continues exactly; --stream harvests while training.")
