"""Steering vectors: difference of means, unit-normalised, saved with model, site and provenance.

Loadable from ``.safetensors`` (ours or any with one 1-D tensor), ``.pt``, ``.npy`` (``FILE#ROW``
picks a row of a 2-D array, e.g. a per-layer persona-vector file) or an SAE decoder row
(``sae:SAE:LATENT``, SAE = a folder, a hub id or a SAELens ``release/sae_id``). Whatever the source,
the loaded vector has unit L2 norm.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from innards.config import at_least, require
from innards.errors import InnardsError
from innards.io import sha256_file
from innards.tensors import save_tensors
from innards.models.config import MODEL_ALIASES, ModelConfig
from innards.models.hooks import run_with_cache
from innards.models.load import load_model
from innards.models.sites import resolve_site, site_metadata
from innards.run import Run
from innards.sae.load import load_sae
from innards.sae.model import SparseAutoencoder
from innards.steer.texts import CONCEPTS, check_balanced, concept_sentences, read_labelled
from innards.steer.tokens import encode

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    # a model, its name, or its identity record ({"name", "sha256", ...}) wherever provenance is compared
    ModelLike = PreTrainedModel | str | dict

FORMAT = "innards.steering_vector/1"
# flat str/int/float metadata of a vector (safetensors metadata holds strings; these are parsed back)
Meta = str | int | float
_INT_KEYS = ("width", "n_pos", "n_neg", "layer")
_FLOAT_KEYS = ("raw_norm",)


@dataclass
class SteeringVector:
    """A unit-norm direction (d,) float32 and what it was made from (flat str/int/float metadata)."""

    vector: torch.Tensor
    meta: dict[str, Meta] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.vector.shape[0])

    def check_compatible(self, model: ModelLike | None = None, site: str | None = None, width: int | None = None) -> None:
        """InnardsError if the vector was made for another model, site or width than the one given."""
        check_compatible(self.meta | {"width": self.width}, model, site, width, what="steering vector")


def model_identity(model: PreTrainedModel) -> dict[str, str]:
    """{"model": name, "model_sha256"/"model_revision": ...} from ``model.innards_source``."""
    src = getattr(model, "innards_source", None) or {}
    out = {"model": str(src.get("name", getattr(getattr(model, "config", None), "_name_or_path", "")))}
    if src.get("sha256"):
        out["model_sha256"] = str(src["sha256"])
    if src.get("revision"):
        out["model_revision"] = str(src["revision"])
    return out


def _same_model(meta: dict, model: ModelLike) -> bool:
    ident = model_identity(model) if not isinstance(model, (str, dict)) else (
        {"model": model} if isinstance(model, str) else model)
    for key in ("model_sha256", "model_revision"):
        if meta.get(key) and ident.get(key):
            return meta[key] == ident[key]  # same weights count as the same model whatever the path
    return not meta.get("model") or not ident.get("model") or str(meta["model"]) == str(ident["model"])


def check_compatible(meta: dict, model: ModelLike | None, site: str | None, width: int | None, what: str) -> None:
    """Shared model/site/width check for artifacts whose metadata records them."""
    if width is not None and meta.get("width") is not None and int(meta["width"]) != int(width):
        raise InnardsError(f"{what} has width {meta['width']}, the site has width {width}")
    if model is not None and not _same_model(meta, model):
        name = model_identity(model)["model"] if not isinstance(model, (str, dict)) else model
        raise InnardsError(f"{what} was made for model '{meta.get('model')}', not '{name}'")
    if site is not None and meta.get("site") and _canonical(model, meta["site"]) != _canonical(model, site):
        raise InnardsError(f"{what} was made for site '{meta['site']}', not '{site}'")


def _canonical(model: ModelLike | None, site: str) -> str:
    """Canonical site name when a model is at hand (TL or module-path spellings compare equal)."""
    if model is None or isinstance(model, (str, dict)):
        return str(site)
    try:
        return resolve_site(model, str(site)).name
    except InnardsError:
        return str(site)


def unit(v: torch.Tensor, what: str = "vector") -> tuple[torch.Tensor, float]:
    """(v / ||v||, ||v||) in float32; a zero or non-finite vector is an error."""
    v = v.detach().to(torch.float64).flatten().cpu()
    n = float(v.norm())
    if not math.isfinite(n) or n == 0.0:
        raise InnardsError(f"{what} has {'zero' if n == 0.0 else 'non-finite'} norm")
    return (v / n).to(torch.float32), n


def save_vector(path: str | Path, sv: SteeringVector) -> str:
    """Atomically write a safetensors file with tensor ``vector`` and flat string metadata; returns SHA-256."""
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in sv.meta.items() if v is not None}
    meta["format"] = FORMAT
    meta["width"] = str(sv.width)
    p = Path(path)
    if p.suffix != ".safetensors":
        raise InnardsError(f"steering vectors are written as .safetensors, not {p.suffix or 'no suffix'}: {p}")
    p.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(p, {"vector": sv.vector.contiguous()}, metadata=meta)


def _parse_meta(raw: dict[str, str] | None) -> dict[str, Meta]:
    out: dict[str, Meta] = {}
    for k, v in (raw or {}).items():
        if k in _INT_KEYS:
            try:
                out[k] = int(v)
                continue
            except ValueError:
                pass
        if k in _FLOAT_KEYS:
            try:
                out[k] = float(v)
                continue
            except ValueError:
                pass
        out[k] = v
    return out


def _pick(arr: torch.Tensor, row: int | None, src: str) -> torch.Tensor:
    arr = arr.squeeze() if arr.dim() > 1 and row is None else arr
    if arr.dim() == 1:
        if row is not None:
            raise InnardsError(f"{src} holds one vector; drop the #{row}")
        return arr
    if arr.dim() == 2:
        if row is None:
            raise InnardsError(f"{src} holds {arr.shape[0]} vectors; pick one with FILE#ROW")
        if not -arr.shape[0] <= row < arr.shape[0]:
            raise InnardsError(f"row {row} out of range for {src} with {arr.shape[0]} vectors")
        return arr[row]
    raise InnardsError(f"{src} holds a tensor of shape {tuple(arr.shape)}, not a vector")


def _load_file(p: Path, row: int | None) -> tuple[torch.Tensor, dict]:
    if not p.is_file():
        raise InnardsError(f"steering vector not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                raw_meta = f.metadata()
                keys = list(f.keys())
                key = "vector" if "vector" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise InnardsError(f"{p} holds tensors {', '.join(keys[:5])}; expected one named 'vector'")
                t = f.get_tensor(key)
            return _pick(t, row, str(p)), _parse_meta(raw_meta)
        if suffix in (".pt", ".pth"):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                if "vector" in tensors:
                    obj = tensors["vector"]
                elif len(tensors) == 1:
                    obj = next(iter(tensors.values()))
                else:
                    raise InnardsError(f"{p} holds a dict without one tensor named 'vector'")
            if not isinstance(obj, torch.Tensor):
                raise InnardsError(f"{p} does not hold a tensor")
            return _pick(obj, row, str(p)), {}
        if suffix == ".npy":
            return _pick(torch.from_numpy(np.load(str(p), allow_pickle=False).astype(np.float64)), row, str(p)), {}
    except InnardsError:
        raise
    except Exception as e:
        raise InnardsError(f"steering vector {p} does not load: {str(e).splitlines()[0][:200]}") from None
    raise InnardsError(f"unknown steering-vector format '{suffix}' (use .safetensors, .pt or .npy, or sae:SAE:LATENT)")


def _load_sae_row(spec: str) -> tuple[torch.Tensor, dict[str, Meta]]:
    sae_spec, _, idx = spec[len("sae:"):].rpartition(":")
    if not sae_spec or not idx.lstrip("-").isdigit():
        raise InnardsError(f"SAE decoder rows are written sae:SAE:LATENT (a folder, hub id or release/sae_id), got '{spec}'")
    sae = load_sae(sae_spec)
    w = sae_decoder(sae)
    i = int(idx)
    if not -w.shape[0] <= i < w.shape[0]:
        raise InnardsError(f"SAE latent {i} out of range (the SAE has {w.shape[0]} latents)")
    keep = {k: v for k, v in (("model", sae.model_name), ("site", sae.site)) if v}
    # a hub id or registry name is recorded as given: it is not a path
    where = str(Path(sae_spec).resolve()) if Path(sae_spec).expanduser().exists() else sae_spec
    return w[i], keep | {"source": f"sae:{where}:{i}"}


def sae_decoder(sae: SparseAutoencoder) -> torch.Tensor:
    """The SAE's decoder as (n_latents, d): one row per latent direction."""
    return sae.W_dec.detach().float().cpu()


