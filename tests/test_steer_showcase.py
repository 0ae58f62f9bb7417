"""The steering showcase: packaged concept sets, prior-guided steering, equal-concept reading, a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_steer_helpers import NEG, POS, SITE, make_glp, write_lines

from innards.cli import main as cli
from innards.steer.config import PriorConfig
from innards.steer.prior import prior_guided
from innards.steer.showcase import STATEMENTS, at_level
from innards.steer.texts import CONCEPTS, concept_sentences, read_prompts


def test_packaged_concepts_keep_vector_and_evaluator_sentences_apart():
    for c in CONCEPTS:
        s = concept_sentences(c)
        assert len(s["vector_pos"]) >= 30 and len(s["eval_pos"]) >= 60 and len(s["eval_neg"]) >= 60
        assert not set(s["vector_pos"] + s["vector_neg"]) & set(s["eval_pos"] + s["eval_neg"])
        assert not set(s["eval_pos"]) & set(s["eval_neg"])
        assert len(STATEMENTS[c]) == 2
    assert len(read_prompts("stories")) >= 50


def test_packaged_concepts_in_vector_and_sweep(tiny_model_dir, tmp_path):
    from innards.steer.evaluator import load_or_train_evaluator
    from innards.steer.vectors import load_vector

    d = tiny_model_dir("llama")
    out = tmp_path / "night.safetensors"
    assert cli(["steer", "vector", "--model", str(d), "--site", SITE, "--concept", "night", "--token", "mean",
                "--out", str(out)]) == 0
    sv = load_vector(out)
    assert sv.meta["concept"] == "night" and sv.meta["n_pos"] == 30 and sv.meta["n_neg"] == 40
    ev = load_or_train_evaluator("night", cache_dir=tmp_path / "ev")
    assert ev.accuracy >= 0.85 and ev.provenance["pos"] == "packaged:night/eval_pos"
    assert load_or_train_evaluator("night", cache_dir=tmp_path / "ev").to_dict() == ev.to_dict()  # cached
    assert cli(["steer", "vector", "--model", str(d), "--site", SITE, "--concept", "dragons",
                "--out", str(tmp_path / "x.safetensors")]) == 2


def test_at_level_reads_the_first_crossing():
    conc = np.array([[0.1, 0.1], [0.4, 0.2], [0.8, 0.3], [0.5, 0.3]])  # (S, B): column 1 never reaches 0.5
    nll = np.array([[2.0, 2.0], [3.0, 3.0], [5.0, 4.0], [9.0, 9.0]])
    got = at_level(conc, nll, 0.6)
    assert got[0] == pytest.approx(3.0 + 0.5 * 2.0) and np.isnan(got[1])
    assert at_level(conc, nll, 0.05)[0] == 2.0  # already above at r = 0


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    from innards.data.harvest import HarvestConfig, harvest
    from innards.models.load import load_model

    d = tiny_model_dir("llama")
    model = load_model(str(d))
    tmp = tmp_path_factory.mktemp("showcase")
    glp = make_glp(model, out=tmp / "glp")
    (tmp / "docs.txt").write_text("\n\n".join(POS + NEG + [p + " " + n for p, n in zip(POS, NEG)]) + "\n")
    harvest(HarvestConfig(model=str(d), site=[SITE], text=str(tmp / "docs.txt"), tokens=400, out=str(tmp / "store"),
                          context=32, store_dtype="fp32", val_fraction=0.3))
    write_lines(tmp / "prompts.txt", ["Once upon a time", "The fox liked", "One day a bear", "They ran"])
    return {"dir": d, "model": model, "glp": glp, "tmp": tmp}


def test_prior_guided_is_raw_at_weight_zero_and_pulls_otherwise(env):
    glp = env["glp"]
    torch.manual_seed(0)
    a = glp.denormalize(torch.randn(6, glp.config.d_in))
    off = torch.randn(glp.config.d_in) * 3
    raw = prior_guided(glp, a, off, PriorConfig(weight=0.0, steps=3))
    torch.testing.assert_close(raw, a + off, atol=1e-4, rtol=1e-4)
    pulled = prior_guided(glp, a, off, PriorConfig(weight=0.5, steps=3, t=0.3))
    assert not torch.allclose(pulled, a + off, atol=1e-3)
    # the pull is towards the denoised estimate: with a zero offset a fixed point of it stays put
    x = glp.normalize(a)
    z = 0.7 * x
    x_hat = z - 0.3 * glp(z, 0.3)
    step = prior_guided(glp, a, torch.zeros_like(off), PriorConfig(weight=1.0, steps=1, t=0.3))
    torch.testing.assert_close(glp.normalize(step), x_hat, atol=1e-4, rtol=1e-4)


def test_showcase_end_to_end_tiny(env):
    tmp = env["tmp"]
    out = tmp / "show"
    args = ["steer", "showcase", "--model", str(env["dir"]), "--site", SITE, "--glp", str(tmp / "glp"), str(tmp / "glp"),
            "--acts", str(tmp / "store"), "--concepts", "sea", "--prompts", str(tmp / "prompts.txt"),
            "--strengths", "0,1,4", "--projections", "exact:0.3", "--project-steps", "3", "--prior-weights", "0.5", "--seed-projections", "exact:0.3", "--seed-prior-weights", "0.5", "--keep-failing",
            "--max-new-tokens", "4", "--levels", "0.5,1", "--n-boot", "200", "--survival-t", "0.3,0.5",
            "--survival-rows", "32", "--delta-lm-docs", "4", "--out", str(out)]
    assert cli(args) == 0
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    res = json.loads(text)
    c = res["concepts"]["sea"]
    assert c["evaluator"]["accuracy"] >= 0.85 and c["evaluator"]["sentences_shared_with_vector"] == 0
    assert set(c["curves"]) == {"raw", "sdedit-exact:0.3", "prior-w0.5", "sdedit-exact:0.3@glp1", "prior-w0.5@glp1"}
    assert [p["strength"] for p in c["curves"]["raw"]] == [0.0, 1.0, 4.0]
    assert {"passes", "first_significant_strength", "collapse_strength"} <= set(c["raw_test"])
    assert set(c["prompting"]) == {"prompt-1", "prompt-2"} and "methods_at_this_concept" in c["prompting"]["prompt-1"]
    row = c["equal_concept"]["sdedit-exact:0.3"][0]
    assert {"fraction", "level", "reached", "nll", "nll_ci", "nll_minus_raw", "nll_minus_raw_ci", "distinct2"} <= set(row)
    lv = c["levels"]
    assert lv["fractions"] == [0.5, 1.0] and lv["concept"][1] == pytest.approx(lv["raw_cmax"])
    assert lv["concept"][0] == pytest.approx(lv["raw_c0"] + 0.5 * (lv["raw_cmax"] - lv["raw_c0"]))
    assert all(0 <= x["reached"] <= 1 for rows in c["equal_concept"].values() for x in rows)
    assert "_boot_nll_minus_raw" not in c
    assert set(res["summary"]["per_level"]) == {"0.5", "1"}
    # the same GLP twice: the seed spread of a method is zero wherever it is defined
    surv = res["projection"][0]["offset_survival"]
    assert set(surv) == {"random", "sea"} and set(surv["sea"]) == {"exact:0.3", "exact:0.5", "grid:0.3", "grid:0.5"}
    k = surv["sea"]["exact:0.3"]["r1"]["kept_fraction"]
    assert np.isfinite(k)
    assert set(res["projection"][0]["delta_lm"]) >= {"lm_loss_clean", "exact:0.3", "grid:0.5"}
    assert (out / "pareto.png").stat().st_size > 5000
    md = (out / "summary.md").read_text()
    assert "Does raw steering move each concept?" in md and "| sea |" in md and "survives projection" in md
    rec = json.loads((out / "run.json").read_text())
    assert rec["kind"] == "steer-showcase" and rec["status"] == "complete"
    # rerun: complete, nothing regenerated
    cells = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    assert cli(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")} == cells
    # other levels: the finished showcase is reopened and re-analysed from its cells, nothing regenerated
    i = args.index("--levels")
    assert cli(args[:i + 1] + ["0.25,0.5"] + args[i + 2:]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")} == cells
    assert json.loads((out / "results.json").read_text())["levels"] == [0.25, 0.5]
