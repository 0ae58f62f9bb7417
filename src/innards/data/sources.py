"""Where a trainer's activations come from: the `Source` protocol and the activation store as a source."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from innards.data.stats import Moments
from innards.data.store import ActivationStore
from innards.errors import InnardsError


class Source(Protocol):
    """What the trainer needs from its data: raw batches with resumable position, stats, provenance."""

    sites: list[str]
    width: int

    def stats(self, site: str) -> dict[str, Any]: ...
    def meta(self) -> dict[str, Any]: ...
    def train_rows(self) -> int | None: ...
    def next_batch(self) -> torch.Tensor: ...
    def val_batch(self, n: int, seed: int) -> torch.Tensor | None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def identity(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class StoreSource:
    """Batches of raw rows from an ActivationStore's train split, epoch after epoch, resumable."""

    def __init__(self, path: str | Path, sites: list[str] | None, batch_tokens: int, seed: int):
        self.store = ActivationStore(path)
        self.path = Path(path)
        have = list(self.store.sites)
        self.sites = [self.store._site(s) for s in sites] if sites else have
        widths = {self.store.width(s) for s in self.sites}
        if len(widths) != 1:
            raise InnardsError(f"sites {', '.join(self.sites)} have different widths {sorted(widths)}; train one GLP per width")
        self.width = widths.pop()
        self.batch_tokens = batch_tokens
        self.seed = seed
        self._loader: Any = None
        self._it: Any = None

    def _site_arg(self) -> str | list[str]:
        return self.sites[0] if len(self.sites) == 1 else self.sites

    def _ensure(self) -> None:
        if self._loader is None:
            # the loader reshuffles every epoch with a permutation seeded by (seed, epoch)
            self._loader = self.store.loader(self.batch_tokens, shuffle=True, seed=self.seed, normalize=False,
                                             sites=self._site_arg(), split="train", drop_last=False)
            self._it = iter(self._loader)

    def stats(self, site: str) -> dict[str, Any]:
        return self.store.stats(site)

    def meta(self) -> dict[str, Any]:
        man = self.store.manifest or {}
        info = [s for s in man.get("sites", []) if isinstance(s, dict) and s.get("site") in self.sites]
        conv = man.get("index_convention") or next((s.get("index_convention") for s in info if s.get("index_convention")), None)
        return {"model": man.get("model") or man.get("source_model"), "sites": self.sites, "site_info": info or None,
                "index_convention": conv, "store": str(self.path)}

    def train_rows(self) -> int | None:
        return len(self.store.split_rows("train"))

    def next_batch(self) -> torch.Tensor:
        self._ensure()
        try:
            return next(self._it)
        except StopIteration:  # end of an epoch: the loader has moved to the next permutation
            self._it = iter(self._loader)
            return next(self._it)

    def val_batch(self, n: int, seed: int) -> torch.Tensor | None:
        if n <= 0:
            return None
        try:
            rows = self.store.split_rows("val")
        except InnardsError:
            return None
        pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:n])
        return self.store.rows(rows[pick], site=self._site_arg(), normalize=False)

    def state_dict(self) -> dict[str, Any]:
        self._ensure()
        return self._loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure()
        self._loader.load_state_dict(state)
        self._it = iter(self._loader)

    def identity(self) -> dict[str, Any]:
        return {"store": str(self.path.resolve()), "rows": len(self.store), "sites": self.sites}

    def scan_nonfinite(self) -> tuple[int, dict[str, dict[str, Any]]]:
        """Count rows with NaN/inf over the store and recompute float64 stats over the finite rows."""
        n = len(self.store)
        chunk = 65536
        bad = np.zeros(n, dtype=bool)
        moments = {s: Moments.empty(self.width) for s in self.sites}
        for i in tqdm(range(0, n, chunk), desc="scan for NaN/inf", unit="chunk"):
            idx = np.arange(i, min(n, i + chunk))
            x = self.store.rows(idx, site=self.sites, normalize=False).reshape(len(idx), len(self.sites), -1)
            okrow = torch.isfinite(x).all(-1).all(-1)
            bad[idx] = ~okrow.numpy()
            for j, s in enumerate(self.sites):
                moments[s].update(x[okrow, j].double())
        return int(bad.sum()), {s: m.summary() for s, m in moments.items()}

    def close(self) -> None:
        pass
