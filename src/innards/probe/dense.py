"""Dense probing: one L2 logistic regression on all features of a set (paper App. D.2).

Same estimator as the 1-D protocol (StandardScaler -> LogisticRegressionCV over the same Cs, 5-fold
stratified CV, ROC-AUC scoring), fitted on every feature at once. For feature sets made of blocks
(GLP meta-neurons) one probe is fitted per block and the block with the best CV AUC is reported, as
the paper does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from innards.probe.onedim import CS, TOL


@dataclass
class DenseResult:
    """Outcome of dense probing on one task and one feature set."""

    cv_auc: float
    test_auc: float
    C: float
    block: int | None  # the chosen block, when the set has several
    block_cv_auc: list[float] | None = None


def fit_dense(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              Cs: tuple[float, ...] = CS, n_folds: int = 5, max_iter: int = 1000, tol: float = TOL,
              seed: int = 1) -> tuple[float, float, float]:
    """(cv_auc at the chosen C, test AUC, C) of one standardised L2 logistic regression."""
    pipe = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=list(Cs), cv=n_folds, scoring="roc_auc", max_iter=max_iter, tol=tol, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        pipe.fit(np.asarray(x_train, dtype=np.float64), np.asarray(y_train))
    lr = pipe[-1]
    scores = lr.scores_[lr.classes_[1]]
    best_c = int(np.flatnonzero(np.asarray(lr.Cs_) == lr.C_[0])[0])
    test = roc_auc_score(np.asarray(y_test), pipe.decision_function(np.asarray(x_test, dtype=np.float64)))
    return float(scores.mean(axis=0)[best_c]), float(test), float(lr.C_[0])


def dense_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                blocks: int = 1, **kw) -> DenseResult:
    """Dense probe on all features, or per block (equal column groups) keeping the best CV AUC."""
    if blocks <= 1:
        cv, test, c = fit_dense(x_train, y_train, x_test, y_test, **kw)
        return DenseResult(cv, test, c, None)
    width = x_train.shape[1] // blocks
    results = [fit_dense(x_train[:, b * width:(b + 1) * width], y_train, x_test[:, b * width:(b + 1) * width],
                         y_test, **kw) for b in range(blocks)]
    best = int(np.argmax([r[0] for r in results]))
    cv, test, c = results[best]
    return DenseResult(cv, test, c, best, [r[0] for r in results])
