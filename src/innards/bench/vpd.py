"""innards bench vpd: TMS 5-2 decomposition steps per second on one thread, SPD and full VPD objectives."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from innards.io import write_json

REFERENCE = {"implementation": "goodfire-ai/spd 3f0bb61, tms_5-2 config, one thread (vpd-reference §9)",
             "steps_per_s": 22.6, "mmcs": 1.0, "ml2r": 0.995, "steps": 10000}


@dataclass
class BenchVPDConfig:
    """Benchmark VPD/SPD training throughput on TMS 5-2 (C=20, batch 4096)."""

    __field_help__ = {
        'steps': 'training steps timed per objective (10000 = the reference run)',
        'objectives': 'spd and/or vpd',
        'threads': 'torch threads',
        'out': 'also write the JSON here',
    }


    steps: int = 10000
    objectives: list[str] = field(default_factory=lambda: ["spd", "vpd"])
    threads: int = 1
    seed: int = 0
    target_steps: int = 0  # 0 = the config's target training (10000 steps); smaller only for smoke tests
    out: str | None = None  # JSON file


def bench_one(objective: str, steps: int, seed: int = 0, target_steps: int = 0) -> dict[str, Any]:
    """Time `steps` training steps of the shipped TMS 5-2 config (target training and warm-up not timed)."""
    from innards.vpd.config import load_config
    from innards.vpd.ground_truth import ground_truth
    from innards.vpd.train import Trainer, faithfulness_warmup

    name = "tms-5-2-spd" if objective == "spd" else "tms-5-2"
    with tempfile.TemporaryDirectory() as tmp:
        over: dict[str, Any] = {"steps": steps, "seed": seed, "out": tmp, "progress": False}
        if target_steps:
            over.update({"target.steps": target_steps, "target.retries": 0})
        cfg = load_config(name, over)
        tr = Trainer(cfg, Path(tmp), progress=False)
        faithfulness_warmup(tr.b, cfg.warmup_steps, cfg.warmup_lr, cfg.warmup_wd)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            tr.train_step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        gt = ground_truth(tr.b)
    return {"config": name, "objective": objective, "steps": steps, "batch_size": cfg.batch_size, "C": cfg.C,
            "seconds": round(wall, 3), "steps_per_s": round(steps / wall, 2), "cpu_steps_per_s": round(steps / cpu, 2),
            "speedup_vs_reference": round(steps / wall / REFERENCE["steps_per_s"], 2),
            "mmcs": gt["mmcs"], "ml2r": gt["ml2r"], "min_cosine": gt["min_cosine"],
            "components_that_matter": gt["components_that_matter"], "recovered": gt["passed"]}


def bench_vpd(cfg: BenchVPDConfig) -> dict[str, Any]:
    """Run the benchmark and print JSON."""
    import json

    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    res: dict[str, Any] = {"threads": cfg.threads, "torch": torch.__version__, "reference_spd": REFERENCE}
    for obj in cfg.objectives:
        res[obj] = bench_one(obj, cfg.steps, cfg.seed, cfg.target_steps)
    print(json.dumps(res, indent=2))
    if cfg.out:
        write_json(cfg.out, res)
    return res
