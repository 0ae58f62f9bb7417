"""Check sharded decomposition on a machine with GPUs: ``python -m innards.vpd.gpu_check --out gpu_check.json``.

1. Equivalence: a small demo-LM decomposition on 1 GPU and with FSDP2 (+ activation checkpointing) on 2 GPUs
   (NCCL, every rank drawing for the whole batch) must give the same U, V and CI weights.
2. Memory: peak CUDA memory allocated per rank for a random wider Llama (d 1024, 8 layers): 1 GPU unsharded,
   2 GPUs FSDP2, 2 GPUs FSDP2 + activation checkpointing.

``--cpu`` runs the same on CPU processes with gloo (what the CPU test suite covers), as a dry run of the script.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from innards.io import write_json
from innards.tensors import load_tensors
from innards.vpd.shard import launch_ranks, random_llama


def _text(folder: Path) -> Path:
    p = folder / "text.txt"
    p.write_text("\n\n".join(f"the cat {i} sat on the mat and the dog ran after it to the river" for i in range(400)))
    return p


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_tensors(a / "decomposition.safetensors"), load_tensors(b / "decomposition.safetensors")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def check(cpu: bool = False, steps: int = 4) -> dict:
    """Run both checks; returns the JSON-able result."""
    backend, device = ("gloo", "cpu") if cpu else ("nccl", "cuda")
    n_gpu = torch.cuda.device_count()
    if not cpu and n_gpu < 2:
        return {"skipped": f"needs 2 GPUs, found {n_gpu}"}
    res: dict = {"backend": backend, "device": device, "gpus": n_gpu}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        text = _text(t)
        small = ["vpd", "train", "--config", "demo-lm", "--no-progress", "--global-draws", f"text={text}",
                 f"device={device}", f"steps={steps}", "warmup_steps=2", "batch_size=4", "seq_len=32",
                 "eval_batches=1", "eval_batch_size=2", "adversary.eval_steps=1", "checkpoint_every=2",
                 "freq_coeff=0", "autocast_bf16=false", "C=16", "C_per_module={}"]
        launch_ranks(1, small + ["--out", str(t / "one")], backend=backend)
        launch_ranks(2, small + ["--out", str(t / "fsdp"), "fsdp=true"], backend=backend)
        launch_ranks(2, small + ["--out", str(t / "fsdp-ac"), "fsdp=true", "activation_checkpointing=true"],
                     backend=backend)
        res["equivalence"] = {"max_abs_diff_fsdp": _max_diff(t / "one", t / "fsdp"),
                              "max_abs_diff_fsdp_ac": _max_diff(t / "one", t / "fsdp-ac")}
        res["equivalence"]["passed"] = max(res["equivalence"].values()) < 1e-3
        # the CPU dry run uses a smaller model so that it stays quick
        d, layers, C = (256, 2, 64) if cpu else (1024, 8, 512)
        wide = random_llama(t / "wide", hidden=d, layers=layers, mlp=4 * d, heads=8)
        big = ["vpd", "train", "--config", "demo-lm", "--no-progress", f"target.name={wide}", f"text={text}",
               f"device={device}", "steps=3", "warmup_steps=2", "batch_size=8", "seq_len=128", "eval_batches=1",
               "eval_batch_size=2", "adversary.eval_steps=1", "checkpoint_every=0", f"C={C}", "C_per_module={}"]
        mem = {}
        for label, world, extra in [("1 process", 1, []), ("2 processes, FSDP2", 2, ["fsdp=true"]),
                                    ("2 processes, FSDP2 + activation checkpointing", 2,
                                     ["fsdp=true", "activation_checkpointing=true"])]:
            peaks = launch_ranks(world, big + ["--out", str(t / f"mem{len(mem)}")] + extra, backend=backend)
            mem[label] = peaks
        res["memory"] = {"target": f"random Llama d{d} x {layers} layers, MLP {4 * d}, vocab 4096; C {C} per matrix; "
                                   "batch 8 x 128 tokens", "peak_per_rank": mem}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m innards.vpd.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU processes (gloo)")
    ns = ap.parse_args(argv)
    res = check(cpu=ns.cpu)
    print(json.dumps(res, indent=2))
    if ns.out:
        write_json(ns.out, res)
    return 0 if res.get("skipped") or res["equivalence"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
