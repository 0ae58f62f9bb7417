"""Canonical activation-site names, the same for every architecture, resolved to real HF modules.

A site is ``blocks.{L}.{kind}`` with kind one of

* ``resid_pre``  - the residual stream entering block L (input of the block module);
* ``resid_post`` - the residual stream leaving block L (output of the block module);
* ``attn_out``   - what the attention sub-layer writes (output projection included);
* ``mlp_out``    - what the MLP sub-layer writes (down-projection included);
* ``mlp_hidden`` - the MLP neurons: the input of the down-projection.

``resid_post[L] == resid_pre[L+1] == hidden_states[L+1]``; ``hidden_states[0]`` is the embedding output.
One exception, which trips people: for causal LMs (Llama, GPT-2, NeoX) Hugging Face returns the
*final-normed* stream as ``hidden_states[-1]``, while ``resid_post`` of the last block is the raw
stream before that norm. (BERT has no final norm, so there the equality holds for every layer.)
For pre-LN models (Llama, GPT-2, GPT-NeoX sequential; Gemma 2/OLMo 2 whose post-norms count as the sub-layer outputs) ``resid_post = resid_pre + attn_out + mlp_out``
holds via the intermediate ``resid_mid``; GPT-NeoX's parallel residual is literally that sum.

BERT-style encoders are post-LN: ``resid_post`` is the block output *after* its final LayerNorm;
``attn_out`` is the attention output projection (``attention.output.dense``, before its residual
add and LayerNorm) and ``mlp_out`` is the FFN output projection (``output.dense``, before its
residual add and LayerNorm), matching TransformerLens' BERT ``hook_attn_out`` / ``hook_mlp_out``.
For BERT the three do not sum to ``resid_post`` because of the LayerNorms.

Also accepted: TransformerLens spellings (``blocks.3.hook_resid_post``, ``blocks.3.mlp.hook_post``),
raw module paths (``model.layers.3`` is resid_post of 3, ``model.layers.3.mlp.down_proj`` is
mlp_hidden of 3; ``PATH:input`` / ``PATH:output`` pick the hook point), negative layers
(``blocks.-1.resid_post``) and fnmatch patterns in :func:`expand_sites` (``blocks.*.resid_post``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from innards.errors import InnardsError

INDEX_CONVENTION = ("resid_post[L] == resid_pre[L+1] == hidden_states[L+1]; hidden_states[0] is the embedding output; "
                    "exception: HF applies the final norm to hidden_states[-1] of causal LMs, resid_post[-1] is before it")

KINDS = ("resid_pre", "attn_out", "mlp_hidden", "mlp_out", "resid_post")  # execution order within a block

TL_NAMES = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_hidden": "mlp.hook_post",
}


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its blocks, and which module/hook point gives each kind."""

    name: str
    layers: tuple[str, ...]  # candidate paths of the block ModuleList (causal-LM wrapper first)
    kinds: dict[str, tuple[str, str]]  # kind -> (path relative to the block, "input" | "output")
    residual: str  # "pre_ln" | "parallel" | "post_ln" (documents how the kinds add up)


_LLAMA = Family("llama", ("model.layers", "layers"), {
    "resid_pre": ("", "input"), "resid_post": ("", "output"),
    "attn_out": ("self_attn", "output"), "mlp_out": ("mlp", "output"),
    "mlp_hidden": ("mlp.down_proj", "input")}, "pre_ln")

# "sandwich" norms (Gemma 2/3, OLMo 2): each sub-layer's output is normalised before the residual add,
# so what the block adds is the output of the post-norms, not of self_attn / mlp
_SANDWICH = Family("llama_sandwich", ("model.layers", "layers"), {
    "resid_pre": ("", "input"), "resid_post": ("", "output"),
    "attn_out": ("post_attention_layernorm", "output"), "mlp_out": ("post_feedforward_layernorm", "output"),
    "mlp_hidden": ("mlp.down_proj", "input")}, "pre_ln")

_GPT2 = Family("gpt2", ("transformer.h", "h"), {
    "resid_pre": ("", "input"), "resid_post": ("", "output"),
    "attn_out": ("attn", "output"), "mlp_out": ("mlp", "output"),
    "mlp_hidden": ("mlp.c_proj", "input")}, "pre_ln")

