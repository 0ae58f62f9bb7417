"""Where a trainer's activations come from: the `Source` protocol, and the activation store as a source.

The other source, a live harvest through a bounded buffer, is :class:`innards.data.stream.StreamSource`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypedDict

import numpy as np
import torch
from tqdm import tqdm

from innards.data.stats import Moments
from innards.data.store import ActivationStore, StoreLoader
from innards.errors import InnardsError


class SiteStats(TypedDict, total=False):
    """Normalisation statistics of one site (float64 arrays; ``source`` says what they cover when not every row)."""

    mean: np.ndarray
    var: np.ndarray
    count: int
    mean_norm: float
    rms_norm: float
    source: str


class Source(Protocol):
    """What a trainer needs from its data: raw float32 batches with a resumable position, statistics, provenance.

    ``sites`` and ``width`` are attributes; the methods up to ``close`` are required. The last three
    are optional capabilities: a source that subclasses ``Source`` inherits their defaults, which
    say "not needed here", so a trainer calls them on every source without probing.
    """

    sites: list[str]
    width: int

    def stats(self, site: str) -> SiteStats:
        """Statistics the trainer normalises with."""
        ...

    def meta(self) -> dict[str, Any]:
        """Provenance recorded with the trained model (model, sites, site info, index convention, store)."""
        ...

    def train_rows(self) -> int | None:
        """Rows of one epoch of the training split; None when the source has no end (a stream)."""
        ...

    def next_batch(self) -> torch.Tensor:
        """The next training batch, (B, d) or (B, n_sites, d); epochs follow one another."""
        ...

    def val_batch(self, n: int, seed: int) -> torch.Tensor | None:
        """Up to ``n`` held-out rows (the same for the same seed); None when there are none."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position; ``load_state_dict`` of it continues with exactly the batches that came next."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict``."""
        ...

    def identity(self) -> dict[str, Any]:
        """What a resumed run must find unchanged (compared as JSON)."""
        ...

    def close(self) -> None:
        """Release what the source holds (a producer process, files)."""
        ...

    def scan_nonfinite(self) -> tuple[int, dict[str, SiteStats]] | None:
        """Count rows with NaN/inf and recompute the statistics over the finite ones.

        Default None: the source cannot rescan (a stream drops non-finite rows in its warm-up pass),
        so non-finite statistics are an error.
        """
        return None

    def after_save(self, state: dict[str, Any]) -> None:
        """A resume state is on disk; the source may free what it no longer needs. Default: nothing to free."""
        return None

    def set_commit_hook(self, fn: Callable[[], None]) -> None:
        """Give the source ``fn()``, which saves a resume state (the stream calls it to free buffer room).
        Default: never needed, ignored."""
        return None


class StoreSource(Source):
    """Batches of raw rows from an ActivationStore's train split, epoch after epoch, resumable."""

    def __init__(self, path: str | Path, sites: list[str] | None, batch_tokens: int, seed: int):
        self.store = ActivationStore(path)
        self.path = Path(path)
        self.sites = [self.store.site(s) for s in sites] if sites else list(self.store.sites)
        widths = {self.store.width(s) for s in self.sites}
        if len(widths) != 1:
            raise InnardsError(f"sites {', '.join(self.sites)} have different widths {sorted(widths)}; train one GLP per width")
        self.width = widths.pop()
        self.batch_tokens = batch_tokens
        self.seed = seed
        self._loader: StoreLoader | None = None
        self._it: Iterator[torch.Tensor] | None = None

    def _site_arg(self) -> str | list[str]:
        return self.sites[0] if len(self.sites) == 1 else self.sites

    def _ensure(self) -> StoreLoader:
        if self._loader is None:
            # the loader reshuffles every epoch with a permutation seeded by (seed, epoch)
            self._loader = self.store.loader(self.batch_tokens, shuffle=True, seed=self.seed, normalize=False,
                                             sites=self._site_arg(), split="train", drop_last=False)
            self._it = iter(self._loader)
        return self._loader

    def stats(self, site: str) -> SiteStats:
        return SiteStats(**self.store.stats(site))

    def meta(self) -> dict[str, Any]:
        man = self.store.manifest
        info = [s for s in man["sites"] if s.get("site") in self.sites]
        conv = man.get("index_convention") or next((s.get("index_convention") for s in info if s.get("index_convention")), None)
        return {"model": man.get("model") or man.get("source_model"), "sites": self.sites, "site_info": info or None,
                "index_convention": conv, "store": str(self.path)}

    def train_rows(self) -> int | None:
        return len(self.store.split_rows("train"))

    def next_batch(self) -> torch.Tensor:
        loader = self._ensure()
        try:
            return next(self._it)
        except StopIteration:  # end of an epoch: the loader has moved to the next permutation
            self._it = iter(loader)
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
        return self._ensure().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loader = self._ensure()
        loader.load_state_dict(state)
        self._it = iter(loader)

    def identity(self) -> dict[str, Any]:
        return {"store": str(self.path.resolve()), "rows": len(self.store), "sites": self.sites}

    def scan_nonfinite(self) -> tuple[int, dict[str, SiteStats]]:
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
        return int(bad.sum()), {s: SiteStats(**m.summary()) for s, m in moments.items()}

    def close(self) -> None:
        pass
