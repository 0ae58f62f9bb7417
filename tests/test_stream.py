"""Streaming mode: bounded buffer, exactly-once consumption across restarts, error propagation, resume."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from innards.errors import InnardsError
from innards.data.stream import StreamExhausted, StreamSource, shard_bytes_estimate, used_bytes
from innards.glp.train import GLPTrainConfig, train_glp

SITE = "blocks.1.resid_post"
WIDTH = 32


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    from tiny_models import SENTENCES

    rng = random.Random(0)
    docs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    p = tmp_path_factory.mktemp("stream_text") / "text.txt"
    p.write_text("\n\n".join(docs) + "\n")
    return p


def _spec(model: Path, text: Path, root: Path, **kw) -> dict:
    spec = {"model": str(model), "site": SITE, "text": str(text), "context": 64, "harvest_batch": 8, "dtype": "bf16",
            "model_dtype": "fp32", "device": None, "shard_rows": 500, "target_rows": 4000, "stats_rows": 1000,
            "val_rows": 200, "val_fraction": 0.1, "seed": 0, "nonfinite": "refuse", "dir": str(root)}
    spec.setdefault("bound_bytes", int(2.5 * shard_bytes_estimate(spec["shard_rows"], WIDTH, spec["dtype"])))
    spec.update(kw)
    return spec


def _expected_rows(spec: dict) -> list[tuple[int, int]]:
    """(doc, pos) of the stream's first target training rows, from the text alone (no model forward)."""
    from innards.data.harvest import Harvester, HarvestConfig

    h = Harvester(HarvestConfig(model=spec["model"], site=[spec["site"]], text=spec["text"], context=spec["context"],
                                batch_size=spec["harvest_batch"], val_fraction=spec["val_fraction"], seed=spec["seed"]))
    out: list[tuple[int, int]] = []
    for b in h.batches():
        train = ~h.val_mask(b)
        out += list(zip(b.doc[train].tolist(), b.pos[train].tolist()))
        if len(out) >= spec["target_rows"]:
            break
    return out[: spec["target_rows"]]


def test_exactly_once_across_a_crash_within_the_disk_bound(tiny_model_dir, text, tmp_path):
    root = tmp_path / "stream"
    spec = _spec(tiny_model_dir("llama"), text, root)
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], used_bytes(root))
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    src = StreamSource(root, spec, batch_rows=192, producer="thread", timeout_s=60)
    saved = [src.state_dict()]
    src.set_commit_hook(lambda: saved.append(src.state_dict()))
    consumed: list[tuple[int, int]] = []
    for i in range(9):
        x, d, p = src.next_with_index()
        assert x.shape == (192, WIDTH) and x.dtype == torch.float32
        consumed += list(zip(d.tolist(), p.tolist()))
        if i == 6:  # the trainer's resume state after batch 7
            saved.append(src.state_dict())
            src.after_save(saved[-1])
    # crash: what came after the last saved state was never trained; restart from that state
    last = saved[-1]
    consumed = consumed[: last["pos"]]
    src.close()
    src2 = StreamSource(root, spec, batch_rows=192, resume=True, producer="thread", timeout_s=60)
    src2.load_state_dict(last)
    src2.set_commit_hook(lambda: saved.append(src2.state_dict()))
    while True:
        try:
            _, d, p = src2.next_with_index()
        except StreamExhausted:
            break
        consumed += list(zip(d.tolist(), p.tolist()))
    src2.after_save(src2.state_dict())
    src2.close()
    done.set()
    want = _expected_rows(spec)
    assert len(consumed) == len(want) == spec["target_rows"]
    assert len(set(consumed)) == len(consumed)
    assert sorted(consumed) == sorted(want)
    import json

    ledger = json.loads((root / "ledger.json").read_text())
    assert 0 < ledger["max_bytes"] <= spec["bound_bytes"] and peak[0] <= spec["bound_bytes"]
    assert not list((root / "shards").glob("r000-*"))  # all consumed and saved: buffer emptied
    assert (root / "val.safetensors").is_file() and (root / "stats.safetensors").is_file()


def _cfg(model: Path, text: Path, out: Path, **kw) -> GLPTrainConfig:
    from innards.data.harvest import HarvestConfig
    from innards.glp.train import GLPOptimConfig

    harvest = HarvestConfig(model=str(model), site=[SITE], text=str(text), context=64, batch_size=8, shard_tokens=700,
                            val_fraction=0.1)
    base = dict(stream=True, harvest=harvest, out=str(out), depth=1, steps=10, batch_size=256,
                optim=GLPOptimConfig(lr=1e-3), buffer_gb=2.2 * shard_bytes_estimate(700, WIDTH, "bf16") / 1e9,
                stats_rows=1000, val_rows=200, checkpoints=3, save_every=4, log_every=2, progress=False,
                stream_producer="thread")
    base.update(kw)
    return GLPTrainConfig(**base)


def test_stream_training_resumes_exactly(tiny_model_dir, text, tmp_path):
    from safetensors.torch import load_file

    from innards.glp.model import GLP

    model = tiny_model_dir("llama")
    a = train_glp(_cfg(model, text, tmp_path / "a"))
    train_glp(_cfg(model, text, tmp_path / "b", stop_after=5))
    b = train_glp(_cfg(model, text, tmp_path / "b", resume=True))
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    glp = GLP.from_pretrained(a)
    assert glp.meta["training"]["activations"] == 10 * 256 and glp.meta["sites"] == [SITE]
    assert "first 1000" in glp.meta["stats"]["source"]


def test_bad_input_reaches_the_trainer(tiny_model_dir, text, tmp_path):
    model = tiny_model_dir("llama")
    with pytest.raises(InnardsError, match="too small"):
        train_glp(_cfg(model, text, tmp_path / "small", buffer_gb=1e-6))
    with pytest.raises(InnardsError, match="stream producer: text source not found"):
        train_glp(_cfg(model, tmp_path / "missing.txt", tmp_path / "missing"))
    with pytest.raises(InnardsError, match="--stream needs"):
        train_glp(GLPTrainConfig(stream=True, out=str(tmp_path / "x"), steps=3))


def test_producer_process_end_to_end_and_silent_death(tiny_model_dir, text, tmp_path):
    from innards.glp.model import GLP

    model = tiny_model_dir("llama")
    out = train_glp(_cfg(model, text, tmp_path / "p", stream_producer="process", steps=6))
    assert GLP.from_pretrained(out).meta["training"]["step"] == 6
    assert (out / "stream" / "end.json").is_file() and (out / "stream" / "producer.log").is_file()
    assert not list((out / "stream" / "shards").glob("r000-*"))
    # a producer killed without a word is reported, not waited for forever
    root = tmp_path / "killed"
    src = StreamSource(root, _spec(model, text, root), batch_rows=256, producer="process", timeout_s=60, wait=False)
    os.kill(src._proc.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="exited with status -9"):
        src.wait_ready()
