"""``innards sites MODEL [--json]``: every activation site of a model with its width and aliases."""

from __future__ import annotations

import json
from dataclasses import dataclass

from innards.config import command


@dataclass
class SitesConfig:
    """Which model to describe and how."""

    model: str = "demo"
    """model name, alias (demo, minilm), local directory or hub id (also the first positional argument)"""
    json: bool = False
    """print JSON instead of a table"""
    revision: str | None = None
    """hub revision (branch, tag or commit)"""


def describe_sites(cfg: SitesConfig) -> dict:
    """The model's sites as a JSON-ready dict (built on the meta device: the weights are not read)."""
    from innards.models.load import load_model
    from innards.models.sites import INDEX_CONVENTION, layout, list_sites

    model = load_model(cfg.model, device="meta", revision=cfg.revision)
    lay = layout(model)
    return {
        "model": cfg.model, "arch": model.config.model_type, "family": lay.family.name,
        "residual": lay.family.residual, "matched_by": lay.matched_by, "n_layers": lay.n_layers,
        "index_convention": INDEX_CONVENTION,
        "sites": [{"site": s.name, "width": s.width, "tl_name": s.tl_name, "hf_module": s.module_path,
                   "hook": s.hook} for s in list_sites(model)],
    }


def run(cfg: SitesConfig) -> int:
    """Print the site table (or JSON)."""
    info = describe_sites(cfg)
    if cfg.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"# {info['model']}: {info['arch']} ({info['family']} family, {info['residual']} residual), "
          f"{info['n_layers']} layers")
    if info["matched_by"] == "structure":
        print(f"# note: '{info['arch']}' is not a known model type; sites were matched by module names, "
              "so check that attn_out/mlp_out are what each block adds")
    print(f"# {info['index_convention']}")
    rows = [("site", "width", "TransformerLens", "HF module (hook point)")]
    rows += [(s["site"], str(s["width"]), s["tl_name"], f"{s['hf_module']} ({s['hook']})") for s in info["sites"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards sites``."""
    return command(SitesConfig, run, argv, prog="innards sites", positional="model",
                   description="List every activation site of a model with its width, TransformerLens alias "
                               "and Hugging Face module.")
