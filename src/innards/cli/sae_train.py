"""``innards sae train``: a TopK sparse autoencoder baseline on an activation store (SAELens format)."""

from __future__ import annotations

from innards.config import command
from innards.sae.train import SAETrainConfig, train_sae


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards sae train`."""
    def run(cfg: SAETrainConfig) -> int:
        train_sae(cfg)
        return 0

    return command(SAETrainConfig, run, argv, prog="innards sae train", aliases={"--lr": "--optim.lr"},
                   description="Train a TopK SAE on a store's train split; writes cfg.json + sae_weights.safetensors "
                               "(SAELens format).")
