"""``innards sites MODEL [--json]``: every activation site of a model with its width and aliases."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from innards.config import command

if TYPE_CHECKING:
    from innards.models.sites import Site


@dataclass
class SitesConfig:
    """Which model to describe and how."""

    model: str = "demo"
    """model name, alias (demo, minilm), local directory or hub id (also the first positional argument)"""
    json: bool = False
    """print JSON instead of a table"""
    revision: str | None = None
    """hub revision (branch, tag or commit)"""


def _shape(s: Site) -> str:
    if s.kind == "pattern":
        return f"{s.heads}xTxT"
    return f"{s.heads}x{s.width}" if s.heads else str(s.width)


def _point(s: Site) -> str:
    """The hook point, and how the site's tensor is read from it when it is not the whole tensor."""
    how = [s.hook + (f"[{s.item}]" if s.item else "")]
    if s.split is not None:
        how.append("per head" if not s.split.index else "part")
    if s.scale is not None:
        how.append(f"x{s.scale:g}")
    if s.flat:
        how.append("(B*T) unflattened")
    return ", ".join(how)


def describe_sites(cfg: SitesConfig) -> dict:
    """The model's sites as a JSON-ready dict (built on the meta device: the weights are not read)."""
    # imported when the command runs, so that `innards sites --help` stays fast
    from innards.models.load import load_model
    from innards.models.sites import INDEX_CONVENTION, layout, list_sites

    model = load_model(cfg.model, device="meta", revision=cfg.revision)
    lay = layout(model)
    return {
        "model": cfg.model, "arch": lay.arch, "family": lay.family, "residual": lay.residual,
        "matched_by": "model_type", "n_layers": lay.n_layers, "index_convention": INDEX_CONVENTION,
        "notes": lay.rules.notes,
        "sites": [{"site": s.name, "width": s.width, "heads": s.heads, "shape": _shape(s), "tl_name": s.tl_name,
                   "hf_module": s.module_path, "hook": s.hook, "point": _point(s), "editable": s.edit != "none"}
                  for s in list_sites(model)],
    }


def run(cfg: SitesConfig) -> int:
    """Print the site table (or JSON)."""
    info = describe_sites(cfg)
    if cfg.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"# {info['model']}: {info['arch']} ({info['family']} family, {info['residual']} residual), "
          f"{info['n_layers']} layers")
    if info["notes"]:
        print(f"# note: {info['notes']}")
    print(f"# {info['index_convention']}")
    print("# per-head sites are (B, T, heads, d_head); pattern is (B, heads, T, T) and read-only")
    rows = [("site", "width", "TransformerLens", "HF module (hook point)")]
    rows += [(s["site"], s["shape"], s["tl_name"], f"{s['hf_module']} ({s['point']})") for s in info["sites"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards sites``."""
    return command(SitesConfig, run, argv, prog="innards sites", positional="model",
                   description="List every activation site of a model with its width, TransformerLens alias "
                               "and Hugging Face module.")
