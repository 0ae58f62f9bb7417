"""`innards probe` end to end on a tiny random model: extraction, feature sets, outputs, reruns, bad input."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch

from innards.cli.probe import main

SITE = "blocks.1.resid_post"
POS = "happy good great lovely sunny bright kind".split()
NEG = "sad bad awful gloomy dark cruel mean".split()


def _task(path, n, seed, labels=("negative", "positive")):
    rnd = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "prompt_len", "target"])
        for i in range(n):
            y = i % 2
            words = [rnd.choice("the a fox dog ran over".split()) for _ in range(rnd.randint(0, 8))]
            words += [rnd.choice(POS if y else NEG) for _ in range(rnd.randint(1, 4))]
            w.writerow([" ".join(words), len(words), labels[y]])
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    from innards.glp.model import GLP, GLPConfig
    from innards.sae.model import TopKSAE
    from innards.models.load import load_model
    from innards.models.sites import resolve_site

    root = tmp_path_factory.mktemp("probe")
    tasks = root / "tasks"
    tasks.mkdir()
    _task(tasks / "1_sent.csv", 160, 0)
    _task(tasks / "2_sent_bool.csv", 150, 1, labels=("False", "True"))
    _task(tasks / "3_tiny.csv", 40, 2)  # too few rows: skipped
    with open(tasks / "4_one_class.csv", "w") as f:
        f.write("prompt,target\n" + "".join(f"p {i},1\n" for i in range(150)))
    mdir = tiny_model_dir("llama")
    model = load_model(mdir)
    site = resolve_site(model, SITE)
    stats = {"mean": torch.zeros(site.width, dtype=torch.float64), "var": torch.ones(site.width, dtype=torch.float64),
             "count": 100, "mean_norm": 1.0}

    def glp(name, model_source=model.innards_source, site_name=SITE, seed=0):
        torch.manual_seed(seed)
        g = GLP(GLPConfig(d_in=site.width, n_blocks=2, d_model=16, d_mlp=24),
                meta={"model": model_source, "site": site_name, "stats_by_site": {site_name: stats}})
        return g.save_pretrained(root / name)

    def sae(name, d_in=site.width, hook=SITE):
        s = TopKSAE(d_in, 48, k=6)
        s.init_weights_(seed=0)
        return s.save_pretrained(root / name, hook_name=hook, model_name=str(mdir))

    other = {"name": "another-model", "sha256": "0" * 64}
    return {"root": root, "tasks": tasks, "model": mdir, "model_obj": model,
            "glp": glp("glp"), "glp_other_model": glp("glp_om", model_source=other),
            "glp_other_site": glp("glp_os", site_name="blocks.0.resid_post"),
            "sae": sae("sae"), "sae_narrow": sae("sae_narrow", d_in=16), "sae_other_site": sae("sae_os", hook="blocks.0.resid_post")}


def _run(setup, out, *extra):
    return main(["--model", str(setup["model"]), "--site", SITE, "--tasks", str(setup["tasks"]), "--out", str(out),
                 "--n-boot", "2000", *extra])


def test_end_to_end_outputs(setup, tmp_path):
    out = tmp_path / "run"
    feats = f"raw,mlp,pca:4,glp:{setup['glp']},sae:{setup['sae']}"
    assert _run(setup, out, "--features", feats) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_tasks"] == 2 and summary["tasks"] == ["1_sent", "2_sent_bool"]
    assert {s["task"] for s in summary["skipped"]} == {"3_tiny", "4_one_class"}
    names = ["raw", "mlp", "pca:4", "glp:glp", "sae:sae"]
    assert list(summary["features"]) == names
    nf = {k: v["n_features"] for k, v in summary["features"].items()}
    assert nf == {"raw": 32, "mlp": 48, "pca:4": 4, "glp:glp": 48, "sae:sae": 48}
    for e in summary["features"].values():
        assert 0.0 <= e["ci_low"] <= e["mean_auc"] <= e["ci_high"] <= 1.0
        assert e["n_tasks"] == 2
    assert "delta_vs_raw" in summary["features"]["mlp"]
    rec = json.loads((out / "tasks" / "1_sent.json").read_text())
    assert rec["n_train"] == 60 and rec["n_test"] == 99 and rec["classes"] == ["negative", "positive"]
    assert rec["settings"]["token"] == "last"
    g = rec["features"]["glp:glp"]
    assert set(g["best"]) == {"index", "block", "neuron"}
    assert g["best"]["index"] == g["best"]["block"] * 24 + g["best"]["neuron"]
    for r in rec["features"].values():
        assert 0 <= r["test_auc"] <= 1 and 0 <= r["cv_auc"] <= 1
    # the sentiment words make the raw residual informative even in a random model
    assert summary["features"]["raw"]["mean_auc"] > 0.6
    assert (out / "summary.png").stat().st_size > 1000 and (out / "table.md").is_file()
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()


def test_rerun_reuses_results_and_cache(setup, tmp_path):
    out = tmp_path / "run"
    assert _run(setup, out, "--features", "raw", "--max-tasks", "1") == 0
    cached = sorted((out / "cache").rglob("*.safetensors"))
    stamp = {p: p.stat().st_mtime_ns for p in cached}
    first = json.loads((out / "tasks" / "1_sent.json").read_text())
    assert _run(setup, out, "--features", "raw,pca:3", "--max-tasks", "1") == 0
    again = json.loads((out / "tasks" / "1_sent.json").read_text())
    assert again["features"]["raw"] == first["features"]["raw"]  # reused, not recomputed
    assert "pca:3" in again["features"]
    assert {p: p.stat().st_mtime_ns for p in cached} == stamp  # nothing extracted again


def test_max_tasks_counts_probeable_tasks(setup, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "1_tiny.csv").write_bytes((setup["tasks"] / "3_tiny.csv").read_bytes())
    (tasks / "2_ok.csv").write_bytes((setup["tasks"] / "1_sent.csv").read_bytes())
    out = tmp_path / "run"
    assert main(["--model", str(setup["model"]), "--site", SITE, "--tasks", str(tasks), "--out", str(out),
                 "--features", "raw", "--max-tasks", "1", "--no-plot"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == ["2_ok"] and [s["task"] for s in summary["skipped"]] == ["1_tiny"]


def test_dense_mode_picks_a_glp_block(setup, tmp_path):
    out = tmp_path / "dense"
    assert _run(setup, out, "--features", f"raw,glp:{setup['glp']}", "--mode", "dense", "--max-tasks", "1") == 0
    rec = json.loads((out / "tasks" / "1_sent.json").read_text())
    assert rec["features"]["glp:glp"]["block"] in (0, 1)
    assert len(rec["features"]["glp:glp"]["block_cv_auc"]) == 2
    assert rec["features"]["raw"]["test_auc"] > 0.6


def test_batched_extraction_equals_one_prompt_at_a_time(tiny_model_dir):
    from innards.models.hooks import run_with_cache
    from innards.models.load import load_model
    from innards.probe.extract import extract, tokenize

    prompts = ["the fox", "a happy dog ran over the lazy cat", "", "sad", "The quick brown dog jumps over " * 20]
    for arch in ("llama", "gpt2", "bert"):
        model = load_model(tiny_model_dir(arch))
        got = extract(model, prompts, [SITE, "blocks.1.mlp_hidden"], batch_size=2, context=40)
        ids, pos = tokenize(model, prompts, 40, "last")
        assert len(ids[-1]) == 40  # left-truncated to the context
        for i, (row, p) in enumerate(zip(ids, pos)):
            ref = run_with_cache(model, torch.tensor([row]), [SITE, "blocks.1.mlp_hidden"])
            for s in (SITE, "blocks.1.mlp_hidden"):
                torch.testing.assert_close(got[s][i], ref[s][0, p], atol=1e-5, rtol=1e-4)


def test_encoder_token_is_the_last_real_token():
    """all-MiniLM-L6-v2's tokenizer: the probed token sits just before [SEP]."""
    from types import SimpleNamespace

    from innards.models.load import load_tokenizer
    from innards.probe.extract import tokenize

    tok = load_tokenizer("minilm")
    ids, pos = tokenize(SimpleNamespace(tokenizer=tok), ["the fox ran home", "", "a b c d e f g h i j"], 6, "last_real")
    words = [tok.convert_ids_to_tokens(r) for r in ids]
    assert words[0][pos[0]] == "home" and words[0][-1] == "[SEP]"
    assert words[1][pos[1]] == "[SEP]"  # nothing real: fall back to the last token
    assert words[2] == ["[CLS]", "g", "h", "i", "j", "[SEP]"] and words[2][pos[2]] == "j"  # left truncation
    assert tok.truncation_side == "right"  # restored


