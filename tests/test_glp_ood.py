"""innards bench ood: AUROC with paired bootstrap CIs, the k-NN and shift builders, end to end on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from innards.bench.ood import auroc_ci, knn_distance, per_document, random_token_docs, select, shuffled_words
from innards.data.text import Document
from innards.glp.score import TokenScores


def test_auroc_ci():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(size=200) + 1.0
    auc, lo, hi = auroc_ci(a, b, 500, seed=1)
    assert auc == pytest.approx(roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[a, b]))
    assert lo < auc < hi and 0.7 < auc < 0.85 and hi - lo < 0.12
    assert auroc_ci(a, a + 100, 50, seed=1) == (1.0, 1.0, 1.0)
    assert auroc_ci(a, b, 500, seed=1) == (auc, lo, hi)  # seeded
    same = auroc_ci(a, rng.normal(size=200), 500, seed=1)
    assert same[1] < 0.5 < same[2]


def test_knn_distance_and_document_means():
    g = torch.Generator().manual_seed(0)
    ref, x = torch.randn(300, 5, generator=g), torch.randn(40, 5, generator=g)
    brute = torch.sort(((x[:, None] - ref[None]) ** 2).sum(-1).sqrt(), dim=1).values[:, 3]
    assert torch.allclose(knn_distance(x, ref, 4), brute, atol=1e-5)
    toks = TokenScores(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2]), np.zeros(9, np.int32), np.zeros(9, np.int32),
                       torch.arange(9.0)[:, None], torch.tensor([float("nan")] + [1.0] * 8))
    sub = select(toks, min_tokens=3, limit=5)
    assert sub.doc.tolist() == [0, 0, 0, 2, 2, 2, 2]
    m = per_document(sub, {"a": sub.acts[:, 0].double(), "lm": sub.lm_nll.double()})
    assert m["a"].tolist() == [1.0, 6.5] and m["lm"].tolist() == [1.0, 1.0]  # NaN (no prediction) left out


def test_shift_builders(tiny_model_dir):
    from innards.models.load import load_model

    model = load_model(str(tiny_model_dir("llama")))
    docs = [Document(id="a", text="the fox ran over the log"), Document(id="b", tokens=(10, 11, 12, 13))]
    sh = shuffled_words(docs, model, seed=0)
    assert sorted(sh[0].text.split()) == sorted(docs[0].text.split()) and sh[0].text != docs[0].text
    rnd = random_token_docs(docs, model, seed=0)
    n0 = len(model.tokenizer(docs[0].text, add_special_tokens=False)["input_ids"])
    assert len(rnd[0].tokens) == n0 and len(rnd[1].tokens) == 4
    assert not set(rnd[0].tokens + rnd[1].tokens) & set(model.tokenizer.all_special_ids)


def test_bench_ood_end_to_end(tiny_model_dir, tmp_path, capsys):
    from test_glp_eval import make_tiny_store
    from tiny_models import SENTENCES

    from innards.cli import main
    from innards.glp.train import GLPOptimConfig, GLPTrainConfig, train_glp

    model = tiny_model_dir("llama")
    store = make_tiny_store(tmp_path, model, tokens=5000)
    glp = train_glp(GLPTrainConfig(acts=str(store), out=str(tmp_path / "glp"), depth=1, steps=40, batch_size=128,
                                   optim=GLPOptimConfig(lr=2e-3), checkpoints=1, val_rows=128, progress=False,
                                   precision="fp32"))
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"{i} {i * 7} {i * 13} 12345 67890 !!! ??? {i}" for i in range(40)))
    out = tmp_path / "ood.json"
    args = ["bench", "ood", "--glp", str(glp), "--out", str(out), "--docs", "12", "--min-tokens", "4", "--n-t", "2",
            "--ode-steps", "2", "--bootstrap", "50", "--ref-rows", "500", "--sae-tokens", "3000", "--sae-k", "4",
            "--probe-tasks", "none", "--shift", f"digits={other}", "--no-progress"]
    assert main(args) == 0  # --acts and --model default to what the GLP records
    res = json.loads(out.read_text())
    assert set(res["auroc"]) == {"shuffled_words", "random_tokens", "digits"}
    for cond, v in res["auroc"].items():
        assert set(v) == {"glp_denoise", "glp_nll", "mahalanobis", "sae_error", "knn", "lm_nll"}, cond
        for d in v.values():
            assert 0 <= d["lo"] <= d["auroc"] <= d["hi"] <= 1
    assert res["n_docs"]["in_distribution"] == 12 and "OOD detection" in capsys.readouterr().out
    assert json.loads((tmp_path / "ood.json.run.json").read_text())["kind"] == "bench"
    assert main(args) == 0 and "already complete" in capsys.readouterr().err
    assert main(args[:-1] + ["--shift", "bad"]) == 2
