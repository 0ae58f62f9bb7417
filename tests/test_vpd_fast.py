"""What makes training faster must not change what is trained: tying, reused x·V, inert rows, bf16 autocast,
activation checkpointing; and the reference's extra loss terms (subset stochastic, fresh PGD in training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from innards.vpd.config import load_config
from innards.vpd.losses import minimality, p_at
from innards.vpd.train import Trainer, train

TINY = {"target.steps": 300, "target.batch_size": 256, "target.retries": 0, "batch_size": 64, "steps": 8,
        "warmup_steps": 3, "checkpoint_every": 100, "log_every": 4, "eval_batches": 1, "eval_batch_size": 64,
        "progress": False, "adversary.eval_steps": 2}


def _trainer(name: str, tmp: Path, **over) -> Trainer:
    return Trainer(load_config(name, {**TINY, "out": str(tmp), **over}), tmp, progress=False)


def test_tie_shares_storage_and_keeps_two_optimiser_states(tmp_path):
    tr = _trainer("tms-5-2-spd", tmp_path)
    l1, l2 = tr.b.decomp.comp("linear1"), tr.b.decomp.comp("linear2")
    assert l2.U.data_ptr() == l1.V.data_ptr() and l2.V.data_ptr() == l1.U.data_ptr()
    assert torch.equal(l2.U, l1.V.t()) and torch.equal(l2.V, l1.U.t())
    before = l1.V.detach().clone()
    tr.warmup()
    tr.train_step()
    assert torch.equal(l2.U, l1.V.t()) and not torch.equal(before, l1.V)
    # both views are separate parameters with their own AdamW state (as the reference's tied TMS)
    assert sum(1 for p in tr.uv if p in tr.opt.state) == 4
    # a checkpoint round trip keeps them tied
    tr.save_checkpoint()
    tr2 = _trainer("tms-5-2-spd", tmp_path)
    tr2.load_checkpoint()
    a, b = tr2.b.decomp.comp("linear1"), tr2.b.decomp.comp("linear2")
    assert b.U.data_ptr() == a.V.data_ptr() and torch.equal(a.V, l1.V)


def test_reused_inner_acts_give_the_same_outputs():
    from innards.vpd.components import Decomposition
    from innards.vpd.masks import stochastic_masks
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    d = Decomposition(model, ["0", "2", "4"], 7, seed=1)
    x = torch.randn(9, 6)
    clean, inputs = d.clean(x)
    h = d.inner(inputs)
    g = {n: torch.rand(9, d.comp(n).C) for n in d.names}
    for only in [None, "2", "4"]:
        masks = stochastic_masks(g, torch.Generator().manual_seed(3), True, "all")
        if only:
            masks = {only: masks[only]}
        a = d.masked(x, masks)
        b = d.masked(x, masks, pre=h)
        assert torch.allclose(a, b, atol=1e-6), only


def test_minimality_weights_stand_for_repeated_rows():
    g = {"a": torch.rand(5, 3), "b": torch.rand(5, 4)}
    zero = {"a": torch.rand(1, 3), "b": torch.rand(1, 4)}
    full = {n: torch.cat([g[n], zero[n].expand(7, -1)]) for n in g}
    w = torch.cat([torch.ones(5), torch.tensor([7.0])])
    for p in (2.0, 0.7):
        a = minimality(full, p, 1e-12, 2)
        b = minimality({n: torch.cat([g[n], zero[n]]) for n in g}, p, 1e-12, 2, w)
        assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


@pytest.mark.parametrize("name", ["tms-5-2-spd", "tms-5-2"])
def test_inert_rows_change_nothing_but_the_work(tmp_path, monkeypatch, name):
    """With CI masks in place of random ones, skipping inert rows gives the same loss and gradients."""
    import innards.vpd.train as T
    from innards.vpd.masks import constant_masks

    monkeypatch.setattr(T, "stochastic_masks", lambda g, *a, **k: constant_masks(g, "ci"))
    over = {"adversary.n_steps": 1} if name == "tms-5-2" else {}
    res = []
    for skip in (False, True):
        tr = _trainer(name, tmp_path / str(skip), skip_inert_rows=skip, batch_size=256, **over)
        gen_state = tr.gen.get_state()
        tr.opt.step = lambda: None  # keep the parameters; compare the gradients of one step
        x = tr.data.batch(256, torch.Generator().manual_seed(5))
        tr._batch = lambda x=x: x
        tr.gen.set_state(gen_state)
        logs = tr.train_step()
        grads = [p.grad.clone() for p in tr.uv + tr.ci_params]
        res.append((logs, grads, tr._active_rows(tr.b.decomp.clean(x)[1])))
    (la, ga, _), (lb, gb, rows) = res
    assert rows is not None and 0 < len(rows) < 256  # the batch has inert rows
    for k in la:
        assert torch.allclose(la[k], lb[k], rtol=1e-5, atol=1e-9), k
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)


def test_bf16_autocast_keeps_delta_in_fp32(tmp_path):
    tr = _trainer("resid-mlp-1-spd", tmp_path, **{"target.d_embed": 64, "target.n_features": 20, "C": 20,
                                                   "target.d_mlp": 10})
    assert tr.cfg.autocast_bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = tr.b.decomp.components[0]
        assert c("delta_sq", W=c.W()).dtype == torch.float32
        assert c("inner", torch.randn(3, c.d_in)).dtype == torch.bfloat16
    tr.warmup()
    logs = [tr.train_step() for _ in range(3)]
    assert all(torch.isfinite(v).all() for lg in logs for v in lg.values())


def test_resid_mlp_2_reference_terms_run(tmp_path):
    """Subset stochastic + fresh-PGD subset reconstruction (the reference's resid_mlp2 config)."""
    run = train(load_config("resid-mlp-2-spd", {**TINY, "out": str(tmp_path / "r"), "target.d_embed": 64,
                                                "target.n_features": 20, "target.d_mlp": 6, "C": 24, "steps": 6}))
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_logs = [m for m in logs if "pgd" in m]
    assert train_logs and all(m["pgd"] >= 0 for m in train_logs) and "layerwise" not in train_logs[0]


def test_p_is_held_after_its_annealing_fraction():
    assert p_at(0, 100, 2.0, 0.4, 0.6) == 2.0
    assert p_at(60, 100, 2.0, 0.4, 0.6) == pytest.approx(0.4)
    assert p_at(90, 100, 2.0, 0.4, 0.6) == pytest.approx(0.4)
    assert p_at(30, 100, 2.0, 0.4, 0.6) == pytest.approx(1.2)


def test_activation_checkpointing_gives_identical_weights(tmp_path):
    from innards.tensors import load_tensors
    from innards.models.load import load_model
    from innards.errors import InnardsError

    try:
        load_model("demo")
    except InnardsError as e:
        pytest.skip(str(e))
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"the cat {i} sat on the mat and the dog ran after it" for i in range(200)))
    over = {"steps": 3, "warmup_steps": 2, "batch_size": 2, "seq_len": 16, "text": str(text), "max_tokens": 3000,
            "log_every": 3, "eval_batches": 1, "eval_batch_size": 2, "adversary.eval_steps": 1, "C": 4,
            "C_per_module": {}, "ci.d_model": 32, "ci.d_ffn": 64, "ci.n_layers": 1, "progress": False,
            "checkpoint_every": 100, "modules": ["model.layers.[01].mlp.*_proj", "model.layers.0.self_attn.*_proj"]}
    a = train(load_config("demo-lm", {**over, "out": str(tmp_path / "a")}))
    b = train(load_config("demo-lm", {**over, "out": str(tmp_path / "b"), "activation_checkpointing": True}))
    ta, tb = load_tensors(a / "decomposition.safetensors"), load_tensors(b / "decomposition.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