def _bad(setup, tmp_path, capsys, *extra):
    rc = _run(setup, tmp_path / "bad", *extra)
    err = capsys.readouterr().err
    ours = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("innards:")]
    assert rc == 2 and len(ours) == 1, err  # other lines are the loaders' progress bars
    return ours[0]


def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys):
    assert "unknown feature set 'neurons'" in _bad(setup, tmp_path, capsys, "--features", "raw,neurons")
    assert "pca needs" in _bad(setup, tmp_path, capsys, "--features", "pca:x")
    assert "folder not found" in _bad(setup, tmp_path, capsys, "--features", "glp:/nonexistent/glp")
    assert "trained on model" in _bad(setup, tmp_path, capsys, "--features", f"glp:{setup['glp_other_model']}")
    assert "trained on site" in _bad(setup, tmp_path, capsys, "--features", f"glp:{setup['glp_other_site']}")
    assert "width 16" in _bad(setup, tmp_path, capsys, "--features", f"sae:{setup['sae_narrow']}")
    assert "trained on site" in _bad(setup, tmp_path, capsys, "--features", f"sae:{setup['sae_other_site']}")
    assert "unknown site" in _bad(setup, tmp_path, capsys, "--site", "blocks.1.nothing")
    cols = tmp_path / "cols"
    cols.mkdir()
    (cols / "t.csv").write_text("text,label\nhello,1\n")
    err = _bad(setup, tmp_path, capsys, "--tasks", str(cols))
    assert "lacks column(s) prompt, target" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "t.csv").write_text("prompt,target\n")
    assert "no rows" in _bad(setup, tmp_path, capsys, "--tasks", str(empty))
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_summary_ci_covers_the_mean():
    from innards.probe.run import format_table, summarize

    rng = np.random.default_rng(0)
    results = [{"task": f"t{i}", "features": {"a": {"test_auc": float(v), "cv_auc": 0.7, "n_features": 8},
                                              "b": {"test_auc": float(v) + 0.05, "cv_auc": 0.7, "n_features": 16}}}
               for i, v in enumerate(rng.uniform(0.5, 0.9, 40))]
    s = summarize(results, ["a", "b"], [{"task": "x", "reason": "one class"}], {"mode": "1d"}, n_boot=10000, seed=0)
    for name in ("a", "b"):
        e = s["features"][name]
        assert e["ci_low"] < e["mean_auc"] < e["ci_high"] and e["n_tasks"] == 40
    d = s["features"]["b"]["delta_vs_a"]
    assert d["mean"] == pytest.approx(0.05) and d["wins"] == 40
    assert "| a | 8 |" in format_table(s) and "skipped 1 task(s)" in format_table(s)


