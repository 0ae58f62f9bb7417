"""innards vpd train --config NAME|FILE [key=value ...] --out DIR [--resume]"""

from __future__ import annotations

import argparse
from pathlib import Path

from innards.cli import run_guarded


def main(argv: list[str] | None = None) -> int:
    """Decompose a model's weights with the VPD or SPD objective."""
    from innards.vpd.config import shipped_configs

    parser = argparse.ArgumentParser(
        prog="innards vpd train",
        description="Decompose a model's weights into rank-one subcomponents (VPD or SPD objective). "
                    f"Shipped configs: {', '.join(shipped_configs())}. Any config key can be overridden as key=value "
                    "(dotted for nested keys, e.g. target.seed=3).")
    parser.add_argument("--config", help="shipped config name or YAML file (with --resume: defaults to the run's own)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--global-draws", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def go() -> int:
        ns, rest = parser.parse_known_args(argv)
        bad = [r for r in rest if r.startswith("-")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        from innards.errors import InnardsError
        from innards.vpd.config import load_config
        from innards.vpd.train import train

        name = ns.config
        if name is None:
            if not ns.resume:
                raise InnardsError("--config NAME|FILE is required (or --resume an existing run)")
            name = str(Path(ns.out) / "config.yaml")
        over = list(rest) + [f"out={ns.out}", f"resume={ns.resume}"]
        if ns.no_progress:
            over.append("progress=false")
        cfg = load_config(name, over)
        out = train(cfg, stop_at=ns.stop_at, global_draws=ns.global_draws)
        print(f"run folder: {out}")
        return 0

    return run_guarded(go)
