"""Sharded decomposition (FSDP2 over target blocks, components and CI function; gloo on CPU) reproduces the
single-process result when every process draws for the whole batch (--global-draws), also across a resume
from per-rank checkpoint shards and with activation checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from innards.errors import InnardsError
from innards.tensors import load_tensors
from innards.train.checkpoint import current_checkpoint
from innards.vpd.config import load_config
from innards.vpd.train import train

TMS = {"target.steps": 300, "target.batch_size": 256, "target.retries": 0, "batch_size": 64, "steps": 6,
       "warmup_steps": 3, "checkpoint_every": 100, "log_every": 2, "eval_batches": 1, "eval_batch_size": 64,
       "adversary.eval_steps": 2, "tie": [], "skip_inert_rows": False}  # global draws cover every row


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INNARDS_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "innards",
           "vpd", "train", "--no-progress", "--global-draws", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _kv(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in d.items()]


def _close(a: Path, b: Path, atol: float) -> None:
    ta, tb = load_tensors(a / "decomposition.safetensors"), load_tensors(b / "decomposition.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=atol), (k, float((ta[k] - tb[k]).abs().max()))


def test_fsdp_two_processes_match_one_process_and_resume(tmp_path):
    one = train(load_config("tms-5-2-spd", {**TMS, "out": str(tmp_path / "one"), "progress": False}))
    out = tmp_path / "fsdp"
    args = ["--config", "tms-5-2-spd", "--out", str(out), *_kv(TMS), "fsdp=true"]
    p = _torchrun(args + ["--stop-at", "3"])
    assert p.returncode == 0, p.stderr[-3000:]
    ck = current_checkpoint(out / "ckpt")
    assert (ck / "shard0.safetensors").is_file() and (ck / "shard1.safetensors").is_file()
    p = _torchrun(args + ["--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((out / "decomposition.json").read_text())
    assert meta["world"] == 2 and meta["sharded"] and meta["step"] == 6
    _close(one, out, 1e-5)


def test_fsdp_language_model_with_activation_checkpointing(tmp_path):
    from innards.models.load import load_model

    try:
        load_model("demo")
    except InnardsError as e:
        pytest.skip(str(e))
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"the cat {i} sat on the mat and the dog ran after it" for i in range(200)))
    # no frequency term: under several processes its log uses the local sum times the world size (an estimate);
    # fp32: bf16 matmuls round differently for different batch shapes
    over = {"steps": 3, "warmup_steps": 2, "batch_size": 2, "seq_len": 16, "text": str(text), "max_tokens": 3000,
            "log_every": 3, "eval_batches": 1, "eval_batch_size": 2, "adversary.eval_steps": 1, "C": 4,
            "C_per_module": {}, "ci.d_model": 32, "ci.d_ffn": 64, "ci.n_layers": 1, "checkpoint_every": 100,
            "freq_coeff": 0.0, "autocast_bf16": False, "modules": ["model.layers.[01].mlp.*_proj", "model.layers.0.self_attn.*_proj"]}
    one = train(load_config("demo-lm", {**over, "out": str(tmp_path / "one"), "progress": False}))
    out = tmp_path / "fsdp"
    p = _torchrun(["--config", "demo-lm", "--out", str(out), *_kv(over), "fsdp=true", "activation_checkpointing=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    _close(one, out, 1e-4)


def test_fsdp_refuses_tied_matrices(tmp_path):
    cfg = load_config("tms-5-2-spd", {**TMS, "tie": [["linear1", "linear2"]], "fsdp": True, "out": str(tmp_path / "x"),
                                      "progress": False})
    with pytest.raises(InnardsError, match="fsdp does not support tied matrices"):
        train(cfg)