def load_vector(spec: str | Path, model: ModelLike | None = None, site: str | None = None,
                width: int | None = None) -> SteeringVector:
    """Load and unit-normalise a vector from a file or ``sae:SAE:LATENT``; checks model/site/width if given."""
    s = str(spec)
    if s.startswith("sae:"):
        v, meta = _load_sae_row(s)
    else:
        path, _, row = s.partition("#")
        if row and not row.lstrip("-").isdigit():
            raise InnardsError(f"row selector must be an integer: '{s}'")
        v, meta = _load_file(Path(path), int(row) if row else None)
        meta.setdefault("source", str(Path(path).resolve()) + (f"#{row}" if row else ""))
    vec, norm = unit(v, f"steering vector {s}")
    meta.setdefault("raw_norm", norm)
    sv = SteeringVector(vec, meta)
    sv.check_compatible(model, site, width)
    return sv


@torch.no_grad()
def mean_activation(model: PreTrainedModel, site: str, texts: list[str], token: Literal["last", "mean"] = "last",
                    batch_size: int = 16, context: int | None = 512, desc: str = "activations") -> tuple[torch.Tensor, int]:
    """Mean over texts of the site's activation at the last text token or averaged over text tokens (float64)."""
    if token not in ("last", "mean"):
        raise InnardsError(f"token mode must be 'last' or 'mean', got '{token}'")
    device = next(model.parameters()).device
    total: torch.Tensor | None = None
    n = 0
    for start in tqdm(range(0, len(texts), batch_size), desc=desc):
        b = encode(model.tokenizer, texts[start:start + batch_size], side="right", max_length=context)
        acts = run_with_cache(model, b.input_ids, [site], attention_mask=b.attention_mask.to(device))[site]
        acts = acts.to(torch.float64).cpu()
        tm = b.text_mask
        if token == "last":
            # the last non-special token: after a BERT-style [SEP] or an appended EOS, not on it
            has = tm.any(1)
            last = (tm.long() * torch.arange(tm.shape[1])).argmax(1)
            rows = acts[torch.arange(acts.shape[0]), last][has]
        else:
            w = tm.to(torch.float64).unsqueeze(-1)
            cnt = w.sum(1)
            has = cnt.squeeze(-1) > 0
            rows = ((acts * w).sum(1) / cnt.clamp(min=1))[has]
        s = rows.sum(0)
        total = s if total is None else total + s
        n += int(rows.shape[0])
    if total is None or n == 0:
        raise InnardsError(f"no text tokens in the {desc} sentences")
    return total / n, n


