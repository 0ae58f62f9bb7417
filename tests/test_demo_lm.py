"""The demo-LM recipe: whole-book hold-out, training, exact resume (also after kill -9), HF loading, the shipped model."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from innards.config import from_dict, to_dict
from innards.errors import InnardsError
from innards.models.load import load_model
from innards.recipes import demo_lm
from innards.recipes.demo_lm import (DemoDataConfig, DemoLMConfig, DemoModelConfig, DemoOutputConfig, DemoTrainConfig,
                                     read_units, split_units, train_demo_lm)
from innards.run import read_run
from innards.train.optim import OptimConfig

DEMO_DIR = demo_lm.DEMO_DIR
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


def _cfg(corpus, out, steps=30, stop_at=None, resume=False, lr=1e-2) -> DemoLMConfig:
    return DemoLMConfig(
        out=str(out), resume=resume,
        data=DemoDataConfig(text=[str(corpus / "books.txt")], holdout=0.2, vocab_size=300, tokenizer_chars=100_000),
        model=DemoModelConfig(context=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64),
        optim=OptimConfig(lr=lr, weight_decay=0.1, clip=1.0, warmup=0.1, final_lr_frac=0.1),
        train=DemoTrainConfig(batch_size=8, steps=steps, stop_at=stop_at, eval_every=10, eval_seqs=8, final_eval_seqs=16,
                              ckpt_every=5, autocast="bf16", seed=3),
        output=DemoOutputConfig(samples=2, sample_tokens=8))


def _losses(out) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def _same_weights(a, b) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """One uninterrupted run: the reference for every resumed one."""
    out = tmp_path_factory.mktemp("runs") / "a"
    return train_demo_lm(_cfg(corpus, out)), out


def test_whole_books_held_out_deterministically(corpus):
    units = read_units([str(corpus / "books.txt")])
    assert len(units) == 6 and all(len(u.docs) == 41 for u in units)
    train, val = split_units(units, 0.2)
    assert len(val) == 1 and len(train) == 5
    assert [u.title for u in split_units(read_units([str(corpus / "books.txt")]), 0.2)[1]] == [val[0].title]
    assert not {u.title for u in train} & {u.title for u in val}


def test_train_writes_a_run_and_a_model_transformers_loads(finished, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, out = finished
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = _losses(out)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert any("val_loss" in r for r in rec) and "final_val_loss" in rec[-1]
    run = read_run(out)
    assert run["kind"] == "demo-lm" and run["status"] == "complete" and run["headline"]["steps"] == 30
    assert (out / "config.yaml").is_file()
    # the checkpoint is safetensors + JSON: nothing in it is ever unpickled
    assert {p.suffix for p in (out / "resume").rglob("*") if p.is_file()} <= {".safetensors", ".json", ""}

    model = AutoModelForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    ids = tok("the king went home", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert tok.decode(ids[0], skip_special_tokens=True) == "the king went home"
    hs = model(ids, output_hidden_states=True)
    assert len(hs.hidden_states) == 3 and hs.logits.shape == (1, ids.shape[1], 300)
    card = (a / "MODEL_CARD.md").read_text()
    for word in ("Held-out loss", "tokens seen", "wall time", "Samples", "Held-out books"):
        assert word in card
    summary = json.loads((a / "metrics_summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 8 * 32
    assert load_model(a).config.num_hidden_layers == 2

    dest = tmp_path / "pkg" / "demo"
    demo_lm.install(a, dest)
    demo_lm.install(a, dest)  # replaces an existing install
    assert (dest / "model.safetensors").is_file() and not (tmp_path / "pkg" / ".demo.old").exists()


def test_interrupted_and_resumed_equals_uninterrupted(corpus, finished, tmp_path, capsys):
    a, out_a = finished
    b_cfg = _cfg(corpus, tmp_path / "b", stop_at=12)
    train_demo_lm(b_cfg)
    assert not (tmp_path / "b" / "final").exists() and read_run(tmp_path / "b")["status"] == "running"
    with pytest.raises(InnardsError, match="unfinished demo-lm run; use --resume"):
        train_demo_lm(dataclasses.replace(b_cfg, train=dataclasses.replace(b_cfg.train, stop_at=None)))
    with pytest.raises(InnardsError, match="optim.lr"):
        train_demo_lm(_cfg(corpus, tmp_path / "b", resume=True, lr=5e-3))
    # a crafted pickle where innards 0.1 kept its checkpoint is never opened
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "b" / "checkpoint.pt").write_bytes(pickle.dumps(Boom()))
    b = train_demo_lm(_cfg(corpus, tmp_path / "b", resume=True))
    assert not marker.exists()
    assert _same_weights(a, b) and _losses(tmp_path / "b") == _losses(out_a)
    assert train_demo_lm(_cfg(corpus, tmp_path / "b")) == b  # finished: said so, not redone
    assert "already complete" in capsys.readouterr().err


_KILLER = r"""
import json, os, signal, sys
import innards.train.checkpoint as ck
from innards.config import from_dict
from innards.recipes.demo_lm import DemoLMConfig, train_demo_lm

