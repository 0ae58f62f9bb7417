"""Harvest activations into an activation store: streaming, resumable, torchrun-parallel.

The stream is fully determined by the settings: documents in source order, rank r of W taking the
documents whose stream index is r mod W, each cut into chunks, chunks grouped into batches of
``batch_size``, and the kept (non-special) tokens of each batch cut into shards of exactly
``shard_tokens`` rows. A shard is committed by writing its files (temporary name + rename, SHA-256
recorded) and then a small JSON record; on restart each rank counts its committed rows, replays the
stream without the model up to the batch that contains the next row, recomputes that batch and
drops the rows it already has. Each shard keeps its own float64 moments, merged in shard order at
the end, so a resumed store is byte-identical to an uninterrupted one. Rank 0 writes
``manifest.json`` last, after every rank has finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from innards.config import save_config
from innards.data.stats import Moments, merge_all
from innards.data.store import (BF16_NOTE, FORMAT, FORMAT_VERSION, INDEX_DTYPE, STORAGE, encode, site_file)
from innards.data.text import Batch, Document, GenerateSource, TextSource, framing, iter_batches, iter_chunks, open_text
from innards.errors import InnardsError
from innards.io import atomic_write_bytes, load_tensors, read_json, save_tensors, write_json
from innards.runtime import Dist, init_dist

PLAN = "harvest.json"
STORE_FILES = ("manifest.json", PLAN, "docs.json", "stats.safetensors", "config.yaml")
STORE_DIRS = ("shards", "generated")


@dataclass
class HarvestConfig:
    """What to harvest, from which model and text, and how to store it."""

    model: str = "demo"
    """model name, alias (demo), local directory or hub id"""
    site: list[str] = field(default_factory=list)
    """site to harvest, e.g. blocks.2.resid_post (repeat or comma-separate for several)"""
    text: str = ""
    """text source: file or folder (.txt/.txt.gz/.jsonl/.csv/.csv.zst), hf:NAME[:SPLIT], a saved datasets folder, generate:N (samples of the model itself) or random:N (random token ids)"""
    tokens: int = 100_000
    """number of tokens (activation rows) to harvest"""
    out: str = ""
    """output folder of the activation store"""
    context: int | None = None
    """tokens per sequence, special tokens included (default: the model's, at most 1024)"""
    batch_size: int = 16
    """sequences per forward pass"""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """storage dtype of activations"""
    overwrite: bool = False
    """replace an existing store made with other settings"""
    shard_tokens: int = 65_536
    """rows per shard (also the resume granularity)"""
    val_fraction: float = 0.05
    """fraction of documents held out as the validation split"""
    seed: int = 0
    """seed of the validation split and of generate:N sampling"""
    text_field: str = "text"
    """JSON / dataset field or CSV column holding the text"""
    doc_split: Literal["blank", "line", "formfeed", "file"] = "blank"
    """how .txt files split into documents: blank lines, lines, form feeds or whole files"""
    model_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    """dtype the model runs in"""
    device: str | None = None
    """device of the model (default: cuda if available, else cpu)"""


# ---------------------------------------------------------------- small helpers


def _git_hash() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"


def _log(msg: str, dist: Dist) -> None:
    if dist.main:
        print(f"innards harvest: {msg}", file=sys.stderr, flush=True)


def quota(tokens: int, rank: int, world: int) -> int:
    """Rows rank ``rank`` harvests when ``tokens`` are split over ``world`` ranks."""
    return tokens // world + (1 if rank < tokens % world else 0)


def shard_name(rank: int, seq: int) -> str:
    return f"r{rank:03d}-{seq:06d}"


def is_val(doc_id: str, seed: int, fraction: float) -> tuple[bool, float]:
    """Deterministic per-document split: a hash of (seed, id) below ``fraction`` means validation."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big") / 2**64
    return u < fraction, u


def write_npy(path: Path, arr: np.ndarray) -> dict:
    """Atomically write a .npy file; returns {path name, sha256, bytes} hashed from memory while writing."""
    arr = np.ascontiguousarray(arr)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    header = head.getvalue()
    body = memoryview(arr.reshape(-1).view(np.uint8))
    h = hashlib.sha256(header)
    h.update(body)
    atomic_write_bytes(path, [header, body])
    return {"sha256": h.hexdigest(), "bytes": len(header) + body.nbytes}


# ---------------------------------------------------------------- the run's fixed inputs


@dataclass
class Prepared:
    """Everything the harvest loop needs, resolved and validated."""

    cfg: HarvestConfig
    model: Any
    sites: list[Any]  # innards.models.sites.Site
    site_meta: list[dict]
    source: TextSource
    context: int
    out: Path
    dist: Dist
    plan: dict

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]


def _context(model: Any, requested: int | None) -> int:
    cfg = model.config
    limit = next((int(v) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(v := getattr(cfg, k, None), int) and v > 0), 1024)
    if requested is None:
        return min(limit, 1024)
    if requested < 2:
        raise InnardsError(f"context must be at least 2 tokens, got {requested}")
    if requested > limit:
        raise InnardsError(f"context {requested} exceeds the model's maximum of {limit} positions")
    return int(requested)


def _check_config(cfg: HarvestConfig) -> None:
    if not cfg.site:
        raise InnardsError("no site given (--site blocks.L.resid_post; see `innards sites MODEL`)")
    if not cfg.text:
        raise InnardsError("no text source given (--text FILE|FOLDER|hf:NAME|generate:N)")
    if not cfg.out:
        raise InnardsError("no output folder given (--out DIR)")
    if cfg.tokens <= 0:
        raise InnardsError(f"--tokens must be positive, got {cfg.tokens}")
    if cfg.batch_size <= 0:
        raise InnardsError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.shard_tokens <= 0:
        raise InnardsError(f"--shard-tokens must be positive, got {cfg.shard_tokens}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise InnardsError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")


def prepare(cfg: HarvestConfig, dist: Dist | None = None, model: Any = None) -> Prepared:
    """Load the model, resolve sites and open the text: every bad-input check that touches no file."""
    from innards.models.load import load_model
    from innards.models.sites import INDEX_CONVENTION, expand_sites, site_metadata

    _check_config(cfg)
    dist = dist or Dist()
    if model is None:
        model = load_model(cfg.model, dtype=cfg.model_dtype, device=cfg.device)
    sites = expand_sites(model, [s for s in cfg.site])
    seen: set[str] = set()
    sites = [s for s in sites if not (s.name in seen or seen.add(s.name))]
    context = _context(model, cfg.context)
    out = Path(cfg.out).expanduser()
    source = open_text(cfg.text, text_field=cfg.text_field, split=cfg.doc_split, model=model, seed=cfg.seed,
                       max_tokens=context, cache_dir=out / "generated")
    src = dict(getattr(model, "innards_source", {}) or {})
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    plan = {
        "format": FORMAT,
        "model": {k: src.get(k) for k in ("name", "revision", "sha256", "arch", "class")},
        "sites": [s.name for s in sites],
        "text": {"spec": cfg.text, "fingerprint": source.fingerprint, "text_field": cfg.text_field,
                 "doc_split": cfg.doc_split},
        "settings": {"tokens": cfg.tokens, "context": context, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
                     "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                     "model_dtype": cfg.model_dtype, "device": device.type, "world_size": dist.world},
        "index_convention": INDEX_CONVENTION,
    }
    meta = [site_metadata(model, s) for s in sites]
    return Prepared(cfg, model, sites, meta, source, context, out, dist, plan)


# ---------------------------------------------------------------- output folder


def _plan_diff(old: dict, new: dict) -> list[str]:
    """What differs between two plans, ignoring spellings of the same thing (model name vs path, text path)."""
    diffs = []
    for key in ("model", "sites", "text", "settings"):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            skip = {"spec"} if key == "text" else set()
            if key == "model" and any(a.get(k) and a.get(k) == b.get(k) for k in ("sha256", "revision")):
                skip = {"name"}  # the same weights reached by another name or path
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                      if k not in skip and a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def _clear_store(out: Path) -> None:
    """Delete a store: the manifest first (no longer complete), the plan last (still a store if cut short)."""
    (out / "manifest.json").unlink(missing_ok=True)
    for name in STORE_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in STORE_FILES:
        if name != PLAN:
            (out / name).unlink(missing_ok=True)
    (out / PLAN).unlink(missing_ok=True)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def open_output(p: Prepared) -> str:
    """Check, then create or reuse, the output folder (rank 0); returns "new", "resume" or "complete".

    Every refusal (other settings, not a store, not writable, not enough disk) happens before
    anything is written or deleted.
    """
    out, cfg = p.out, p.cfg
    if out.exists() and not out.is_dir():
        raise InnardsError(f"output path exists and is not a folder: {out}")
    existing = (out / PLAN).is_file() or (out / "manifest.json").is_file()
    if out.is_dir() and not existing and any(out.iterdir()):
        raise InnardsError(f"output folder {out} is not empty and holds no activation store; choose another --out")
    state = "new"
    if existing:
        old = read_json(out / PLAN, "harvest plan") if (out / PLAN).is_file() else read_json(out / "manifest.json", "store manifest").get("plan", {})
        diffs = _plan_diff(old, p.plan)
        if cfg.overwrite:
            state = "overwrite"
        elif diffs:
            raise InnardsError(f"store {out} was made with other settings ({'; '.join(diffs[:3])}); "
                               "use --overwrite to replace it")
        elif (out / "manifest.json").is_file():
            return "complete"
        else:
            state = "resume"
    base = _existing_parent(out)
    if not os.access(base, os.W_OK):
        raise InnardsError(f"output folder is not writable: {base}")
    have = _committed_rows(out) if state == "resume" else 0
    est, left = estimate_bytes(p, cfg.tokens), estimate_bytes(p, max(0, cfg.tokens - have))
    free = shutil.disk_usage(base).free + (_tree_bytes(out) if state == "overwrite" else 0)
    resume = f"; resuming after {have:,} rows, ~{_human(left)} still to write" if state == "resume" else ""
    _log(f"{cfg.tokens:,} tokens x {len(p.sites)} site(s) ({', '.join(p.names)}) as {cfg.dtype}: "
         f"~{_human(est)} on disk ({_human(free)} free){resume}", p.dist)
    if left > free:
        raise InnardsError(f"not enough disk space in {base}: need ~{_human(left)}, {_human(free)} free")
    try:
        if state == "resume":
            if not (out / "config.yaml").is_file():  # killed right after the plan was written
                save_config(cfg, out)
            (out / "shards").mkdir(exist_ok=True)
            return state
        if state == "overwrite":
            _clear_store(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PLAN, p.plan)  # first: a folder holding only this is a store to resume
        (out / "shards").mkdir(exist_ok=True)
        save_config(cfg, out)
    except OSError as e:
        raise InnardsError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    return "new"


def _committed_rows(out: Path) -> int:
    rows = 0
    for f in (out / "shards").glob("r*-*.json"):
        try:
            rows += int(json.loads(f.read_text()).get("rows", 0))
        except (json.JSONDecodeError, OSError, ValueError):
            pass
    return rows


def estimate_bytes(p: Prepared, rows: int) -> int:
    """Disk use of ``rows`` harvested rows (activations and row index)."""
    per_row = sum(s.width for s in p.sites) * STORAGE[p.cfg.dtype].itemsize + INDEX_DTYPE.itemsize
    return rows * per_row


# ---------------------------------------------------------------- batches and rows


def rank_documents(source: TextSource, rank: int, world: int) -> Iterator[tuple[int, Document]]:
    """(stream index, document) of this rank's share: index mod world == rank."""
    for i, doc in enumerate(source):
        if i % world == rank:
            yield i, doc


def batches(p: Prepared, names: dict[int, str] | None = None, rank: int | None = None, world: int | None = None) -> Iterator[Batch]:
    """This rank's batches in stream order; records document ids into ``names`` as they are read."""
    rank = p.dist.rank if rank is None else rank
    world = p.dist.world if world is None else world
    docs = rank_documents(p.source, rank, world)
    if names is not None:
        docs = _recording(docs, names)
    tok = p.model.tokenizer
    yield from iter_batches(iter_chunks(docs, tok, p.context), p.cfg.batch_size, framing(tok).pad)


def _recording(docs: Iterator[tuple[int, Document]], names: dict[int, str]) -> Iterator[tuple[int, Document]]:
    for i, d in docs:
        names[i] = d.id
        yield i, d


def capture_rows(model: Any, sites: list[Any], batch: Batch) -> dict[str, torch.Tensor]:
    """Run the model up to the last site and return each site's kept rows, (n, d), in row-major order."""
    from innards.models.hooks import run_with_cache

    device = next((q.device for q in model.parameters()), torch.device("cpu"))
    acts = run_with_cache(model, batch.input_ids.to(device), sites, stop_early=True,
                          attention_mask=batch.attention_mask.to(device))
    keep = batch.keep.to(device)
    return {s.name: acts[s.name][keep] for s in sites}


# ---------------------------------------------------------------- shards


def prune(names: OrderedDict[int, str], below: int) -> None:
    """Forget ids of documents before ``below`` (names is filled in stream order, so from the front)."""
    while names:
        first = next(iter(names))
        if first >= below:
            break
        names.popitem(last=False)


class ShardWriter:
    """Fills shards of exactly ``shard_tokens`` rows and commits them on a background thread."""

    def __init__(self, out: Path, rank: int, sites: dict[str, int], dtype: str, shard_tokens: int,
                 start_seq: int = 0, names: dict[int, str] | None = None):
        self.out, self.rank, self.sites, self.dtype, self.k = out, rank, sites, dtype, shard_tokens
        self.seq = start_seq
        self.names = names if names is not None else OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="innards-shards")
        self._pending: Future | None = None
        self.records: list[dict] = []
        self._new_buffers()

    def _new_buffers(self) -> None:
        self.fill = 0
        self.buf = {s: np.empty((self.k, d), dtype=STORAGE[self.dtype]) for s, d in self.sites.items()}
        self.index = np.empty(self.k, dtype=INDEX_DTYPE)
        self.moments = {s: Moments.empty(d) for s, d in self.sites.items()}

    def add(self, rows: dict[str, torch.Tensor], doc: np.ndarray, pos: np.ndarray, tok: np.ndarray) -> None:
        """Append rows (same count for every site) with their provenance; full shards are committed."""
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
        bufs = {s: b[:n] for s, b in self.buf.items()}
        index = self.index[:n]
        docs = [[int(i), self.names.get(int(i))] for i in np.unique(index["doc"])]
        job = (shard_name(self.rank, self.seq), bufs, index, dict(self.moments), docs)
        self.wait()  # at most one shard in flight: memory stays at two shard buffers
        self._pending = self._pool.submit(self._commit, *job)
        self.seq += 1
        if docs:  # ids of documents before the last one in this shard are no longer needed
            prune(self.names, docs[-1][0])
        self._new_buffers()

    def _commit(self, name: str, bufs: dict[str, np.ndarray], index: np.ndarray, moments: dict[str, Moments],
                docs: list) -> None:
        shards = self.out / "shards"
        files = {}
        for s, b in bufs.items():
            info = write_npy(shards / site_file(name, s), b)
            files[s] = {"path": f"shards/{site_file(name, s)}", **info}
        info = write_npy(shards / f"{name}.index.npy", index)
        files["index"] = {"path": f"shards/{name}.index.npy", **info}
        tensors = {}
        for s, m in moments.items():
            tensors.update(m.to_tensors(f"{s}."))
        msha = save_tensors(shards / f"{name}.moments.safetensors", tensors)
        record = {"name": name, "rank": self.rank, "rows": len(index), "files": files,
                  "moments": {"path": f"shards/{name}.moments.safetensors", "sha256": msha}, "docs": docs}
        write_json(shards / f"{name}.json", record, indent=None)  # the commit point
        self.records.append(record)

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


