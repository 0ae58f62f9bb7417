"""The activation store, read side: ``ActivationStore(DIR)`` and its shuffling, resumable loader.

On disk (written by :mod:`innards.data.harvest` through :class:`innards.data.shards.ShardWriter`)::

    DIR/manifest.json                 self-description; written last, so its presence means "complete"
    DIR/docs.json                     doc table: stream index -> document id, and the train/val flag
    DIR/stats.safetensors             per-site float64 mean/var/M2/count/norms over the whole store
    DIR/shards/NAME.SITE.npy          (rows, width) activations of one shard and site (.npy, mmap-able)
    DIR/shards/NAME.index.npy         per row: doc (int64 stream index), pos (int32), tok (int32)

Each shard file is listed in the manifest with its byte size and SHA-256; a shard is verified when
first opened (``verify="open"``, the default), so a truncated or corrupted file raises
:class:`~innards.errors.ChecksumError` instead of returning garbage. bf16 activations are stored
as their raw uint16 bit patterns (numpy has no bfloat16); :func:`decode` turns them back into floats.
Every reader goes through :func:`read_manifest`, which checks the manifest's fields before use.

Indexing reads raw float32 rows like a map-style ``torch.utils.data.Dataset``: ``store[i]`` is one
row, ``store[a:b]``, ``store[[i, j]]``, a numpy/torch index array or a boolean mask of ``len(store)``
give ``(n, d)`` (``(n, n_sites, d)`` for several sites of one width); negative indices count from
the end. Rows are numbered in store order (shard by shard, each rank's shards in turn).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from innards.errors import ChecksumError, InnardsError
from innards.io import read_json, sha256_file
from innards.tensors import load_tensors

FORMAT = "innards.activation_store"
FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype([("doc", "<i8"), ("pos", "<i4"), ("tok", "<i4")])
STORAGE = {"bf16": np.dtype("<u2"), "fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
BF16_NOTE = "bf16 rows are stored as uint16 bit patterns: float32 = (u16.astype(uint32) << 16).view(float32)"
VERIFY_MODES = ("open", "size", "none")


def encode(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Float activations -> the storage numpy array of ``dtype`` (bf16|fp16|fp32), rounding to nearest."""
    if dtype == "bf16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    if dtype == "fp16":
        return x.to(torch.float16).cpu().numpy()
    if dtype == "fp32":
        return x.to(torch.float32).cpu().numpy()
    raise InnardsError(f"unknown store dtype '{dtype}' (choose bf16, fp16 or fp32)")


