import numpy as np
import pytest
import torch

from innards.glp.delta_lm import delta_lm_loss, sequences_from_rows


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    from innards.models.load import load_model

    return load_model(tiny_model_dir("llama"))


def _seqs(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    bos = model.tokenizer.bos_token_id
    return [np.r_[bos, rng.integers(3, 250, size=n - 1)] for n in lengths]


def test_sequences_from_rows_rebuilds_documents():
    # doc 7: positions 0..4 shuffled, with a duplicate; doc 9: gap after position 1; doc 3: one token
    doc = np.array([7, 7, 7, 7, 7, 7, 9, 9, 9, 3])
    pos = np.array([3, 0, 4, 1, 2, 2, 0, 1, 3, 0])
    tok = np.array([13, 10, 14, 11, 12, 12, 20, 21, 23, 30])
    seqs = sequences_from_rows(doc, pos, tok, bos_id=1, max_len=4)
    as_lists = sorted(s.tolist() for s in seqs)
    assert as_lists == [[1, 10, 11, 12], [1, 20, 21], [1, 30]]
    no_bos = sequences_from_rows(doc, pos, tok, bos_id=None, max_len=8)
    assert sorted(s.tolist() for s in no_bos) == [[10, 11, 12, 13, 14], [20, 21]]


def test_identity_replacement_has_zero_delta_and_bos_is_untouched(tiny_llama):
    model = tiny_llama
    bos = model.tokenizer.bos_token_id
    seqs = _seqs(model, [12, 7, 20, 3])
    seen = []

    def ident(x):
        seen.append(x.shape[0])
        return x

    res = delta_lm_loss(model, "blocks.1.resid_post", seqs, {"id": ident}, bos_id=bos, pad_id=0, batch_size=3,
                        progress=False)
    assert res["delta_lm_id"] == pytest.approx(0.0, abs=1e-6)
    assert sum(seen) == sum(len(s) - 1 for s in seqs)  # every position but BOS, no pad
    assert res["delta_lm_tokens"] == sum(len(s) - 1 for s in seqs)


def test_mean_replacement_hurts_and_padding_dilutes(tiny_llama):
    model = tiny_llama
    bos = model.tokenizer.bos_token_id
    seqs = _seqs(model, [16, 5, 9, 16], seed=1)
    zero = {"zero": lambda x: torch.zeros_like(x)}
    res = delta_lm_loss(model, "blocks.1.resid_post", seqs, zero, bos_id=bos, pad_id=0, batch_size=4, max_len=16,
                        progress=False)
    assert res["delta_lm_zero"] != 0.0
    # padded variant: every document divided by max_len - 1 = 15 predictions, then averaged over documents
    single = [delta_lm_loss(model, "blocks.1.resid_post", [s], zero, bos_id=bos, pad_id=0, progress=False) for s in seqs]
    expected = np.mean([r["delta_lm_zero"] * r["delta_lm_tokens"] / 15 for r in single])
    assert res["delta_lm_zero_padded"] == pytest.approx(expected, rel=1e-4)
    tokens = sum(r["delta_lm_tokens"] for r in single)
    assert res["delta_lm_zero"] == pytest.approx(sum(r["delta_lm_zero"] * r["delta_lm_tokens"] for r in single) / tokens,
                                                 rel=1e-4)
    assert res["delta_lm_zero_se"] >= 0.0
    # equal lengths: both means coincide
    eq = _seqs(model, [10, 10, 10], seed=2)
    r2 = delta_lm_loss(model, "blocks.1.resid_post", eq, zero, bos_id=bos, pad_id=0, max_len=10, progress=False)
    assert r2["delta_lm_zero_padded"] == pytest.approx(r2["delta_lm_zero"], rel=1e-9)
    assert r2["lm_loss_clean_padded"] == pytest.approx(r2["lm_loss_clean"], rel=1e-9)


# ----- end to end on a tiny store, GLP and model ------------------------------------------------------

def make_tiny_store(root, model_dir, tokens=6000):
    """A small fp32 store of a tiny model's blocks.1.resid_post (20% validation documents); also used by other tests."""
    import random

    from innards.data.harvest import HarvestConfig, harvest
    from tiny_models import SENTENCES

    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4))) for _ in range(250)))
    return harvest(HarvestConfig(model=str(model_dir), site=["blocks.1.resid_post"], text=str(text), tokens=tokens,
                                 out=str(root / "store"), store_dtype="fp32", shard_tokens=2048, val_fraction=0.2))


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from innards.glp.train import GLPOptimConfig, GLPTrainConfig, train_glp

    root = tmp_path_factory.mktemp("glp_eval")
    model_dir = tiny_model_dir("llama")
    store = make_tiny_store(root, model_dir)
    glp = train_glp(GLPTrainConfig(acts=str(store), out=str(root / "glp"), depth=1, tokens=30000, batch_size=256,
                                   optim=GLPOptimConfig(lr=1e-3), checkpoints=2, progress=False, precision="fp32"))
    return {"root": root, "model": model_dir, "store": store, "glp": glp}


