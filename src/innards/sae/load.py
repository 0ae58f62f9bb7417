"""Load SAEs: an SAELens-format folder, a hub id, or a release/sae_id of SAELens's pretrained registry.

``load_sae(X)`` tries, in order:

1. ``X`` as a local folder (``cfg.json`` + ``sae_weights.safetensors``, as SAELens's ``save_model``
   and innards' trainer write them);
2. ``release/sae_id`` of SAELens's registry (``pretrained_saes.yaml``), when the optional package
   ``sae-lens`` is installed: releases stored in SAELens's own format are read here from the hub
   (with the registry's config overrides and activation-norm factor), the others (Gemma Scope npz,
   LlamaScope, ...) through SAELens's own converters and then copied into innards' SAE;
3. ``org/name[/folder][@revision]`` on the Hugging Face hub (cache first; see :mod:`innards.hub`).

Standard (ReLU), TopK and JumpReLU SAEs are supported, with SAELens's input normalisations; anything
else (gated, transcoders, ...) is a one-line error naming the architecture.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml

from innards import hub
from innards.errors import InnardsError
from innards.io import read_json
from innards.tensors import load_tensors
from innards.sae.model import ARCHITECTURES, CFG_FILE, WEIGHTS_FILE, SparseAutoencoder

_HUB_FILES = [CFG_FILE, "*.safetensors"]
# SAELens metadata fields that registry overrides may set at the top level of a config
_META_KEYS = ("model_name", "hook_name", "hook_head_index", "prepend_bos", "context_size", "dataset_path",
              "model_from_pretrained_kwargs", "neuronpedia_id")


def load_sae(spec: str | Path, scaling_factor: float | None = None, device: str | torch.device = "cpu", *,
             sae_id: str | None = None, revision: str | None = None, cache_dir: str | Path | None = None,
             fold_W_dec_norm: bool = False) -> SparseAutoencoder:
    """An SAE acting on raw activations from a folder, ``release/sae_id`` (SAELens registry) or hub id.

    ``sae_id``: the SAE inside a release or a hub repo (else the part of ``spec`` after the first
    ``/`` for a release, after ``org/name/`` for a repo). ``scaling_factor``: the activation-norm
    factor of an ``expected_average_only_in`` SAE whose config and registry entry lack it (it is
    folded into the weights). ``fold_W_dec_norm``: make decoder rows unit-norm without changing outputs.
    """
    s = str(spec).strip()
    if not s:
        raise InnardsError("empty SAE name")
    local = Path(s).expanduser()
    if local.exists():
        if sae_id:
            local = local / sae_id
        sae = load_folder(local, scaling_factor)
    else:
        entry = registry_entry(s, sae_id)
        if entry is not None:
            sae = _from_registry(*entry, scaling_factor=scaling_factor, revision=revision, cache_dir=cache_dir)
        else:
            sae = _from_hub(s, sae_id, scaling_factor, revision, cache_dir)
    if fold_W_dec_norm:
        sae.fold_W_dec_norm()
    return sae.to(device).eval().requires_grad_(False)


def load_folder(path: str | Path, scaling_factor: float | None = None,
                overrides: dict[str, Any] | None = None) -> SparseAutoencoder:
    """Load an SAELens-format SAE folder (cfg.json + weights), applying registry ``overrides`` to its config."""
    p = Path(path)
    if not p.is_dir():
        raise InnardsError(f"SAE folder not found: {p}")
    if not (p / CFG_FILE).is_file():
        raise InnardsError(f"{p} is not an SAE folder (no {CFG_FILE})")
    cfg = read_json(p / CFG_FILE, what="SAE config")
    if not isinstance(cfg, dict):
        raise InnardsError(f"SAE config {p / CFG_FILE} is not a mapping")
    cfg = _override(cfg, overrides or {})
    _check_architecture(cfg, str(p))
    weights = p / WEIGHTS_FILE
    if not weights.is_file():
        found = [f for f in sorted(p.glob("*.safetensors")) if f.name != "sparsity.safetensors"]
        if len(found) != 1:
            raise InnardsError(f"SAE folder {p} has no {WEIGHTS_FILE}")
        weights = found[0]
    sha = (cfg.get("metadata") or {}).get("weights_sha256")
    return from_state(cfg, load_tensors(weights, sha256=sha, what="SAE weights"), str(weights), scaling_factor)


def _architecture(cfg: dict[str, Any]) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k")
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":  # SAELens < 6 spelling
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    return arch, k


def _check_architecture(cfg: dict[str, Any], where: str) -> None:
    arch, _ = _architecture(cfg)
    if arch not in ARCHITECTURES:
        raise InnardsError(f"SAE {where} has architecture '{arch}', which innards does not support "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise InnardsError(f"SAE {where} reshapes its input ({cfg['reshape_activations']}); only flat sites are supported")


def from_state(cfg: dict[str, Any], w: dict[str, torch.Tensor], where: str,
               scaling_factor: float | None = None) -> SparseAutoencoder:
    """Build an SAE from an SAELens config dict and state dict (one-line errors for anything it cannot hold)."""
    _check_architecture(cfg, where)
    arch, k = _architecture(cfg)
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in w]
    if missing:
        raise InnardsError(f"SAE weights {where} lack {', '.join(missing)}")
    d_in, d_sae = w["W_enc"].shape
    if (cfg.get("d_in", d_in), cfg.get("d_sae", d_sae)) != (d_in, d_sae) or tuple(w["W_dec"].shape) != (d_sae, d_in) \
            or w["b_enc"].shape != (d_sae,) or w["b_dec"].shape != (d_in,):
        raise InnardsError(f"SAE weights {where} do not match cfg d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}")
    norm = cfg.get("normalize_activations", "none") or "none"
    factor = None
    if norm == "expected_average_only_in":
        meta = cfg.get("metadata") or {}
        factor = scaling_factor if scaling_factor is not None else cfg.get("norm_scaling_factor", meta.get("norm_scaling_factor"))
        if factor is None:
            raise InnardsError(f"SAE {where} expects inputs scaled by an activation-norm factor (expected_average_only_in) "
                               "that its config does not hold: pass scaling_factor")
        norm = "none"
    sae = SparseAutoencoder(d_in, d_sae, architecture=arch, k=k,
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            normalize_activations=norm,
                            rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)), cfg=cfg)
    with torch.no_grad():
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, n).copy_(w[n].float())
        if arch == "jumprelu":
            if "threshold" in w:
                sae.threshold.copy_(w["threshold"].float())
            elif "log_threshold" in w:
                sae.threshold.copy_(w["log_threshold"].float().exp())
            else:
                raise InnardsError(f"jumprelu SAE weights {where} lack a threshold")
        if "scaling_factor" in w:  # SAELens < 6 fine-tuning scale on the latents
            sae.feature_scale = w["scaling_factor"].float()
    if factor is not None:
        sae.fold_activation_norm_scaling_factor(float(factor))
        sae.cfg = {**cfg, "normalize_activations": "none", "folded_norm_scaling_factor": float(factor)}
    return sae


def _override(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {**cfg, **overrides}
    if isinstance(cfg.get("metadata"), dict):
        out["metadata"] = {**cfg["metadata"], **{k: v for k, v in overrides.items() if k in _META_KEYS}}
    return out


# ----- the hub ------------------------------------------------------------------------------------------
def _complete(d: Path) -> bool:
    return (d / CFG_FILE).is_file() and any(f.name != "sparsity.safetensors" for f in d.glob("*.safetensors"))


def _from_hub(spec: str, sae_id: str | None, scaling_factor: float | None, revision: str | None,
              cache_dir: str | Path | None, overrides: dict[str, Any] | None = None) -> SparseAutoencoder:
    hint = "" if saelens_installed() else " (for a SAELens release/sae_id, install sae-lens)"
    try:
        r = hub.resolve(spec, what="SAE", revision=revision, patterns=_HUB_FILES, complete=_complete, cache=cache_dir,
                        subfolder=sae_id)
    except InnardsError as e:
        raise InnardsError(f"{e}{hint}") from None
    sae = load_folder(r.path, scaling_factor, overrides)
    sae.cfg.setdefault("metadata", {})
    sae.cfg["innards_source"] = r.source()
    return sae


# ----- SAELens's pretrained registry ----------------------------------------------------------------------
def saelens_installed() -> bool:
    """Whether the optional package sae-lens is importable (checked without importing it)."""
    return importlib.util.find_spec("sae_lens") is not None


@cache
def _registry_text() -> str:
    """SAELens's pretrained_saes.yaml from the installed package, without importing sae-lens ("" when absent)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    return path.read_text() if path.is_file() else ""


