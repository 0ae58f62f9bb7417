"""Canonical activation-site names, the same for every architecture, resolved to real HF modules.

Block sites are ``blocks.{L}.{kind}``, in execution order:

* ``resid_pre``  - the residual stream entering block L (input of the block module);
* ``ln1_out``    - the output of the block's first norm (pre-LN: what attention reads);
* ``q``, ``k``, ``v`` - the attention projections' outputs per head, (B, T, heads, d_head), before any
  rotary embedding or q/k norm (grouped-query models have fewer k/v heads);
* ``pattern``    - the attention probabilities (B, heads, T_query, T_key); read-only, and captured by
  running attention eagerly (the only implementation that forms them);
* ``z``          - the per-head attention result, (B, T, heads, d_head): the input of the output projection;
* ``attn_out``   - what the attention sub-layer writes (output projection included);
* ``resid_mid``  - ``resid_pre + attn_out``, between the sub-layers (sequential blocks only);
* ``ln2_out``    - the output of the block's second norm (pre-LN: what the MLP reads);
* ``mlp_pre``    - the MLP's pre-activation (gated MLPs: the gate projection's output);
* ``mlp_hidden`` - the MLP neurons: the input of the down-projection;
* ``mlp_out``    - what the MLP sub-layer writes (down-projection included; mixture of experts: the mixture);
* ``resid_post`` - the residual stream leaving block L (output of the block module).

Model sites: ``embed`` (the token embedding), ``pos_embed`` (a learned position embedding, where the model
adds one; (1, T, d) when the batch shares positions) and ``ln_final_out`` (the final norm's output). A site that a model does not have (``pos_embed``
of a rotary model, ``resid_mid`` of a parallel block, ``mlp_hidden`` of a mixture of experts) is refused
with the reason.

``resid_post[L] == resid_pre[L+1] == hidden_states[L+1]``; ``hidden_states[0]`` is the embedding output.
One exception, which trips people: for models with a final norm (causal LMs, ModernBERT) Hugging Face
returns the *final-normed* stream as ``hidden_states[-1]`` (``ln_final_out``), while ``resid_post`` of the
last block is the raw stream before that norm. Residual rules, checked for every architecture by the tests:
pre-LN blocks give ``resid_post = resid_pre + attn_out + mlp_out`` (through ``resid_mid``; "sandwich" models
such as Gemma 2 and OLMo 2 count the post-norms' outputs as the sub-layer outputs; Granite's residual
multiplier is folded into ``attn_out`` / ``mlp_out``); parallel blocks (GPT-J, GPT-NeoX, Phi, Falcon,
Cohere) give the same sum without a ``resid_mid``. Post-LN encoders (BERT, DistilBERT) normalise after
each residual add: ``resid_mid = resid_pre + attn_out``, ``ln1_out = LN1(resid_mid)``,
``resid_post = LN2(ln1_out + mlp_out)`` - there the sub-layer outputs do not sum to ``resid_post``.

Only architectures whose blocks these rules were checked on are accepted (table ``ARCHS``); a model of
another type, or a block with submodules the rules do not describe, is refused rather than guessed.

Also accepted: TransformerLens names (``blocks.3.hook_resid_post``, ``blocks.3.attn.hook_q``,
``blocks.3.ln1.hook_normalized``, ``hook_embed``, ``ln_final.hook_normalized``, ...), raw module paths of
sites whose tensor is the module's own input or output (``model.layers.3`` is resid_post of 3,
``model.layers.3.mlp.down_proj`` is mlp_hidden of 3; ``PATH:input`` / ``PATH:output`` pick the hook point),
negative layers (``blocks.-1.resid_post``) and fnmatch patterns in :func:`expand_sites` (``blocks.*.resid_post``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from innards.errors import InnardsError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

INDEX_CONVENTION = ("resid_post[L] == resid_pre[L+1] == hidden_states[L+1]; hidden_states[0] is the embedding output; "
                    "exception: HF applies the final norm to hidden_states[-1] of causal LMs, resid_post[-1] is before it")

KINDS = ("resid_pre", "attn_out", "mlp_hidden", "mlp_out", "resid_post")  # the residual-stream sites every model has
BLOCK_KINDS = ("resid_pre", "ln1_out", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "ln2_out",
               "mlp_pre", "mlp_hidden", "mlp_out", "resid_post")  # execution order within a block
MODEL_KINDS = ("embed", "pos_embed", "ln_final_out")
HEAD_KINDS = ("q", "k", "v", "z")  # (B, T, heads, d_head)

TL_NAMES = {
    "resid_pre": "hook_resid_pre", "ln1_out": "ln1.hook_normalized", "q": "attn.hook_q", "k": "attn.hook_k",
    "v": "attn.hook_v", "pattern": "attn.hook_pattern", "z": "attn.hook_z", "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid", "ln2_out": "ln2.hook_normalized", "mlp_pre": "mlp.hook_pre",
    "mlp_hidden": "mlp.hook_post", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post",
}
TL_MODEL_NAMES = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "ln_final_out": "ln_final.hook_normalized"}

Residual = Literal["pre_ln", "sandwich", "parallel", "post_ln"]


@dataclass(frozen=True)
class Split:
    """A sub-tensor of a module's (..., F) tensor: F viewed as ``shape``, indexed per dim, reshaped to ``out``.

    ``index`` holds, per dim of ``shape``: None (all), an int, or a (start, stop) range.
    """

    shape: tuple[int, ...]
    index: tuple[int | tuple[int, int] | None, ...]
    out: tuple[int, ...]

    def _key(self) -> tuple:
        pad = tuple(self.index) + (None,) * (len(self.shape) - len(self.index))
        return (Ellipsis, *(slice(None) if i is None else slice(*i) if isinstance(i, tuple) else i for i in pad))

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """The sub-tensor, (..., *out)."""
        return x.unflatten(-1, self.shape)[self._key()].reshape(*x.shape[:-1], *self.out)

    def write(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` with the sub-tensor replaced by ``new`` (..., *out)."""
        y = x.clone()
        view = y.unflatten(-1, self.shape)
        part = view[self._key()]
        view[self._key()] = new.reshape(part.shape).to(part.dtype)
        return y


