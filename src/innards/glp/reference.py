"""The GLP reference code's released layout, read and written (glp-reference.md §2, §3.4, §8.1).

A released meta-model (``generative-latent-prior/glp-llama1b-d3`` and its siblings) is a folder with

- ``config.yaml``: the trainer's OmegaConf config; ``glp_kwargs`` holds ``denoiser_config`` (d_input,
  d_model, d_mlp, n_layers, multi_layer_n_layers), ``tracedict_config`` (layer_prefix, layers, retain)
  and ``normalizer_config``. Two shapes exist: saved unresolved (``${...}`` interpolations kept) and
  saved with ``resolve=True``, where ``output_path`` is a ``!!python/object/apply:pathlib.PosixPath``
  tag. Both are read with a safe YAML loader that reads that one tag family as a plain string; no
  other Python object is ever constructed.
- ``final.safetensors`` and ``checkpoints/epoch_XXXX.safetensors``: the denoiser's state dict
  (``model.in_proj``, ``model.layers.{i}.{ln,up_proj,gate_proj,time_proj,down_proj}``, ...).
- ``rep_statistics.pt``: ``{"mean", "var"}`` in float32, (d,) or, for a multi-layer GLP, (n_layers, d)
  indexed by the LLM layer. It is a pickle, so it is read only with ``torch.load(weights_only=True)``
  and refused unless it is a dict of tensors.

**Known flaw of the reference statistics**: the producer copies the statistics of the *first shard*
of its activation stream (the first 1M activations for Llama-1B, 100k for Llama-8B and the
multi-layer model) to ``rep_statistics.pt``, and the trainer never updates them (glp-reference.md §1.5,
§10 #1). :func:`restats` replaces them with whole-store float64 statistics from an innards
ActivationStore (``GLP.from_pretrained(x, restats=STORE)``). The denoiser was trained under the
first-shard normalisation, so restats changes what the model sees; use it to study that bias, and
keep the reference statistics to reproduce the reference's numbers.

Mapping onto innards' GLP: the same network with each block's up and gate projections stored as one
Linear and the blocks' time projections as one Linear (exact concatenations, so the round trip is
bit-identical); the reference's layer embedding depth = layer / (n_layers - 1) is innards'
``site_scale = 1 / (n_layers - 1)`` with site i = ``blocks.{i}.resid_post``.

What the reference layout cannot express (``save_pretrained(format="reference")`` refuses or keeps it
aside): sites other than a block's output (or input), multi-site GLPs whose sites are not all the
LLM's layers 0..n-1 in order or whose site embedding is not depth = i / (n - 1) (innards' default
``site_scale = 100`` is not), a time scale other than 1000, float64 statistics and their counts
(kept in extra ``innards.*`` tensors of ``rep_statistics.pt`` and an ``innards:`` block of
``config.yaml``, which the reference ignores), and innards' checkpoint checksums.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import torch
import yaml

from innards.data.store import ActivationStore
from innards.errors import InnardsError
from innards.io import atomic_write_bytes
from innards.tensors import load_tensors, save_tensors
from innards.models.sites import INDEX_CONVENTION

CONFIG = "config.yaml"
STATS = "rep_statistics.pt"
FINAL = "final"
FORMAT = "glp-reference"
# the denoiser's constructor defaults (TransformerMLPDenoiser), which a config may leave out
DENOISER_DEFAULTS = {"d_model": 256, "d_mlp": 1536, "d_input": 1536, "n_layers": 12, "multi_layer_n_layers": None}
GLP_KWARGS = ("normalizer_config", "denoiser_config", "tracedict_config")
RETAIN_KIND = {"output": "resid_post", "input": "resid_pre"}
_F64 = ("innards.mean_f64", "innards.var_f64")


class _Arch(Protocol):
    d_in: int
    d_model: int
    d_mlp: int
    n_blocks: int
    n_sites: int
    time_scale: float
    site_scale: float


class GLPLike(Protocol):
    """What the writer and restats use of innards' GLP (structural: glp/model.py imports this module)."""

    config: _Arch
    meta: dict[str, Any]

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def set_meta(self, meta: dict[str, Any]) -> None: ...

    def check_compatible(self, model: Any, site: str, width: int | None = None) -> None: ...


