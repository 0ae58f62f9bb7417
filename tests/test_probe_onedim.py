"""The rank-based 1-D protocol equals scikit-learn's LogisticRegressionCV, candidate by candidate."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from innards.probe.onedim import CS, one_d_probe, prefilter, rank_auc, sklearn_one_d

TOL = 1e-9


def _check_against_sklearn(xtr, ytr, xte, yte, top_k):
    """Every candidate's CV and test AUC, and the selection, equal the reference fits."""
    r = one_d_probe(xtr, ytr, xte, yte, top_k=top_k, prune=False)
    pruned = one_d_probe(xtr, ytr, xte, yte, top_k=top_k)
    assert (pruned.best, pruned.cv_auc, pruned.test_auc) == (r.best, r.cv_auc, r.test_auc)
    cand = prefilter(xtr, ytr, top_k)
    assert np.array_equal(cand, r.candidates)
    ref = [sklearn_one_d(xtr[:, j], ytr, xte[:, j], yte) for j in cand]
    ref_cv = np.array([x["cv_auc"] for x in ref])
    ref_test = np.array([x["test_auc"] for x in ref])
    np.testing.assert_allclose(r.cand_cv_auc, ref_cv, atol=TOL, rtol=0)
    np.testing.assert_allclose(r.cand_test_auc, ref_test, atol=TOL, rtol=0)
    # the reference picks the first maximum; allow only round-off-level ties to differ
    pick = int(np.argmax(ref_cv))
    assert r.best == cand[pick] or abs(ref_cv[pick] - r.cv_auc) < TOL
    assert r.test_auc == pytest.approx(ref_test[list(cand).index(r.best)], abs=TOL)
    assert r.C == ref[list(cand).index(r.best)]["C"]
    return r


def test_rank_auc_is_roc_auc_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = np.round(rng.normal(size=(300, 5)) + y[:, None] * [0.0, 0.3, -0.5, 1.0, 2.0], 1)  # many ties
    got = rank_auc(x, y)
    want = [roc_auc_score(y, x[:, j]) for j in range(5)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_rank_protocol_equals_sklearn_on_synthetic_data():
    rng = np.random.default_rng(1)
    n_tr, n_te = 203, 120  # odd train size: the stratified folds are not exactly balanced
    y_tr = np.r_[np.ones(102), np.zeros(101)].astype(int)
    rng.shuffle(y_tr)
    y_te = rng.integers(0, 2, n_te)
    y = np.r_[y_tr, y_te]
    n = n_tr + n_te
    cols = []
    for eff in (1.5, -1.0, 0.6, -0.4, 0.25, 0.1, -0.05, 0.02):
        cols.append(rng.normal(size=n) + eff * y)
    cols.append(np.round(rng.normal(size=n) + 0.8 * y))  # integer-valued: heavy ties
    cols.append(np.where(rng.random(n) < 0.15, rng.exponential(size=n) * (1 + y), 0.0))  # sparse, SAE-like
    cols.append(cols[0].copy())  # duplicate of the best: CV tie, the first in candidate order wins
    cols.append(np.full(n, 3.0))  # constant
    const_train = np.r_[np.zeros(n_tr), rng.normal(size=n_te)]  # constant on train only
    cols.append(const_train)
    near_null = rng.normal(size=n)
    near_null[:n_tr] -= (near_null[:n_tr][y_tr == 1].mean() - near_null[:n_tr][y_tr == 0].mean()) * y_tr  # gap ~ 0
    cols.append(near_null)
    for _ in range(6):
        cols.append(rng.normal(size=n) * rng.uniform(0.1, 10))  # pure noise of various scales
    x = np.stack(cols, 1).astype(np.float32)
    r = _check_against_sklearn(x[:n_tr], y_tr, x[n_tr:], y_te, top_k=18)
    assert r.n_sklearn >= 1  # the near-null candidate went through scikit-learn
    assert r.best == 0  # the strongest feature, ahead of its duplicate


def test_sign_and_zero_weight_cases():
    rng = np.random.default_rng(2)
    y = np.tile([0, 1], 60)
    x = np.stack([rng.normal(size=120) - 2 * y, np.ones(120)], 1)  # negative direction, constant
    r = one_d_probe(x[:100], y[:100], x[100:], y[100:], top_k=2)
    assert r.best == 0 and r.sign == -1 and r.cv_auc > 0.9
    assert r.cand_cv_auc[1] == 0.5 and r.cand_test_auc[1] == 0.5


def test_rank_protocol_equals_sklearn_on_real_tasks(shared_data):
    """Real SAE-Probes tasks and splits, with cheap text-statistics features full of ties."""
    from innards.probe.tasks import make_split, read_task

    root = shared_data / "sae_probes" / "cleaned_data"
    for name in ("117_us_state_FL", "95_toxic_is", "129_arith_mc_A"):
        task = read_task(root / f"{name}.csv.zst")
        split, why = make_split(task)
        assert why is None
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'"
        x = np.array([[p.lower().count(c) for c in alphabet] + [len(p), len(p.split()), sum(ch.isupper() for ch in p)]
                      for p in task.prompts], dtype=np.float32)
        y = task.labels
        _check_against_sklearn(x[split.train], y[split.train], x[split.test], y[split.test], top_k=6)


def test_grid_is_the_reference_grid():
    assert np.allclose(CS, np.logspace(-5, 0, 6))
