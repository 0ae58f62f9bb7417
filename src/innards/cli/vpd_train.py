"""innards vpd train --config NAME|FILE [--flag V | key=value ...] --out DIR [--resume]"""

from __future__ import annotations

from pathlib import Path

from innards.config import command
from innards.vpd.config import VPDConfig, shipped_configs
from innards.vpd.train import train


def _train(cfg: VPDConfig) -> Path:
    return train(cfg, stop_at=cfg.stop_after, global_draws=cfg.global_draws)


def main(argv: list[str] | None = None) -> int:
    """Decompose a model's weights with the VPD or SPD objective."""
    argv = list(argv or [])
    if "--resume" in argv and not any(a == "--config" or a.startswith("--config=") for a in argv) and "--out" in argv:
        # a resumed run defaults to its own saved config
        i = argv.index("--out")
        if i + 1 < len(argv):
            argv = ["--config", str(Path(argv[i + 1]) / "config.yaml"), *argv]
    return command(VPDConfig, _train, argv, prog="innards vpd train", named_configs=shipped_configs(),
                   aliases={"--stop-at": "--stop-after"},
                   description="Decompose a model's weights into rank-one subcomponents (VPD or SPD objective). "
                               f"Shipped configs (--config NAME): {', '.join(shipped_configs())}.")
