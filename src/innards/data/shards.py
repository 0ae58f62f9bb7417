"""The one shard format of activation data, and its writer: fixed-size shards, committed atomically.

A shard ``NAME`` (``r{rank:03d}-{seq:06d}``) in ``FOLDER/shards/`` is::

    NAME.SITE.npy             (rows, width) activations of one site, C order (bf16 as uint16 bit patterns)
    NAME.index.npy            per row: doc (int64 stream index), pos (int32), tok (int32)
    NAME.moments.safetensors  float64 count/mean/M2/norm_sum per site (merged exactly in shard order)
    NAME.json                 the record: rows, every file's size and SHA-256, the documents it holds

Every file is written under a temporary name and renamed; the record is written last, so a shard
exists exactly when its record does (the commit point). :func:`committed` lists a rank's shards in
order and stops at the first missing or damaged one, which is how a restarted writer resumes: it
recomputes from there and gets the same bytes. The activation store (``innards harvest``), the
streaming buffer of ``glp train --stream`` and ``innards bench harvest`` all write through
:class:`ShardWriter`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from innards.data.stats import Moments
from innards.data.store import INDEX_DTYPE, STORAGE, decode, encode, site_file
from innards.io import atomic_write_bytes

SHARDS = "shards"
RECORD_MARGIN = 4096  # bytes a record may take beyond its document list (see shard_bytes)


def shard_name(rank: int, seq: int) -> str:
    """Name of shard ``seq`` of rank ``rank``."""
    return f"r{rank:03d}-{seq:06d}"


def _npy_header(arr: np.ndarray) -> bytes:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    return head.getvalue()


def npy_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Exact size of a .npy file holding a C-order array of this shape and dtype."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                "shape": tuple(shape)})
    return len(head.getvalue()) + int(np.prod(shape)) * dtype.itemsize


def shard_bytes(rows: int, widths: Mapping[str, int], dtype: str, docs: int = 0) -> int:
    """Upper bound of one shard's size on disk (its files and record), for ``docs`` documents."""
    acts = sum(npy_bytes((rows, d), STORAGE[dtype]) for d in widths.values())
    moments = sum(2 * 8 * d + 400 for d in widths.values()) + 200
    return acts + npy_bytes((rows,), INDEX_DTYPE) + moments + RECORD_MARGIN + 64 * docs


