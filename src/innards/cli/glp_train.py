"""``innards glp train``: flow-matching meta-model on an activation store (or a live stream)."""

from __future__ import annotations

from innards.config import command

# the flat spellings of innards 0.1: optimiser settings now live in --optim.*, stream-mode harvest settings in --harvest.*
ALIASES = {
    "--lr": "--optim.lr", "--weight-decay": "--optim.weight-decay", "--warmup": "--optim.warmup",
    "--final-lr-frac": "--optim.final-lr-frac", "--clip": "--optim.clip",
    "--model": "--harvest.model.name", "--site": "--harvest.site", "--text": "--harvest.text",
    "--context": "--harvest.context", "--harvest-batch": "--harvest.batch-size", "--model-dtype": "--harvest.model.dtype",
    "--stream-dtype": "--harvest.store-dtype",
    "--val-fraction": "--harvest.val-fraction", "--shard-rows": "--harvest.shard-tokens",
}


def main(argv: list[str] | None = None) -> int:
    """Parse GLPTrainConfig from the command line and train."""
    from innards.glp.train import GLPTrainConfig, train_glp

    def run(cfg: GLPTrainConfig) -> int:
        train_glp(cfg)
        return 0

    return command(GLPTrainConfig, run, argv, prog="innards glp train",
                   description="Train a GLP (flow matching on normalised activations). Launch with torchrun for "
                               "data parallelism; --resume continues exactly; --stream harvests while training.",
                   aliases=ALIASES)