def _heads(n: int, d_head: int) -> Split:
    return Split((n, d_head), (), (n, d_head))


@dataclass(frozen=True)
class Tap:
    """Where a site's tensor is, relative to the block (or, for model sites, to the base model)."""

    path: str
    hook: Literal["input", "output"] = "output"
    item: int = 0  # which element of a tuple output (attention modules return the pattern as item 1)
    split: Split | None = None
    scale: float | None = None  # the block adds scale * this module's output (Granite's residual multiplier)
    flat: bool = False  # the module sees (B*T, F) (OPT's MLP): unflattened with the block input's (B, T)


Taps = dict[str, "Tap | str"]  # kind -> where, or why this model has no such tensor


@dataclass(frozen=True)
class Site:
    """One resolved activation site: canonical name, block, kind, HF module and hook point, width.

    The tensor is (B, T, width), except per-head sites (``heads`` > 0): q/k/v/z are (B, T, heads, width)
    and ``pattern`` is (B, heads, T_query, T_key) (width 0).
    """

    name: str
    layer: int  # the block; model sites: 0 for the embeddings (they feed block 0), the last block for ln_final_out
    kind: str
    module_path: str
    width: int
    hook: str = "output"  # "output": forward hook on the module; "input": forward pre-hook (first arg)
    tl_name: str = ""
    heads: int = 0
    item: int = 0
    split: Split | None = None
    scale: float | None = None
    block: str = ""  # path of the block module (flat taps and resid_mid edits need it)
    flat: bool = False
    edit: Literal["direct", "delta", "none"] = "direct"  # delta: resid_mid is edited through attn_out

    @property
    def plain(self) -> bool:
        """The tensor is the module's own input or output, so the module path names the site."""
        return self.item == 0 and self.split is None and self.scale is None and not self.flat

    @property
    def vector(self) -> bool:
        """One width-sized vector per token: (B, T, width) (what stores, SAEs and GLPs take)."""
        return self.heads == 0


@dataclass(frozen=True)
class Arch:
    """The site rules of one architecture (a ``config.model_type``) for a given config."""

    family: str
    residual: Residual
    layers: str  # block list, relative to the base model
    block: Callable[[PretrainedConfig, nn.Module], Taps]
    model: Taps  # embed / pos_embed / ln_final_out, relative to the base model
    extra_children: tuple[str, ...] = ()  # block submodules that hold no site (dropouts, activations)
    check: Callable[[PretrainedConfig], str | None] = lambda cfg: None  # why a config is not covered
    notes: str = ""


@dataclass(frozen=True)
class Layout:
    """A model's site rules and the path of its block list."""

    arch: str
    rules: Arch
    base: str  # path of the base model inside the model ("" when the model is the base)
    layers_path: str
    n_layers: int
    block_taps: tuple[Taps, ...] = field(repr=False)

    @property
    def family(self) -> str:
        return self.rules.family

    @property
    def residual(self) -> Residual:
        return self.rules.residual


# ---------------------------------------------------------------- the rules, per architecture


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer (nn.Linear, GPT-2's Conv1D, Falcon's linear)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        # GPT-2's Conv1D stores weight as (in, out), nn.Linear-likes as (out, in)
        return (int(w.shape[0]), int(w.shape[1])) if type(module).__name__ == "Conv1D" else (int(w.shape[1]), int(w.shape[0]))
    raise InnardsError(f"cannot tell the widths of {type(module).__name__}")


def _n_heads(cfg: PretrainedConfig) -> tuple[int, int]:
    h = int(cfg.num_attention_heads)
    kv = getattr(cfg, "num_key_value_heads", None)
    return h, int(kv) if kv else h


def _separate_qkv(block: nn.Module, attn: str, q: str, k: str, v: str, o: str, h: int, kv: int) -> Taps:
    """q, k, v from three projections, z from the output projection's input, the pattern from the attention module."""
    d_head = _in_out(block.get_submodule(f"{attn}.{q}"))[1] // h
    return {"q": Tap(f"{attn}.{q}", split=_heads(h, d_head)), "k": Tap(f"{attn}.{k}", split=_heads(kv, d_head)),
            "v": Tap(f"{attn}.{v}", split=_heads(kv, d_head)), "z": Tap(f"{attn}.{o}", "input", split=_heads(h, d_head)),
            "pattern": Tap(attn, item=1)}


