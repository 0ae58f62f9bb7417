"""Harvest activations into an activation store: streaming, resumable, torchrun-parallel.

The stream is fully determined by the settings: documents in the text's order (a seeded shuffle
over the whole input by default, ``--order sequential`` for the files in path order), rank r of W
taking the documents whose stream index is r mod W, each cut into chunks, chunks grouped into
batches of ``batch_size``, and the kept (non-special) tokens of each batch cut into shards of
exactly ``shard_tokens`` rows (:mod:`innards.data.shards`). On restart each rank counts its
committed rows, replays the stream without the model up to the batch that contains the next row,
recomputes that batch and drops the rows it already has. Each shard keeps its own float64 moments,
merged in shard order at the end, so a resumed store is byte-identical to an uninterrupted one.
Rank 0 writes ``manifest.json`` last, after every rank has finished.

The output folder is an :class:`innards.run.Run` of kind "store": rerunning the same command
resumes or says it is complete, ``--overwrite`` replaces the store, another kind of artifact is
refused, and a lock keeps a second harvest out while one writes. Which settings may differ on a
rerun is decided by the store's plan (``harvest.json``), which compares what the settings resolve
to: the model by its weights, the text by its content, the context as used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from tqdm import tqdm

from innards import __version__
from innards.config import at_least, require, within
from innards.data.shards import SHARDS, ShardWriter, committed
from innards.data.stats import Moments, merge_all
from innards.data.store import BF16_NOTE, FORMAT, FORMAT_VERSION, INDEX_DTYPE, STORAGE, read_manifest
from innards.data.text import ORDERS, SPLITS, Batch, GenerateSource, TextSource, framing, iter_batches, iter_chunks, open_text
from innards.errors import InnardsError
from innards.io import atomic_write_bytes, read_json, write_json
from innards.tensors import load_tensors, save_tensors
from innards.models.config import ModelConfig
from innards.models.hooks import run_with_cache
from innards.models.load import load_model
from innards.models.sites import INDEX_CONVENTION, Site, expand_sites, site_metadata
from innards.provenance import git_revision
from innards.run import Run
from innards.runtime import Dist, init_dist

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PLAN = "harvest.json"
StoreDtype = Literal["bf16", "fp16", "fp32"]


@dataclass
class HarvestConfig:
    """Harvest activations of a model at one or more sites into an activation store."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the language model (a plain string is taken as its name)"""
    site: list[str] = field(default_factory=list)
    """site to harvest, e.g. blocks.2.resid_post (repeat or comma-separate for several)"""
    text: str = ""
    """text source: file or folder (.txt/.txt.gz/.jsonl/.csv/.csv.zst), hf:NAME[:SPLIT], a saved datasets folder, generate:N (samples of the model itself) or random:N (random token ids)"""
    tokens: int = 100_000
    """number of tokens (activation rows) to harvest"""
    out: str = ""
    """output folder of the activation store"""
    context: int | None = None
    """tokens per sequence, special tokens included (None: the model's, at most 1024)"""
    batch_size: int = 16
    """sequences per forward pass"""
    store_dtype: StoreDtype = "bf16"
    """storage dtype of the activations (the model itself runs in --model.dtype)"""
    order: Literal["shuffled", "sequential"] = "shuffled"
    """document order: a seeded shuffle over the whole input, so a token budget samples all of it, or sequential (files in path order, each from its start)"""
    overwrite: bool = False
    """replace an existing store made with other settings"""
    shard_tokens: int = 65_536
    """rows per shard (also the resume granularity)"""
    val_fraction: float = 0.05
    """fraction of documents held out as the validation split"""
    seed: int = 0
    """seed of the shuffle, the validation split and generate:N sampling"""
    text_field: str = "text"
    """JSON / dataset field or CSV column holding the text"""
    doc_split: Literal["blank", "line", "formfeed", "file"] = "blank"
    """how .txt files split into documents: blank lines, lines, form feeds or whole files"""
    dtype: InitVar[StoreDtype | None] = None
    """old spelling of --store-dtype (kept working; prints a hint)"""

    def __post_init__(self, dtype: StoreDtype | None) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        if dtype is not None:  # innards 0.2 spelling; the CLI prints the hint (old_dtype_hint)
            warnings.warn("HarvestConfig(dtype=) is now store_dtype=", DeprecationWarning, stacklevel=3)
            self.store_dtype = dtype
        at_least(self, 1, "tokens", "batch_size", "shard_tokens")
        at_least(self, 2, "context")
        at_least(self, 0, "seed")
        within(self, "val_fraction", 0.0, 1.0, open_hi=True)
        require(self.store_dtype in STORAGE, f"--store-dtype must be one of {', '.join(STORAGE)}, got {self.store_dtype!r}")
        require(self.order in ORDERS, f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        require(self.doc_split in SPLITS, f"--doc-split must be one of {', '.join(SPLITS)}, got {self.doc_split!r}")


def old_dtype_hint(argv: list[str] | None) -> None:
    """One line on stderr when a command line still spells the storage dtype --dtype (it keeps working)."""
    if any(a == "--dtype" or a.startswith("--dtype=") for a in (sys.argv[1:] if argv is None else argv)):
        print("innards: note: --dtype is now --store-dtype (the storage dtype of the activations); "
              "the model's dtype is --model.dtype", file=sys.stderr)


# ---------------------------------------------------------------- small helpers


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


def is_val(doc_id: str, seed: int, fraction: float) -> tuple[bool, float]:
    """Deterministic per-document split: a hash of (seed, id) below ``fraction`` means validation."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big") / 2**64
    return u < fraction, u


def _model_context(model: PreTrainedModel, requested: int | None) -> int:
    cfg = model.config
    limit = next((int(v) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(v := getattr(cfg, k, None), int) and v > 0), 1024)
    if requested is None:
        return min(limit, 1024)
    if requested > limit:
        raise InnardsError(f"context {requested} exceeds the model's maximum of {limit} positions")
    return int(requested)


# ---------------------------------------------------------------- the public face: model, sites and text resolved


class Harvester:
    """A model, its sites and a text source resolved for harvesting: the stream's batches and their activations.

    Everything a writer of activations needs (the harvest, the GLP stream, the benchmark): every
    bad-input check that touches no file happens here, before anything is written.
    """

    def __init__(self, cfg: HarvestConfig, model: PreTrainedModel | None = None, world: int = 1):
        require(bool(cfg.site), "no site given (--site blocks.L.resid_post; see `innards sites MODEL`)")
        require(bool(cfg.text), "no text source given (--text FILE|FOLDER|hf:NAME|generate:N)")
        self.cfg = cfg
        self.model = model if model is not None else load_model(cfg.model.name, dtype=cfg.model.dtype,
                                                                device=cfg.model.device, revision=cfg.model.revision)
        seen: set[str] = set()
        self.sites: list[Site] = [s for s in expand_sites(self.model, cfg.site) if not (s.name in seen or seen.add(s.name))]
        for s in self.sites:
            # a store holds one (d,) vector per token; per-head tensors and attention patterns are not that
            require(s.heads == 0, f"site {s.name} is per-head ({'(B, heads, T, T)' if s.kind == 'pattern' else '(B, T, heads, d_head)'}): "
                    "a store holds one vector per token; harvest z's output (attn_out) or a residual site instead")
        self.site_meta = [site_metadata(self.model, s) for s in self.sites]
        self.context = _model_context(self.model, cfg.context)
        self.out = Path(cfg.out).expanduser()
        self.source: TextSource = open_text(cfg.text, text_field=cfg.text_field, split=cfg.doc_split, model=self.model,
                                            seed=cfg.seed, max_tokens=self.context, cache_dir=self.out / "generated",
                                            order=cfg.order)
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        src = dict(getattr(self.model, "innards_source", {}) or {})
        self.plan = {
            "format": FORMAT,
            "model": {k: src.get(k) for k in ("name", "revision", "sha256", "arch", "class")},
            "sites": self.names,
            "text": {"spec": cfg.text, "fingerprint": self.source.fingerprint, "text_field": cfg.text_field,
                     "doc_split": cfg.doc_split, "order": cfg.order},
            "settings": {"tokens": cfg.tokens, "context": self.context, "batch_size": cfg.batch_size,
                         "dtype": cfg.store_dtype, "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction,
                         "seed": cfg.seed, "model_dtype": cfg.model.dtype, "device": self.device.type, "world_size": world},
            "index_convention": INDEX_CONVENTION,
        }

    @property
    def names(self) -> list[str]:
        """Canonical names of the sites, in storage order."""
        return [s.name for s in self.sites]

    @property
    def widths(self) -> dict[str, int]:
        """Width of each site."""
        return {s.name: s.width for s in self.sites}

    def batches(self, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """This rank's batches in stream order: documents whose stream index is ``rank`` mod ``world``."""
        docs = ((i, d) for i, d in enumerate(self.source) if i % world == rank)
        tok = self.model.tokenizer
        return iter_batches(iter_chunks(docs, tok, self.context), self.cfg.batch_size, framing(tok).pad)

    def capture(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Run the model up to the last site; each site's kept rows, (n, d), in row-major order."""
        acts = run_with_cache(self.model, batch.input_ids.to(self.device), self.sites, stop_early=True,
                              attention_mask=batch.attention_mask.to(self.device))
        keep = batch.keep.to(self.device)
        return {s.name: acts[s.name][keep] for s in self.sites}

    def val_mask(self, batch: Batch) -> np.ndarray:
        """Per row of ``batch``: does it belong to a validation document (see :func:`is_val`)."""
        if self.cfg.val_fraction <= 0:
            return np.zeros(batch.rows, dtype=bool)
        docs = np.unique(batch.doc)
        val = np.array([is_val(batch.names.get(int(d)) or str(int(d)), self.cfg.seed, self.cfg.val_fraction)[0]
                        for d in docs], dtype=bool)
        return val[np.searchsorted(docs, batch.doc)]

    def estimate_bytes(self, rows: int) -> int:
        """Disk use of ``rows`` harvested rows (activations and row index)."""
        return rows * (sum(self.widths.values()) * STORAGE[self.cfg.store_dtype].itemsize + INDEX_DTYPE.itemsize)

    def check_documents(self) -> None:
        """Fail on an empty or unreadable text source before anything is written."""
        if isinstance(self.source, GenerateSource):
            return  # sampled later, into the output folder
        self.source.quiet = True  # the real pass warns about invalid bytes; the peek would repeat it
        it = iter(self.source)
        try:
            next(it)
            return
        except StopIteration:
            pass
        finally:
            it.close()
            self.source.quiet = False
        raise InnardsError(f"text source '{self.cfg.text}' has no documents")


# ---------------------------------------------------------------- output folder


def _plan_diff(old: dict, new: dict) -> list[str]:
    """What differs between two plans, ignoring spellings of the same thing (model name vs path, text path)."""
    old = {**old, "text": {"order": "sequential", **(old.get("text") or {})}}  # stores of innards 0.2 read in file order
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


def _saved_plan(out: Path) -> dict | None:
    """The plan of the store in ``out`` (from harvest.json, else the manifest), or None when there is none."""
    if (out / PLAN).is_file():
        plan = read_json(out / PLAN, "harvest plan")
        if not isinstance(plan, dict):
            raise InnardsError(f"{out / PLAN} is not a harvest plan")
        return plan
    if (out / "manifest.json").is_file():
        return read_manifest(out).get("plan") or {}
    return None


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _committed_rows(out: Path) -> int:
    rows = 0
    for f in (out / SHARDS).glob("r*-*.json"):
        try:
            rows += int(json.loads(f.read_text()).get("rows", 0))
        except (json.JSONDecodeError, OSError, ValueError, AttributeError):
            pass
    return rows


def open_output(h: Harvester, dist: Dist) -> Run:
    """Check, lock and create or reuse the output folder (rank 0); the run's state says new, resume or complete.

    Every refusal (other settings, another artifact, a file in the way, not writable, not enough
    disk, another harvest writing) happens before anything is written or deleted.
    """
    out, cfg = h.out, h.cfg
    if out.exists() and not out.is_dir():
        raise InnardsError(f"output path {out} exists and is not a folder")
    old = _saved_plan(out) if out.is_dir() else None
    diffs = _plan_diff(old, h.plan) if old is not None else []
    if diffs and not cfg.overwrite:
        raise InnardsError(f"store {out} was made with other settings ({'; '.join(diffs[:3])}); "
                           "use --overwrite to replace it")
    resuming = old is not None and not cfg.overwrite
    if not (resuming and (out / "manifest.json").is_file()):
        base = _existing_parent(out)
        have = _committed_rows(out) if resuming else 0
        est, left = h.estimate_bytes(cfg.tokens), h.estimate_bytes(max(0, cfg.tokens - have))
        free = shutil.disk_usage(base).free + (_tree_bytes(out) if cfg.overwrite else 0)
        resume = f"; resuming after {have:,} rows, ~{_human(left)} still to write" if resuming else ""
        _log(f"{cfg.tokens:,} tokens x {len(h.sites)} site(s) ({', '.join(h.names)}) as {cfg.store_dtype}: "
             f"~{_human(est)} on disk ({_human(free)} free){resume}", dist)
        if left > free:
            raise InnardsError(f"not enough disk space in {base}: need ~{_human(left)}, {_human(free)} free")
    # the plan decides which settings may differ (see module docstring), so none is compared twice
    run = Run.open(out, "store", cfg, inputs={"model": cfg.model.name, "text": cfg.text}, always_resume=True,
                   overwrite=cfg.overwrite, free=[f.name for f in fields(HarvestConfig)])
    try:
        if run.state != "complete":
            if not (out / PLAN).is_file():
                write_json(out / PLAN, h.plan)  # first: a folder holding this is a store to resume
            (out / SHARDS).mkdir(exist_ok=True)
    except OSError as e:
        run.close()
        raise InnardsError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    return run


# ---------------------------------------------------------------- one rank's work


def run_rank(h: Harvester, dist: Dist) -> dict:
    """Harvest this rank's quota (resuming after its committed shards); returns its done record."""
    out, rank, world, cfg = h.out, dist.rank, dist.world, h.cfg
    done_path = out / SHARDS / f"r{rank:03d}.done.json"
    if done_path.is_file():
        return read_json(done_path, "rank record")
    records = committed(out, rank)
    have = sum(r["rows"] for r in records)
    want = quota(cfg.tokens, rank, world)
    writer = ShardWriter(out, h.widths, cfg.store_dtype, cfg.shard_tokens, rank=rank, start_seq=len(records))
    seen = 0  # rows of the stream so far, whether stored earlier or now
    bar = tqdm(total=want * world, initial=have * world, unit="tok", unit_scale=True, desc="harvest",
               disable=not dist.main, file=sys.stderr, smoothing=0.1)
    try:
        with torch.inference_mode():
            for batch in h.batches(rank, world):
                n = batch.rows
                if seen + n <= have:  # already stored: replay the stream without the model
                    seen += n
                    continue
                if seen >= want:
                    break
                rows = h.capture(batch)
                lo, hi = max(0, have - seen), min(n, want - seen)
                writer.add({k: v[lo:hi] for k, v in rows.items()}, batch.doc[lo:hi], batch.pos[lo:hi], batch.tok[lo:hi],
                           batch.names)
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


def _doc_table(shards: list[dict], seed: int, fraction: float) -> tuple[bytes, int, int, int]:
    """docs.json (dense over stream indices, with the train/val flag by document): its bytes, the number of
    validation documents, of documents with rows, and of stream indices."""
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
        v, u = is_val(name or str(i), seed, fraction)
        val[i] = v
        draws.append((u, i))
    if fraction > 0 and len(ids) >= 2 and not any(val):
        val[min(draws)[1]] = True  # tiny stores still get a validation document
    if all(val[i] for i in ids):
        val[max(draws)[1]] = False  # ... and always a training one
    return (json.dumps({"ids": table, "val": val}) + "\n").encode(), sum(val), len(ids), size


def finalize(h: Harvester, world: int) -> dict:
    """Merge every rank's shards into one manifest, statistics file and document table (rank 0)."""
    out, cfg = h.out, h.cfg
    shards: list[dict] = []
    ranks = []
    for rank in range(world):
        done = read_json(out / SHARDS / f"r{rank:03d}.done.json", "rank record")
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
    parts: dict[str, list[Moments]] = {s: [] for s in h.names}
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

    docs_bytes, n_val, n_docs, size = _doc_table(shards, cfg.seed, cfg.val_fraction)
    atomic_write_bytes(out / "docs.json", docs_bytes)

    offsets = 0
    listed = []
    for rec in shards:
        listed.append({"name": rec["name"], "rank": rec["rank"], "rows": rec["rows"], "offset": offsets, "files": rec["files"]})
        offsets += rec["rows"]
    frame = framing(h.model.tokenizer)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {**(getattr(h.model, "innards_source", {}) or {}), "n_layers": getattr(h.model.config, "num_hidden_layers", None)},
        "sites": h.site_meta,
        "index_convention": h.plan["index_convention"],
        "dtype": cfg.store_dtype,
        "storage": {"layout": "one (rows, width) .npy per shard and site, C order", "bf16": BF16_NOTE,
                    "index": {"dtype": [list(x) for x in INDEX_DTYPE.descr],
                              "doc": "stream index of the document (see docs.json)",
                              "pos": "position of the token within its document's content tokens, from 0",
                              "tok": "token id"}},
        "context": h.context,
        "tokens": total,
        "tokens_requested": cfg.tokens,
        "special_tokens": {"prefix": list(frame.prefix), "suffix": list(frame.suffix),
                           "excluded_ids": sorted(frame.special),
                           "note": "BOS (or CLS/SEP) frames every chunk; special tokens are never stored"},
        "text": {**h.source.describe(), "order": cfg.order, "documents_with_rows": n_docs,
                 "invalid_utf8_bytes": getattr(h.source, "invalid_bytes", 0)},
        "settings": h.plan["settings"],
        "split": {"by": "document", "method": "sha256(f'{seed}:{doc_id}')[:8] / 2**64 < val_fraction",
                  "val_fraction": cfg.val_fraction, "seed": cfg.seed, "val_docs": n_val, "train_docs": n_docs - n_val},
        "docs": {"path": "docs.json", "sha256": hashlib.sha256(docs_bytes).hexdigest(), "count": size},
        "stats": {"path": "stats.safetensors", "sha256": stats_sha, "summary": summary,
                  "note": "float64 Chan merge of per-shard moments in shard order; var is the population variance"},
        "innards": {"version": __version__, "git": git_revision()},
        "ranks": ranks,
        "plan": h.plan,
        "shards": listed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------- entry point


def harvest(cfg: HarvestConfig, model: PreTrainedModel | None = None) -> Path:
    """Harvest activations into ``cfg.out`` (resuming a killed run; a no-op for a finished one)."""
    require(bool(cfg.out), "no output folder given (--out DIR)")
    dist = init_dist()
    h = Harvester(cfg, model=model, world=dist.world)
    h.check_documents()
    run: Run | None = None
    failure = None
    if dist.main:
        try:
            run = open_output(h, dist)
        except InnardsError as e:
            failure = str(e)
    state = run.state if run is not None else None
    state, failure = dist.from_main((state, failure))  # every rank learns the state, or the refusal, from rank 0
    if failure is not None:
        raise InnardsError(failure)
    try:
        if state == "complete":
            _log(f"store {h.out} is already complete; nothing to do", dist)
            return h.out
        h.source.prepare(dist.rank, dist.world)
        dist.barrier()
        run_rank(h, dist)
        dist.barrier()
        if run is not None:
            m = finalize(h, dist.world)
            run.complete(headline={"tokens": m["tokens"], "sites": ",".join(h.names), "dtype": cfg.store_dtype,
                                   "shards": len(m["shards"])},
                         outputs=["manifest.json", "stats.safetensors", "docs.json"])
            _log(f"wrote {m['tokens']:,} rows in {len(m['shards'])} shard(s) to {h.out}", dist)
        dist.barrier()
    finally:
        if run is not None:
            run.close()
    return h.out
