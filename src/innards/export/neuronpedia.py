"""Meta-neurons and VPD subcomponents as SAEDashboard / Neuronpedia feature-dashboard batches.

The files follow the batch format SAEDashboard's ``neuronpedia-runner`` writes for Neuronpedia to import
(``batch-N.json``: ``{"model_id", "layer", "sae_set", "features": [...]}``, each feature with exactly the
keys of SAEDashboard's ``NeuronpediaDashboardFeature`` and ``NeuronpediaDashboardActivation``), plus
``mapping.json``: which innards unit every ``feature_index`` is and which fields have no innards value.
docs/export-neuronpedia.md describes the mapping.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from innards.errors import InnardsError
from innards.io import read_json, write_json
from innards.models.load import load_tokenizer

# the keys of SAEDashboard's NeuronpediaDashboardFeature.to_dict(), in its order
FEATURE_KEYS = ["feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
                "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations"]
# the ones innards has nothing for: written empty, listed in mapping.json
EMPTY_FIELDS = [k for k in FEATURE_KEYS if k.startswith(("neuron_alignment", "correlated", "neg_", "pos_", "logits_hist"))
                or k == "decoder_weights_dist"]


@dataclass
class NeuronpediaConfig:
    """Export meta-neurons (innards glp neurons) or VPD subcomponents (with innards vpd contexts) for Neuronpedia."""

    run: str = ""
    """a glp neurons folder (neurons.json) or a VPD run folder (its contexts in RUN/contexts or --contexts)"""
    out: str = "neuronpedia"
    """output folder: batch-N.json files and mapping.json"""
    model_id: str | None = None
    """Neuronpedia model id (None: the model name innards recorded)"""
    set_name: str | None = None
    """Neuronpedia source-set name (None: glp-SITE for meta-neurons, vpd for subcomponents)"""
    contexts: str | None = None
    """VPD only: the folder of innards vpd contexts (None: RUN/contexts)"""
    batch_size: int = 128
    """features per batch file"""
    overwrite: bool = False
    """replace an existing export in --out"""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InnardsError("--batch-size must be at least 1")


def _r3(values: Any) -> list[float]:
    """Floats rounded to 3 decimals, as SAEDashboard writes them."""
    return [round(float(v), 3) for v in values]


def _feature(index: int, activations: list[dict], frac_nonzero: float, hist: tuple[list, list], n_prompts: int,
             n_tokens: int, dataset: str) -> dict[str, Any]:
    feat: dict[str, Any] = {k: [] for k in EMPTY_FIELDS}
    feat.update({"feature_index": int(index), "frac_nonzero": float(frac_nonzero), "freq_hist_data_bar_values": hist[0],
                 "freq_hist_data_bar_heights": hist[1], "n_prompts_total": int(n_prompts),
                 "n_tokens_in_prompt": int(n_tokens), "dataset": dataset, "activations": activations})
    return {k: feat[k] for k in FEATURE_KEYS}


def _activation(tokens: list[str], values: list[float], top: float) -> dict[str, Any]:
    # SAEDashboard's "TOP ACTIVATIONS" group: bin_min -1, bin_max the group's maximum, bin_contains -1
    return {"bin_min": -1, "bin_max": round(float(top), 3), "bin_contains": -1, "tokens": tokens, "values": _r3(values)}


def _hist(values: list[float], bins: int = 20) -> tuple[list[float], list[float]]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [], []
    counts, edges = np.histogram(v, bins=bins)
    return _r3((edges[:-1] + edges[1:]) / 2), [float(c) for c in counts]


def _layer(name: str) -> int:
    m = re.search(r"(?:blocks|layers|h|layer)\.(\d+)", name)
    return int(m.group(1)) if m else 0


def _neurons(run: Path, cfg: NeuronpediaConfig) -> tuple[list[dict], dict[str, Any]]:
    """Batches and mapping of a glp neurons folder."""
    d = read_json(run / "neurons.json", "meta-neuron contexts")
    ctx = d.get("contexts") or {}
    d_mlp = int(d.get("d_mlp") or 0)
    site = str(d.get("site") or "")
    model_id = cfg.model_id or Path(str(d.get("model") or "model")).name  # a model folder: its name
    set_name = cfg.set_name or f"glp-{site.replace('.', '-')}"
    feats, mapping = [], {}
    for n in d.get("neurons") or []:
        b, i = int(n["block"]), int(n["index"])
        index = b * d_mlp + i
        acts, values = [], []
        for ex in n.get("examples") or []:
            c = ctx.get(str(ex["context"])) or {}
            keep = [k for k, s in enumerate(c.get("special") or []) if not s]
            toks = [c["tokens"][k] for k in keep]
            vals = [ex["acts"][k] if k < len(ex["acts"]) else 0.0 for k in keep]
            values.extend(vals)
            acts.append(_activation(toks, vals, ex.get("max") or 0.0))
        positive = [v for v in values if v > 0]
        feats.append(_feature(index, acts, len(positive) / len(values) if values else 0.0, _hist(values),
                              int(d.get("n_contexts") or 0), int(d.get("context") or 0), str(d.get("text") or "")))
        mapping[str(index)] = f"{b}:{i}"
    info = {"what": "GLP meta-neurons", "model_id": model_id, "layer": _layer(site), "sae_set": set_name,
            "feature_index": "block * d_mlp + unit", "d_mlp": d_mlp, "site": site, "glp": d.get("glp"), "t": d.get("t"),
            "frac_nonzero": "fraction of the top contexts' tokens with a positive activation (not of the whole corpus)",
            "freq_hist": "activations over the tokens of the top contexts (bar centres, counts)",
            "features": mapping}
    return [{"model_id": model_id, "layer": _layer(site), "sae_set": set_name, "features": feats}], info


def _vpd_meta(run: Path) -> dict[str, Any]:
    for name in ("decomposition.json", "run.json"):
        p = run / name
        if p.is_file():
            m = read_json(p, "VPD run metadata")
            if isinstance(m, dict) and "components" in m:
                return m
    raise InnardsError(f"{run} is not a VPD run (no decomposition metadata)")


def _split(tok: Any, text: str) -> list[str]:
    """Token strings of decoded text (re-tokenised: close to, not always exactly, the original tokens)."""
    if not text:
        return []
    if tok is None:
        return [text]
    return [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]


def _vpd(run: Path, cfg: NeuronpediaConfig) -> tuple[list[dict], dict[str, Any]]:
    """Batches (one source per decomposed matrix) and mapping of a VPD run with its contexts."""
    meta = _vpd_meta(run)
    cdir = Path(cfg.contexts) if cfg.contexts else run / "contexts"
    if not (cdir / "contexts.json").is_file():
        raise InnardsError(f"no VPD contexts at {cdir} (run innards vpd contexts --run {run} --text ... first)")
    cx = read_json(cdir / "contexts.json", "VPD contexts")
    comps = cx.get("components") or {}
    target = None
    if (run / "config.yaml").is_file():
        t = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("target") or {}
        target = t.get("name") if t.get("kind") == "lm" else None
    tok = None
    if target:
        try:
            tok = load_tokenizer(target)
        except (InnardsError, OSError, ValueError):
            tok = None
    model_id = cfg.model_id or str(target or meta.get("target") or "model")
    base = cfg.set_name or "vpd"
    batches, mapping = [], {}
    for c in meta["components"]:
        name, C = c["name"], int(c["C"])
        short = re.sub(r"^(model\.)?(layers|h|transformer\.h)\.\d+\.", "", name).replace(".", "-")
        set_name = f"{base}-{short}"
        feats = []
        for i in range(C):
            e = comps.get(f"{name}:{i}") or {}
            acts = []
            for ex in e.get("examples") or []:
                left, right = _split(tok, ex.get("left", "")), _split(tok, ex.get("right", ""))
                toks = left + [ex.get("token", "")] + right
                vals = [0.0] * len(left) + [float(ex.get("ci", 0.0))] + [0.0] * len(right)
                acts.append(_activation(toks, vals, ex.get("ci", 0.0)))
            feats.append(_feature(i, acts, float(e.get("firing_frac") or 0.0), ([], []), 0, 0, str(cx.get("text") or "")))
            mapping[f"{_layer(name)}-{set_name}:{i}"] = f"{name}:{i}"
        batches.append({"model_id": model_id, "layer": _layer(name), "sae_set": set_name, "features": feats})
    info = {"what": "VPD rank-one subcomponents", "model_id": model_id, "objective": meta.get("objective"),
            "feature_index": "subcomponent index within its matrix; one sae_set per decomposed matrix",
            "activations": "top contexts by causal importance; values: the CI at the firing token, 0 elsewhere "
                           "(innards records CI only there); tokens re-tokenised from the decoded context",
            "frac_nonzero": f"fraction of tokens with CI above {cx.get('threshold')} (innards vpd contexts)",
            "features": mapping, "tokens_of_contexts_text": cx.get("tokens")}
    return batches, info


def export_neuronpedia(cfg: NeuronpediaConfig) -> Path:
    """Write ``cfg.out/batch-N.json`` (+ ``mapping.json``) for a meta-neuron folder or a VPD run."""
    run = Path(cfg.run)
    if not cfg.run or not run.is_dir():
        raise InnardsError(f"run folder not found: {cfg.run or '(give RUN)'}")
    if (run / "neurons.json").is_file():
        batches, info = _neurons(run, cfg)
    else:
        batches, info = _vpd(run, cfg)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise InnardsError(f"{out} is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        n = 0
        for b in batches:
            feats = b["features"]
            for k in range(0, max(1, len(feats)), cfg.batch_size):
                write_json(tmp / f"batch-{n}.json", {**b, "features": feats[k:k + cfg.batch_size]}, indent=None)
                n += 1
        info["empty_fields"] = EMPTY_FIELDS
        info["source_run"] = str(run.resolve())
        info["batches"] = n
        write_json(tmp / "mapping.json", info)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {n} batch file(s), {sum(len(b['features']) for b in batches)} features, to {out}")
    return out