def committed(out: Path, rank: int) -> list[dict]:
    """This rank's committed shard records, in order, stopping at the first missing or damaged one."""
    records = []
    shards = out / "shards"
    seq = 0
    while (shards / f"{shard_name(rank, seq)}.json").is_file():
        try:
            rec = json.loads((shards / f"{shard_name(rank, seq)}.json").read_text())
        except (json.JSONDecodeError, OSError):
            break
        ok = all((out / f["path"]).is_file() and (out / f["path"]).stat().st_size == f["bytes"] for f in rec["files"].values())
        if not ok or not (out / rec["moments"]["path"]).is_file():
            break
        records.append(rec)
        seq += 1
    # anything after a gap is stale: recomputed identically from the stream
    for stale in shards.glob(f"{shard_name(rank, 0)[:4]}-*.json"):
        if int(stale.stem.split("-")[1]) >= seq:
            stale.unlink()
    for tmp in shards.glob(f".{shard_name(rank, 0)[:4]}-*.tmp*"):
        tmp.unlink(missing_ok=True)
    return records


# ---------------------------------------------------------------- one rank's work


def run_rank(p: Prepared) -> dict:
    """Harvest this rank's quota (resuming after its committed shards); returns its done record."""
    from tqdm import tqdm

    out, rank, world = p.out, p.dist.rank, p.dist.world
    done_path = out / "shards" / f"r{rank:03d}.done.json"
    if done_path.is_file():
        return read_json(done_path, "rank record")
    records = committed(out, rank)
    have = sum(r["rows"] for r in records)
    want = quota(p.cfg.tokens, rank, world)
    names: OrderedDict[int, str] = OrderedDict()
    writer = ShardWriter(out, rank, {s.name: s.width for s in p.sites}, p.cfg.dtype, p.cfg.shard_tokens,
                         start_seq=len(records), names=names)
    seen = 0  # rows of the stream so far, whether stored earlier or now
    bar = tqdm(total=want * world, initial=have * world, unit="tok", unit_scale=True, desc="harvest",
               disable=not p.dist.main, file=sys.stderr, smoothing=0.1)
    try:
        with torch.inference_mode():
            for batch in batches(p, names):
                n = batch.rows
                if seen + n <= have:  # already stored: replay the stream without the model
                    seen += n
                    prune(names, int(batch.doc[0]) if n else 0)
                    continue
                if seen >= want:
                    break
                rows = capture_rows(p.model, p.sites, batch)
                lo, hi = max(0, have - seen), min(n, want - seen)
                writer.add({k: v[lo:hi] for k, v in rows.items()}, batch.doc[lo:hi], batch.pos[lo:hi], batch.tok[lo:hi])
                bar.update((hi - lo) * world)
                seen += n
                if seen >= want:
                    break
        writer.close()
    finally:
        bar.close()
    stored = have + sum(r["rows"] for r in writer.records)
    record = {"rank": rank, "rows": stored, "quota": want, "shards": len(records) + len(writer.records),
              "exhausted": stored < want}
    write_json(done_path, record)
    return record