def test_evaluate_end_to_end(tiny_run, capsys):
    import json

    from innards.glp.evaluate import EvalConfig, evaluate_glp

    out = tiny_run["root"] / "ev" / "eval.json"
    cfg = EvalConfig(glp=str(tiny_run["glp"]), acts=str(tiny_run["store"]), n=400, steps=8, pca_k=4, lm_docs=12,
                     sae_k=4, sae_tokens=20000, out=str(out), progress=False)  # no --model: the GLP's own
    res = evaluate_glp(cfg)
    on_disk = json.loads(out.read_text())
    for key in ("fd", "fd_floor", "fd_gaussian", "fd_pca", "fd_sae", "c2st_auc_glp", "c2st_auc_gaussian",
                "delta_lm_glp", "delta_lm_sae", "delta_lm_pca", "delta_lm_mean", "lm_loss_clean", "delta_lm_glp_padded",
                "delta_lm_gaussian", "delta_lm_gaussian_se", "fd_gaussian_projection", "c2st_auc_gaussian_projection",
                "c2st_auc_glp_projection", "fd_floor_within_store"):
        assert on_disk[key] is not None and np.isfinite(on_disk[key]), key
    assert on_disk["delta_lm_model"] == str(tiny_run["model"])  # --model defaults to the model recorded in the GLP
    assert on_disk["fd_floor_within_store"] == on_disk["fd_floor"] and "finite-sample" in on_disk["fd_floor_kind"]
    assert 0 <= on_disk["sae"]["val_fvu"] < 1 and on_disk["sae"]["val_rows"] == 400
    assert res["n"] == 400 and res["fd_floor"] >= 0
    assert out.with_name("eval_pca.png").stat().st_size > 1000
    assert (out.parent / "eval.json.config.yaml").is_file()
    rec = json.loads((out.parent / "eval.json.run.json").read_text())
    assert rec["kind"] == "eval" and rec["status"] == "complete" and set(rec["outputs"]) == {"eval.json", "eval_pca.png"}
    assert (out.parent / "eval_sae" / "cfg.json").is_file()
    printed = capsys.readouterr().out
    assert "Fréchet distance" in printed and "Gaussian-flow projection" in printed
    # a rerun with the same settings is not redone
    stamp = out.stat().st_mtime_ns
    assert evaluate_glp(cfg)["fd"] == res["fd"] and out.stat().st_mtime_ns == stamp
    assert "already complete" in capsys.readouterr().err


def test_val_acts_is_labelled_a_shift_and_the_within_store_floor_is_kept(tiny_run, tiny_model_dir, tmp_path):
    from innards.glp.evaluate import EvalConfig, evaluate_glp

    (tmp_path / "v").mkdir()
    other = make_tiny_store(tmp_path / "v", tiny_run["model"], tokens=3000)  # same model, other documents
    res = evaluate_glp(EvalConfig(glp=str(tiny_run["glp"]), acts=str(tiny_run["store"]), val_acts=str(other), n=300,
                                  steps=4, pca_k=4, sae_k=4, sae_tokens=5000, c2st=True, delta_lm=False,
                                  out=str(tmp_path / "e.json"), plot=False, progress=False))
    assert "corpus shift" in res["fd_floor_kind"] and res["fd_floor_within_store"] is not None
    assert res["fd_floor_within_store"] != res["fd_floor"] and res["c2st_auc_floor_within_store"] is not None
    assert res["sae"]["val_fvu"] is not None and res["sae"]["val_rows"] == res["n"]  # reported on --val-acts too
    assert res["delta_lm_glp"] is None and any("--no-delta-lm" in n for n in res["notes"])


def test_old_projection_flags_and_ranges():
    from innards.cli.glp_eval import ALIASES
    from innards.config import parse
    from innards.errors import InnardsError
    from innards.glp.evaluate import EvalConfig

    cfg = parse(EvalConfig, ["--t-start", "0.3", "--project-steps", "7", "--project-schedule", "grid", "--model", "m",
                             "--model-dtype", "bf16", "-n", "99"], prog="t", aliases=ALIASES)
    assert (cfg.project.t_start, cfg.project.steps, cfg.project.schedule, cfg.model.name, cfg.model.dtype, cfg.n) == \
        (0.3, 7, "grid", "m", "bf16", 99)
    for bad in (["--t-start", "1.5"], ["--project-steps", "0"], ["-n", "3"], ["--max-len", "1"]):
        with pytest.raises(InnardsError):
            parse(EvalConfig, bad, prog="t", aliases=ALIASES)


def test_cli_bad_inputs_are_one_line(tiny_run, tmp_path, tiny_model_dir, capsys):
    from innards.cli import main

    out = str(tmp_path / "e.json")
    base = ["glp", "eval", "--out", out, "-n", "64", "--steps", "2", "--no-train-sae", "--no-c2st", "--no-plot"]
    assert main(base + ["--glp", str(tmp_path / "missing"), "--acts", str(tiny_run["store"])]) == 2
    assert main(base + ["--glp", str(tiny_run["glp"]), "--acts", str(tmp_path)]) == 2
    # a store harvested from another model (same width and site, other weights) is refused
    other = tiny_model_dir("llama", num_hidden_layers=4)
    (tmp_path / "o").mkdir()
    other_store = make_tiny_store(tmp_path / "o", other, tokens=2048)
    assert main(base + ["--glp", str(tiny_run["glp"]), "--acts", str(other_store)]) == 2
    assert main(base + ["--glp", str(tiny_run["glp"]), "--acts", str(tiny_run["store"]), "--model", str(other)]) == 2
    (tmp_path / "afile").write_text("x")
    assert main(base[:2] + ["--out", str(tmp_path / "afile" / "e.json")] + base[4:] + ["--glp", str(tiny_run["glp"]),
                                                                                  "--acts", str(tiny_run["store"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in err if e.startswith("innards: error:")]) == 5, err
    assert not (tmp_path / "e.json").exists() and (tmp_path / "afile").read_text() == "x"
