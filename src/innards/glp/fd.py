"""Fréchet distance between two sets of activations, in float64 with a stable matrix square root.

FD = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}).  The cross term is computed as the sum
of square roots of the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, which has the
same spectrum as S1 S2 but never produces the complex, ill-conditioned results of a general sqrtm.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

Rows = np.ndarray | torch.Tensor  # (N, d) activations, either kind

_CHUNK = 8192


def _as_2d_f64_chunks(x: Rows) -> Iterator[np.ndarray]:
    """Yield float64 numpy chunks of a (N, d) array or tensor without copying it all at once."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.ndim != 2:
            x = x.reshape(-1, x.shape[-1])
        for i in range(0, x.shape[0], _CHUNK):
            yield x[i:i + _CHUNK].to("cpu", torch.float64).numpy()
    else:
        x = np.asarray(x)
        if x.ndim != 2:
            x = x.reshape(-1, x.shape[-1])
        for i in range(0, x.shape[0], _CHUNK):
            yield np.asarray(x[i:i + _CHUNK], dtype=np.float64)


def moments(x: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of the rows of ``x`` (N, d), accumulated in float64."""
    shift = None
    n = 0
    s = None
    ss = None
    for chunk in _as_2d_f64_chunks(x):
        if shift is None:
            # centring on a first estimate of the mean avoids catastrophic cancellation in X^T X
            shift = chunk.mean(axis=0)
            s = np.zeros_like(shift)
            ss = np.zeros((shift.size, shift.size))
        c = chunk - shift
        n += c.shape[0]
        s += c.sum(axis=0)
        ss += c.T @ c
    if n < 2:
        raise ValueError(f"need at least 2 rows to estimate a covariance, got {n}")
    m = s / n
    cov = (ss - n * np.outer(m, m)) / (n - 1)
    cov = (cov + cov.T) / 2
    return shift + m, cov


def _psd_sqrt(S: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh((S + S.T) / 2)
    return (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T


def trace_sqrt_product(S1: np.ndarray, S2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2, via the eigenvalues of S1^{1/2} S2 S1^{1/2}."""
    S1 = np.asarray(S1, dtype=np.float64)
    S2 = np.asarray(S2, dtype=np.float64)
    r = _psd_sqrt(S1)
    M = r @ S2 @ r
    w = np.linalg.eigvalsh((M + M.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance_from_moments(mu1: np.ndarray, S1: np.ndarray, mu2: np.ndarray, S2: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu1, S1) and N(mu2, S2), in float64."""
    mu1 = np.asarray(mu1, dtype=np.float64).reshape(-1)
    mu2 = np.asarray(mu2, dtype=np.float64).reshape(-1)
    S1 = np.atleast_2d(np.asarray(S1, dtype=np.float64))
    S2 = np.atleast_2d(np.asarray(S2, dtype=np.float64))
    if mu1.shape != mu2.shape or S1.shape != S2.shape or S1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {S1.shape} vs {S2.shape}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(S1) + np.trace(S2) - 2.0 * trace_sqrt_product(S1, S2))
    # rounding can leave a tiny negative number when the two distributions coincide
    return max(fd, 0.0)


def frechet_distance(x: Rows, y: Rows) -> float:
    """Fréchet distance between the Gaussian fits of two sample sets (N, d) and (M, d)."""
    mu1, S1 = moments(x)
    mu2, S2 = moments(y)
    return frechet_distance_from_moments(mu1, S1, mu2, S2)