def decode(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows -> float32 tensor."""
    if dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def site_file(name: str, site: str) -> str:
    """File name (inside ``shards/``) of one shard's rows for one site."""
    return f"{name}.{site}.npy"


def _release(arr: np.ndarray) -> None:
    """Drop a memory map's pages from this process's RSS after a read (the page cache keeps them),
    so resident memory does not grow with the size of the store."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _manifest_error(path: Path, what: str) -> InnardsError:
    return InnardsError(f"store manifest {path} is damaged: {what} (re-harvest the store, or restore manifest.json)")


def _is_file_entry(f: object) -> bool:
    return isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a finished store, checked field by field (one-line InnardsError on anything missing or wrong)."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        if (folder / "harvest.json").is_file():
            raise InnardsError(f"activation store {folder} is incomplete (rerun the same harvest command to finish it)")
        raise InnardsError(f"no activation store at {folder} (manifest.json missing)")
    m = read_json(mpath, "store manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InnardsError(f"{mpath} is not an innards activation store manifest")
    version = m.get("format_version", 0)
    if not isinstance(version, int):
        raise _manifest_error(mpath, f"format_version is {version!r}")
    if version > FORMAT_VERSION:
        raise InnardsError(f"store {folder} has format version {version}; this innards reads up to {FORMAT_VERSION}")
    if m.get("dtype") not in STORAGE:
        raise _manifest_error(mpath, f"dtype is {m.get('dtype')!r}, not one of {', '.join(STORAGE)}")
    sites = m.get("sites")
    if not isinstance(sites, list) or not sites or not all(
            isinstance(x, dict) and isinstance(x.get("site"), str) and isinstance(x.get("width"), int) and x["width"] > 0
            for x in sites):
        raise _manifest_error(mpath, "'sites' is missing or not a list of {site, width}")
    names = [x["site"] for x in sites]
    if len(set(names)) != len(names):
        raise _manifest_error(mpath, "a site is listed twice")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise _manifest_error(mpath, "'shards' is missing or not a list")
    for i, sh in enumerate(shards):
        files = sh.get("files") if isinstance(sh, dict) else None
        if not (isinstance(files, dict) and isinstance(sh.get("rows"), int) and sh["rows"] >= 0
                and all(_is_file_entry(files.get(k)) and isinstance(files[k].get("bytes"), int) for k in [*names, "index"])):
            raise _manifest_error(mpath, f"shard {i} lacks its rows or a file entry (path, bytes, sha256) for each site and the index")
    if not isinstance(m.get("tokens"), int) or m["tokens"] != sum(sh["rows"] for sh in shards):
        raise _manifest_error(mpath, f"token count {m.get('tokens')!r} disagrees with the shards' rows ({sum(sh['rows'] for sh in shards)})")
    for key in ("stats", "docs"):
        if not _is_file_entry(m.get(key)):
            raise _manifest_error(mpath, f"'{key}' is missing or lacks path and sha256")
    split = m.get("split")
    if not isinstance(split, dict) or not isinstance(split.get("val_fraction"), (int, float)):
        raise _manifest_error(mpath, "'split' is missing or lacks val_fraction")
    return m


class ActivationStore:
    """A finished activation store: sites, rows, statistics and a loader (see module docstring)."""

    def __init__(self, path: str | os.PathLike, verify: str = "open"):
        self.path = Path(path)
        if verify not in VERIFY_MODES:
            raise InnardsError(f"unknown verify mode '{verify}' (choose {', '.join(VERIFY_MODES)})")
        self.verify_mode = verify
        m = read_manifest(self.path)
        self.manifest: dict = m
        self.dtype: str = m["dtype"]
        self._sites = [s["site"] for s in m["sites"]]
        self._widths = {s["site"]: int(s["width"]) for s in m["sites"]}
        self._shards = m["shards"]
        rows = np.array([int(s["rows"]) for s in self._shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._n = int(self._offsets[-1])
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self._index: np.ndarray | None = None
        self._stats: dict[str, dict] | None = None
        self._docs: dict | None = None

    # ------------------------------------------------------------ description

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, rows={self._n}, sites={self._sites}, dtype={self.dtype})"

    @property
    def sites(self) -> list[str]:
        """Canonical names of the stored sites, in storage order."""
        return list(self._sites)

    def width(self, site: str | None = None) -> int:
        """Width (d) of a site (the only site when None)."""
        return self._widths[self.site(site)]

    def site(self, site: str | None = None) -> str:
        """The stored site's canonical name for a name, its TransformerLens or HF spelling, or None (the only site)."""
        if site is None:
            if len(self._sites) != 1:
                raise InnardsError(f"store has several sites ({', '.join(self._sites)}); name one")
            return self._sites[0]
        if site in self._widths:
            return site
        for s in self.manifest["sites"]:  # TransformerLens / HF spellings recorded at harvest time
            if site in (s.get("tl_name"), s.get("hf_module")):
                return s["site"]
        raise InnardsError(f"site '{site}' is not in store {self.path} (sites: {', '.join(self._sites)})")

    # ------------------------------------------------------------ statistics and provenance

    def stats(self, site: str | None = None) -> dict:
        """{"mean", "var" (float64 arrays), "count", "mean_norm", "rms_norm"} of a site over the whole store."""
        if self._stats is None:
            info = self.manifest["stats"]
            t = load_tensors(self.path / info["path"], sha256=info["sha256"], what="store statistics")
            out = {}
            for s in self._sites:
                out[s] = {"mean": t[f"{s}.mean"].numpy(), "var": t[f"{s}.var"].numpy(),
                          "count": int(t[f"{s}.count"][0]), "mean_norm": float(t[f"{s}.mean_norm"][0]),
                          "rms_norm": float(t[f"{s}.rms_norm"][0])}
            self._stats = out
        st = self._stats[self.site(site)]
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}

    def _load_index(self) -> np.ndarray:
        if self._index is None:
            parts = [self._open(i, "index") for i in range(len(self._shards))]
            self._index = np.concatenate(parts) if parts else np.zeros(0, INDEX_DTYPE)
        return self._index

    @property
    def doc_ids(self) -> np.ndarray:
        """Per row: the document's stream index (an index into :attr:`doc_table`), int64."""
        return self._load_index()["doc"]

    @property
    def positions(self) -> np.ndarray:
        """Per row: the token's position within its document (content tokens, from 0), int32."""
        return self._load_index()["pos"]

    @property
    def token_ids(self) -> np.ndarray:
        """Per row: the token id, int32."""
        return self._load_index()["tok"]

    def _doc_info(self) -> dict:
        if self._docs is None:
            info = self.manifest["docs"]
            p = self.path / info["path"]
            if not p.is_file() or sha256_file(p) != info["sha256"]:
                raise ChecksumError(f"store document table {p} is missing or corrupted (checksum mismatch)")
            self._docs = read_json(p, "store document table")
        return self._docs

    @property
    def doc_table(self) -> list[str | None]:
        """Document id (e.g. ``file.txt:12``) of every stream index; None for documents never harvested."""
        return list(self._doc_info()["ids"])

    def val_docs(self) -> np.ndarray:
        """Boolean per stream index: is the document in the validation split."""
        return np.asarray(self._doc_info()["val"], dtype=bool)

    def split_rows(self, split: str | None) -> np.ndarray:
        """Row indices of a split (None: every row), ascending."""
        if split is None:
            return np.arange(self._n, dtype=np.int64)
        if split not in ("train", "val"):
            raise InnardsError(f"unknown split '{split}' (choose train or val, or None for every row)")
        val = self.val_docs()[self.doc_ids]
        rows = np.flatnonzero(val if split == "val" else ~val).astype(np.int64)
        if len(rows) == 0:
            raise InnardsError(f"store {self.path} has no '{split}' rows (documents: {len(self._doc_info()['ids'])}, "
                               f"val fraction {self.manifest['split']['val_fraction']})")
        return rows

    # ------------------------------------------------------------ shard access

    def _file(self, shard: int, key: str) -> dict:
        return self._shards[shard]["files"][key]

    def _open(self, shard: int, key: str) -> np.ndarray:
        """Memory-map one shard file, checking size, checksum (verify="open") and shape first."""
        with self._lock:
            hit = self._maps.get((shard, key))
            if hit is not None:
                return hit
            info = self._file(shard, key)
            p = self.path / info["path"]
            if not p.is_file():
                raise ChecksumError(f"shard file missing: {p}")
            if self.verify_mode != "none" and p.stat().st_size != int(info["bytes"]):
                raise ChecksumError(f"shard {p} is truncated or corrupted (size {p.stat().st_size}, expected {info['bytes']})")
            if self.verify_mode == "open" and sha256_file(p) != info["sha256"]:
                raise ChecksumError(f"shard {p} is corrupted (checksum mismatch)")
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ChecksumError(f"shard {p} does not load: {str(e).splitlines()[0][:160]}") from None
            rows = int(self._shards[shard]["rows"])
            want = (rows,) if key == "index" else (rows, self._widths[key])
            dtype = INDEX_DTYPE if key == "index" else STORAGE[self.dtype]
            if arr.shape != want or arr.dtype != dtype:
                raise ChecksumError(f"shard {p} has shape {arr.shape} {arr.dtype}, expected {want} {dtype}")
            self._maps[(shard, key)] = arr
            return arr

    def verify(self) -> dict:
        """Check every file's size and SHA-256 against the manifest; raises ChecksumError on the first bad one."""
        n = 0
        for shard in self._shards:
            for info in shard["files"].values():
                p = self.path / info["path"]
                if not p.is_file():
                    raise ChecksumError(f"shard file missing: {p}")
                if p.stat().st_size != int(info["bytes"]) or sha256_file(p) != info["sha256"]:
                    raise ChecksumError(f"shard {p} is truncated or corrupted (checksum mismatch)")
                n += 1
        for key in ("stats", "docs"):
            info = self.manifest[key]
            p = self.path / info["path"]
            if not p.is_file() or sha256_file(p) != info["sha256"]:
                raise ChecksumError(f"store file {p} is missing or corrupted (checksum mismatch)")
            n += 1
        return {"files": n, "rows": self._n, "ok": True}

    def _norm(self, sites: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.stack([torch.from_numpy(self.stats(s)["mean"]) for s in sites]).float()
        var = torch.stack([torch.from_numpy(self.stats(s)["var"]) for s in sites])
        std = var.clamp_min(1e-12).sqrt().float()  # constant dimensions would otherwise divide by zero
        return mean, std

    def _sites_arg(self, site: str | Sequence[str] | None) -> list[str]:
        if site is None:
            return list(self._sites)
        if isinstance(site, str):
            return [self.site(site)]
        names = [self.site(s) for s in site]
        if not names:
            raise InnardsError("no sites given")
        return names

    def _gather(self, idx: np.ndarray, sites: list[str], normalize: bool) -> torch.Tensor:
        """Rows ``idx`` (any order) of ``sites`` as float32 (n, n_sites, d), read shard by shard."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self._n):
            raise InnardsError(f"row index out of range (store has {self._n} rows)")
        widths = {self._widths[s] for s in sites}
        if len(widths) != 1:
            raise InnardsError(f"sites {', '.join(sites)} have different widths; read them one at a time")
        d = widths.pop()
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        shard = np.searchsorted(self._offsets, sidx, side="right") - 1
        buf = np.empty((len(idx), len(sites), d), dtype=STORAGE[self.dtype])
        cuts = np.flatnonzero(np.diff(shard)) + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(idx)]])):
            if lo == hi:
                continue
            s = int(shard[lo])
            local = sidx[lo:hi] - self._offsets[s]  # ascending: memmap reads walk forward
            for j, site in enumerate(sites):
                arr = self._open(s, site)
                buf[lo:hi, j] = arr[local]
                _release(arr)
        out = np.empty_like(buf)
        out[order] = buf
        x = decode(out, self.dtype)
        if normalize:
            mean, std = self._norm(sites)
            x = (x - mean) / std
        return x

    def rows(self, index: Sequence[int] | np.ndarray | torch.Tensor, site: str | Sequence[str] | None = None,
             normalize: bool = False) -> torch.Tensor:
        """Rows by global index as float32: (n, d) for one site, (n, n_sites, d) for several."""
        idx = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        names = self._sites_arg(site)
        x = self._gather(idx, names, normalize)
        return x[:, 0] if len(names) == 1 else x

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw float32 rows by position (see module docstring): ``(d,)`` for an int, ``(n, d)`` otherwise."""
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            i = int(index)
            if not -self._n <= i < self._n:
                raise IndexError(f"row {i} is out of range for a store of {self._n} rows")
            return self.rows([i % self._n])[0]
        if isinstance(index, slice):
            idx = np.arange(self._n, dtype=np.int64)[index]
        else:
            idx = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
            if idx.dtype == bool:
                if idx.shape != (self._n,):
                    raise IndexError(f"boolean mask of shape {idx.shape} for a store of {self._n} rows")
                idx = np.flatnonzero(idx)
            elif idx.size and not np.issubdtype(idx.dtype, np.integer):
                raise IndexError(f"store rows are indexed by integers, slices or boolean masks, not {idx.dtype}")
            idx = idx.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -self._n or idx.max() >= self._n):
                raise IndexError(f"row index out of range for a store of {self._n} rows")
            idx = np.where(idx < 0, idx + self._n, idx)
        return self.rows(idx)

    def loader(self, batch_size: int, shuffle: bool = True, seed: int = 0, normalize: bool = True,
               sites: str | Sequence[str] | None = None, split: str | None = None, drop_last: bool = False,
               prefetch: bool = True) -> "StoreLoader":
        """Batches of float32 rows, (B, d) for one site or (B, n_sites, d); one epoch per iteration."""
        return StoreLoader(self, batch_size, shuffle, seed, normalize, sites, split, drop_last, prefetch)