# ----- config.yaml ------------------------------------------------------------------------------------
class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader plus the pathlib tags of configs saved with resolve=True, read as plain strings."""


def _pathlib_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> str:
    if suffix not in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        raise yaml.constructor.ConstructorError(None, None, f"unsupported tag python/object/apply:pathlib.{suffix}",
                                                node.start_mark)
    parts = loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else [loader.construct_scalar(node)]
    return str(PurePosixPath(*[str(p) for p in parts])) if parts else "."


_ConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:pathlib.", _pathlib_tag)


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a reference ``config.yaml`` (either shape) without constructing any Python object."""
    p = Path(path)
    try:
        cfg = yaml.load(p.read_text(), Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise InnardsError(f"{p} is not a config innards can read ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(cfg, dict):
        raise InnardsError(f"{p} is not a mapping")
    return cfg


_INTERP = re.compile(r"\$\{([^${}]*)\}")


def _lookup(cfg: dict[str, Any], value: Any, where: str, depth: int = 0) -> Any:
    """Resolve OmegaConf-style ``${a.b}`` references to other keys of the same config."""
    if not isinstance(value, str) or "${" not in value:
        return value
    if depth > 20:
        raise InnardsError(f"config.yaml: interpolation loop at {where}")

    def get(ref: str) -> Any:
        if ":" in ref:
            raise InnardsError(f"config.yaml: {where} uses the resolver '${{{ref}}}', which innards does not evaluate")
        node: Any = cfg
        for part in ref.split("."):
            if not isinstance(node, dict) or part not in node:
                raise InnardsError(f"config.yaml: {where} refers to '{ref}', which the config does not hold")
            node = node[part]
        return _lookup(cfg, node, ref, depth + 1)

    m = _INTERP.fullmatch(value)
    if m:
        return get(m.group(1))
    return _INTERP.sub(lambda mm: str(get(mm.group(1))), value)


def _int(cfg: dict[str, Any], value: Any, where: str, allow_none: bool = False, minimum: int = 1) -> int | None:
    v = _lookup(cfg, value, where)
    if v is None and allow_none:
        return None
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InnardsError(f"config.yaml: {where} must be an integer >= {minimum}, got {v!r}")
    return v


def architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """GLPConfig keyword arguments for a reference config's ``glp_kwargs`` (one-line error if innards cannot build it)."""
    gk = cfg.get("glp_kwargs")
    if not isinstance(gk, dict) or not isinstance(gk.get("denoiser_config"), dict):
        raise InnardsError("config.yaml has no glp_kwargs.denoiser_config; not a GLP reference config")
    extra = sorted(set(gk) - set(GLP_KWARGS))
    if extra:
        raise InnardsError(f"config.yaml glp_kwargs has settings innards cannot build: {', '.join(extra)}")
    dc = gk["denoiser_config"]
    extra = sorted(set(dc) - set(DENOISER_DEFAULTS))
    if extra:
        raise InnardsError(f"config.yaml glp_kwargs.denoiser_config has settings innards cannot build: {', '.join(extra)}")
    v = {k: dc.get(k, d) for k, d in DENOISER_DEFAULTS.items()}
    arch: dict[str, Any] = {
        "d_in": _int(cfg, v["d_input"], "denoiser_config.d_input"),
        "d_model": _int(cfg, v["d_model"], "denoiser_config.d_model"),
        "d_mlp": _int(cfg, v["d_mlp"], "denoiser_config.d_mlp"),
        "n_blocks": _int(cfg, v["n_layers"], "denoiser_config.n_layers"),
        "time_scale": 1000.0,
    }
    if arch["d_model"] % 2:
        raise InnardsError(f"config.yaml: denoiser_config.d_model = {arch['d_model']} is odd; innards builds only even widths")
    n = _int(cfg, v["multi_layer_n_layers"], "denoiser_config.multi_layer_n_layers", allow_none=True)
    if n is not None:
        if n < 2:
            raise InnardsError(f"config.yaml: multi_layer_n_layers = {n}; a multi-layer GLP needs at least 2 layers")
        arch["n_sites"] = n
        arch["site_scale"] = 1.0 / (n - 1)
    return arch


def _sites(cfg: dict[str, Any], n_sites: int, d_in: int) -> tuple[list[str], list[dict[str, Any]]]:
    """innards site names (and site_info records) of the LLM layers a reference GLP models."""
    tc = (cfg.get("glp_kwargs") or {}).get("tracedict_config") or {}
    prefix = _lookup(cfg, tc.get("layer_prefix", "model.layers"), "tracedict_config.layer_prefix")
    retain = _lookup(cfg, tc.get("retain", "output"), "tracedict_config.retain")
    if retain not in RETAIN_KIND:
        raise InnardsError(f"config.yaml: tracedict_config.retain = {retain!r}; innards reads 'output' (a block's "
                           "output, resid_post) or 'input' (resid_pre)")
    kind = RETAIN_KIND[retain]
    if n_sites > 1:
        layers = list(range(n_sites))  # the layer embedding and the stacked statistics are indexed by layer
    else:
        raw = _lookup(cfg, tc.get("layers"), "tracedict_config.layers")
        raw = raw if isinstance(raw, list) else [raw] if raw is not None else []
        if len(raw) != 1:
            raise InnardsError(f"config.yaml: a single-layer GLP needs exactly one tracedict_config.layers entry, got {raw}")
        layers = [_int(cfg, raw[0], "tracedict_config.layers[0]", minimum=0)]
    names = [f"blocks.{L}.{kind}" for L in layers]
    info = [{"site": s, "layer": L, "kind": kind, "width": d_in, "hf_module": f"{prefix}.{L}", "hook": retain}
            for s, L in zip(names, layers)]
    return names, info


# ----- rep_statistics.pt ------------------------------------------------------------------------------
def read_statistics(path: str | Path) -> dict[str, torch.Tensor]:
    """``rep_statistics.pt`` as a dict of tensors: torch.load(weights_only=True), refusing anything else."""
    p = Path(path)
    if not p.is_file():
        raise InnardsError(f"GLP statistics not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise InnardsError(f"{p} holds more than tensors or is damaged; refused (innards unpickles only tensors: "
                           f"{str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise InnardsError(f"{p} is not a dict of tensors; refused")
    for k in ("mean", "var"):
        if k not in obj:
            raise InnardsError(f"{p} has no '{k}' tensor")
    if obj["mean"].shape != obj["var"].shape or obj["mean"].ndim not in (1, 2):
        raise InnardsError(f"{p}: mean {tuple(obj['mean'].shape)} and var {tuple(obj['var'].shape)} are not "
                           "matching (d,) or (n_layers, d) tensors")
    return obj


def _site_stats(st: dict[str, torch.Tensor], sites: list[str], path: Path) -> dict[str, dict[str, Any]]:
    mean, var = st["mean"], st["var"]
    if all(k in st for k in _F64):  # written by innards: the float64 originals, rounded to mean/var
        m64, v64 = st[_F64[0]].to(torch.float64), st[_F64[1]].to(torch.float64)
        if m64.shape == mean.shape and torch.equal(m64.to(mean.dtype), mean) and torch.equal(v64.to(var.dtype), var):
            mean, var = m64, v64
    rows = mean.reshape(1, -1) if mean.ndim == 1 else mean
    vrows = var.reshape(1, -1) if var.ndim == 1 else var
    if rows.shape[0] != len(sites):
        raise InnardsError(f"{path} holds statistics for {rows.shape[0]} layer(s), the config describes {len(sites)}")
    count = st.get("innards.count")
    out = {}
    for i, s in enumerate(sites):
        out[s] = {"mean": rows[i].to(torch.float64), "var": vrows[i].to(torch.float64),
                  "count": int(count.reshape(-1)[i]) if count is not None and count.numel() == len(sites) else None,
                  "source": "rep_statistics.pt"}
    return out


# ----- weights ----------------------------------------------------------------------------------------
def to_innards(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """A reference ``Denoiser.state_dict()`` in innards' parameter layout (exact concatenations)."""
    expected = {f"model.{m}.{p}" for m in ("in_proj", "time_embed.0", "time_embed.2", "ln", "out_proj") for p in ("weight", "bias")}
    expected |= {f"model.layers.{i}.{m}.{p}" for i in range(n_blocks)
                 for m in ("ln", "up_proj", "gate_proj", "time_proj", "down_proj") for p in ("weight", "bias")}
    if any(k.startswith("model.layer_embed.") for k in sd):
        expected |= {f"model.layer_embed.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise InnardsError(f"checkpoint does not match config.yaml's {n_blocks} blocks (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
    f = {k: v.to(torch.float32) for k, v in sd.items()}
    out = {ours: f[theirs] for ours, theirs in _renames(n_blocks) if theirs in f}
    for p in ("weight", "bias"):
        out[f"time_proj.{p}"] = torch.cat([f[f"model.layers.{i}.time_proj.{p}"] for i in range(n_blocks)])
        for i in range(n_blocks):
            b = f"model.layers.{i}"
            out[f"blocks.{i}.up_gate.{p}"] = torch.cat([f[f"{b}.up_proj.{p}"], f[f"{b}.gate_proj.{p}"]])
    return out


def _renames(n_blocks: int) -> list[tuple[str, str]]:
    """(innards name, reference name) of every parameter that is the same tensor in both layouts."""
    pairs = [("in_proj", "model.in_proj"), ("out_norm", "model.ln"), ("out_proj", "model.out_proj"),
             ("time_embed.0", "model.time_embed.0"), ("time_embed.2", "model.time_embed.2"),
             ("site_embed.0", "model.layer_embed.0"), ("site_embed.2", "model.layer_embed.2")]
    for i in range(n_blocks):
        pairs += [(f"blocks.{i}.norm", f"model.layers.{i}.ln"), (f"blocks.{i}.down", f"model.layers.{i}.down_proj")]
    return [(f"{a}.{p}", f"{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def to_reference(sd: dict[str, torch.Tensor], n_blocks: int, d_mlp: int) -> dict[str, torch.Tensor]:
    """innards' GLP state dict as a reference ``Denoiser.state_dict()`` (exact splits)."""
    f = {k: v.detach().to(torch.float32).cpu() for k, v in sd.items()}
    out = {theirs: f[ours] for ours, theirs in _renames(n_blocks) if ours in f}
    for p in ("weight", "bias"):
        tp = f[f"time_proj.{p}"].split(d_mlp)
        for i in range(n_blocks):
            b = f"model.layers.{i}"
            out[f"{b}.up_proj.{p}"], out[f"{b}.gate_proj.{p}"] = f[f"blocks.{i}.up_gate.{p}"].split(d_mlp)
            out[f"{b}.time_proj.{p}"] = tp[i]
    return {k: v.contiguous() for k, v in out.items()}


# ----- folders ----------------------------------------------------------------------------------------
def is_reference_dir(path: str | Path) -> bool:
    """True when ``path`` looks like a reference GLP folder (config.yaml with glp_kwargs)."""
    p = Path(path) / CONFIG
    if not p.is_file():
        return False
    try:
        return isinstance(read_config(p).get("glp_kwargs"), dict)
    except InnardsError:
        return False


def checkpoint_name(checkpoint: str | None) -> str:
    """``None``/``final`` -> ``final``; ``epoch_0032`` or ``checkpoints/epoch_0032[.safetensors]`` -> ``checkpoints/epoch_0032``."""
    c = (checkpoint or FINAL).strip().removesuffix(".safetensors")
    if c == FINAL or "/" in c:
        return c
    return f"checkpoints/{c}"


def hub_patterns(checkpoint: str | None) -> list[str]:
    """The files of a reference repo to download for one checkpoint (never the other checkpoints)."""
    return [CONFIG, STATS, f"{checkpoint_name(checkpoint)}.safetensors"]


def load_folder(path: str | Path, checkpoint: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """A reference folder -> (GLPConfig kwargs, innards state dict, meta with statistics)."""
    p = Path(path)
    cfg = read_config(p / CONFIG)
    arch = architecture(cfg)
    name = checkpoint_name(checkpoint)
    wpath = p / f"{name}.safetensors"
    if not wpath.is_file():
        have = sorted(q.relative_to(p).as_posix().removesuffix(".safetensors")
                      for q in [p / "final.safetensors", *sorted((p / "checkpoints").glob("*.safetensors"))] if q.is_file())
        raise InnardsError(f"reference GLP {p} has no checkpoint '{name}' (it has: {', '.join(have) or 'none'})")
    tensors = to_innards(load_tensors(wpath, what="GLP checkpoint"), arch["n_blocks"])
    n_sites = int(arch.get("n_sites", 1))
    inn = cfg.get("innards") if isinstance(cfg.get("innards"), dict) else {}
    sites, site_info = _sites(cfg, n_sites, arch["d_in"])
    if inn.get("sites") and len(inn["sites"]) == n_sites:
        sites, site_info = list(inn["sites"]), inn.get("site_info") or site_info
    model_name = _lookup(cfg, cfg.get("model_name"), "model_name")
    training = {k: _lookup(cfg, cfg[k], k) for k in ("learning_rate", "batch_size", "num_epochs", "epoch_size", "use_bf16")
                if k in cfg and "${" not in str(cfg[k])}
    meta = {
        "model": inn.get("source_model") or ({"name": model_name} if model_name else None),
        "sites": sites, "site_info": site_info,
        "index_convention": inn.get("index_convention") or INDEX_CONVENTION,
        "training": inn.get("training") or training,
        "stats_by_site": _site_stats(read_statistics(p / STATS), sites, p / STATS),
        "reference": {"config": cfg, "checkpoint": name, "statistics": "reference rep_statistics.pt "
                      "(the first shard of the training stream; see innards.glp.reference.restats)"},
        "format": FORMAT,
    }
    return arch, tensors, meta


def _export_sites(glp: GLPLike) -> tuple[list[int], str, str]:
    """Layers, layer_prefix and retain for tracedict_config, or a one-line reason the format cannot hold them."""
    sites = glp.meta.get("sites") or []
    if not sites:
        raise InnardsError("the reference format needs the GLP's site (this GLP records none)")
    layers, kinds = [], set()
    for s in sites:
        m = re.fullmatch(r"blocks\.(\d+)\.(resid_post|resid_pre)", s)
        if not m:
            raise InnardsError(f"the reference format holds GLPs of a block's output (resid_post) or input, not '{s}'")
        layers.append(int(m.group(1)))
        kinds.add(m.group(2))
    if len(kinds) > 1:
        raise InnardsError("the reference format holds one kind of site per GLP, this one mixes resid_pre and resid_post")
    c = glp.config
    if c.time_scale != 1000.0:
        raise InnardsError(f"the reference format feeds tau = 1000 t; this GLP uses time_scale {c.time_scale}")
    if c.n_sites > 1:
        n = c.n_sites
        if layers != list(range(n)):
            raise InnardsError(f"a multi-layer reference GLP models layers 0..{n - 1} in order; this one models {', '.join(sites)}")
        if not math.isclose(c.site_scale, 1.0 / (n - 1), rel_tol=1e-12):
            raise InnardsError(f"the reference layer embedding is depth = layer / {n - 1}; this GLP's site_scale is "
                               f"{c.site_scale}, not 1/{n - 1}, so the reference format cannot express it")
    info = (glp.meta.get("site_info") or [{}])[0] or {}
    prefix = str(info.get("hf_module") or "model.layers.0").rsplit(".", 1)[0]
    return layers, prefix, {v: k for k, v in RETAIN_KIND.items()}[kinds.pop()]


def _plain(obj: Any) -> Any:
    """JSON-plain copy (tensors to lists, tuples to lists), so YAML gets no Python-specific tags."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_folder(glp: GLPLike, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``glp`` in the reference layout (config.yaml, final.safetensors, rep_statistics.pt)."""
    layers, prefix, retain = _export_sites(glp)
    c = glp.config
    sites = glp.meta["sites"]
    stats = glp.meta.get("stats_by_site") or {}
    if set(stats) != set(sites):
        raise InnardsError("the reference format needs normalisation statistics for every site of the GLP")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    src = glp.meta.get("model")
    model_name = src.get("name") if isinstance(src, dict) else src
    denoiser = {"d_input": c.d_in, "d_model": c.d_model, "d_mlp": c.d_mlp, "n_layers": c.n_blocks,
                "multi_layer_n_layers": c.n_sites if c.n_sites > 1 else None}
    base = (glp.meta.get("reference") or {}).get("config")
    cfg: dict[str, Any] = dict(base) if isinstance(base, dict) else {"model_name": model_name}
    gk = dict(cfg.get("glp_kwargs") or {})
    # the reference loader sets the top-level rep_statistic to the folder's file and resolves this interpolation
    gk["normalizer_config"] = {"rep_statistic": "${rep_statistic}"}
    gk["denoiser_config"] = denoiser
    gk["tracedict_config"] = {**(gk.get("tracedict_config") or {}), "layer_prefix": prefix,
                              "layers": layers, "retain": retain}
    cfg["glp_kwargs"] = gk
    cfg["rep_statistic"] = f"./{STATS}"
    cfg["innards"] = _plain({"format": "innards-glp", "source_model": src, "sites": sites,
                             "site_info": glp.meta.get("site_info"), "index_convention": glp.meta.get("index_convention"),
                             "training": glp.meta.get("training") or {}})
    mean = torch.stack([stats[s]["mean"].to(torch.float64) for s in sites])
    var = torch.stack([stats[s]["var"].to(torch.float64) for s in sites])
    st = {"mean": mean.to(torch.float32), "var": var.to(torch.float32), _F64[0]: mean, _F64[1]: var}
    if c.n_sites == 1:
        st = {k: v[0] for k, v in st.items()}
    counts = [stats[s].get("count") for s in sites]
    if all(isinstance(n, int) for n in counts):
        st["innards.count"] = torch.tensor(counts, dtype=torch.int64)
    save_tensors(out / f"{FINAL}.safetensors", to_reference(state_dict or glp.state_dict(), c.n_blocks, c.d_mlp))
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in st.items()}, buf)
    atomic_write_bytes(out / STATS, buf.getvalue())
    atomic_write_bytes(out / CONFIG, yaml.safe_dump(_plain(cfg), sort_keys=False).encode())
    return out


# ----- statistics from a whole store --------------------------------------------------------------------
def restats(glp: GLPLike, store: ActivationStore | str | Path, check_model: bool = True) -> GLPLike:
    """Replace ``glp``'s normalisation statistics with whole-store float64 ones from an innards ActivationStore.

    The reference's rep_statistics.pt holds the statistics of its first shard only; a store's are
    Chan/Welford moments over every row. The store must hold each of the GLP's sites at its width
    (and, with ``check_model``, come from the GLP's model).
    """
    st = store if isinstance(store, ActivationStore) else ActivationStore(store)
    new = {}
    for s in glp.meta.get("sites") or []:
        if s not in st.sites:
            raise InnardsError(f"restats: the store {st.path} has no site '{s}' (it has {', '.join(st.sites)})")
        if st.width(s) != glp.config.d_in:
            raise InnardsError(f"restats: site '{s}' has width {st.width(s)} in {st.path}, the GLP models {glp.config.d_in}")
        model = (st.manifest or {}).get("model")
        if check_model and model and glp.meta.get("model"):
            glp.check_compatible(model, s, st.width(s))
        new[s] = {**st.stats(s), "source": f"restats:{st.path}"}
    if not new:
        raise InnardsError("restats: the GLP records no sites")
    glp.set_meta({"stats_by_site": new, "restats": {"store": str(st.path), "count": {s: v.get("count") for s, v in new.items()}}})
    return glp
