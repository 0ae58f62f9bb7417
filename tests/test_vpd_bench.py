"""innards bench vpd runs and reports steps per second (the timing itself is a command, not a test)."""

from __future__ import annotations

import json


def test_bench_vpd_reports_json(tmp_path, capsys):
    from innards.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "vpd", "--steps", "2", "--target-steps", "200", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for obj in ("spd", "vpd"):
        assert res[obj]["steps"] == 2 and res[obj]["steps_per_s"] > 0 and res[obj]["batch_size"] == 4096
        assert res[obj]["C"] == 20 and "mmcs" in res[obj]
    assert res["reference_spd"]["steps_per_s"] == 22.6
    assert '"steps_per_s"' in capsys.readouterr().out
