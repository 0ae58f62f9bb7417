"""`innards demo` end to end at a tiny size: every stage writes its folder, the summary is readable, a rerun skips."""

from __future__ import annotations

import json
import re

from innards.cli import main

TINY = ["--tokens", "3000", "--glp-steps", "20", "--glp-batch-size", "128", "--sae-steps", "20", "--eval-n", "200",
        "--eval-steps", "4", "--no-steer", "--no-probe"]


def test_demo_runs_then_skips_every_finished_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    first = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["harvest", "glp train", "sae baseline", "glp eval", "report"]
    assert not any(s["skipped"] for s in summary["stages"].values())
    assert (out / "report" / "index.html").is_file()
    # a readable closing summary: one line per stage, no 16-digit floats, no JSON dump
    tail = first[first.rindex("innards demo:"):]
    assert "FD" in tail and "C2ST" in tail and "innards view" in tail
    assert not re.search(r"\d\.\d{7,}", tail) and "{" not in tail

    assert main(["demo", "--out", str(out), *TINY]) == 0
    again = capsys.readouterr().out
    rerun = json.loads((out / "summary.json").read_text())
    assert all(rerun["stages"][s]["skipped"] for s in ("harvest", "glp train", "sae baseline", "glp eval"))
    assert again.count("(complete: skipped)") == 4
    # what a skipped stage reports is read back from its folder: the same lines as the first time
    assert [s["result"] for s in rerun["stages"].values()] == [s["result"] for s in summary["stages"].values()]


def test_demo_bad_input_is_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens" in err[0]
