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
                                 out=str(root / "store"), dtype="fp32", shard_tokens=2048, val_fraction=0.2))


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from innards.glp.train import GLPTrainConfig, train_glp

    root = tmp_path_factory.mktemp("glp_eval")
    model_dir = tiny_model_dir("llama")
    store = make_tiny_store(root, model_dir)
    glp = train_glp(GLPTrainConfig(acts=str(store), out=str(root / "glp"), depth=1, tokens=30000, batch_size=256,
                                   lr=1e-3, checkpoints=2, progress=False, precision="fp32"))
    return {"root": root, "model": model_dir, "store": store, "glp": glp}


def test_evaluate_end_to_end(tiny_run, capsys):
    import json

    from innards.glp.evaluate import EvalConfig, evaluate_glp

    out = tiny_run["root"] / "ev" / "eval.json"
    res = evaluate_glp(EvalConfig(glp=str(tiny_run["glp"]), acts=str(tiny_run["store"]), model=str(tiny_run["model"]),
                                  n=400, steps=8, pca_k=4, lm_docs=12, sae_k=4, sae_tokens=20000, out=str(out),
                                  progress=False))
    on_disk = json.loads(out.read_text())
    for key in ("fd", "fd_floor", "fd_gaussian", "fd_pca", "fd_sae", "c2st_auc_glp", "c2st_auc_gaussian",
                "delta_lm_glp", "delta_lm_sae", "delta_lm_pca", "delta_lm_mean", "lm_loss_clean", "delta_lm_glp_padded"):
        assert on_disk[key] is not None and np.isfinite(on_disk[key]), key
    assert res["n"] == 400 and res["fd_floor"] >= 0
    assert out.with_name("eval_pca.png").stat().st_size > 1000
    assert (out.parent / "eval.config.yaml").is_file()
    assert (out.parent / "eval_sae" / "cfg.json").is_file()
    assert "Fréchet distance" in capsys.readouterr().out


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
    err = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in err if e.startswith("innards: error:")]) == 4, err
    assert not (tmp_path / "e.json").exists()
