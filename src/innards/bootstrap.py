"""Percentile bootstrap confidence intervals (seeded, NaN-aware), shared by steering and probing."""

from __future__ import annotations

import math

import numpy as np


def bootstrap_ci(values: "np.ndarray | list[float]", n_resamples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the NaN-ignoring mean and its percentile bootstrap CI.

    The resampling indices depend only on ``seed`` and the number of values, so every method and
    strength evaluated on the same prompts with the same seed is resampled jointly (a paired
    bootstrap across cells, as in the paper's SAE-steering plot).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or np.all(np.isnan(x)):
        return (math.nan, math.nan, math.nan)
    mean = float(np.nanmean(x))
    if x.size == 1:
        return (mean, mean, mean)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    # chunks keep memory bounded for many prompts x many resamples
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        sample = x[idx]
        with np.errstate(invalid="ignore"):
            # a resample can draw only NaNs (e.g. every continuation too short); it carries no information
            counts = np.sum(~np.isnan(sample), axis=1)
            sums = np.nansum(sample, axis=1)
            means[start:stop] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    tail = (1.0 - level) / 2.0
    lo, hi = np.nanquantile(means, [tail, 1.0 - tail])
    return (mean, float(lo), float(hi))
