"""Classifier two-sample test: can a small MLP tell real activations from generated ones?

The answer is the held-out ROC-AUC: 0.5 means the classifier cannot separate the two sets (the
ideal for a generator), 1.0 means they are perfectly separable.  Unlike the Fréchet distance it
sees beyond the first two moments, so a Gaussian with the data's mean and covariance no longer
scores near the floor.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from innards.glp.fd import Rows


def _np(x: Rows) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


def _summaries(z: np.ndarray) -> np.ndarray:
    """log L2 norm and log max |z_i| of standardised rows: tails and norms a small MLP finds hard to compute."""
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    peak = np.abs(z).max(axis=1, keepdims=True)
    return np.log(np.concatenate([norm, peak], axis=1) + 1e-6)


def c2st_auc(real: Rows, fake: Rows, seed: int = 0, test_frac: float = 0.5, hidden: tuple[int, ...] = (256, 256),
             max_iter: int = 200, summaries: bool = True) -> float:
    """Held-out ROC-AUC of an MLP trained to tell ``real`` rows from ``fake`` rows (0.5 = indistinguishable).

    With ``summaries`` the classifier also sees two functions of each standardised row (log norm, log
    max-abs coordinate): with a few thousand rows an MLP misses heavy tails it could in principle
    learn (Student-t vs a Gaussian of equal variance in 128-d: AUC 0.53 without, 0.95 with). Any
    function of x keeps the test valid: under identical distributions the AUC is still 0.5.
    """
    a, b = _np(real), _np(fake)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"width mismatch: {a.shape[1]} vs {b.shape[1]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("non-finite values in the two-sample test inputs")
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    if n < 8:
        raise ValueError(f"need at least 8 rows per set, got {n}")
    # balance the classes so that AUC 0.5 is the chance level whatever the set sizes
    a = a[rng.permutation(len(a))[:n]]
    b = b[rng.permutation(len(b))[:n]]
    X = np.concatenate([a, b])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_frac, stratify=y, random_state=seed)
    # scaled on the training half only, so nothing about the test half leaks into the classifier
    scaler = StandardScaler().fit(Xtr)
    Ztr, Zte = scaler.transform(Xtr), scaler.transform(Xte)
    if summaries:
        Ztr, Zte = np.concatenate([Ztr, _summaries(Ztr)], 1), np.concatenate([Zte, _summaries(Zte)], 1)
        extra = StandardScaler().fit(Ztr)
        Ztr, Zte = extra.transform(Ztr), extra.transform(Zte)
    clf = MLPClassifier(hidden_layer_sizes=hidden, early_stopping=True, validation_fraction=0.1,
                        n_iter_no_change=10, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(Ztr, ytr)
    p = clf.predict_proba(Zte)[:, 1]
    return float(roc_auc_score(yte, p))