_PARALLEL = "the block is parallel: attention and MLP both read resid_pre, so there is no resid_mid"
_ONE_NORM = "the block is parallel with one norm: the MLP reads ln1_out"
_MOE = ("the MLP is a mixture of experts: its neurons belong to single experts, so the block has no {kind}; "
        "mlp_out is the mixture's output")
_ROTARY = "positions are rotary (applied inside attention); no position embedding is added to the stream"
_NO_FINAL = "the model has no final norm"


def _moe(kind: str) -> str:
    return _MOE.format(kind=kind)


def _llama_block(cfg: PretrainedConfig, block: nn.Module, *, mlp: tuple[str, str] = ("gate_proj", "down_proj"),
                 scale: float | None = None, parallel: bool = False) -> Taps:
    """Llama and its relatives: input_layernorm -> self_attn, post_attention_layernorm -> mlp."""
    h, kv = _n_heads(cfg)
    if hasattr(block.self_attn, "qkv_proj"):  # Phi-3: one fused projection [q | k | v]
        d_head = _in_out(block.self_attn.qkv_proj)[1] // (h + 2 * kv)
        n = h + 2 * kv
        qkv = {"q": Tap("self_attn.qkv_proj", split=Split((n, d_head), ((0, h),), (h, d_head))),
               "k": Tap("self_attn.qkv_proj", split=Split((n, d_head), ((h, h + kv),), (kv, d_head))),
               "v": Tap("self_attn.qkv_proj", split=Split((n, d_head), ((h + kv, n),), (kv, d_head))),
               "z": Tap("self_attn.o_proj", "input", split=_heads(h, d_head)), "pattern": Tap("self_attn", item=1)}
    else:
        qkv = _separate_qkv(block, "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", h, kv)
    taps: Taps = {"resid_pre": Tap("", "input"), "resid_post": Tap(""), "ln1_out": Tap("input_layernorm"), **qkv,
                  "attn_out": Tap("self_attn", scale=scale), "mlp_out": Tap("mlp", scale=scale)}
    if parallel:
        taps.update(resid_mid=_PARALLEL, ln2_out=_ONE_NORM)
    else:
        taps.update(resid_mid=Tap("post_attention_layernorm", "input"), ln2_out=Tap("post_attention_layernorm"))
    if hasattr(block.mlp, "experts"):
        taps.update(mlp_pre=_moe("mlp_pre"), mlp_hidden=_moe("mlp_hidden"))
    elif hasattr(block.mlp, "gate_up_proj"):  # Phi-3: [gate | up] in one projection
        f = _in_out(block.mlp.gate_up_proj)[1] // 2
        taps.update(mlp_pre=Tap("mlp.gate_up_proj", split=Split((2, f), (0,), (f,))), mlp_hidden=Tap("mlp.down_proj", "input"))
    else:
        taps.update(mlp_pre=Tap(f"mlp.{mlp[0]}"), mlp_hidden=Tap(f"mlp.{mlp[1]}", "input"))
    return taps


def _sandwich_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    """Gemma 2/3 and OLMo 2: each sub-layer's output is normalised before the residual add."""
    h, kv = _n_heads(cfg)
    pre_norms = hasattr(block, "input_layernorm")  # OLMo 2 has only the post-norms
    no_pre = "the block normalises its sub-layers' outputs, not their inputs: attention reads resid_pre and the MLP resid_mid"
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""),
            "ln1_out": Tap("input_layernorm") if pre_norms else no_pre,
            **_separate_qkv(block, "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", h, kv),
            "attn_out": Tap("post_attention_layernorm"),
            "resid_mid": Tap("pre_feedforward_layernorm" if pre_norms else "mlp", "input"),
            "ln2_out": Tap("pre_feedforward_layernorm") if pre_norms else no_pre,
            "mlp_pre": Tap("mlp.gate_proj"), "mlp_hidden": Tap("mlp.down_proj", "input"),
            "mlp_out": Tap("post_feedforward_layernorm")}


def _gpt2_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h = int(cfg.num_attention_heads)
    d_head = _in_out(block.attn.c_attn)[1] // (3 * h)
    fused = {kind: Tap("attn.c_attn", split=Split((3, h, d_head), (i,), (h, d_head))) for i, kind in enumerate("qkv")}
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""), "ln1_out": Tap("ln_1"), **fused,
            "z": Tap("attn.c_proj", "input", split=_heads(h, d_head)), "pattern": Tap("attn", item=1),
            "attn_out": Tap("attn"), "resid_mid": Tap("ln_2", "input"), "ln2_out": Tap("ln_2"),
            "mlp_pre": Tap("mlp.c_fc"), "mlp_hidden": Tap("mlp.c_proj", "input"), "mlp_out": Tap("mlp")}


def _gpt_neo_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h = int(cfg.num_attention_heads)
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""), "ln1_out": Tap("ln_1"),
            **_separate_qkv(block, "attn.attention", "q_proj", "k_proj", "v_proj", "out_proj", h, h),
            "pattern": Tap("attn", item=1), "attn_out": Tap("attn"), "resid_mid": Tap("ln_2", "input"),
            "ln2_out": Tap("ln_2"), "mlp_pre": Tap("mlp.c_fc"), "mlp_hidden": Tap("mlp.c_proj", "input"), "mlp_out": Tap("mlp")}