# ---------------------------------------------------------------- finishing


def finalize(p: Prepared) -> dict:
    """Merge every rank's shards into one manifest, statistics file and document table (rank 0)."""
    from innards import __version__

    out, cfg = p.out, p.cfg
    world = p.dist.world
    shards: list[dict] = []
    ranks = []
    for rank in range(world):
        done = read_json(out / "shards" / f"r{rank:03d}.done.json", "rank record")
        recs = committed(out, rank)
        if sum(r["rows"] for r in recs) != done["rows"]:
            raise InnardsError(f"rank {rank}'s shards hold {sum(r['rows'] for r in recs)} rows, its record says {done['rows']}")
        ranks.append(done)
        shards.extend(recs)
    total = sum(r["rows"] for r in shards)
    if total == 0:
        raise InnardsError(f"text source '{cfg.text}' produced no tokens to harvest")
    if total < cfg.tokens:
        print(f"innards: warning: the text ran out after {total} of {cfg.tokens} tokens", file=sys.stderr)

    # statistics: shard moments merged in shard order (rank 0's shards first)
    parts = {s.name: [] for s in p.sites}
    for rec in shards:
        t = load_tensors(out / rec["moments"]["path"], sha256=rec["moments"]["sha256"], what="shard moments")
        for s in parts:
            parts[s].append(Moments.from_tensors(t, f"{s}."))
    tensors: dict[str, torch.Tensor] = {}
    summary = {}
    for s, ps in parts.items():
        m = merge_all(ps)
        sm = m.summary()
        tensors.update(m.to_tensors(f"{s}."))
        tensors[f"{s}.var"] = torch.from_numpy(sm["var"])
        tensors[f"{s}.mean_norm"] = torch.tensor([sm["mean_norm"]], dtype=torch.float64)
        tensors[f"{s}.rms_norm"] = torch.tensor([sm["rms_norm"]], dtype=torch.float64)
        summary[s] = {"count": sm["count"], "mean_norm": sm["mean_norm"], "rms_norm": sm["rms_norm"]}
    stats_sha = save_tensors(out / "stats.safetensors", tensors)

    # document table, dense over stream indices, with the train/val split by document
    ids: dict[int, str | None] = {}
    for rec in shards:
        for i, name in rec["docs"]:
            ids[int(i)] = name
    size = max(ids) + 1
    table: list[str | None] = [None] * size
    val = [False] * size
    draws = []
    for i, name in ids.items():
        table[i] = name
        v, u = is_val(name or str(i), cfg.seed, cfg.val_fraction)
        val[i] = v
        draws.append((u, i))
    if cfg.val_fraction > 0 and len(ids) >= 2 and not any(val):
        val[min(draws)[1]] = True  # tiny stores still get a validation document
    if all(val[i] for i in ids):
        val[max(draws)[1]] = False  # ... and always a training one
    docs_bytes = (json.dumps({"ids": table, "val": val}) + "\n").encode()
    atomic_write_bytes(out / "docs.json", docs_bytes)
    n_val = sum(val)

    offsets = 0
    listed = []
    for rec in shards:
        listed.append({"name": rec["name"], "rank": rec["rank"], "rows": rec["rows"], "offset": offsets, "files": rec["files"]})
        offsets += rec["rows"]
    frame = framing(p.model.tokenizer)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {**(getattr(p.model, "innards_source", {}) or {}), "n_layers": getattr(p.model.config, "num_hidden_layers", None)},
        "sites": p.site_meta,
        "index_convention": p.plan["index_convention"],
        "dtype": cfg.dtype,
        "storage": {"layout": "one (rows, width) .npy per shard and site, C order", "bf16": BF16_NOTE,
                    "index": {"dtype": [list(x) for x in INDEX_DTYPE.descr],
                              "doc": "stream index of the document (see docs.json)",
                              "pos": "position of the token within its document's content tokens, from 0",
                              "tok": "token id"}},
        "context": p.context,
        "tokens": total,
        "tokens_requested": cfg.tokens,
        "special_tokens": {"prefix": list(frame.prefix), "suffix": list(frame.suffix),
                           "excluded_ids": sorted(frame.special),
                           "note": "BOS (or CLS/SEP) frames every chunk; special tokens are never stored"},
        "text": {**p.source.describe(), "documents_with_rows": len(ids), "invalid_utf8_bytes": getattr(p.source, "invalid_bytes", 0)},
        "settings": p.plan["settings"],
        "split": {"by": "document", "method": "sha256(f'{seed}:{doc_id}')[:8] / 2**64 < val_fraction",
                  "val_fraction": cfg.val_fraction, "seed": cfg.seed, "val_docs": n_val, "train_docs": len(ids) - n_val},
        "docs": {"path": "docs.json", "sha256": hashlib.sha256(docs_bytes).hexdigest(), "count": size},
        "stats": {"path": "stats.safetensors", "sha256": stats_sha, "summary": summary,
                  "note": "float64 Chan merge of per-shard moments in shard order; var is the population variance"},
        "innards": {"version": __version__, "git": _git_hash()},
        "ranks": ranks,
        "plan": p.plan,
        "shards": listed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------- entry point


def harvest(cfg: HarvestConfig, model: Any = None) -> Path:
    """Harvest activations into ``cfg.out`` (resuming a killed run; a no-op for a finished one)."""
    dist = init_dist()
    p = prepare(cfg, dist, model=model)
    if not isinstance(p.source, GenerateSource):
        _first_document(p)
    state = open_output(p) if dist.main else None
    if dist.world > 1:
        box = [state]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    if state == "complete":
        _log(f"store {p.out} is already complete; nothing to do", dist)
        return p.out
    p.source.prepare(dist.rank, dist.world)
    dist.barrier()
    run_rank(p)
    dist.barrier()
    if dist.main:
        m = finalize(p)
        _log(f"wrote {m['tokens']:,} rows in {len(m['shards'])} shard(s) to {p.out}", p.dist)
    dist.barrier()
    return p.out


def _first_document(p: Prepared) -> None:
    """Fail on an empty or unreadable text source before anything is written."""
    p.source.quiet = True  # the real pass warns about invalid bytes; the peek would repeat it
    it = iter(p.source)
    try:
        next(it)
        return
    except StopIteration:
        pass
    finally:
        it.close()
        p.source.quiet = False
    raise InnardsError(f"text source '{p.cfg.text}' has no documents")