_NEOX = Family("gpt_neox", ("gpt_neox.layers", "layers"), {
    "resid_pre": ("", "input"), "resid_post": ("", "output"),
    "attn_out": ("attention", "output"), "mlp_out": ("mlp", "output"),
    "mlp_hidden": ("mlp.dense_4h_to_h", "input")}, "parallel")

_BERT = Family("bert", ("bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer", "encoder.layer"), {
    "resid_pre": ("", "input"), "resid_post": ("", "output"),
    "attn_out": ("attention.output.dense", "output"), "mlp_out": ("output.dense", "output"),
    "mlp_hidden": ("output.dense", "input")}, "post_ln")

FAMILIES = {f.name: f for f in (_SANDWICH, _LLAMA, _GPT2, _NEOX, _BERT)}  # structural fallback tries this order

# config.model_type -> family; unknown types fall back to the first family whose modules exist.
MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "phi3": "llama", "olmo": "llama", "smollm3": "llama",
    "gemma2": "llama_sandwich", "gemma3_text": "llama_sandwich", "olmo2": "llama_sandwich",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
}


@dataclass(frozen=True)
class Site:
    """One resolved activation site: canonical name, block, kind, HF module and hook point, width."""

    name: str
    layer: int
    kind: str
    module_path: str
    width: int
    hook: str = "output"  # "output": forward hook on the module; "input": forward pre-hook (first arg)
    tl_name: str = ""


