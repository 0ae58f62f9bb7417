"""Every architecture the site rules cover, checked against the model's own computation (tiny random models).

For each variant in ``tiny_models.VARIANTS``: the index convention against ``output_hidden_states``, the
residual rule of its block, the norms' inputs, q/k/v against the projections (and, where positions are
not rotary, the pattern recomputed from q and k), z = pattern @ v, the pattern against an eager model's
``output_attentions``, the MLP's activation between mlp_pre and mlp_hidden, the widths, the embeddings,
and edits. ``python tests/test_architectures.py`` prints the table kept in docs/architectures.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import VARIANTS, VOCAB, tiny_model  # noqa: E402

from innards.errors import InnardsError  # noqa: E402
from innards.models.hooks import capture, edit  # noqa: E402
from innards.models.sites import ARCHS, BLOCK_KINDS, Site, layout, list_sites, n_layers, resolve_site  # noqa: E402

B, L_SEQ = 2, 7
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
_CACHE: dict[tuple[str, str | None], T.PreTrainedModel] = {}


def _model(variant: str, attn: str | None = None) -> T.PreTrainedModel:
    if (variant, attn) not in _CACHE:
        _CACHE[variant, attn] = tiny_model(variant, attn=attn)
    return _CACHE[variant, attn]


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, L_SEQ), generator=torch.Generator().manual_seed(0))


def _capture(model: nn.Module, kinds: tuple[str, ...] | None = None, **kw) -> tuple[list[Site], dict, object]:
    sites = [s for s in list_sites(model) if (kinds is None and s.kind != "pattern") or (kinds and s.kind in kinds)]
    with capture(model, [s.name for s in sites]) as c:
        out = model(input_ids=_ids(), **kw)
    return sites, c, out


def _mod(model: nn.Module, site: str) -> nn.Module:
    return model.get_submodule(resolve_site(model, site).module_path)


def _has(model: nn.Module, site: str) -> bool:
    try:
        resolve_site(model, site)
        return True
    except InnardsError:
        return False


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_index_convention_and_residual_rule(variant):
    model = _model(variant)
    sites, c, out = _capture(model, output_hidden_states=True)
    hs, n, residual = out.hidden_states, n_layers(model), layout(model).residual
    assert len(hs) == n + 1 == 3
    d = model.config.hidden_size
    for s in sites:
        shape = (B, L_SEQ, s.heads, s.width) if s.heads else (B, L_SEQ, s.width)
        got = c[s.name].shape
        if s.kind == "pos_embed":  # shared by the batch where positions are: (1, T, d)
            got = (B, *got[1:])
        assert got == shape, s.name
        if s.kind in ("resid_pre", "resid_post", "attn_out", "mlp_out", "resid_mid", "ln1_out", "ln2_out", "ln_final_out"):
            assert s.width == d, s.name
    for layer in range(n):
        b = lambda k: c[f"blocks.{layer}.{k}"]  # noqa: E731
        assert torch.equal(b("resid_pre"), hs[layer])
        if layer + 1 < n:
            assert torch.equal(b("resid_post"), hs[layer + 1]) and torch.equal(b("resid_post"), c[f"blocks.{layer + 1}.resid_pre"])
        if _has(model, f"blocks.{layer}.ln1_out") and residual != "post_ln":
            assert torch.equal(b("ln1_out"), _mod(model, f"blocks.{layer}.ln1_out")(b("resid_pre")))
        if residual in ("pre_ln", "sandwich"):
            assert torch.equal(b("resid_mid"), b("resid_pre") + b("attn_out"))
            _close(b("resid_mid") + b("mlp_out"), b("resid_post"))
            if _has(model, f"blocks.{layer}.ln2_out"):
                assert torch.equal(b("ln2_out"), _mod(model, f"blocks.{layer}.ln2_out")(b("resid_mid")))
        elif residual == "parallel":
            with pytest.raises(InnardsError, match="parallel"):
                resolve_site(model, f"blocks.{layer}.resid_mid")
            if _has(model, f"blocks.{layer}.ln2_out"):  # NeoX, Falcon 40B: the MLP has its own norm of resid_pre
                assert torch.equal(b("ln2_out"), _mod(model, f"blocks.{layer}.ln2_out")(b("resid_pre")))
        else:  # post-LN: each residual add is normalised
            assert torch.equal(b("resid_mid"), b("resid_pre") + b("attn_out"))
            _close(b("ln1_out"), _mod(model, f"blocks.{layer}.ln1_out")(b("resid_mid")))
            _close(b("resid_post"), _mod(model, f"blocks.{layer}.ln2_out")(b("ln1_out") + b("mlp_out")))
            assert torch.equal(b("ln2_out"), b("resid_post"))
        if residual != "post_ln":
            _close(b("resid_pre") + b("attn_out") + b("mlp_out"), b("resid_post"))
    last = c[f"blocks.{n - 1}.resid_post"]
    after = last
    if "ln_final_out" in c:  # the documented exception: HF's last hidden state is after the final norm
        assert torch.equal(c["ln_final_out"], _mod(model, "ln_final_out")(last))
        after = c["ln_final_out"]
        assert not torch.allclose(last, hs[n])
    project_out = getattr(getattr(model.base_model, "decoder", None), "project_out", None)  # OPT-350m
    if project_out is not None:
        after = project_out(after)
    assert torch.equal(after, hs[n])


def _expected_qkv(model: nn.Module, layer: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """q, k, v per head from the projection modules, split the way each HF implementation splits them."""
    fam = layout(model).family
    block = model.get_submodule(layout(model).layers_path)[layer]
    h = model.config.num_attention_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, L_SEQ, -1, model.config.hidden_size // h)

    if fam == "gpt2":
        q, k, v = block.attn.c_attn(x).split(block.attn.split_size, dim=2)
        return {"q": heads(q), "k": heads(k), "v": heads(v)}
    if fam == "gpt_neox":
        q, k, v = block.attention.query_key_value(x).view(B, L_SEQ, h, -1).chunk(3, dim=-1)
        return {"q": q, "k": k, "v": v}
    if fam == "falcon":
        attn = block.self_attention
        q, k, v = attn._split_heads(attn.query_key_value(x))
        if model.config.new_decoder_architecture:  # HF broadcasts each kv head over its group of queries
            g = h // model.config.num_kv_heads
            k, v = k[:, :, ::g], v[:, :, ::g]
        return {"q": q, "k": k, "v": v}
    if fam == "modernbert":
        q, k, v = block.attn.Wqkv(x).view(B, L_SEQ, 3, h, -1).unbind(2)
        return {"q": q, "k": k, "v": v}
    if fam in ("bert", "distilbert", "mpnet", "deberta_v2"):
        a = {"bert": lambda: block.attention.self, "distilbert": lambda: block.attention, "mpnet": lambda: block.attention.attn,
             "deberta_v2": lambda: block.attention.self}[fam]()
        names = {"bert": ("query", "key", "value"), "distilbert": ("q_lin", "k_lin", "v_lin"), "mpnet": ("q", "k", "v"),
                 "deberta_v2": ("query_proj", "key_proj", "value_proj")}[fam]
        return {kind: heads(getattr(a, name)(x)) for kind, name in zip("qkv", names)}
    attn = {"gpt_neo": lambda: block.attn.attention, "gptj": lambda: block.attn, "opt": lambda: block.self_attn}.get(
        fam, lambda: block.self_attn)()
    if hasattr(attn, "qkv_proj"):  # Phi-3
        dh = attn.head_dim
        qkv = attn.qkv_proj(x)
        kv = model.config.num_key_value_heads * dh
        return {"q": heads(qkv[..., :h * dh]), "k": heads(qkv[..., h * dh:h * dh + kv]), "v": heads(qkv[..., h * dh + kv:])}
    dh = attn.q_proj.out_features // h
    return {kind: getattr(attn, f"{kind}_proj")(x).view(B, L_SEQ, -1, dh) for kind in "qkv"}


_NON_ROTARY = {"gpt2": 1.0, "opt": 1.0, "bert": 1.0, "distilbert": 1.0, "gpt_neo": 0.0}  # 1: scores scaled by 1/sqrt(d_head)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_sites(variant):
    model = _model(variant)
    _, c, _ = _capture(model, ("resid_pre", "ln1_out", "q", "k", "v", "z", "pattern"))
    eager = _model(variant, "eager")
    ref = eager(input_ids=_ids(), output_attentions=True).attentions
    h = model.config.num_attention_heads
    fam = layout(model).family
    for layer in range(n_layers(model)):
        b = lambda k: c[f"blocks.{layer}.{k}"]  # noqa: E731
        pattern = b("pattern")
        assert pattern.shape == (B, h, L_SEQ, L_SEQ)
        _close(pattern, ref[layer])
        _close(pattern.sum(-1), torch.ones(B, h, L_SEQ))
        v = b("v").repeat_interleave(h // b("v").shape[2], dim=2)  # grouped-query: each kv head serves a group
        _close(b("z"), torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        x = b("ln1_out") if f"blocks.{layer}.ln1_out" in c and layout(model).residual != "post_ln" else b("resid_pre")
        for kind, want in _expected_qkv(model, layer, x).items():
            assert torch.equal(b(kind), want), kind
        if fam in _NON_ROTARY:  # positions are not rotated into q and k: the pattern follows from them alone
            scores = torch.einsum("bqhd,bkhd->bhqk", b("q"), b("k"))
            if _NON_ROTARY[fam]:
                scores = scores / b("q").shape[-1] ** 0.5
            if fam in ("gpt2", "opt", "gpt_neo"):
                causal = torch.ones(L_SEQ, L_SEQ, dtype=torch.bool).tril()
                if fam == "gpt_neo" and layer == 1:  # its local layer sees window_size tokens
                    causal &= ~torch.ones(L_SEQ, L_SEQ, dtype=torch.bool).tril(-model.config.window_size)
                scores = scores.masked_fill(~causal, float("-inf"))
            _close(scores.softmax(-1), pattern)
    with pytest.raises(InnardsError, match="can be read but not edited"):
        with edit(model, {"blocks.0.pattern": lambda a: a}):
            pass


_ACTS = ("act_fn", "act", "activation_fn", "activation", "intermediate_act_fn")


def _d_mlp(cfg: T.PretrainedConfig) -> int:
    for key in ("intermediate_size", "ffn_dim", "hidden_dim", "ffn_hidden_size", "n_inner"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 4 * cfg.hidden_size


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mlp_sites(variant):
    model = _model(variant)
    _, c, _ = _capture(model)
    lay = layout(model)
    for layer in range(lay.n_layers):
        block = model.get_submodule(lay.layers_path)[layer]
        mlp = block.mlp if hasattr(block, "mlp") else block
        if hasattr(mlp, "experts"):
            for kind in ("mlp_pre", "mlp_hidden"):
                with pytest.raises(InnardsError, match="mixture of experts"):
                    resolve_site(model, f"blocks.{layer}.{kind}")
            continue
        b = lambda k: c[f"blocks.{layer}.{k}"]  # noqa: E731
        assert resolve_site(model, f"blocks.{layer}.mlp_hidden").width == _d_mlp(model.config) == b("mlp_hidden").shape[-1]
        act = next(m for name, m in block.named_modules() if name.split(".")[-1] in _ACTS)
        if lay.residual == "post_ln":
            x = b("ln1_out")
        else:
            x = next(c[f"blocks.{layer}.{k}"] for k in ("ln2_out", "ln1_out", "resid_mid") if f"blocks.{layer}.{k}" in c)
        if hasattr(mlp, "up_proj"):
            up = mlp.up_proj(x)
        elif hasattr(mlp, "gate_up_proj"):
            up = mlp.gate_up_proj(x).chunk(2, dim=-1)[1]
        elif hasattr(mlp, "Wi"):
            up = mlp.Wi(x).chunk(2, dim=-1)[1]
        else:
            up = None
        want = act(b("mlp_pre")) if up is None else act(b("mlp_pre")) * up
        _close(b("mlp_hidden"), want)


def _embedding_sum(model: nn.Module, c: dict) -> torch.Tensor:
    """What the model feeds block 0, rebuilt from the embed / pos_embed sites."""
    fam, cfg, base = layout(model).family, model.config, model.base_model
    e = c["embed"]
    if fam in ("gpt2", "gpt_neo"):
        return e + c["pos_embed"]
    if fam == "opt":
        proj = base.decoder.project_in
        return (proj(e) if proj is not None else e) + c["pos_embed"]
    if fam == "bert":
        emb = base.embeddings
        x = emb.LayerNorm(e + emb.token_type_embeddings(torch.zeros_like(_ids())) + c["pos_embed"])
        return base.embeddings_project(x) if hasattr(base, "embeddings_project") else x
    if fam in ("distilbert", "mpnet"):
        return base.embeddings.LayerNorm(e + c["pos_embed"])
    if fam == "deberta_v2":  # no position embedding (positions are relative, inside attention), no token types
        return base.embeddings.LayerNorm(e)
    if fam == "modernbert":
        return base.embeddings.norm(e)
    if cfg.model_type == "granite":
        return e * cfg.embedding_multiplier
    return e


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_embeddings(variant):
    model = _model(variant)
    _, c, _ = _capture(model, ("embed", "pos_embed", "resid_pre"))
    assert c["embed"].shape[-1] == model.get_input_embeddings().embedding_dim
    _close(_embedding_sum(model, c), c["blocks.0.resid_pre"])
    if "pos_embed" not in c:
        with pytest.raises(InnardsError, match="does not exist"):
            resolve_site(model, "hook_pos_embed")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_edits_are_faithful(variant):
    model = _model(variant)
    ids = _ids()
    run = lambda: model(input_ids=ids)[0]  # noqa: E731
    ref = run()
    sites = [s for s in list_sites(model) if s.edit != "none"]
    exact = [s for s in sites if s.edit == "direct" and s.scale is None]
    with edit(model, {s.name: (lambda a: a.clone()) for s in exact}):
        assert torch.equal(run(), ref)  # rewriting a tensor with itself changes nothing, fused projections included
    with edit(model, {s.name: (lambda a: a.clone()) for s in sites}):
        _close(run(), ref)
    seen = []
    with edit(model, {"blocks.1.resid_post": lambda a, hook: seen.append(hook) or None}):
        run()
    assert [s.name for s in seen] == ["blocks.1.resid_post"] and seen[0].tl_name == "blocks.1.hook_resid_post"
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    names = ["blocks.0.resid_mid", "blocks.0.mlp_out", "blocks.0.resid_post", "blocks.0.ln1_out", "blocks.0.q", "blocks.0.k"]
    names = [n for n in names if _has(model, n)]
    with capture(model, names) as before:
        run()
    if _has(model, "blocks.0.resid_mid"):  # the edit reaches the residual stream, not only the MLP's input
        with edit(model, {"blocks.0.resid_mid": lambda a: a + vec}), capture(model, names) as after:
            run()
        _close(after["blocks.0.resid_mid"], before["blocks.0.resid_mid"] + vec)
        if layout(model).residual == "post_ln":
            _close(after["blocks.0.ln1_out"], _mod(model, "blocks.0.ln1_out")(before["blocks.0.resid_mid"] + vec))
        else:
            _close(after["blocks.0.resid_post"], after["blocks.0.resid_mid"] + after["blocks.0.mlp_out"])
    def sharpen(q: torch.Tensor) -> torch.Tensor:  # random tiny weights attend almost uniformly: make head 0 peaked
        q = q.clone()
        q[:, :, 0] *= 1000
        return q

    with edit(model, {"blocks.0.q": sharpen}), capture(model, names + ["blocks.0.z"]) as after:
        out = run()
    assert torch.equal(after["blocks.0.q"][:, :, 0], before["blocks.0.q"][:, :, 0] * 1000)
    assert torch.equal(after["blocks.0.q"][:, :, 1:], before["blocks.0.q"][:, :, 1:])
    assert torch.equal(after["blocks.0.k"], before["blocks.0.k"]) and not torch.allclose(out, ref)


def test_granite_sub_layers_include_the_residual_multiplier():
    model = _model("granite")
    _, c, _ = _capture(model, ("attn_out", "mlp_out"))
    block = model.model.layers[0]
    raw = {}
    handles = [block.self_attn.register_forward_hook(lambda m, a, out: raw.update(attn=out[0])),
               block.mlp.register_forward_hook(lambda m, a, out: raw.update(mlp=out))]
    try:
        model(input_ids=_ids())
    finally:
        for h in handles:
            h.remove()
    m = model.config.residual_multiplier
    assert m == 0.22 and not torch.allclose(raw["attn"], c["blocks.0.attn_out"])
    assert torch.equal(c["blocks.0.attn_out"], raw["attn"] * m) and torch.equal(c["blocks.0.mlp_out"], raw["mlp"] * m)
    with pytest.raises(InnardsError, match="unknown site"):  # the module's output is not the site: the multiplier sits between
        resolve_site(model, "model.layers.0.mlp")


def test_uncovered_architectures_and_blocks_fail_loudly():
    bloom = T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()
    with pytest.raises(InnardsError, match="unsupported architecture 'bloom'.*supported: .*gpt2"):
        list_sites(bloom)
    cross = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, add_cross_attention=True))
    with pytest.raises(InnardsError, match="cross-attention"):
        resolve_site(cross, "blocks.0.resid_post")
    extra = tiny_model("llama")
    extra.model.layers[1].adapter = nn.Linear(32, 32)  # a sub-layer the rules know nothing about
    with pytest.raises(InnardsError, match="block 1 .* submodules the site rules do not describe \\(adapter\\)"):
        resolve_site(extra, "blocks.0.resid_post")
    missing = tiny_model("gpt2")
    del missing.transformer.h[0].mlp.c_proj
    with pytest.raises(InnardsError, match="lacks mlp.c_proj"):
        list_sites(missing)


# ---------------------------------------------------------------- the coverage table


def coverage_markdown() -> str:
    """The table of tested architectures (docs/architectures.md)."""
    rows = ["| variant | model_type | stands for | family | block | sites it lacks | notes |", "|---|---|---|---|---|---|---|"]
    for name, v in VARIANTS.items():
        model = tiny_model(name)
        lay = layout(model)
        kinds = {s.kind for s in list_sites(model)}
        lacks = [k for k in ("embed", "pos_embed", *BLOCK_KINDS, "ln_final_out") if k not in kinds]
        lacks += [f"{k} (MoE layers)" for k in ("mlp_pre", "mlp_hidden") if k in kinds and any(
            not _has(model, f"blocks.{i}.{k}") for i in range(lay.n_layers))]
        rows.append(f"| {name} | `{v.model_type}` | {v.like} | {lay.family} | {lay.residual} | "
                    f"{', '.join(lacks) or '-'} | {lay.rules.notes} |")
    return "\n".join(rows) + "\n"


def test_docs_table_is_current():
    assert set(ARCHS) == {v.model_type for v in VARIANTS.values()}  # every covered type is tested
    text = DOCS.read_text()
    assert coverage_markdown() in text, "docs/architectures.md is stale: python tests/test_architectures.py"


if __name__ == "__main__":
    print(coverage_markdown(), end="")
