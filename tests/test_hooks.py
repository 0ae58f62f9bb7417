"""capture / edit / run_with_cache on tiny real HF models: values, composition, cleanup, generate."""

from __future__ import annotations

import pytest
import torch

from innards.errors import InnardsError
from innards.models.hooks import add_vector, capture, edit, replace_with, run_with_cache
from innards.models.load import load_model


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    cache = {}

    def get(arch="llama"):
        if arch not in cache:
            cache[arch] = load_model(tiny_model_dir(arch))
        return cache[arch]

    return get


def _ids(model, texts=("the fox jumps over the bear", "hello")):
    enc = model.tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "bert"])
def test_stop_early_equals_full_forward_and_stops(models, arch):
    model = models(arch)
    ids, mask = _ids(model)
    sites = ["blocks.1.mlp_hidden", "blocks.0.resid_post", "blocks.1.attn_out"]
    with capture(model, sites) as full:
        model(input_ids=ids, attention_mask=mask)
    ran = []
    last = model.get_submodule({"llama": "model.layers.2", "gpt2": "transformer.h.2",
                                "gpt_neox": "gpt_neox.layers.2", "bert": "encoder.layer.2"}[arch])
    probe = last.register_forward_hook(lambda *a: ran.append(1))
    try:
        early = run_with_cache(model, ids, sites, attention_mask=mask)
        assert ran == []  # block 2 never ran
        late = run_with_cache(model, ids, sites, stop_early=False, attention_mask=mask)
        assert ran == [1]
    finally:
        probe.remove()
    for s in sites:
        assert torch.equal(early[s], full[s]) and torch.equal(late[s], full[s])
    assert _hook_count(model) == 0


def test_run_with_cache_accepts_1d_ids_and_patterns(models):
    model = models("gpt2")
    ids, _ = _ids(model, ["the fox"])
    out = run_with_cache(model, ids[0].tolist(), "blocks.*.resid_post")
    assert list(out) == ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]
    assert out["blocks.2.resid_post"].shape == (1, ids.shape[1], 32)
    assert not out["blocks.2.resid_post"].requires_grad


def test_hooks_removed_after_exceptions(models):
    model = models("llama")
    ids, mask = _ids(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["blocks.0.resid_post", "blocks.1.mlp_hidden"]):
            assert _hook_count(model) == 2
            raise RuntimeError("boom")
    assert _hook_count(model) == 0

    def bad(act):
        raise ValueError("inside the forward pass")

    with pytest.raises(ValueError, match="inside the forward"):
        with capture(model, ["blocks.2.resid_post"]), edit(model, {"blocks.1.attn_out": bad}):
            model(input_ids=ids, attention_mask=mask)
    assert _hook_count(model) == 0
    with pytest.raises(InnardsError, match="returned"):
        with edit(model, {"blocks.1.resid_post": lambda a: a[:, :1]}):
            model(input_ids=ids, attention_mask=mask)
    assert _hook_count(model) == 0
    # a bad site name fails before any hook is registered
    with pytest.raises(InnardsError, match="unknown site"):
        with edit(model, {"blocks.0.resid_post": lambda a: a, "blocks.0.nope": lambda a: a}):
            pass
    with pytest.raises(InnardsError):
        with capture(model, ["blocks.0.resid_post", "blocks.9.resid_post"]):
            pass
    assert _hook_count(model) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "bert"])
def test_identity_edit_leaves_outputs_unchanged(models, arch):
    model = models(arch)
    ids, mask = _ids(model)
    ref = model(input_ids=ids, attention_mask=mask)[0]
    kinds = ["resid_pre", "attn_out", "mlp_hidden", "mlp_out", "resid_post"]
    fns = {f"blocks.{i}.{k}": (lambda a: a.clone()) for i in range(3) for k in kinds}
    with edit(model, fns):
        out = model(input_ids=ids, attention_mask=mask)[0]
    assert torch.equal(out, ref)
    with edit(model, {"blocks.1.resid_post": lambda a: None}):  # None keeps the activation
        assert torch.equal(model(input_ids=ids, attention_mask=mask)[0], ref)


def test_add_vector_and_replace_compose_with_capture(models):
    model = models("llama")
    ids, mask = _ids(model)
    vec = torch.randn(32)
    with capture(model, ["blocks.1.resid_post", "blocks.2.resid_pre"]) as before:
        logits = model(input_ids=ids, attention_mask=mask).logits
    # capture outer, edit inner: the capture still sees the edited value (edits run first)
    with capture(model, ["blocks.1.resid_post", "blocks.2.resid_pre"]) as c:
        with edit(model, {"blocks.1.resid_post": add_vector(vec, scale=2.0, positions=[1, 3])}):
            steered = model(input_ids=ids, attention_mask=mask).logits
    delta = c["blocks.1.resid_post"] - before["blocks.1.resid_post"]
    torch.testing.assert_close(delta[:, [1, 3]], (2.0 * vec).expand(2, 2, 32))
    assert torch.all(delta[:, [0, 2, 4]] == 0)
    assert torch.equal(c["blocks.2.resid_pre"], c["blocks.1.resid_post"])
    assert not torch.allclose(steered, logits)
    assert torch.equal(steered[:, 0], logits[:, 0])  # causal: position 0 is untouched
    # edit outer, capture inner
    with edit(model, {"blocks.0.mlp_hidden": replace_with(torch.zeros(48))}):
        with capture(model, "blocks.0.mlp_hidden") as c2:
            model(input_ids=ids, attention_mask=mask)
    assert torch.all(c2["blocks.0.mlp_hidden"] == 0)
    with pytest.raises(InnardsError, match="does not fit"):
        with edit(model, {"blocks.0.resid_post": replace_with(torch.zeros(5))}):
            model(input_ids=ids)
    with pytest.raises(InnardsError, match="width"):
        with edit(model, {"blocks.0.resid_post": add_vector(torch.zeros(5))}):
            model(input_ids=ids)
    assert _hook_count(model) == 0
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)