cfg = from_dict(DemoLMConfig, json.loads(sys.argv[1]))
moment, step = sys.argv[2], int(sys.argv[3])
save_tensors, write_json = ck.save_tensors, ck.write_json

def killing_save(path, tensors, *a, **k):
    # the model file of this checkpoint is written, the optimizer's is not
    if moment == "files" and f"step_{step:07d}" in str(path) and path.name == "optimizer.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)
    return save_tensors(path, tensors, *a, **k)

def killing_write(path, obj, *a, **k):
    # the new checkpoint folder is in place, the pointer to it is not
    if moment == "commit" and path.name == "LATEST" and obj.get("step") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return write_json(path, obj, *a, **k)

ck.save_tensors, ck.write_json = killing_save, killing_write
train_demo_lm(cfg)
"""


def test_kill9_inside_checkpoint_writes_then_again_while_resumed(corpus, finished, tmp_path):
    a, out_a = finished
    out = tmp_path / "k"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}

    def killed(cfg: DemoLMConfig, moment: str, step: int) -> None:
        r = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(to_dict(cfg)), moment, str(step)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]

    killed(_cfg(corpus, out), "files", 10)  # inside the step-10 checkpoint: step 5 is the last committed
    killed(_cfg(corpus, out, resume=True), "commit", 20)  # resumed from 5, killed between the two commits of step 20
    state = json.loads((out / "resume" / "LATEST").read_text())
    assert state["step"] == 15
    b = train_demo_lm(_cfg(corpus, out, resume=True))
    assert _same_weights(a, b) and _losses(out) == _losses(out_a)
    assert sorted(p.name for p in (out / "resume").iterdir()) == ["LATEST", "step_0000030"]  # the debris of the kills is gone


def test_bad_input_is_one_line(corpus, tmp_path, capsys):
    from innards.cli.demo_lm import main

    with pytest.raises(InnardsError, match="licence"):
        train_demo_lm(dataclasses.replace(_cfg(corpus, tmp_path / "x"), data=DemoDataConfig(
            text=["/x/simple-stories-sentences.txt.gz"])))
    with pytest.raises(InnardsError, match="budget"):
        train_demo_lm(dataclasses.replace(_cfg(corpus, tmp_path / "x"), train=DemoTrainConfig()))
    bad = [(["--data", str(tmp_path / "missing.txt"), "--steps", "1"], "not found"),
           (["--data", str(corpus), "--resume", "--steps", "1"], "nothing to resume"),
           (["--context", "0", "--steps", "1"], "--model.context must be at least 2, got 0"),
           (["--batch-size", "0", "--steps", "1"], "--train.batch-size must be at least 1, got 0"),
           (["--steps", "-1"], "--train.steps must be at least 1, got -1"),
           (["--train.steps", "5", "--model.n-heads", "3"], "multiple of --model.n-heads"),
           (["--holdout", "1.5", "--steps", "1"], "--data.holdout must be in (0.0, 1.0)")]
    for argv, message in bad:
        assert main(["--out", str(tmp_path / "y"), *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and err[0].startswith("innards: error:"), (argv, err)
    # nothing was written for any of them (the folder lock of the --resume attempt aside)
    assert not (tmp_path / "y").exists() or [p.name for p in (tmp_path / "y").iterdir()] == [".innards.lock"]


def test_old_flat_flags_still_work(corpus, tmp_path):
    from innards.cli.demo_lm import main
    from innards.config import parse

    cfg = parse(DemoLMConfig, ["--data", "a.txt", "b.txt", "--context", "64", "--lr", "0.01", "--steps", "7",
                               "--min-lr-ratio", "0.2", "--save-dtype", "bf16", "--compile"],
                prog="x", aliases=demo_lm.ALIASES)
    assert cfg.data.text == ["a.txt", "b.txt"] and cfg.model.context == 64 and cfg.optim.lr == 0.01
    assert cfg.train.steps == 7 and cfg.optim.final_lr_frac == 0.2 and cfg.output.save_dtype == "bf16" and cfg.train.compile
    assert from_dict(DemoLMConfig, to_dict(cfg)) == cfg
    assert main(["--help"]) == 0


def test_manifest_titles_match_books(shared_data, tmp_path):
    folder = shared_data / "corpus" / "children-pd"
    titles = demo_lm._manifest_titles(folder)
    last = sorted(titles)[-1]
    units = read_units([str(folder / last)])  # a single file has no manifest: titles come from the text
    assert len(units) == len(titles[last])
    small = tmp_path / "children-pd"  # the same shard in a folder with its manifest: the titles come from it
    small.mkdir()
    for name in (last, "MANIFEST.tsv"):
        (small / name).symlink_to(folder / name)
    assert [u.title for u in read_units([str(small)])] == titles[last]


def test_shipped_demo_model_loads_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (DEMO_DIR / "model.safetensors").is_file():
        pytest.fail(f"the demo model is not installed in {DEMO_DIR} (innards demo-lm train --output.install)")
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
    assert load_model("demo").innards_source["path"] == str(DEMO_DIR)