def _neox_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h = int(cfg.num_attention_heads)
    d_head = _in_out(block.attention.query_key_value)[1] // (3 * h)
    fused = {kind: Tap("attention.query_key_value", split=Split((h, 3, d_head), (None, i), (h, d_head)))
             for i, kind in enumerate("qkv")}
    parallel = bool(cfg.use_parallel_residual)
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""), "ln1_out": Tap("input_layernorm"), **fused,
            "z": Tap("attention.dense", "input", split=_heads(h, d_head)), "pattern": Tap("attention", item=1),
            "attn_out": Tap("attention"),
            # parallel NeoX normalises resid_pre a second time for the MLP
            "resid_mid": _PARALLEL if parallel else Tap("post_attention_layernorm", "input"),
            "ln2_out": Tap("post_attention_layernorm"),
            "mlp_pre": Tap("mlp.dense_h_to_4h"), "mlp_hidden": Tap("mlp.dense_4h_to_h", "input"), "mlp_out": Tap("mlp")}


def _gptj_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h = int(cfg.num_attention_heads)
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""), "ln1_out": Tap("ln_1"),
            **_separate_qkv(block, "attn", "q_proj", "k_proj", "v_proj", "out_proj", h, h),
            "attn_out": Tap("attn"), "resid_mid": _PARALLEL, "ln2_out": _ONE_NORM,
            "mlp_pre": Tap("mlp.fc_in"), "mlp_hidden": Tap("mlp.fc_out", "input"), "mlp_out": Tap("mlp")}


def _phi_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h, kv = _n_heads(cfg)
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""), "ln1_out": Tap("input_layernorm"),
            **_separate_qkv(block, "self_attn", "q_proj", "k_proj", "v_proj", "dense", h, kv),
            "attn_out": Tap("self_attn"), "resid_mid": _PARALLEL, "ln2_out": _ONE_NORM,
            "mlp_pre": Tap("mlp.fc1"), "mlp_hidden": Tap("mlp.fc2", "input"), "mlp_out": Tap("mlp")}


def _falcon_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h = int(cfg.num_attention_heads)
    qkv_out = _in_out(block.self_attention.query_key_value)[1]
    if cfg.new_decoder_architecture:  # per kv head: its group of queries, then one key and one value
        kv = int(cfg.num_kv_heads)
        g = h // kv
        d_head = qkv_out // (kv * (g + 2))
        shape = (kv, g + 2, d_head)
        index = {"q": ((None, (0, g)), (h, d_head)), "k": ((None, g), (kv, d_head)), "v": ((None, g + 1), (kv, d_head))}
    elif cfg.multi_query:  # all queries, then the one shared key and value
        d_head = qkv_out // (h + 2)
        shape = (h + 2, d_head)
        index = {"q": (((0, h),), (h, d_head)), "k": ((h,), (1, d_head)), "v": ((h + 1,), (1, d_head))}
    else:  # per head: query, key, value
        d_head = qkv_out // (3 * h)
        shape = (h, 3, d_head)
        index = {"q": ((None, 0), (h, d_head)), "k": ((None, 1), (h, d_head)), "v": ((None, 2), (h, d_head))}
    taps: Taps = {"resid_pre": Tap("", "input"), "resid_post": Tap(""),
                  **{k: Tap("self_attention.query_key_value", split=Split(shape, i, out)) for k, (i, out) in index.items()},
                  "z": Tap("self_attention.dense", "input", split=_heads(h, d_head)), "pattern": Tap("self_attention", item=1),
                  "attn_out": Tap("self_attention"), "mlp_pre": Tap("mlp.dense_h_to_4h"),
                  "mlp_hidden": Tap("mlp.dense_4h_to_h", "input"), "mlp_out": Tap("mlp")}
    two_norms = cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2
    taps["ln1_out"] = Tap("ln_attn") if two_norms else Tap("input_layernorm")
    if cfg.new_decoder_architecture or cfg.parallel_attn:
        taps.update(resid_mid=_PARALLEL, ln2_out=Tap("ln_mlp") if two_norms else _ONE_NORM)
    else:
        taps.update(resid_mid=Tap("post_attention_layernorm", "input"), ln2_out=Tap("post_attention_layernorm"))
    return taps


def _falcon_check(cfg: PretrainedConfig) -> str | None:
    if cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 1 and not cfg.parallel_attn:
        return "new_decoder_architecture with one norm needs parallel_attn"
    return None


def _opt_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h = int(cfg.num_attention_heads)
    pre = bool(cfg.do_layer_norm_before)
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""), "ln1_out": Tap("self_attn_layer_norm"),
            **_separate_qkv(block, "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", h, h),
            "attn_out": Tap("self_attn"),
            # the MLP half of OPT's block runs on (B*T, d)
            "resid_mid": Tap("final_layer_norm", "input", flat=True) if pre else Tap("self_attn_layer_norm", "input"),
            "ln2_out": Tap("final_layer_norm", flat=pre), "mlp_pre": Tap("fc1", flat=True),
            "mlp_hidden": Tap("fc2", "input", flat=True), "mlp_out": Tap("fc2", flat=True)}