def diff_means(model: PreTrainedModel, site: str, pos: list[str], neg: list[str], token: Literal["last", "mean"] = "last",
               batch_size: int = 16, context: int | None = 512) -> SteeringVector:
    """Unit-normalised mean(pos) - mean(neg) of the site's activations, with its metadata."""
    check_balanced(len(pos), len(neg))
    s = resolve_site(model, site)
    mp, n_pos = mean_activation(model, s.name, pos, token, batch_size, context, desc="positive")
    mn, n_neg = mean_activation(model, s.name, neg, token, batch_size, context, desc="negative")
    vec, raw = unit(mp - mn, "difference of means")
    sm = site_metadata(model, s)
    meta = {**model_identity(model), "site": s.name, "width": s.width, "layer": s.layer, "tl_name": sm["tl_name"],
            "hf_module": sm["hf_module"], "index_convention": sm["index_convention"], "method": "diff_means",
            "token": token, "n_pos": n_pos, "n_neg": n_neg, "raw_norm": raw,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return SteeringVector(vec, meta)


@dataclass
class VectorConfig:
    """``innards steer vector``: a difference-of-means steering vector from two sentence files."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the language model (a plain string is taken as its name)"""
    site: str = ""
    """activation site, e.g. blocks.3.resid_post (required for a difference of means; with --from-sae the SAE is checked against --model's site)"""
    pos: str = ""
    """file of sentences showing the concept, one per line (required unless --from-sae)"""
    neg: str = ""
    """file of sentences not showing it, at most 10x more or fewer than --pos (required unless --from-sae)"""
    concept: str | None = None
    """packaged concept (sea, royalty, food, night, winter, happy) whose vector sentences replace --pos/--neg"""
    from_sae: str | None = None
    """SAE:LATENT: save this SAE latent's decoder direction instead (SAE = a folder, hub id or SAELens release/sae_id)"""
    token: Literal["last", "mean"] = "last"
    """last: the last non-special token; mean: mean over non-special tokens"""
    out: str = "vector.safetensors"
    """output .safetensors file (the run record is written beside it)"""
    batch_size: int = 16
    """sentences per forward pass"""
    context: int = 512
    """longest sentence kept, in tokens (longer ones are truncated from the left)"""
    overwrite: bool = False
    """replace an existing vector made with other settings"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        at_least(self, 1, "batch_size", "context")
        require(self.token in ("last", "mean"), f"--token must be last or mean, got {self.token!r}")

    def check_inputs(self) -> None:
        """Required flags and readable, balanced sentence files (before any model loads)."""
        require(Path(self.out).suffix == ".safetensors", f"--out must end in .safetensors: {self.out}")
        if self.from_sae is not None:
            sae, _, idx = self.from_sae.rpartition(":")
            require(bool(sae) and idx.lstrip("-").isdigit(), f"--from-sae is SAE:LATENT, got '{self.from_sae}'")
            require(not self.pos and not self.neg, "--from-sae takes no --pos/--neg sentence files")
            return
        require(bool(self.site), "--site is required")
        if self.concept is not None:
            require(self.concept in CONCEPTS, f"--concept must be one of {', '.join(CONCEPTS)}, got '{self.concept}'")
            require(not self.pos and not self.neg, "--concept takes no --pos/--neg sentence files")
            return
        require(bool(self.pos) and bool(self.neg),
                "--pos and --neg sentence files are required (or --concept NAME, or --from-sae SAE:LATENT)")


VECTOR_ALIASES = {**MODEL_ALIASES, "--dtype": "--model.dtype", "--max-length": "--context"}


def build_vector(cfg: VectorConfig) -> Path:
    """Compute, check and save a difference-of-means vector, or an SAE latent's decoder row (file run kind "vector")."""
    cfg.check_inputs()
    if cfg.from_sae is not None:
        return _vector_from_sae(cfg)
    if cfg.concept is not None:
        sents = concept_sentences(cfg.concept)
        pos, neg = sents["vector_pos"], sents["vector_neg"]
    else:
        pos, neg = read_labelled(cfg.pos, cfg.neg)
    out = Path(cfg.out)
    with Run.open(out, "vector", cfg, inputs={"pos": cfg.pos, "neg": cfg.neg}, overwrite=cfg.overwrite, file=True) as run:
        if run.state == "complete":
            run.say_complete()
            return out
        model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
        sv = diff_means(model, cfg.site, pos, neg, cfg.token, cfg.batch_size, cfg.context)
        if cfg.concept is not None:
            sv.meta |= {"concept": cfg.concept, "sentences": f"packaged:{cfg.concept}/vector_pos,vector_neg"}
        else:
            sv.meta |= {"pos_file": str(Path(cfg.pos).resolve()), "pos_sha256": sha256_file(cfg.pos),
                        "neg_file": str(Path(cfg.neg).resolve()), "neg_sha256": sha256_file(cfg.neg)}
        save_vector(out, sv)
        run.complete(headline={"site": sv.meta["site"], "width": sv.width, "n_pos": sv.meta["n_pos"],
                               "n_neg": sv.meta["n_neg"], "raw_norm": round(float(sv.meta["raw_norm"]), 6),
                               "token": cfg.token}, outputs=[out.name])
    print(f"wrote {out} (site {sv.meta['site']}, width {sv.width}, {sv.meta['n_pos']} pos / {sv.meta['n_neg']} neg, "
          f"raw norm {sv.meta['raw_norm']:.4g})")
    return out


def _vector_from_sae(cfg: VectorConfig) -> Path:
    out = Path(cfg.out)
    sae_spec = cfg.from_sae.rpartition(":")[0]
    with Run.open(out, "vector", cfg, inputs={"sae": sae_spec}, overwrite=cfg.overwrite, file=True) as run:
        if run.state == "complete":
            run.say_complete()
            return out
        model = None
        if cfg.site:  # checked against the model's site (TransformerLens and HF spellings of a site compare equal)
            model = load_model(cfg.model.name, dtype=cfg.model.dtype, device="meta", revision=cfg.model.revision)
        sv = load_vector(f"sae:{cfg.from_sae}", model=model, site=cfg.site or None,
                         width=resolve_site(model, cfg.site).width if model is not None else None)
        sv.meta |= {"method": "sae_decoder", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        save_vector(out, sv)
        run.complete(headline={"site": str(sv.meta.get("site", "")), "width": sv.width, "source": sv.meta["source"],
                               "raw_norm": round(float(sv.meta["raw_norm"]), 6)}, outputs=[out.name])
    print(f"wrote {out} ({sv.meta['source']}, width {sv.width}, raw norm {sv.meta['raw_norm']:.4g})")
    return out
