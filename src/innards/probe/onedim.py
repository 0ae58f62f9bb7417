"""The published 1-D probing protocol, computed from per-feature ranks instead of thousands of fits.

Protocol (GLP paper §5 / reference ``script_probe.py``, on SAE-Probes splits): rank every feature by
``|mean(x | y=1) - mean(x | y=0)|`` on the train split and keep the top k (512); for each candidate fit
``StandardScaler -> LogisticRegressionCV(Cs=CS, cv=5, scoring="roc_auc", max_iter=1000)`` (L2,
L-BFGS); its validation AUC is the mean 5-fold CV AUC at the chosen C; pick the candidate with the
best validation AUC (first in candidate order on ties) and report its test AUC.

Why no fits are needed: a 1-D logistic model scores ``w * x + b``, so its ROC-AUC on any set is the
Mann-Whitney AUC of ``x`` (ties counted half) when ``w > 0``, of ``-x`` (= 1 - AUC) when ``w < 0`` and
exactly 0.5 when ``w == 0`` (every score ties). C only enters through the sign of ``w``, and for the
exact L2 optimum that sign is the sign of ``cov(x, y)`` on the fitting data, i.e. of the class-mean
difference, whatever C is (the profile loss in w is convex with slope ``-cov(x, y)`` at 0). So every
C scores the same in every fold, LogisticRegressionCV keeps the first C (its argmax over summed fold
scores), and CV and test AUCs follow from ranks.

Where scikit-learn departs from the exact optimum: L-BFGS starts at ``w = b = 0`` and stops at once
when the largest gradient entry is <= tol (1e-4), leaving ``w = 0`` (AUC 0.5) for features whose
standardised class-mean gap is tiny, and a barely converged tiny ``w`` could in principle carry either
sign. That can only happen when ``|cov(z, y)| = p(1-p) |gap / std|`` of the standardised feature z on
some fitting set is below ``tol (1 + |mean(z)|)`` (see ``_near_null``); those few near-null candidates
(with a 2x safety margin) are re-run through scikit-learn itself, so the results equal
scikit-learn's, not merely its exact-arithmetic ideal. Features constant on the train
split score 0.5 (scikit-learn's scaler maps them to ~0 and the fit leaves ``w = 0`` on a balanced split).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

CS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the reference's grid, == np.logspace(-5, 0, 6)
TOL = 1e-4  # scikit-learn's LogisticRegression(CV) default tol, L-BFGS gtol


@dataclass
class OneDResult:
    """Outcome of the 1-D protocol on one task and one feature set."""

    best: int  # index of the selected feature (column of the feature matrix)
    cv_auc: float
    test_auc: float
    sign: int  # +1 / -1 / 0: the sign of the refitted weight
    C: float  # the C scikit-learn would keep
    candidates: np.ndarray  # feature indices in pre-filter order
    cand_cv_auc: np.ndarray
    cand_test_auc: np.ndarray
    n_sklearn: int = 0  # near-null candidates re-run through scikit-learn
    extra: dict = field(default_factory=dict)


def rank_auc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Column-wise ROC-AUC of scores ``x`` (n, F) for labels ``y`` (n,), ties counted half (Mann-Whitney)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    pos = np.asarray(y).astype(bool)
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("AUC needs both classes")
    ranks = rankdata(x, axis=0, method="average")  # midranks, exact halves in float64
    u = ranks[pos].sum(axis=0) - n1 * (n1 + 1) / 2.0
    return u / (n1 * n0)


def signed_auc(auc: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """AUC of ``sign * x`` given the AUC of ``x``: 1 - AUC for negative sign, 0.5 for zero."""
    return np.where(sign > 0, auc, np.where(sign < 0, 1.0 - auc, 0.5))


def class_mean_diff(x: np.ndarray, y: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """mean(x | y=1) - mean(x | y=0) per column, in float64 (column chunks: no full float64 copy)."""
    x = np.asarray(x)
    pos = np.asarray(y).astype(bool)
    out = np.empty(x.shape[1], dtype=np.float64)
    for i in range(0, x.shape[1], chunk):
        xc = np.asarray(x[:, i:i + chunk], dtype=np.float64)
        out[i:i + chunk] = xc[pos].mean(axis=0) - xc[~pos].mean(axis=0)
    return out


def prefilter(x_train: np.ndarray, y_train: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the top-k features by |class-mean difference| (all when top_k <= 0), stable order."""
    diff = np.abs(class_mean_diff(x_train, y_train))
    diff = np.nan_to_num(diff, nan=-1.0)
    order = np.argsort(-diff, kind="stable")
    return order if top_k is None or top_k <= 0 else order[: min(top_k, len(order))]