def _bert_block(cfg: PretrainedConfig, block: nn.Module, *, attn: str = "attention.self",
                qkv: tuple[str, str, str] = ("query", "key", "value"), out: str = "attention.output.dense",
                ln1: str = "attention.output.LayerNorm") -> Taps:
    """BERT and its post-LN relatives: attention (+ output projection) -> LN1(x + .) -> MLP -> LN2(. + .)."""
    h = int(cfg.num_attention_heads)
    taps = _separate_qkv(block, attn, *qkv, "", h, h)
    heads = taps["q"].split  # type: ignore[union-attr]
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""), **taps, "z": Tap(out, "input", split=heads),
            "attn_out": Tap(out), "resid_mid": Tap(ln1, "input"), "ln1_out": Tap(ln1), "mlp_pre": Tap("intermediate.dense"),
            "mlp_hidden": Tap("output.dense", "input"), "mlp_out": Tap("output.dense"), "ln2_out": Tap("output.LayerNorm")}


def _bert_check(cfg: PretrainedConfig) -> str | None:
    if getattr(cfg, "add_cross_attention", False):
        return "decoders with cross-attention add a sub-layer"
    if getattr(cfg, "conv_kernel_size", 0):  # DeBERTa-v2 xlarge: a convolution joins the stream after block 0
        return "conv_kernel_size > 0 adds a convolution between blocks 0 and 1"
    return None


def _distilbert_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h = int(cfg.num_attention_heads)
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""),
            **_separate_qkv(block, "attention", "q_lin", "k_lin", "v_lin", "out_lin", h, h),
            "attn_out": Tap("attention"), "resid_mid": Tap("sa_layer_norm", "input"), "ln1_out": Tap("sa_layer_norm"),
            "mlp_pre": Tap("ffn.lin1"), "mlp_hidden": Tap("ffn.lin2", "input"), "mlp_out": Tap("ffn"),
            "ln2_out": Tap("output_layer_norm")}


def _modernbert_block(cfg: PretrainedConfig, block: nn.Module) -> Taps:
    h = int(cfg.num_attention_heads)
    d_head = _in_out(block.attn.Wqkv)[1] // (3 * h)
    f = _in_out(block.mlp.Wi)[1] // 2
    return {"resid_pre": Tap("", "input"), "resid_post": Tap(""), "ln1_out": Tap("attn_norm"),
            **{kind: Tap("attn.Wqkv", split=Split((3, h, d_head), (i,), (h, d_head))) for i, kind in enumerate("qkv")},
            "z": Tap("attn.Wo", "input", split=_heads(h, d_head)), "pattern": Tap("attn", item=1),
            "attn_out": Tap("attn"), "resid_mid": Tap("mlp_norm", "input"), "ln2_out": Tap("mlp_norm"),
            # Wi gives [input | gate]; the activation is applied to the input half
            "mlp_pre": Tap("mlp.Wi", split=Split((2, f), (0,), (f,))), "mlp_hidden": Tap("mlp.Wo", "input"),
            "mlp_out": Tap("mlp")}


def _gpt2_check(cfg: PretrainedConfig) -> str | None:
    return "cross-attention adds a sub-layer" if getattr(cfg, "add_cross_attention", False) else None


_LLAMA_MODEL: Taps = {"embed": Tap("embed_tokens"), "pos_embed": _ROTARY, "ln_final_out": Tap("norm")}
_DROPOUTS = ("dropout", "resid_dropout", "resid_attn_dropout", "resid_mlp_dropout", "post_attention_dropout",
             "post_mlp_dropout", "activation_fn")


def _llama(family: str = "llama", notes: str = "", **kw: object) -> Arch:
    return Arch(family, "parallel" if kw.get("parallel") else "pre_ln", "layers",
                lambda cfg, b: _llama_block(cfg, b, **kw), _LLAMA_MODEL, _DROPOUTS, notes=notes)  # type: ignore[arg-type]


def _granite() -> Arch:
    return Arch("llama", "pre_ln", "layers", lambda cfg, b: _llama_block(cfg, b, scale=float(cfg.residual_multiplier)),
                _LLAMA_MODEL, notes="attn_out / mlp_out include the residual multiplier; resid_pre[0] = embedding_multiplier * embed")


def _stablelm(cfg: PretrainedConfig) -> Arch:
    par = bool(cfg.use_parallel_residual)
    return Arch("llama", "parallel" if par else "pre_ln", "layers", lambda c, b: _llama_block(c, b, parallel=par),
                _LLAMA_MODEL, _DROPOUTS, notes="use_parallel_residual selects the parallel block")


def _neox(cfg: PretrainedConfig) -> Arch:
    return Arch("gpt_neox", "parallel" if cfg.use_parallel_residual else "pre_ln", "layers", _neox_block,
                {"embed": Tap("embed_in"), "pos_embed": _ROTARY, "ln_final_out": Tap("final_layer_norm")}, _DROPOUTS,
                notes="use_parallel_residual selects the parallel block (the MLP has its own norm of resid_pre)")


def _falcon(cfg: PretrainedConfig) -> Arch:
    par = bool(cfg.new_decoder_architecture or cfg.parallel_attn)
    return Arch("falcon", "parallel" if par else "pre_ln", "h", _falcon_block,
                {"embed": Tap("word_embeddings"), "pos_embed": "positions are rotary or ALiBi; no position embedding is added",
                 "ln_final_out": Tap("ln_f")}, check=_falcon_check,
                notes="new_decoder_architecture, parallel_attn, multi_query and ALiBi variants")


