"""Per-dimension moments of an activation stream in float64, merged exactly (Chan et al.).

A :class:`Moments` holds count, mean, the sum of squared deviations (M2) and the sum of row L2
norms. Batches are reduced on their own and merged pairwise, so the result does not depend on how
the stream was cut, up to float64 rounding; merging in a fixed order makes it bit-identical, which
is what lets a resumed harvest reproduce an uninterrupted one exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Moments:
    """Count, mean, M2 (sum of squared deviations) and sum of row norms of a set of rows."""

    count: int
    mean: np.ndarray  # float64 (d,)
    m2: np.ndarray  # float64 (d,)
    norm_sum: float = 0.0

    @classmethod
    def empty(cls, d: int) -> "Moments":
        """Moments of no rows."""
        return cls(0, np.zeros(d, np.float64), np.zeros(d, np.float64), 0.0)

    @classmethod
    def of(cls, x: torch.Tensor | np.ndarray) -> "Moments":
        """Moments of the rows of a (n, d) array, computed in float64."""
        # reduced where the rows live (GPU rows never cross to the CPU whole); only (d,) vectors come back
        t = torch.as_tensor(x).detach().to(torch.float64)
        if t.ndim != 2:
            raise ValueError(f"expected (n, d) rows, got shape {tuple(t.shape)}")
        n, d = t.shape
        if n == 0:
            return cls.empty(d)
        mean = t.mean(0)
        m2 = (t - mean).square_().sum(0)
        norm_sum = float(torch.linalg.vector_norm(t, dim=1).sum())
        return cls(n, mean.cpu().numpy(), m2.cpu().numpy(), norm_sum)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def var(self) -> np.ndarray:
        """Population variance (M2 / count), as the reference normalisation uses."""
        return self.m2 / self.count if self.count else np.zeros_like(self.m2)

    def merge(self, other: "Moments") -> "Moments":
        """Moments of the union of both row sets (Chan's parallel update)."""
        if other.count == 0:
            return Moments(self.count, self.mean.copy(), self.m2.copy(), self.norm_sum)
        if self.count == 0:
            return Moments(other.count, other.mean.copy(), other.m2.copy(), other.norm_sum)
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return Moments(n, mean, m2, self.norm_sum + other.norm_sum)

    def update(self, x: torch.Tensor | np.ndarray) -> "Moments":
        """Merge a batch of rows into these moments in place; returns self."""
        m = self.merge(Moments.of(x))
        self.count, self.mean, self.m2, self.norm_sum = m.count, m.mean, m.m2, m.norm_sum
        return self

    def summary(self) -> dict:
        """{mean, var (float64 arrays), count, mean_norm, rms_norm} as stored with an activation store."""
        var = self.var
        return {
            "mean": self.mean.copy(),
            "var": var,
            "count": int(self.count),
            "mean_norm": self.norm_sum / self.count if self.count else 0.0,
            "rms_norm": math.sqrt(float(np.sum(self.mean**2 + var))),
        }

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat float64 tensors (for safetensors) that :meth:`from_tensors` reads back exactly."""
        return {
            f"{prefix}mean": torch.from_numpy(np.ascontiguousarray(self.mean)),
            f"{prefix}m2": torch.from_numpy(np.ascontiguousarray(self.m2)),
            f"{prefix}count": torch.tensor([self.count], dtype=torch.int64),
            f"{prefix}norm_sum": torch.tensor([self.norm_sum], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "Moments":
        """Inverse of :meth:`to_tensors`."""
        return cls(
            int(tensors[f"{prefix}count"][0]),
            tensors[f"{prefix}mean"].to(torch.float64).numpy().copy(),
            tensors[f"{prefix}m2"].to(torch.float64).numpy().copy(),
            float(tensors[f"{prefix}norm_sum"][0]),
        )


def merge_all(parts: list[Moments]) -> Moments:
    """Merge moments left to right (the order is part of the result's bit pattern)."""
    if not parts:
        raise ValueError("nothing to merge")
    out = Moments.empty(parts[0].dim)
    for p in parts:
        out = out.merge(p)
    return out
