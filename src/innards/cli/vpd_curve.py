"""innards vpd curve --run DIR [--out FILE.md]"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """L0, CE and KL over a decomposition's training, from its metrics.jsonl; Markdown table, JSON and PNG."""
    from innards.config import command
    from innards.vpd.evaluate import CurveConfig, curve

    return command(CurveConfig, curve, argv, prog="innards vpd curve",
                   description="The training curve of a VPD/SPD run: at every evaluation step (eval_every) the L0 per "
                               "token, CE and KL under each mask type and the fresh-PGD KL, plus the training losses "
                               "averaged since the previous evaluation; with the last rows' relative change, to read "
                               "off whether L0 and CE have stopped improving. Writes FILE.md, FILE.json and FILE.png.")