def _opt(cfg: PretrainedConfig) -> Arch:
    pre = bool(cfg.do_layer_norm_before)
    final: Tap | str = Tap("decoder.final_layer_norm") if pre and not getattr(cfg, "_remove_final_layer_norm", False) else _NO_FINAL
    return Arch("opt", "pre_ln" if pre else "post_ln", "decoder.layers", _opt_block,
                {"embed": Tap("decoder.embed_tokens"), "pos_embed": Tap("decoder.embed_positions"), "ln_final_out": final},
                ("activation_fn",),
                notes="do_layer_norm_before=False (OPT-350m) is post-LN; with project_in/out, embed has width word_embed_proj_dim")


_BERT = Arch("bert", "post_ln", "encoder.layer", _bert_block,
             {"embed": Tap("embeddings.word_embeddings"), "pos_embed": Tap("embeddings.position_embeddings"),
              "ln_final_out": _NO_FINAL}, check=_bert_check,
             notes="post-LN: resid_post is after the block's last LayerNorm; hidden_states[0] = LayerNorm(embed + pos_embed + token type)")

_MPNET = Arch("mpnet", "post_ln", "encoder.layer",
              lambda cfg, b: _bert_block(cfg, b, attn="attention.attn", qkv=("q", "k", "v"), out="attention.attn.o",
                                         ln1="attention.LayerNorm"),
              {"embed": Tap("embeddings.word_embeddings"), "pos_embed": Tap("embeddings.position_embeddings"),
               "ln_final_out": _NO_FINAL},
              notes="post-LN like BERT; attn_out is the attention's output projection (relative position bias inside)")
def _deberta(cfg: PretrainedConfig) -> Arch:
    pos: Tap | str = Tap("embeddings.position_embeddings") if cfg.position_biased_input else \
        "positions are relative (disentangled attention); no position embedding is added to the stream"
    return Arch("deberta_v2", "post_ln", "encoder.layer",
                lambda c, b: _bert_block(c, b, qkv=("query_proj", "key_proj", "value_proj")),
                {"embed": Tap("embeddings.word_embeddings"), "pos_embed": pos, "ln_final_out": _NO_FINAL},
                check=_bert_check, notes="post-LN like BERT; disentangled relative attention")


