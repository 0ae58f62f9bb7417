"""Steering sweep: strengths parsing, end-to-end outputs on a tiny model, resume, dominance logic."""

from __future__ import annotations

import json

import pytest
from test_steer_helpers import NEG, POS, SITE, make_glp, write_lines

from innards.cli import main as cli
from innards.errors import InnardsError
from innards.steer.sweep import parse_strengths, summarise
from innards.steer.vectors import diff_means, save_vector


def test_parse_strengths():
    assert parse_strengths("0, 0.5,1,1") == [0.0, 0.5, 1.0]
    assert parse_strengths([2, -1]) == [-1.0, 2.0]
    for bad in ("0,abc", "", "1,nan", "1,,x"):
        with pytest.raises(InnardsError):
            parse_strengths(bad)


def test_packaged_story_openings():
    from innards.steer.texts import read_prompts

    prompts = read_prompts("stories")
    assert 45 <= len(prompts) <= 60 and all(len(p.split()) >= 4 for p in prompts)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    from innards.models.load import load_model

    d = tiny_model_dir("llama")
    model = load_model(str(d))
    tmp = tmp_path_factory.mktemp("sweep")
    save_vector(tmp / "v.safetensors", diff_means(model, SITE, POS, NEG))
    make_glp(model, out=tmp / "glp")
    write_lines(tmp / "prompts.txt", ["Once upon a time", "The fox liked", "One day she met a bear", "They became"])
    write_lines(tmp / "pos.txt", POS)
    write_lines(tmp / "neg.txt", NEG)
    return d, tmp


def _args(d, tmp, out, strengths="0,1.5"):
    return ["steer", "sweep", "--model", str(d), "--site", SITE, "--vector", str(tmp / "v.safetensors"),
            "--glp", str(tmp / "glp"), "--strengths", strengths, "--prompts", str(tmp / "prompts.txt"),
            "--concept", "joy", "--concept-pos", str(tmp / "pos.txt"), "--concept-neg", str(tmp / "neg.txt"),
            "--max-new-tokens", "5", "--steps", "4", "--n-bootstrap", "200", "--batch-size", "3", "--out", str(out)]


def test_sweep_end_to_end_and_resume(env, capsys):
    d, tmp = env
    out = tmp / "run"
    assert cli(_args(d, tmp, out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["evaluator_accuracy"] <= 1.0
    for m in ("raw", "glp"):
        rows = res["methods"][m]
        assert [r["strength"] for r in rows] == [0.0, 1.5]
        for r in rows:
            assert {"strength", "concept", "concept_ci", "nll", "nll_ci", "distinct2"} <= set(r)
            assert r["concept_ci"][0] <= r["concept"] <= r["concept_ci"][1]
            assert r["nll_ci"][0] <= r["nll"] <= r["nll_ci"][1] and r["n"] == 4
    comp = res["comparison"]
    assert comp["large_r"] == [1.5] and isinstance(comp["glp_dominates_pointwise_at_r_ge_1"], bool)
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * 2 * 4 and {"concept", "nll", "distinct2", "method", "strength"} <= set(gens[0])
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "config.yaml").is_file()
    assert list((out / "evaluator").glob("joy-*.json"))
    raw0 = [g for g in gens if g["method"] == "raw" and g["strength"] == 0.0]
    assert len(raw0) == 4
    # a re-run reuses the finished cells
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert cli(_args(d, tmp, out)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == cells
    assert "GLP dominates raw" in capsys.readouterr().out


def test_sweep_bad_inputs(env, capsys):
    d, tmp = env
    assert cli(_args(d, tmp, tmp / "bad", strengths="0,one")) == 2
    assert "strength" in capsys.readouterr().err
    args = _args(d, tmp, tmp / "bad")
    i = args.index("--concept-pos")
    assert cli(args[:i] + args[i + 4:]) == 2  # concept 'joy' without files
    assert "no evaluator data" in capsys.readouterr().err
    args = _args(d, tmp, tmp / "bad")
    j = args.index("--glp")
    assert cli(args[:j] + args[j + 2:]) == 2
    assert "--glp" in capsys.readouterr().err
    assert not (tmp / "bad" / "results.json").exists()


def _rec(method, r, i, c, n):
    return {"method": method, "strength": r, "prompt_index": i, "concept": c, "nll": n, "distinct2": 1.0}


def test_dominance_logic():
    recs = []
    for i in range(5):
        recs += [_rec("raw", 0.0, i, 0.5, 2.0), _rec("glp", 0.0, i, 0.5, 2.0),
                 _rec("raw", 1.0, i, 0.7, 4.0), _rec("glp", 1.0, i, 0.8, 3.0),
                 _rec("raw", 2.0, i, 0.9, 6.0), _rec("glp", 2.0, i, 0.85, 3.5)]
    res = summarise(recs, ["raw", "glp"], [0.0, 1.0, 2.0], n_boot=200)
    comp = res["comparison"]
    assert comp["large_r"] == [1.0, 2.0]
    assert comp["glp_dominates_pointwise_at_r_ge_1"] is False  # r=2: GLP concept 0.85 < raw 0.9
    assert comp["pointwise_dominated_fraction"] == 0.5
    assert comp["glp_frontier_dominates_at_r_ge_1"] is False
    paired = {p["strength"]: p for p in comp["paired_glp_minus_raw"]}
    assert paired[1.0]["concept_diff"] == pytest.approx(0.1) and paired[2.0]["nll_diff"] == pytest.approx(-2.5)