class StoreLoader:
    """Iterates one epoch per ``for`` loop over a global permutation of the split's rows (new one each epoch).

    ``state_dict()`` records the epoch and how many batches were yielded; a loader given it by
    ``load_state_dict`` yields exactly the batches the original would have yielded next.
    """

    def __init__(self, store: ActivationStore, batch_size: int, shuffle: bool, seed: int, normalize: bool,
                 sites: str | Sequence[str] | None, split: str | None, drop_last: bool, prefetch: bool = True):
        if int(batch_size) <= 0:
            raise InnardsError(f"batch size must be positive, got {batch_size}")
        self.store, self.batch_size, self.shuffle, self.seed = store, int(batch_size), bool(shuffle), int(seed)
        self.normalize, self.split, self.drop_last, self.prefetch = bool(normalize), split, bool(drop_last), prefetch
        self.sites = store._sites_arg(sites)
        self._squeeze = isinstance(sites, str) or (sites is None and len(self.sites) == 1)
        rows = store.split_rows(split)
        # int32 halves the permutation's memory for stores under 2**31 rows
        self._rows = rows.astype(np.int32) if store._n < 2**31 else rows
        self.epoch = 0
        self.batch = 0
        if len(self) == 0:
            raise InnardsError(f"batch size {batch_size} with drop_last leaves no batch ({len(self._rows)} rows)")

    def __len__(self) -> int:
        n = len(self._rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def rows(self) -> int:
        """Rows per epoch (before drop_last)."""
        return len(self._rows)

    def order(self, epoch: int) -> np.ndarray:
        """The row order of an epoch: a permutation seeded by (seed, epoch), or ascending."""
        if not self.shuffle:
            return self._rows
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._rows))
        return self._rows[perm]

    def _load(self, order: np.ndarray, b: int) -> torch.Tensor:
        x = self.store._gather(order[b * self.batch_size : (b + 1) * self.batch_size], self.sites, self.normalize)
        return x[:, 0] if self._squeeze else x

    def __iter__(self) -> Iterator[torch.Tensor]:
        nb, start = len(self), self.batch
        order = self.order(self.epoch)
        if not self.prefetch:
            for b in range(start, nb):
                x = self._load(order, b)
                self.batch = b + 1
                yield x
        else:
            # read batch b+1 while the caller works on batch b (numpy copies release the GIL)
            with ThreadPoolExecutor(1, thread_name_prefix="innards-loader") as pool:
                nxt = pool.submit(self._load, order, start) if start < nb else None
                for b in range(start, nb):
                    x = nxt.result()
                    nxt = pool.submit(self._load, order, b + 1) if b + 1 < nb else None
                    self.batch = b + 1
                    yield x
        self.epoch += 1
        self.batch = 0

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (epoch, batches yielded) and what it was built with."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "split": self.split, "rows": len(self._rows),
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one saved from a differently built loader."""
        for key in ("seed", "shuffle", "batch_size", "split", "rows", "drop_last"):
            if key in state and state[key] != self.state_dict()[key]:
                raise InnardsError(f"loader state was saved with {key}={state[key]!r}, this loader has {self.state_dict()[key]!r}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
