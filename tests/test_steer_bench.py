"""`innards bench steer`: side-by-side timing of steered generation with and without GLP projection."""

from __future__ import annotations

import json

from test_steer_helpers import SITE, make_glp

from innards.cli import main as cli


def test_bench_steer_tiny(tiny_model_dir, tmp_path, capsys):
    from innards.models.load import load_model

    d = tiny_model_dir("llama")
    make_glp(load_model(str(d)), out=tmp_path / "glp")
    out = tmp_path / "bench_steer.json"
    assert cli(["bench", "steer", "--model", str(d), "--site", SITE, "--glp", str(tmp_path / "glp"), "--nfe", "2,4",
                "--batch-sizes", "1,3", "--new-tokens", "3", "--rounds", "2", "--no-compile", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["generation"]
    assert {(r["batch"], r["variant"]) for r in rows} == {(b, v) for b in (1, 3)
                                                          for v in ("plain", "raw", "glp-nfe2", "glp-nfe4")}
    for r in rows:
        assert r["tokens_per_s"] > 0 and len(r["seconds"]) == 2
        if r["variant"] == "raw":
            assert r["ratio_vs_raw"] == 1.0
    proj = res["projection_ms"]
    assert {(p["rows"], p["nfe"]) for p in proj} == {(1, 2), (1, 4), (3, 2), (3, 4)}
    assert all(p["glp.project_ms"] > 0 and p["fast_ms"] > 0 for p in proj)
    rec = json.loads((tmp_path / "bench_steer.json.run.json").read_text())
    assert rec["kind"] == "bench" and "ratio_b1_nfe2" in rec["headline"]
    assert json.loads(capsys.readouterr().out)["site"] == SITE