def test_accumulate_keeps_every_call(models):
    model = models("gpt_neox")
    ids, mask = _ids(model)
    with capture(model, ["blocks.0.resid_post"], accumulate=True) as c:
        model(input_ids=ids[:1])
        model(input_ids=ids, attention_mask=mask)
    assert [t.shape[0] for t in c["blocks.0.resid_post"]] == [1, 2]
    with capture(model, ["blocks.0.resid_post"]) as c:
        model(input_ids=ids[:1])
        model(input_ids=ids, attention_mask=mask)
    assert c["blocks.0.resid_post"].shape[0] == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_kv_cache_sees_new_tokens_only(models, arch):
    model = models(arch)
    ids, _ = _ids(model, ["the fox"])
    t = ids.shape[1]
    seen = []

    def spy(act):
        seen.append(tuple(act.shape))
        return act

    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    ref = model.generate(ids, **gen)
    with edit(model, {"blocks.1.resid_post": spy}), capture(model, ["blocks.1.resid_post"], accumulate=True) as c:
        out = model.generate(ids, **gen)
    assert torch.equal(out, ref)
    assert seen == [(1, t, 32)] + [(1, 1, 32)] * 3
    assert [x.shape[1] for x in c["blocks.1.resid_post"]] == [t, 1, 1, 1]
    with edit(model, {"blocks.1.resid_post": add_vector(torch.randn(32, generator=torch.Generator().manual_seed(0)), scale=50.0)}):
        steered = model.generate(ids, **gen)
    assert not torch.equal(steered, ref)
    assert _hook_count(model) == 0


def test_capture_without_detach_keeps_the_graph(models):
    model = models("gpt2")
    ids, _ = _ids(model, ["the fox"])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with capture(model, ["blocks.1.resid_post"], detach=False) as c:
        model(inputs_embeds=emb)
    c["blocks.1.resid_post"].sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_run_with_cache_takes_a_names_filter_like_transformerlens(models):
    model = models("gpt2")
    ids, _ = _ids(model, ["the fox"])
    out = run_with_cache(model, ids, names_filter=lambda name: name.endswith("hook_resid_post"))
    assert list(out) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    canon = run_with_cache(model, ids, lambda name: name.endswith(".resid_post"))  # canonical names work too
    assert list(canon) == ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]
    assert all(torch.equal(out[f"blocks.{i}.hook_resid_post"], canon[f"blocks.{i}.resid_post"]) for i in range(3))
    listed = run_with_cache(model, ids, names_filter=["blocks.0.attn.hook_q", "hook_embed"])
    assert listed["blocks.0.attn.hook_q"].shape == (1, ids.shape[1], 4, 8) and "hook_embed" in listed
    everything = run_with_cache(model, ids)
    assert len(everything) == 2 + 14 * 3 + 1 and everything["blocks.2.pattern"].shape == (1, 4, ids.shape[1], ids.shape[1])
    assert model.config._attn_implementation == "sdpa"  # the pattern ran attention eagerly only for that call
    with pytest.raises(InnardsError, match="selects no site"):
        run_with_cache(model, ids, names_filter=lambda name: False)
    with pytest.raises(InnardsError, match="not both"):
        run_with_cache(model, ids, "blocks.0.resid_post", names_filter=["blocks.0.resid_post"])


def test_edit_functions_may_take_the_site_as_transformerlens_hooks_do(models):
    model = models("llama")
    ids, mask = _ids(model)
    got = {}

    def tl_style(act, hook):
        got[hook.name] = hook
        return act * 0 if hook.kind == "mlp_out" else None

    def keyword(act, *, hook):
        got["kw"] = hook
        return None

    ref = model(input_ids=ids, attention_mask=mask).logits
    with edit(model, {"blocks.0.hook_mlp_out": tl_style, "blocks.1.resid_post": keyword, "blocks.2.resid_post": lambda a: None}):
        with capture(model, ["blocks.0.mlp_out"]) as c:
            out = model(input_ids=ids, attention_mask=mask).logits
    assert got["blocks.0.mlp_out"].tl_name == "blocks.0.hook_mlp_out" and got["kw"].name == "blocks.1.resid_post"
    with edit(model, {"blocks.1.resid_post": torch.nn.Identity()}):  # a module edits with its forward(act)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    assert torch.all(c["blocks.0.mlp_out"] == 0) and not torch.allclose(out, ref)
    assert _hook_count(model) == 0