def test_glp_options_pass_through_and_hub_ids(setup, tmp_path, monkeypatch):
    """probe --features glp:X with --glp-revision/--glp-checkpoint/--restats reaches GLP.from_pretrained."""
    from innards.glp.model import GLP
    from innards.probe.features import parse_features

    seen = []
    real = GLP.from_pretrained.__func__

    def spy(cls, path, *a, **k):
        seen.append(dict(k, path=str(path)))
        return real(cls, path, *a, **{x: v for x, v in k.items() if x not in ("revision", "checkpoint", "restats")})

    monkeypatch.setattr(GLP, "from_pretrained", classmethod(spy))
    monkeypatch.setattr("innards.probe.features.file_sha256", lambda *a, **k: "0" * 64)
    store = tmp_path / "store"
    store.mkdir()
    out = tmp_path / "run"
    assert _run(setup, out, "--features", f"glp:{setup['glp']}", "--max-tasks", "1", "--glp-revision", "r1",
                "--checkpoint", "final", "--restats", str(store)) == 0
    assert seen and all(k["revision"] == "r1" and k["checkpoint"] == "final" and k["restats"] == str(store) for k in seen)
    rec = json.loads((out / "tasks" / "1_sent.json").read_text())
    assert rec["features"]["glp:glp"]["source"]["path"] == str(setup["glp"].resolve())
    # a hub id is kept as given (not resolved under the working directory)
    hub = parse_features(["glp:some-org/glp-model", "sae:some-release/blocks.3.hook_resid_post"])
    assert [s.name for s in hub] == ["glp:some-org/glp-model", "sae:some-release/blocks.3.hook_resid_post"]
    assert not hub[0].local