@dataclass(frozen=True)
class Layout:
    """A model's family and the path of its block list."""

    family: Family
    layers_path: str
    n_layers: int
    matched_by: str  # "model_type" | "structure"


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _arch(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def layout(model: nn.Module) -> Layout:
    """The model's architecture family and block list (by model_type, else by module structure)."""
    cached = getattr(model, "_innards_layout", None)
    if isinstance(cached, Layout):
        return cached
    arch = _arch(model)
    named = MODEL_TYPES.get(arch)
    candidates = [FAMILIES[named]] if named else list(FAMILIES.values())
    for fam in candidates:
        for path in fam.layers:
            if not _has(model, path):
                continue
            blocks = model.get_submodule(path)
            if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
                continue
            if all(_has(blocks[0], sub) for sub, _ in fam.kinds.values() if sub):
                out = Layout(fam, path, len(blocks), "model_type" if named else "structure")
                model.__dict__["_innards_layout"] = out  # plain attribute, not a submodule or buffer
                return out
    raise InnardsError(f"unsupported architecture '{arch}' (supported: Llama-family, GPT-2, GPT-NeoX, BERT-style)")


def n_layers(model: nn.Module) -> int:
    """Number of transformer blocks."""
    return layout(model).n_layers


def _in_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        # GPT-2's Conv1D stores weight as (in, out), nn.Linear-likes as (out, in)
        return int(w.shape[0] if type(module).__name__ == "Conv1D" else w.shape[1])
    raise InnardsError(f"cannot tell the input width of {type(module).__name__}")


def _make(model: nn.Module, lay: Layout, layer: int, kind: str) -> Site:
    sub, hook = lay.family.kinds[kind]
    path = f"{lay.layers_path}.{layer}" + (f".{sub}" if sub else "")
    if kind == "mlp_hidden":
        width = _in_width(model.get_submodule(path))
    else:
        width = int(model.config.hidden_size)
    return Site(f"blocks.{layer}.{kind}", layer, kind, path, width, hook, f"blocks.{layer}.{TL_NAMES[kind]}")


def list_sites(model: nn.Module) -> list[Site]:
    """Every site of the model, block by block in execution order."""
    lay = layout(model)
    return [_make(model, lay, layer, kind) for layer in range(lay.n_layers) for kind in KINDS]


_CANON = re.compile(r"^blocks\.(-?\d+)\.(" + "|".join(KINDS) + r")$")
_TL = re.compile(r"^blocks\.(-?\d+)\.(" + "|".join(re.escape(v) for v in TL_NAMES.values()) + r")$")
_TL_KIND = {v: k for k, v in TL_NAMES.items()}


def _valid_forms(model: nn.Module, lay: Layout) -> str:
    return (f"valid: blocks.{{L}}.{{{'|'.join(KINDS)}}} with L in 0..{lay.n_layers - 1}, "
            f"TransformerLens blocks.{{L}}.hook_* names, or module paths like {lay.layers_path}.{{L}}")


def _check_layer(model: nn.Module, lay: Layout, layer: int, name: str) -> int:
    if not -lay.n_layers <= layer < lay.n_layers:
        raise InnardsError(f"layer {layer} out of range in site '{name}': {_arch(model)} model has "
                           f"{lay.n_layers} layers (0..{lay.n_layers - 1})")
    return layer % lay.n_layers


def _from_module_path(model: nn.Module, lay: Layout, name: str) -> Site | None:
    path, _, point = name.partition(":")
    if point not in ("", "input", "output"):
        return None
    prefix = getattr(model, "base_model_prefix", "") or ""
    # accept paths from the wrapper (model.layers.3) and from the base model (layers.3) alike
    forms = [path, f"{prefix}.{path}", path.removeprefix(f"{prefix}.")] if prefix else [path]
    for form in forms:
        if not form.startswith(lay.layers_path + "."):
            continue
        m = re.match(r"^(-?\d+)((?:\..+)?)$", form[len(lay.layers_path) + 1:])
        if not m:
            continue
        layer = _check_layer(model, lay, int(m.group(1)), name)
        found = [s for s in (_make(model, lay, layer, k) for k in KINDS)
                 if s.module_path == f"{lay.layers_path}.{layer}{m.group(2)}"]
        if point:
            found = [s for s in found if s.hook == point]
        # a block path alone means its output (resid_post); a down-projection alone means its input
        found.sort(key=lambda s: s.hook != "output")
        if found:
            return found[0]
    return None


def resolve_site(model: nn.Module, name: str | Site) -> Site:
    """Canonical, TransformerLens or module-path site name -> Site (InnardsError when unknown)."""
    if isinstance(name, Site):
        return name
    if not isinstance(name, str):
        raise InnardsError(f"site names are strings, got {type(name).__name__}")
    lay = layout(model)
    text = name.strip()
    m = _CANON.match(text)
    if m:
        return _make(model, lay, _check_layer(model, lay, int(m.group(1)), name), m.group(2))
    m = _TL.match(text)
    if m:
        return _make(model, lay, _check_layer(model, lay, int(m.group(1)), name), _TL_KIND[m.group(2)])
    site = _from_module_path(model, lay, text)
    if site is not None:
        return site
    raise InnardsError(f"unknown site '{name}' ({_valid_forms(model, lay)})")


def expand_sites(model: nn.Module, names: str | list[str]) -> list[Site]:
    """Resolve names, expanding fnmatch patterns (``blocks.*.resid_post``) over canonical and TL names."""
    names = [names] if isinstance(names, str) else list(names)
    out: list[Site] = []
    for name in names:
        if isinstance(name, str) and any(c in name for c in "*?["):
            hits = [s for s in list_sites(model) if fnmatch.fnmatchcase(s.name, name) or fnmatch.fnmatchcase(s.tl_name, name)]
            if not hits:
                lay = layout(model)
                raise InnardsError(f"site pattern '{name}' matches nothing ({_valid_forms(model, lay)})")
            out.extend(hits)
        else:
            out.append(resolve_site(model, name))
    return out


def site_metadata(model: nn.Module, site: str | Site) -> dict:
    """What an artifact records about a site: canonical, TL and HF names, and the index convention."""
    s = resolve_site(model, site)
    lay = layout(model)
    hs = {"resid_pre": s.layer, "resid_post": s.layer + 1}.get(s.kind)
    return {
        "site": s.name, "layer": s.layer, "kind": s.kind, "width": s.width,
        "tl_name": s.tl_name, "hf_module": s.module_path, "hook": s.hook,
        "hidden_states_index": hs, "arch": _arch(model), "family": lay.family.name,
        "residual": lay.family.residual, "matched_by": lay.matched_by, "index_convention": INDEX_CONVENTION,
    }