class ShardWriter:
    """Fills shards of exactly ``shard_rows`` rows (the last may be short) and commits them in the background.

    ``room(nbytes)`` is called on the writer thread before a shard's files are written and may block
    (the stream waits there for disk room under its bound); ``on_commit(record)`` after its record is.
    At most one shard is in flight, so memory stays at two shard buffers.
    """

    def __init__(self, folder: Path, sites: Mapping[str, int], dtype: str, shard_rows: int, *, rank: int = 0,
                 start_seq: int = 0, room: Callable[[int], None] | None = None,
                 on_commit: Callable[[dict], None] | None = None):
        self.folder, self.rank, self.sites, self.dtype, self.k = Path(folder), rank, dict(sites), dtype, int(shard_rows)
        self.seq = start_seq
        self.room, self.on_commit = room, on_commit
        self.records: list[dict] = []
        self._names: dict[int, str | None] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="innards-shards")
        self._pending: Future | None = None
        (self.folder / SHARDS).mkdir(parents=True, exist_ok=True)
        self._new_buffers()

    def _new_buffers(self) -> None:
        self.fill = 0
        self.buf = {s: np.empty((self.k, d), dtype=STORAGE[self.dtype]) for s, d in self.sites.items()}
        self.index = np.empty(self.k, dtype=INDEX_DTYPE)
        self.moments = {s: Moments.empty(d) for s, d in self.sites.items()}

    def add(self, rows: Mapping[str, torch.Tensor], doc: np.ndarray, pos: np.ndarray, tok: np.ndarray,
            names: Mapping[int, str] | None = None) -> None:
        """Append rows (the same count for every site) with their provenance; full shards are committed.

        ``names`` maps the stream index of each document among ``doc`` to its id (recorded per shard).
        """
        if names:
            self._names.update(names)
        n = len(doc)
        enc = {s: encode(rows[s], self.dtype) for s in self.sites}
        at = 0
        while at < n:
            m = min(self.k - self.fill, n - at)
            sl, dst = slice(at, at + m), slice(self.fill, self.fill + m)
            for s in self.sites:
                self.buf[s][dst] = enc[s][sl]
                # moments of each (batch, shard) piece: the same pieces whether resumed or not
                self.moments[s] = self.moments[s].merge(Moments.of(rows[s][sl]))
            self.index["doc"][dst], self.index["pos"][dst], self.index["tok"][dst] = doc[sl], pos[sl], tok[sl]
            self.fill += m
            at += m
            if self.fill == self.k:
                self.flush()

    def flush(self) -> None:
        """Commit the current (possibly partial) shard in the background."""
        if self.fill == 0:
            return
        n = self.fill
        index = self.index[:n]
        docs = [[int(i), self._names.get(int(i))] for i in np.unique(index["doc"])]
        job = (shard_name(self.rank, self.seq), {s: b[:n] for s, b in self.buf.items()}, index, dict(self.moments), docs)
        self.wait()
        self._pending = self._pool.submit(self._commit, *job)
        self.seq += 1
        last = docs[-1][0]  # only the last document can continue into the next shard
        self._names = {i: v for i, v in self._names.items() if i >= last}
        self._new_buffers()

    def _commit(self, name: str, bufs: dict[str, np.ndarray], index: np.ndarray, moments: dict[str, Moments],
                docs: list) -> None:
        shards = self.folder / SHARDS
        arrays = {**{s: np.ascontiguousarray(b) for s, b in bufs.items()}, "index": np.ascontiguousarray(index)}
        parts = {k: (_npy_header(a), memoryview(a.reshape(-1).view(np.uint8))) for k, a in arrays.items()}
        tensors: dict[str, torch.Tensor] = {}
        for s, m in moments.items():
            tensors.update(m.to_tensors(f"{s}."))
        mbytes = safetensors_bytes(tensors)
        paths = {s: f"{SHARDS}/{site_file(name, s)}" for s in bufs} | {"index": f"{SHARDS}/{name}.index.npy"}
        record = {"name": name, "rank": self.rank, "rows": len(index), "files": {},
                  "moments": {"path": f"{SHARDS}/{name}.moments.safetensors",
                              "sha256": hashlib.sha256(mbytes).hexdigest()}, "docs": docs}
        for k, (header, body) in parts.items():
            h = hashlib.sha256(header)
            h.update(body)
            record["files"][k] = {"path": paths[k], "sha256": h.hexdigest(), "bytes": len(header) + body.nbytes}
        text = json.dumps(record) + "\n"
        if self.room is not None:
            self.room(sum(f["bytes"] for f in record["files"].values()) + len(mbytes) + len(text))
        for k, (header, body) in parts.items():
            atomic_write_bytes(self.folder / paths[k], [header, body])
        atomic_write_bytes(shards / f"{name}.moments.safetensors", mbytes)
        atomic_write_bytes(shards / f"{name}.json", text.encode())  # the commit point
        self.records.append(record)
        if self.on_commit is not None:
            self.on_commit(record)

    def wait(self) -> None:
        """Block until the shard in flight is committed (re-raising its error)."""
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()

    def close(self) -> None:
        """Commit the partial shard, wait, and stop the thread."""
        try:
            self.flush()
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop after an error without committing the shard being filled (a restart recomputes its rows)."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the error being handled is the one that matters
            pass
        finally:
            self._pool.shutdown(wait=True)


def read_record(folder: Path, name: str) -> dict | None:
    """A shard's record if it and every file it lists are present with the recorded sizes; else None."""
    path = Path(folder) / SHARDS / f"{name}.json"
    try:
        rec = json.loads(path.read_text())
        files = [*rec["files"].values(), rec["moments"]]
        if not all((Path(folder) / f["path"]).is_file() for f in files):
            return None
        if not all((Path(folder) / f["path"]).stat().st_size == f["bytes"] for f in rec["files"].values()):
            return None
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return rec


def committed(folder: Path, rank: int, start: int = 0) -> list[dict]:
    """Rank ``rank``'s committed shard records from ``start`` on, in order, up to the first missing or damaged one.

    Records after that gap and temporary files of interrupted writes are deleted: a restarted writer
    recomputes them identically from the stream.
    """
    folder = Path(folder)
    shards = folder / SHARDS
    records = []
    seq = start
    while (rec := read_record(folder, shard_name(rank, seq))) is not None:
        records.append(rec)
        seq += 1
    prefix = shard_name(rank, 0)[:4]
    for stale in shards.glob(f"{prefix}-*.json"):
        if int(stale.stem.split("-")[1]) >= seq:
            stale.unlink()
    for tmp in shards.glob(f".{prefix}-*.tmp*"):
        tmp.unlink(missing_ok=True)
    return records


def read_shard(folder: Path, record: dict, site: str, dtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """One committed shard's rows of ``site`` as float32 and its row index, read whole."""
    acts = np.load(Path(folder) / record["files"][site]["path"], allow_pickle=False)
    index = np.load(Path(folder) / record["files"]["index"]["path"], allow_pickle=False)
    return decode(acts, dtype), index