# model_type -> the rules for its config
ARCHS: dict[str, Callable[[PretrainedConfig], Arch]] = {
    **{t: (lambda cfg: _llama()) for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo")},
    "gemma": lambda cfg: _llama(notes="embed includes the sqrt(d) scale"),
    "phi3": lambda cfg: _llama(notes="fused qkv_proj and gate_up_proj are split per head / half"),
    "starcoder2": lambda cfg: _llama(mlp=("c_fc", "c_proj")),
    "granite": lambda cfg: _granite(),
    "cohere": lambda cfg: _llama(parallel=True),
    "stablelm": _stablelm,
    **{t: (lambda cfg: _llama("llama_moe", notes="mlp_pre / mlp_hidden exist only in dense layers"))
       for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")},
    **{t: (lambda cfg: Arch("llama_sandwich", "sandwich", "layers", _sandwich_block, _LLAMA_MODEL,
                            notes="attn_out / mlp_out are the post-norms' outputs"))
       for t in ("gemma2", "gemma3_text", "olmo2")},
    "gpt2": lambda cfg: Arch("gpt2", "pre_ln", "h", _gpt2_block,
                             {"embed": Tap("wte"), "pos_embed": Tap("wpe"), "ln_final_out": Tap("ln_f")}, check=_gpt2_check),
    "gpt_neo": lambda cfg: Arch("gpt_neo", "pre_ln", "h", _gpt_neo_block,
                                {"embed": Tap("wte"), "pos_embed": Tap("wpe"), "ln_final_out": Tap("ln_f")}),
    "gpt_neox": _neox,
    "gptj": lambda cfg: Arch("gptj", "parallel", "h", _gptj_block,
                             {"embed": Tap("wte"), "pos_embed": _ROTARY, "ln_final_out": Tap("ln_f")}),
    "phi": lambda cfg: Arch("phi", "parallel", "layers", _phi_block,
                            {"embed": Tap("embed_tokens"), "pos_embed": _ROTARY, "ln_final_out": Tap("final_layernorm")},
                            _DROPOUTS),
    "falcon": _falcon,
    "opt": _opt,
    **{t: (lambda cfg: _BERT) for t in ("bert", "roberta", "xlm-roberta", "electra")},
    "mpnet": lambda cfg: _MPNET,
    "deberta-v2": _deberta,
    "distilbert": lambda cfg: Arch("distilbert", "post_ln", "transformer.layer", _distilbert_block,
                                   {"embed": Tap("embeddings.word_embeddings"),
                                    "pos_embed": Tap("embeddings.position_embeddings"), "ln_final_out": _NO_FINAL},
                                   notes="post-LN like BERT"),
    "modernbert": lambda cfg: Arch("modernbert", "pre_ln", "layers", _modernbert_block,
                                   {"embed": Tap("embeddings.tok_embeddings"), "pos_embed": _ROTARY,
                                    "ln_final_out": Tap("final_norm")},
                                   notes="pre-LN encoder with a final norm (hidden_states[-1] is after it); layer 0's attn_norm is the identity"),
}


# ---------------------------------------------------------------- layout and resolution


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _arch(model: PreTrainedModel) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def _base_path(model: PreTrainedModel) -> str:
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def layout(model: PreTrainedModel) -> Layout:
    """The model's site rules and block list (InnardsError when its architecture is not covered)."""
    cached = model.__dict__.get("_innards_layout")
    if isinstance(cached, Layout):
        return cached
    arch = _arch(model)
    if arch not in ARCHS:
        raise InnardsError(f"unsupported architecture '{arch}': its blocks have not been checked against the site "
                           f"rules (supported: {', '.join(sorted(ARCHS))})")
    cfg = model.config
    rules = ARCHS[arch](cfg)
    why = rules.check(cfg)
    if why:
        raise InnardsError(f"unsupported {arch} configuration: {why}")
    base = _base_path(model)
    path = _join(base, rules.layers)
    blocks = model.get_submodule(path) if _has(model, path) else None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise InnardsError(f"{arch} model has no block list at '{path}' ({type(model).__name__} is not a layout innards knows)")
    taps = []
    for i, block in enumerate(blocks):
        t = rules.block(cfg, block)
        described = {tap.path.split(".")[0] for tap in t.values() if isinstance(tap, Tap) and tap.path} | set(rules.extra_children)
        extra = sorted(n for n, _ in block.named_children() if n not in described)
        if extra:
            raise InnardsError(f"block {i} of this {arch} model has submodules the site rules do not describe "
                               f"({', '.join(extra)}); refusing rather than guessing what its sites are")
        missing = [tap.path for tap in t.values() if isinstance(tap, Tap) and tap.path and not _has(block, tap.path)]
        if missing:
            raise InnardsError(f"block {i} of this {arch} model lacks {', '.join(missing)}, which the site rules expect")
        taps.append(t)
    out = Layout(arch, rules, base, path, len(blocks), tuple(taps))
    model.__dict__["_innards_layout"] = out  # plain attribute, not a submodule or buffer
    return out


def n_layers(model: PreTrainedModel) -> int:
    """Number of transformer blocks."""
    return layout(model).n_layers


def _width(module: nn.Module, tap: Tap, d_model: int) -> int:
    if tap.split is not None:
        return tap.split.out[-1]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    try:
        i, o = _in_out(module)
    except InnardsError:
        return d_model  # blocks, norms, sub-layers: the stream's width
    return i if tap.hook == "input" else o


def _site(model: PreTrainedModel, lay: Layout, name: str, layer: int, kind: str, tap: Tap, block: str, tl: str) -> Site:
    path = _join(block, tap.path)
    module = model.get_submodule(path)
    heads = tap.split.out[0] if tap.split is not None and kind in HEAD_KINDS else 0
    width = _width(module, tap, int(model.config.hidden_size))
    if kind == "pattern":
        heads, width = int(model.config.num_attention_heads), 0
    edit: Literal["direct", "delta", "none"] = "direct"
    if kind == "pattern":
        edit = "none"
    elif kind == "resid_mid" and lay.residual in ("pre_ln", "sandwich"):
        edit = "delta"  # the block keeps resid_mid in a variable: the norm's input is only the MLP's copy
    return Site(name, layer, kind, path, width, tap.hook, tl, heads, tap.item, tap.split, tap.scale,
                block if kind in BLOCK_KINDS else "", tap.flat, edit)


def _block_site(model: PreTrainedModel, lay: Layout, layer: int, kind: str) -> Site | str:
    tap = lay.block_taps[layer].get(kind, "the site rules do not define it")
    if isinstance(tap, str):
        return tap
    return _site(model, lay, f"blocks.{layer}.{kind}", layer, kind, tap, f"{lay.layers_path}.{layer}",
                 f"blocks.{layer}.{TL_NAMES[kind]}")


def _model_site(model: PreTrainedModel, lay: Layout, kind: str) -> Site | str:
    tap = lay.rules.model[kind]
    if isinstance(tap, str):
        return tap
    if not _has(model, _join(lay.base, tap.path)):
        return _NO_FINAL if kind == "ln_final_out" else f"the model has no {tap.path}"
    layer = lay.n_layers - 1 if kind == "ln_final_out" else 0
    return _site(model, lay, kind, layer, kind, tap, lay.base, TL_MODEL_NAMES[kind])


def list_sites(model: PreTrainedModel) -> list[Site]:
    """Every site of the model in execution order: embeddings, each block's sites, the final norm."""
    lay = layout(model)
    head = [s for k in ("embed", "pos_embed") if isinstance(s := _model_site(model, lay, k), Site)]
    body = [s for layer in range(lay.n_layers) for k in BLOCK_KINDS if isinstance(s := _block_site(model, lay, layer, k), Site)]
    tail = [s for s in [_model_site(model, lay, "ln_final_out")] if isinstance(s, Site)]
    return head + body + tail


_KIND_RE = "|".join(BLOCK_KINDS)
_TL_RE = "|".join(re.escape(v) for v in TL_NAMES.values())
_CANON = re.compile(rf"^blocks\.(-?\d+)\.({_KIND_RE})$")
_TL = re.compile(rf"^blocks\.(-?\d+)\.({_TL_RE})$")
_TL_KIND = {v: k for k, v in TL_NAMES.items()}
_TL_MODEL_KIND = {v: k for k, v in TL_MODEL_NAMES.items()}


def accepted_names(model: PreTrainedModel) -> str:
    """Every name form this model accepts, in one line (what the unknown-site error lists)."""
    lay = layout(model)
    sites = list_sites(model)
    top = [s.name for s in sites if s.kind in MODEL_KINDS]
    kinds = [k for k in BLOCK_KINDS if any(s.kind == k for s in sites)]
    return (f"accepted: {', '.join(top)}, blocks.{{L}}.{{{'|'.join(kinds)}}} with L in 0..{lay.n_layers - 1} "
            f"(negative L counts from the end); the TransformerLens names {', '.join(TL_MODEL_NAMES[k] for k in top)}, "
            f"blocks.{{L}}.{{{'|'.join(TL_NAMES[k] for k in kinds)}}}; or the module path of a site whose tensor is "
            f"that module's input or output, e.g. {lay.layers_path}.{{L}}[:input|:output] (see `innards sites`)")


def _check_layer(model: PreTrainedModel, lay: Layout, layer: int, name: str) -> int:
    if not -lay.n_layers <= layer < lay.n_layers:
        raise InnardsError(f"layer {layer} out of range in site '{name}': {_arch(model)} model has "
                           f"{lay.n_layers} layers (0..{lay.n_layers - 1})")
    return layer % lay.n_layers


def _got(model: PreTrainedModel, name: str, found: Site | str) -> Site:
    if isinstance(found, str):
        raise InnardsError(f"site '{name}' does not exist in this {_arch(model)} model: {found}")
    return found


def _from_module_path(model: PreTrainedModel, lay: Layout, name: str) -> Site | None:
    path, _, point = name.partition(":")
    if point not in ("", "input", "output"):
        return None
    # accept paths from the wrapper (model.layers.3) and from the base model (layers.3) alike
    forms = {path, _join(lay.base, path), path.removeprefix(f"{lay.base}.")} if lay.base else {path}
    candidates: list[Site] = []
    for form in forms:
        m = re.match(rf"^{re.escape(lay.layers_path)}\.(-?\d+)((?:\..+)?)$", form)
        if m:
            layer = _check_layer(model, lay, int(m.group(1)), name)
            full = f"{lay.layers_path}.{layer}{m.group(2)}"
            candidates += [s for k in BLOCK_KINDS if isinstance(s := _block_site(model, lay, layer, k), Site)
                           and s.module_path == full]
        else:
            candidates += [s for k in MODEL_KINDS if isinstance(s := _model_site(model, lay, k), Site) and s.module_path == form]
    found = [s for s in candidates if s.plain and (not point or s.hook == point)]
    # a block path alone means its output (resid_post); a down-projection alone means its input
    found.sort(key=lambda s: s.hook != "output")
    return found[0] if found else None


def resolve_site(model: PreTrainedModel, name: str | Site) -> Site:
    """Canonical, TransformerLens or module-path site name -> Site (InnardsError when unknown or absent)."""
    if isinstance(name, Site):
        return name
    if not isinstance(name, str):
        raise InnardsError(f"site names are strings, got {type(name).__name__}")
    lay = layout(model)
    text = name.strip()
    if text in MODEL_KINDS or text in _TL_MODEL_KIND:
        return _got(model, name, _model_site(model, lay, _TL_MODEL_KIND.get(text, text)))
    m = _CANON.match(text)
    if m:
        return _got(model, name, _block_site(model, lay, _check_layer(model, lay, int(m.group(1)), name), m.group(2)))
    m = _TL.match(text)
    if m:
        return _got(model, name, _block_site(model, lay, _check_layer(model, lay, int(m.group(1)), name), _TL_KIND[m.group(2)]))
    site = _from_module_path(model, lay, text)
    if site is not None:
        return site
    raise InnardsError(f"unknown site '{name}' for this {_arch(model)} model; {accepted_names(model)}")


def expand_sites(model: PreTrainedModel, names: str | Iterable[str]) -> list[Site]:
    """Resolve names, expanding fnmatch patterns (``blocks.*.resid_post``) over canonical and TL names."""
    names = [names] if isinstance(names, str) else list(names)
    out: list[Site] = []
    for name in names:
        if isinstance(name, str) and any(c in name for c in "*?["):
            hits = [s for s in list_sites(model) if fnmatch.fnmatchcase(s.name, name) or fnmatch.fnmatchcase(s.tl_name, name)]
            if not hits:
                raise InnardsError(f"site pattern '{name}' matches nothing; {accepted_names(model)}")
            out.extend(hits)
        else:
            out.append(resolve_site(model, name))
    return out


def site_metadata(model: PreTrainedModel, site: str | Site) -> dict:
    """What an artifact records about a site: canonical, TL and HF names, and the index convention."""
    s = resolve_site(model, site)
    lay = layout(model)
    hs = {"resid_pre": s.layer, "resid_post": s.layer + 1}.get(s.kind)
    return {
        "site": s.name, "layer": s.layer, "kind": s.kind, "width": s.width,
        "tl_name": s.tl_name, "hf_module": s.module_path, "hook": s.hook,
        "hidden_states_index": hs, "arch": lay.arch, "family": lay.family,
        "residual": lay.residual, "matched_by": "model_type", "index_convention": INDEX_CONVENTION,
    }
