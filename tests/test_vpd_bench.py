"""innards bench vpd reports only what it measured in the same run (the timing itself is a command, not a test)."""

from __future__ import annotations

import json
import os

import pytest


def test_bench_vpd_innards_alone_reports_rates_and_phases(tmp_path, capsys):
    from innards.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "vpd", "--steps", "3", "--chunk", "2", "--untimed", "1", "--cases", "tms-5-2-spd", "tms-5-2",
                 "--target-steps", "200", "--reference", str(tmp_path / "no-such-checkout"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["reference"]["used"] is False and "not a goodfire-ai/spd checkout" in res["reference"]["skipped_because"]
    for name, obj in (("tms-5-2-spd", "spd"), ("tms-5-2", "vpd")):
        case = res["cases"][name]
        assert case["objective"] == obj and case["timed_steps"] == 3 and case["batch_size"] == 4096 and case["C"] == 20
        inn = case["innards"]
        assert inn["steps_per_s"] > 0 and inn["cpu_steps_per_s"] > 0
        assert {"target", "ci", "minimality", "stochastic", "backward", "optimizer"} <= set(inn["phases"])
        assert all(p["wall_ms"] >= 0 and p["cpu_ms"] >= 0 for p in inn["phases"].values())
        assert "mmcs" in inn["recovery"]
        # nothing is divided by a number this run did not measure
        assert "speedup" not in case and "reference" not in case
    assert "adversary" in res["cases"]["tms-5-2"]["innards"]["phases"]
    assert "layerwise" in res["cases"]["tms-5-2-spd"]["innards"]["phases"]
    assert '"cases"' in capsys.readouterr().out


def test_bench_vpd_with_the_reference_when_it_imports_here(tmp_path):
    from innards.bench.vpd import BenchVPDConfig, bench_vpd, reference_available

    path = os.environ.get("INNARDS_SPD_REFERENCE", "/work/ref/spd")
    why = reference_available(path)
    if why is not None:
        pytest.skip(why)
    res = bench_vpd(BenchVPDConfig(steps=2, chunk=1, untimed=1, cases=["tms-5-2-spd"], target_steps=200, reference=path))
    case = res["cases"]["tms-5-2-spd"]
    assert case["speedup"] == pytest.approx(case["reference"]["seconds"] / case["innards"]["seconds"], rel=1e-2)
    assert {"ci", "backward", "optimizer"} <= set(case["reference"]["phases"])


def test_peak_rss_of_directly_launched_ranks(tmp_path):
    from innards.vpd.shard import launch_ranks

    args = ["vpd", "train", "--config", "tms-5-2-spd", "--out", str(tmp_path / "r"), "--no-progress", "target.steps=100",
            "target.retries=0", "steps=2", "warmup_steps=1", "batch_size=64", "eval_batches=1", "eval_batch_size=64",
            "adversary.eval_steps=1"]
    peaks = launch_ranks(1, args)
    assert len(peaks) == 1 and peaks[0]["rss_mb"] > 50 and peaks[0]["cuda_mb"] == 0


def test_memory_benchmark_on_the_demo_lm():
    """1 vs 2 processes (replicated, FSDP2, FSDP2 + checkpointing): peak RSS per process and the run's size."""
    from innards.bench.vpd import BenchVPDConfig, bench_memory

    res = bench_memory(BenchVPDConfig(memory=True, memory_steps=1, memory_models=["demo"]))["demo"]
    assert res["subcomponents"] > 0 and res["uv_params"] > 0 and res["target_params"] > 0
    assert all(p > 50 for run in res["runs"].values() for p in run["peak_rss_mb_per_process"])
    assert {len(run["peak_rss_mb_per_process"]) for run in res["runs"].values()} == {1, 2}