def stratified_folds(y: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds LogisticRegressionCV(cv=n_folds) uses for a classifier: StratifiedKFold, no shuffle."""
    y = np.asarray(y)
    return list(StratifiedKFold(n_splits=n_folds).split(np.zeros((len(y), 1)), y))


def _near_null(x: np.ndarray, y: np.ndarray, scale: np.ndarray, center: np.ndarray, tol: float,
               margin: float) -> np.ndarray:
    """Features whose fitted sign scikit-learn could leave at 0 or get wrong on this fitting set.

    With z the standardised feature, L-BFGS stops when every gradient entry is <= tol. On the wrong
    side of 0 (or at 0) the profile gradient in w is at least |cov(z, y)|, and an intercept that is
    off by <= tol / H_bb shifts it by at most |mean(z)| tol, so a stop there needs
    |cov(z, y)| <= tol (1 + |mean(z)|). ``margin`` multiplies that bound for safety.
    """
    pos = np.asarray(y).astype(bool)
    p = pos.mean()
    cov = p * (1 - p) * np.abs(class_mean_diff(x, y)) / scale
    m = np.abs(x.mean(axis=0) - center) / scale
    return cov <= margin * tol * (1.0 + m)


def _scale(x_train: np.ndarray) -> np.ndarray:
    """StandardScaler's scale: the std, or 1 where the feature is (numerically) constant."""
    std = x_train.std(axis=0)
    mean = np.abs(x_train.mean(axis=0))
    n = x_train.shape[0]
    eps = np.finfo(np.float64).eps
    constant = std**2 <= (n * eps * std**2 + (n * mean * eps) ** 2)
    return np.where(constant, 1.0, std)


def one_d_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                top_k: int = 512, n_folds: int = 5, Cs: tuple[float, ...] = CS, tol: float = TOL,
                exact: bool = True, prune: bool = True, margin: float = 2.0, max_iter: int = 1000,
                seed: int = 1) -> OneDResult:
    """Run the 1-D protocol (pre-filter, per-feature 5-fold CV AUC, pick by CV AUC, test AUC) from ranks.

    ``exact``: near-null candidates are re-fitted with scikit-learn. ``prune``: only those whose CV AUC
    could still reach the best (its bound: every fold at max(AUC, 1 - AUC)); the others cannot be
    selected and keep their rank-based (exact-arithmetic) values.
    """
    x_train = np.asarray(x_train)
    x_test = np.asarray(x_test)
    y_train = np.asarray(y_train).astype(np.int64)
    y_test = np.asarray(y_test).astype(np.int64)
    cand = prefilter(x_train, y_train, top_k)
    xtr = np.asarray(x_train[:, cand], dtype=np.float64)
    xte = np.asarray(x_test[:, cand], dtype=np.float64)
    scale = _scale(xtr)
    center = xtr.mean(axis=0)
    constant = np.ptp(xtr, axis=0) == 0
    folds = stratified_folds(y_train, n_folds)

    fold_auc = np.empty((len(folds), len(cand)))
    bound = np.zeros(len(cand))
    near_null = np.zeros(len(cand), dtype=bool)
    for k, (tr, va) in enumerate(folds):
        sign = np.sign(class_mean_diff(xtr[tr], y_train[tr]))
        auc = rank_auc(xtr[va], y_train[va])
        fold_auc[k] = signed_auc(auc, sign)
        bound += np.maximum(auc, 1.0 - auc) / len(folds)
        near_null |= _near_null(xtr[tr], y_train[tr], scale, center, tol, margin)
    cv_auc = fold_auc.mean(axis=0)
    sign_full = np.sign(class_mean_diff(xtr, y_train)).astype(np.int64)
    near_null |= _near_null(xtr, y_train, scale, center, tol, margin)
    test_auc = signed_auc(rank_auc(xte, y_test), sign_full)
    chosen_c = np.full(len(cand), Cs[0], dtype=np.float64)

    cv_auc[constant] = 0.5
    test_auc[constant] = 0.5
    sign_full[constant] = 0
    near_null &= ~constant
    todo = np.flatnonzero(near_null) if exact else np.array([], dtype=np.int64)
    todo = todo[np.argsort(-bound[todo], kind="stable")]
    best_exact = cv_auc[~near_null].max() if (~near_null).any() else -np.inf
    redo = []
    for j in todo:
        if prune and bound[j] < best_exact - 1e-12:
            break  # bounds are sorted: no remaining near-null candidate can be selected
        r = sklearn_one_d(xtr[:, j], y_train, xte[:, j], y_test, Cs=Cs, n_folds=n_folds, tol=tol,
                          max_iter=max_iter, seed=seed)
        cv_auc[j], test_auc[j], sign_full[j], chosen_c[j] = r["cv_auc"], r["test_auc"], r["sign"], r["C"]
        best_exact = max(best_exact, cv_auc[j])
        redo.append(j)

    best = int(np.argmax(cv_auc))  # first maximum: candidate order breaks ties, as in the reference
    return OneDResult(best=int(cand[best]), cv_auc=float(cv_auc[best]), test_auc=float(test_auc[best]),
                      sign=int(sign_full[best]), C=float(chosen_c[best]), candidates=cand,
                      cand_cv_auc=cv_auc, cand_test_auc=test_auc, n_sklearn=len(redo),
                      extra={"n_near_null": int(near_null.sum())})


def sklearn_one_d(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  Cs: tuple[float, ...] = CS, n_folds: int = 5, tol: float = TOL, max_iter: int = 1000,
                  seed: int = 1) -> dict:
    """The reference 1-D fit for one feature: StandardScaler + LogisticRegressionCV, ROC-AUC scoring."""
    xtr = np.asarray(x_train, dtype=np.float64).reshape(-1, 1)
    xte = np.asarray(x_test, dtype=np.float64).reshape(-1, 1)
    pipe = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=list(Cs), cv=n_folds, scoring="roc_auc", max_iter=max_iter, tol=tol, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        pipe.fit(xtr, np.asarray(y_train))
    lr = pipe[-1]
    scores = lr.scores_[lr.classes_[1]]  # (folds, Cs)
    best_c = int(np.flatnonzero(np.asarray(lr.Cs_) == lr.C_[0])[0])
    return {"cv_auc": float(scores.mean(axis=0)[best_c]),
            "test_auc": float(roc_auc_score(np.asarray(y_test), pipe.predict_proba(xte)[:, 1])),
            "sign": int(np.sign(lr.coef_[0, 0])), "C": float(lr.C_[0]), "fold_auc": scores[:, best_c]}
