"""The demo LM: tokenizer, whole-book hold-out, training, exact resume, HF loading, the shipped model."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from innards.errors import InnardsError
from innards.models import demo_lm
from innards.models.demo_lm import DEMO_DIR, DemoLMConfig, read_units, split_units, train_demo_lm

WORDS = ("the a little girl boy king queen cat dog went to forest castle and saw big small red happy sad "
         "said ran walked home tree river bird sang day night morning wolf fox bread milk").split()


def _text(rng: random.Random, n_par: int) -> str:
    pars = []
    for _ in range(n_par):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "." for _ in range(rng.randint(1, 4))]
        pars.append(" ".join(sents))
    return "\n\n".join(pars)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    books = [f"BOOK {i}\n\n" + _text(rng, 40) for i in range(6)]
    (d / "books.txt").write_text("\n\n\f\n\n".join(books))
    return d


def _cfg(corpus, out, **kw) -> DemoLMConfig:
    base = dict(out=str(out), data=[str(corpus / "books.txt")], holdout=0.2, vocab_size=300, tokenizer_chars=100_000,
                context=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, batch_size=8, lr=1e-2,
                warmup_steps=3, steps=30, eval_every=10, eval_seqs=8, final_eval_seqs=16, ckpt_every=5,
                samples=2, sample_tokens=8, autocast="bf16", seed=3)
    base.update(kw)
    return DemoLMConfig(**base)


def test_whole_books_held_out_deterministically(corpus):
    units = read_units([str(corpus / "books.txt")])
    assert len(units) == 6 and all(len(u.docs) == 41 for u in units)
    train, val = split_units(units, 0.2)
    assert len(val) == 1 and len(train) == 5
    assert [u.title for u in split_units(read_units([str(corpus / "books.txt")]), 0.2)[1]] == [val[0].title]
    assert not {u.title for u in train} & {u.title for u in val}


def test_train_resume_exact_and_loads_with_transformers(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = train_demo_lm(_cfg(corpus, tmp_path / "a"))
    rec = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rec if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert any("val_loss" in r for r in rec) and "final_val_loss" in rec[-1]
    assert (tmp_path / "a" / "config.yaml").is_file()

    # an interrupted run, resumed, ends with exactly the same weights and the same log
    b_cfg = _cfg(corpus, tmp_path / "b", stop_at=12)
    train_demo_lm(b_cfg)
    assert not (tmp_path / "b" / "final").exists()
    with pytest.raises(InnardsError, match="resume"):
        train_demo_lm(dataclasses.replace(b_cfg, stop_at=None))
    with pytest.raises(InnardsError, match="lr"):
        train_demo_lm(dataclasses.replace(b_cfg, stop_at=None, resume=True, lr=5e-3))
    b = train_demo_lm(dataclasses.replace(b_cfg, stop_at=None, resume=True))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rec_b = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rec_b if "loss" in r] == losses

    model = AutoModelForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    ids = tok("the king went home", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert tok.decode(ids[0], skip_special_tokens=True) == "the king went home"
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.logits.shape == (1, ids.shape[1], 300)
    g = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert g.shape[1] <= ids.shape[1] + 5
    card = (a / "MODEL_CARD.md").read_text()
    for word in ("Held-out loss", "tokens seen", "wall time", "Samples", "Held-out books"):
        assert word in card
    summary = json.loads((a / "metrics_summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 8 * 32

    dest = tmp_path / "pkg" / "demo"
    demo_lm.install(a, dest)
    demo_lm.install(b, dest)  # replaces an existing install
    assert (dest / "model.safetensors").is_file() and not (tmp_path / "pkg" / ".demo.old").exists()


def test_bad_input_is_one_line(corpus, tmp_path, capsys):
    from innards.cli.demo_lm import main

    with pytest.raises(InnardsError, match="licence"):
        train_demo_lm(_cfg(corpus, tmp_path / "x", data=["/x/simple-stories-sentences.txt.gz"]))
    with pytest.raises(InnardsError, match="budget"):
        train_demo_lm(_cfg(corpus, tmp_path / "x", steps=None))
    assert main(["--out", str(tmp_path / "y"), "--data", str(tmp_path / "missing.txt"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text not found" in err[0]
    assert main(["--out", str(tmp_path / "y"), "--resume", "--steps", "1"]) == 2


def test_manifest_titles_match_books(shared_data):
    folder = shared_data / "corpus" / "children-pd"
    titles = demo_lm._manifest_titles(folder)
    last = sorted(titles)[-1]
    units = read_units([str(folder / last)])  # a single file has no manifest: titles come from the text
    assert len(units) == len(titles[last])


def test_shipped_demo_model_loads_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.fail(f"the demo model is not installed in {DEMO_DIR} (innards demo-lm train --install)")
    size = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert size <= 10 * 2**20
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR)
    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers >= 4
    assert 1_500_000 <= sum(p.numel() for p in model.parameters()) <= 2_500_000
    assert model.config.max_position_embeddings == 256 and 3500 <= len(tok) <= 4096
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    assert (DEMO_DIR / "MODEL_CARD.md").is_file()