def _release(name: str) -> dict[str, Any] | None:
    """One release of the registry; only its block is parsed (the whole 1.5 MB file takes seconds)."""
    text = _registry_text()
    m = re.search(rf"^{re.escape(name)}:[ \t]*$", text, re.M)
    if m is None:
        return None
    nxt = re.search(r"^\S", text[m.end():], re.M)
    block = text[m.start():m.end() + nxt.start()] if nxt else text[m.start():]
    data = yaml.load(block, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    entry = data.get(name) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else None


def registry_entry(spec: str, sae_id: str | None = None) -> tuple[str, str, dict[str, Any], dict[str, Any]] | None:
    """(release, sae_id, release entry, sae entry) when ``spec`` (``release/sae_id``) is in SAELens's registry."""
    release, _, rest = spec.partition("/")
    if sae_id is not None:
        release, rest = spec, sae_id
    entry = _release(release) if release else None
    if entry is None:
        return None
    saes = {str(e.get("id")): e for e in entry.get("saes") or [] if isinstance(e, dict)}
    if rest not in saes:
        ids = list(saes)
        raise InnardsError(f"SAELens release '{release}' has no SAE '{rest}' (it has {', '.join(ids[:5])}"
                           f"{', ...' if len(ids) > 5 else ''})")
    return release, rest, entry, saes[rest]


def _from_registry(release: str, sae_id: str, entry: dict[str, Any], sae: dict[str, Any], *,
                   scaling_factor: float | None, revision: str | None, cache_dir: str | Path | None) -> SparseAutoencoder:
    factor = scaling_factor if scaling_factor is not None else sae.get("norm_scaling_factor")
    overrides = entry.get("config_overrides") or {}
    if isinstance(overrides, dict) and sae_id in overrides and isinstance(overrides[sae_id], dict):
        overrides = overrides[sae_id]  # per-SAE overrides
    conversion = entry.get("conversion_func")
    if conversion in (None, "sae_lens"):
        out = _from_hub(str(entry["repo_id"]), str(sae["path"]), factor, revision, cache_dir, overrides)
    else:
        out = _via_saelens(release, sae_id)
    out.cfg["innards_source"] = {**(out.cfg.get("innards_source") or {}), "saelens_release": release, "sae_id": sae_id}
    return out


def _via_saelens(release: str, sae_id: str) -> SparseAutoencoder:
    """Releases in other formats (npz, LlamaScope, ...): SAELens's own converter, then copied into innards' SAE."""
    # sae_lens imports transformer_lens, torch hooks and plotly; only this rare path pays for it
    sae_lens = importlib.import_module("sae_lens")
    try:
        loaded = sae_lens.SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # sae_lens raises ValueError, hub errors and its own types
        raise InnardsError(f"SAELens could not load {release}/{sae_id}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    sae_obj = loaded[0] if isinstance(loaded, tuple) else loaded
    cfg = sae_obj.cfg.to_dict()
    return from_state(cfg, {k: v.detach() for k, v in sae_obj.state_dict().items()}, f"{release}/{sae_id}")
