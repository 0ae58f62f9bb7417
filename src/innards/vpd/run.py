"""Build a decomposition from a config, save its artifacts, and load a run folder back."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from innards.config import load_yaml, to_dict
from innards.errors import InnardsError
from innards.io import read_json, write_json
from innards.models.load import load_model
from innards.tensors import load_tensors, save_tensors
from innards.train.checkpoint import current_checkpoint
from innards.vpd.ci import build_ci
from innards.vpd.components import Decomposition
from innards.vpd.config import TargetConfig, VPDConfig, config_from_dict
from innards.vpd.sigmoids import lower_leaky, upper_leaky
from innards.vpd.toys import build_toy

DECOMP_FILE = "decomposition.safetensors"
META_FILE = "decomposition.json"  # what the decomposition is; run.json is the folder's innards.run record
LEGACY_META = "run.json"  # the name META_FILE had before innards.run took it
TARGET_FILE = "target.safetensors"
TARGET_META = "target.json"


@dataclass
class Built:
    """Everything a trained or training decomposition consists of."""

    cfg: VPDConfig
    target: nn.Module
    decomp: Decomposition
    ci: nn.Module
    target_info: dict[str, Any]


def ci_values(b: Built, inputs: dict[str, torch.Tensor], h: dict[str, torch.Tensor] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(g_lower, g_upper) from the CI function on the clean inputs (``h``: their x V, when already known)."""
    z = b.ci(inputs, b.decomp, detach=b.cfg.ci.detach_inputs, h=h)
    z = {n: v.float() for n, v in z.items()}  # masks and minimality in fp32 also under autocast
    return {n: lower_leaky(v) for n, v in z.items()}, {n: upper_leaky(v) for n, v in z.items()}


def target_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the target's parameter names, shapes and bytes (identifies 'the same model')."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_lm(name: str, device: str = "cpu") -> nn.Module:
    model = load_model(name, dtype="fp32", device=device)
    model.eval()
    return model


def save_target(model: nn.Module, tcfg: TargetConfig, report: dict[str, Any], out: Path) -> None:
    save_tensors(out / TARGET_FILE, dict(model.state_dict()))
    write_json(out / TARGET_META, {"target": to_dict(tcfg), "training": report, "fingerprint": target_fingerprint(model)})


def load_target(cfg: VPDConfig, run_dir: Path | None, model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The run's target: a toy from its saved weights, or the LM named in the config (or ``model``)."""
    if cfg.target.kind == "lm":
        name = model or cfg.target.name
        lm = load_lm(name, cfg.device)
        return lm, {"name": name, "fingerprint": target_fingerprint(lm), "source": getattr(lm, "innards_source", None)}
    if run_dir is None or not (run_dir / TARGET_FILE).is_file():
        raise InnardsError(f"toy target weights missing from run folder {run_dir}")
    toy = build_toy(cfg.target)
    state = load_tensors(run_dir / TARGET_FILE, what="target weights")
    try:
        toy.load_state_dict(state)
    except RuntimeError:
        raise InnardsError(f"target weights in {run_dir} do not fit the configured toy") from None
    toy.eval()
    for p in toy.parameters():
        p.requires_grad_(False)
    meta = read_json(run_dir / TARGET_META, "target metadata") if (run_dir / TARGET_META).is_file() else {}
    # the fingerprint of the weights actually loaded, so a swapped target is noticed
    return toy, {"name": cfg.target.kind, "training": meta.get("training"), "fingerprint": target_fingerprint(toy)}


def build(cfg: VPDConfig, target: nn.Module, target_info: dict[str, Any]) -> Built:
    """Components and CI function for a target (deterministic in cfg.init_seed)."""
    target = target.to(cfg.device)
    decomp = Decomposition(target, list(cfg.modules), cfg.C, dict(cfg.C_per_module), seed=cfg.init_seed).to(cfg.device)
    if cfg.tie:
        decomp.tie([list(p) for p in cfg.tie])
    ci = build_ci(decomp, cfg.ci, seed=cfg.init_seed)
    return Built(cfg, target, decomp, ci, target_info)


def decomposition_tensors(b: Built) -> dict[str, torch.Tensor]:
    out = b.decomp.component_state()
    for k, v in b.ci.state_dict().items():
        out[f"ci.{k}"] = v
    return out


def load_decomposition_tensors(b: Built, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Fill V, U and the CI function from saved tensors; one-line error when they do not fit."""
    try:
        b.decomp.load_component_state(tensors)
        ci_state = {k[3:]: v for k, v in tensors.items() if k.startswith("ci.")}
        b.ci.load_state_dict(ci_state)
    except (InnardsError, RuntimeError, KeyError):
        raise InnardsError(f"{where} does not fit this model and config (was it made for another model?)") from None


def run_meta(b: Built, step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    comps = [{"name": c.name, "C": c.C, "d_in": c.d_in, "d_out": c.d_out} for c in b.decomp.components]
    return {"step": step, "objective": b.cfg.objective, "components": comps,
            "target_fingerprint": b.target_info.get("fingerprint"), "target": b.target_info.get("name", b.cfg.target.kind),
            **(extra or {})}


def save_final(b: Built, out: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    digest = save_tensors(out / DECOMP_FILE, decomposition_tensors(b))
    write_json(out / META_FILE, {**run_meta(b, step, extra), "sha256": digest})


def read_meta(d: Path) -> dict[str, Any]:
    """A finished run's decomposition metadata ({} if none): ``decomposition.json``, or the legacy ``run.json``."""
    if (d / META_FILE).is_file():
        return read_json(d / META_FILE, "decomposition metadata")
    if (d / LEGACY_META).is_file():
        meta = read_json(d / LEGACY_META, "run metadata")
        return {} if meta.get("format") == "innards.run" else meta
    return {}


def load_run(run_dir: str | Path, model: str | None = None, device: str | None = None) -> Built:
    """A run folder -> built decomposition with trained weights (final, else the latest checkpoint)."""
    d = Path(run_dir)
    if not (d / "config.yaml").is_file():
        raise InnardsError(f"not a VPD run folder (no config.yaml): {d}")
    cfg = config_from_dict(load_yaml(d / "config.yaml"))
    if device:
        cfg.device = device
    target, info = load_target(cfg, d, model)
    b = build(cfg, target, info)
    if (d / DECOMP_FILE).is_file():
        meta = read_meta(d)
        tensors = load_tensors(d / DECOMP_FILE, meta.get("sha256"), what="decomposition")
        where = str(d / DECOMP_FILE)
    elif (ck := current_checkpoint(d / "ckpt")) is not None and (ck / "state.safetensors").is_file():
        meta = read_json(ck / "state.json", "checkpoint metadata")
        tensors = load_tensors(ck / "state.safetensors", (meta.get("files") or {}).get("state.safetensors",
                                                                                     meta.get("sha256")),
                               what="checkpoint")
        where = str(ck)
    else:
        raise InnardsError(f"run folder {d} holds no decomposition or checkpoint yet")
    fp = meta.get("target_fingerprint")
    if fp and info.get("fingerprint") and fp != info["fingerprint"]:
        raise InnardsError(f"run {d} was made for another model (target fingerprint differs from {info.get('name', 'the target')})")
    load_decomposition_tensors(b, tensors, where)
    b.decomp.eval()
    return b
