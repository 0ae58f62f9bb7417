"""Text sources -> documents -> token chunks, deterministically.

A source spec is one of

* a ``.txt`` / ``.txt.gz`` file (documents split on blank lines by default), a ``.jsonl`` /
  ``.jsonl.gz`` file (one document per record, field ``text``), an SAE-Probes-style ``.csv`` /
  ``.csv.zst`` file (one document per row, column ``prompt``), or a folder of such files
  (recursively, in sorted relative-path order);
* a Hugging Face dataset: ``hf:NAME[:SPLIT]`` or ``hf:NAME:CONFIG:SPLIT`` (streamed), or a local
  folder written by ``datasets`` (``save_to_disk``) or holding parquet/arrow files;
* ``generate:N``: N documents sampled from the model being harvested (seeded); the samples are
  written to a cache folder so a resumed run reads the very same text;
* ``random:N``: N context-long documents of uniformly random token ids (seeded): for benchmarks
  and smoke tests, where only the amount of computation matters;
* ``demo-samples``: the 4,096 documents (about 220k tokens) the demo LM wrote itself, shipped with
  the package (``models/demo/samples.jsonl.gz``): the corpus of ``make demo`` and the README.

Every document gets a stable id (``relative/path:k``, ``hf:NAME:SPLIT:row``, ``gen:SEED:i``) and a
stream index (its position in the source). Invalid UTF-8 is replaced and counted (one warning per
file on stderr). Documents are tokenised without special tokens and cut into chunks of at most
``context`` tokens with BOS (or CLS ... SEP for encoders) around each chunk; special tokens are
never harvested.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import datasets
import numpy as np
import torch
import zstandard
from tqdm import tqdm
from transformers import GenerationConfig

from innards.errors import InnardsError
from innards.io import atomic_write_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# 4,096 documents the demo LM wrote itself (seed 0): the demo's corpus, shipped so nothing is generated at run time
DEMO_SAMPLES = Path(__file__).resolve().parent.parent / "models" / "demo" / "samples.jsonl.gz"
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".csv", ".csv.zst")
SPLITS = ("blank", "line", "formfeed", "file")


@dataclass(frozen=True)
class Document:
    """One document: a stable id and either text or (pre-tokenised) token ids."""

    id: str
    text: str | None = None
    tokens: tuple[int, ...] | None = None


@dataclass
class Chunk:
    """At most ``context`` tokens of one document, special tokens included, and which to harvest."""

    doc: int  # stream index of the document
    start: int  # position in the document (content tokens) of the chunk's first content token
    ids: np.ndarray  # int64 (T,), with BOS/CLS/SEP
    keep: np.ndarray  # bool (T,), False at special tokens
    positions: np.ndarray  # int32 (T,), position in the document (meaningful where keep)
    name: str = ""  # the document's id


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(TEXT_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


_ESCAPED = re.compile("[\udc80-\udcff]")


class _Utf8:
    """Decode bytes as UTF-8, replacing each invalid byte by U+FFFD and counting them."""

    def __init__(self) -> None:
        self.invalid = 0

    def decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            # surrogateescape maps each invalid byte to one lone surrogate, which valid UTF-8 never yields
            text, n = _ESCAPED.subn("\ufffd", data.decode("utf-8", errors="surrogateescape"))
            self.invalid += n
            return text


def _warn(msg: str) -> None:
    print(f"innards: warning: {msg}", file=sys.stderr)


class TextSource:
    """A deterministic stream of documents with a fingerprint for compatibility checks."""

    spec: str = ""
    quiet: bool = False  # no warnings (set while peeking at the first document)

    def __iter__(self) -> Iterator[Document]:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """A string that changes when the documents would change."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What an artifact records about its text."""
        return {"spec": self.spec, "fingerprint": self.fingerprint}

    def prepare(self, rank: int = 0, world: int = 1) -> None:
        """Work needed before iterating (only ``generate:`` has any); ranks share it."""


# ---------------------------------------------------------------- files

ORDERS = ("shuffled", "sequential")
READ_BYTES = 1 << 13  # raw bytes read at a time by a shuffled read (each open segment buffers about this much)
MAX_SEGMENTS = 512  # a shuffled read cuts the input into at most this many segments (plus one per file) ...
MIN_SEGMENT = 1 << 12  # ... of at least this many raw bytes
WAVE = 512  # segments read at once, their documents interleaved at random


def _open_binary(path: Path) -> BinaryIO:
    s = _suffix(path)
    if s.endswith(".gz"):
        return gzip.open(path, "rb")
    if s.endswith(".zst"):
        # the zstd reader has no readline; buffering gives line iteration
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _file_fingerprint(path: Path, h: hashlib._Hash) -> None:
    st = path.stat()
    h.update(f"{st.st_size}\n".encode())
    with open(path, "rb") as f:  # head and tail: catches edits without hashing terabytes
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))


@dataclass(frozen=True)
class _Snapshot:
    """Where a read can restart: raw (file) and decompressed offsets, and the gzip decoder's state there."""

    raw: int
    out: int
    state: Any = None  # zlib.Decompress (its type is not importable)


@dataclass
class _Segment:
    """Consecutive documents of one file: ``count`` of them from decompressed offset ``start`` on."""

    file: Path
    snap: _Snapshot | None  # None: the whole file, parsed from its start
    start: int = 0
    k: int = 0  # number of the first document within its file
    lineno: int = 0  # lines before it
    count: int = 0


def _chunks(path: Path, snap: _Snapshot, every: int = 0, snaps: list[_Snapshot] | None = None) -> Iterator[bytes]:
    """Decompressed bytes of a file from a snapshot on; with ``snaps``, record a restart point every ``every`` raw bytes.

    No file descriptor is held between reads, so hundreds of segments can be read at once.
    """
    s = _suffix(path)
    gz = s.endswith(".gz")
    z = (snap.state.copy() if snap.state is not None else zlib.decompressobj(31)) if gz else \
        zstandard.ZstdDecompressor().decompressobj() if s.endswith(".zst") else None
    raw, out, due = snap.raw, snap.out, snap.raw + every
    size = min(READ_BYTES, every) if snaps is not None else READ_BYTES  # restart points fall between reads
    while True:
        with open(path, "rb") as fh:
            fh.seek(raw)
            data = fh.read(size)
        if not data:
            break
        raw += len(data)
        if z is None:
            chunk = data
        else:
            chunk = z.decompress(data)
            while gz and z.eof and z.unused_data:  # a file of several gzip members
                rest, z = z.unused_data, zlib.decompressobj(31)
                chunk += z.decompress(rest)
        out += len(chunk)
        if snaps is not None and raw >= due:
            snaps.append(_Snapshot(raw, out, z.copy() if z is not None else None))
            due = raw + every
        yield chunk
    if gz and raw > 0 and not z.eof:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (with their newline) of a stream of byte chunks; a line longer than a chunk is joined once."""
    pending: list[bytes] = []
    for chunk in chunks:
        at = 0
        while (nl := chunk.find(b"\n", at)) >= 0:
            piece = chunk[at : nl + 1]
            if pending:
                pending.append(piece)
                piece = b"".join(pending)
                pending.clear()
            yield piece
            at = nl + 1
        if at < len(chunk):
            pending.append(chunk[at:])
    if pending:
        yield b"".join(pending)


def _skip(chunks: Iterable[bytes], n: int) -> Iterator[bytes]:
    """The chunks without their first ``n`` bytes."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:] if n else chunk
        n = 0


# A parsed document with where it starts: (decompressed offset, line number of its first line, number in file, doc)
_Placed = tuple[int, int, int, Document]


class FileSource(TextSource):
    """Plain text, JSON-lines or CSV files, one file or a folder of them.

    ``order="sequential"`` reads the files in sorted path order, each from start to end.
    ``order="shuffled"`` first indexes the input (one pass: document counts, and a restart point
    every ~1/512 of it, gzip decoder states included), then reads it as a seeded shuffle: segments
    of consecutive documents (at most ~512 over the whole input, at least 4 KB each; a CSV, zstd,
    form-feed or whole-file document file is one segment) in random order, ``WAVE`` at a time with
    their documents interleaved uniformly at random, so any prefix of the stream samples the whole
    input. Memory stays bounded: ~40 KB per gzip restart point and ~60 KB per segment being read
    (no file stays open between reads). Document ids are the same in both orders.
    """

    def __init__(self, spec: str, path: Path, text_field: str = "text", split: str = "blank",
                 order: str = "sequential", seed: int = 0):
        if split not in SPLITS:
            raise InnardsError(f"unknown document split '{split}' (choose {', '.join(SPLITS)})")
        if order not in ORDERS:
            raise InnardsError(f"unknown document order '{order}' (choose {', '.join(ORDERS)})")
        self.spec, self.root, self.text_field, self.split = spec, path, text_field, split
        self.order, self.seed = order, seed
        if path.is_dir():
            self.files = sorted((p for p in path.rglob("*") if p.is_file() and _suffix(p) in TEXT_SUFFIXES
                                 and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                                key=lambda p: p.relative_to(path).as_posix())
            if not self.files:
                raise InnardsError(f"no text files ({', '.join(TEXT_SUFFIXES)}) in folder {path}")
        else:
            if _suffix(path) not in TEXT_SUFFIXES:
                raise InnardsError(f"unsupported text file {path} (use {', '.join(TEXT_SUFFIXES)})")
            self.files = [path]
        self.invalid_bytes = 0
        self._segments: list[_Segment] | None = None

    def _rel(self, f: Path) -> str:
        return f.relative_to(self.root).as_posix() if self.root.is_dir() else f.name

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"files|{self.text_field}|{self.split}\n".encode())
        for f in self.files:
            h.update(f"{self._rel(f)}\n".encode())
            _file_fingerprint(f, h)
        return h.hexdigest()

    def describe(self) -> dict:
        return {**super().describe(), "order": self.order, "files": len(self.files)}

    # ----- reading
    def __iter__(self) -> Iterator[Document]:
        self.invalid_bytes = 0
        utf8 = {f: _Utf8() for f in self.files}
        try:
            if self.order == "sequential":
                for f in self.files:
                    yield from self._guarded(f, self._whole(f, utf8[f]))
                    self._warn(f, utf8.pop(f))
            else:
                yield from self._shuffled(utf8)
        finally:  # also when the reader stops early (token budget reached)
            for f, u in utf8.items():
                self._warn(f, u)

    def _warn(self, f: Path, utf8: _Utf8) -> None:
        if utf8.invalid:
            self.invalid_bytes += utf8.invalid
            if not self.quiet:
                _warn(f"{f}: replaced {utf8.invalid} invalid UTF-8 byte(s)")
            utf8.invalid = 0

    @staticmethod
    def _guarded(f: Path, docs: Iterator[Document]) -> Iterator[Document]:
        try:
            yield from docs
        except (OSError, EOFError, csv.Error, zlib.error, zstandard.ZstdError) as e:
            # truncated gzip, bad zstd frame, unreadable file: the source is bad input, not a bug
            raise InnardsError(f"cannot read text file {f}: {getattr(e, 'strerror', None) or e}") from None

    def _segmentable(self, f: Path) -> bool:
        """Whether documents of ``f`` can be read from a restart point (line-based formats, plain or gzip)."""
        s = _suffix(f)
        return s in (".jsonl", ".jsonl.gz") or (s in (".txt", ".txt.gz") and self.split in ("blank", "line"))

    def _parse(self, f: Path, lines: Iterable[bytes], utf8: _Utf8, at: int = 0, lineno: int = 0, k: int = 0
               ) -> Iterator[_Placed]:
        """Documents of a line-based file from a document start on, with where each starts."""
        if _suffix(f).startswith(".jsonl"):
            return _jsonl(lines, f, self._rel(f), utf8, self.text_field, at, lineno, k)
        return _txt(lines, self._rel(f), utf8, self.split, at, lineno, k)

    def _whole(self, f: Path, utf8: _Utf8, lines: Iterable[bytes] | None = None) -> Iterator[Document]:
        """Every document of one file, in order (from ``lines``, else from the open file)."""
        with contextlib.ExitStack() as stack:
            if lines is None:
                lines = stack.enter_context(_open_binary(f))
            if _suffix(f).startswith(".csv"):
                yield from _csv(lines, f, self._rel(f), utf8, self.text_field)
            else:
                for *_, doc in self._parse(f, lines, utf8):
                    yield doc

    def _index(self) -> list[_Segment]:
        """One pass over the input: segments of consecutive documents with their restart points."""
        if self._segments is not None:
            return self._segments
        every = max(MIN_SEGMENT, sum(f.stat().st_size for f in self.files) // MAX_SEGMENTS)
        segments: list[_Segment] = []
        for f in self.files:
            mine: list[_Segment] = []
            if not self._segmentable(f):
                n = sum(1 for _ in self._guarded(f, self._whole(f, _Utf8())))
                mine = [_Segment(f, None, count=n)] if n else []
            else:
                snaps = [_Snapshot(0, 0)]
                outs = [0]
                for start, lineno, k, _ in self._guarded(f, self._parse(f, _lines(_chunks(f, snaps[0], every, snaps)), _Utf8())):
                    while len(outs) < len(snaps):
                        outs.append(snaps[len(outs)].out)
                    snap = snaps[bisect.bisect_right(outs, start) - 1]
                    if mine and mine[-1].snap is snap:
                        mine[-1].count += 1
                    else:
                        mine.append(_Segment(f, snap, start, k, lineno - 1, 1))
            segments += mine
        self._segments = segments
        return segments

    def _read(self, seg: _Segment, utf8: _Utf8) -> Iterator[Document]:
        if seg.snap is None:
            docs = self._whole(seg.file, utf8, _lines(_chunks(seg.file, _Snapshot(0, 0))))
        else:
            chunks = _skip(_chunks(seg.file, seg.snap), seg.start - seg.snap.out)
            docs = (doc for *_, doc in self._parse(seg.file, _lines(chunks), utf8, seg.start, seg.lineno, seg.k))
        n = 0
        for doc in self._guarded(seg.file, docs):
            yield doc
            n += 1
            if n == seg.count:
                return
        raise InnardsError(f"text file {seg.file} changed while it was being read")

    def _shuffled(self, utf8: dict[Path, _Utf8]) -> Iterator[Document]:
        segments = self._index()
        rng = np.random.default_rng([self.seed, 0x5EED])
        order = rng.permutation(len(segments))
        for w in range(0, len(order), WAVE):
            wave = [segments[i] for i in order[w : w + WAVE]]
            left = np.array([s.count for s in wave], dtype=np.int64)
            readers: list[Iterator[Document] | None] = [None] * len(wave)
            try:
                while (total := int(left.sum())) > 0:
                    # a uniformly random interleaving of the wave's segments, drawn in blocks
                    take = rng.multivariate_hypergeometric(left, min(total, 4096))
                    left -= take
                    for j in rng.permutation(np.repeat(np.arange(len(wave)), take)):
                        if readers[j] is None:
                            readers[j] = self._read(wave[j], utf8[wave[j].file])
                        yield next(readers[j])
            finally:
                for r in readers:
                    if r is not None:
                        r.close()


def _txt(lines: Iterable[bytes], rel: str, utf8: _Utf8, split: str, at: int = 0, lineno: int = 0, k: int = 0
         ) -> Iterator[_Placed]:
    """Documents of a text file: runs of lines split on blank lines, lines, form feeds or the whole file."""
    buf: list[bytes] = []
    start = first = -1

    def flush() -> Iterator[_Placed]:
        nonlocal k, start
        text = utf8.decode(b"".join(buf)).strip()
        buf.clear()
        if text:
            yield start, first, k, Document(f"{rel}:{k}", text)
            k += 1
        start = -1

    for line in lines:
        lineno += 1
        if split == "line":
            start, first = at, lineno
            buf.append(line)
            yield from flush()
        elif split == "blank" and not line.strip():
            yield from flush()
        elif split == "formfeed" and b"\f" in line:
            before, _, after = line.partition(b"\f")
            if start < 0:
                start, first = at, lineno
            buf.append(before)
            yield from flush()
            start, first = at + len(before) + 1, lineno
            buf.append(after)
        else:
            if start < 0:
                start, first = at, lineno
            buf.append(line)
        at += len(line)
    yield from flush()


def _jsonl(lines: Iterable[bytes], f: Path, rel: str, utf8: _Utf8, text_field: str, at: int = 0, lineno: int = 0,
           k: int = 0) -> Iterator[_Placed]:
    """One document per JSON record (blank lines skipped; records without text are numbered but not yielded)."""
    for line in lines:
        lineno += 1
        start, at = at, at + len(line)
        if not line.strip():
            continue
        try:
            rec = json.loads(utf8.decode(line))
        except json.JSONDecodeError:
            raise InnardsError(f"{f}:{lineno}: not valid JSON") from None
        doc = _record_doc(rec, f"{rel}:{k}", text_field, f"{f}:{lineno}")
        k += 1
        if doc is not None:
            yield start, lineno, k - 1, doc


def _csv(lines: Iterable[bytes], f: Path, rel: str, utf8: _Utf8, text_field: str) -> Iterator[Document]:
    """One document per CSV row, from the text column (else ``prompt``)."""
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(utf8.decode(line) for line in lines)
    cols = reader.fieldnames or []
    col = text_field if text_field in cols else "prompt" if "prompt" in cols else None
    if col is None:
        raise InnardsError(f"{f}: no '{text_field}' or 'prompt' column (columns: {', '.join(cols) or 'none'})")
    for k, row in enumerate(reader):
        value = (row.get(col) or "").strip()
        if value:
            yield Document(f"{rel}:{k}", value)


def _record_doc(rec: object, doc_id: str, text_field: str, where: str) -> Document | None:
    """A document from a JSON/dataset record: the text field, else pre-tokenised ids."""
    if not isinstance(rec, dict):
        raise InnardsError(f"{where}: expected an object with a '{text_field}' field")
    for key in (text_field, "text", "prompt"):
        if key in rec:
            value = rec[key]
            if not isinstance(value, str):
                raise InnardsError(f"{where}: field '{key}' is not a string")
            value = value.strip()
            return Document(doc_id, value) if value else None
    for key in ("input_ids", "tokens"):
        if key in rec and isinstance(rec[key], (list, tuple, np.ndarray)):
            toks = tuple(int(t) for t in rec[key])
            return Document(doc_id, tokens=toks) if toks else None
    raise InnardsError(f"{where}: no '{text_field}' field (fields: {', '.join(map(str, rec))})")


# ---------------------------------------------------------------- Hugging Face datasets


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


def _has_table_files(p: Path) -> bool:
    return p.is_dir() and any(q.suffix in (".parquet", ".arrow") for q in p.rglob("*") if q.is_file())


class HFSource(TextSource):
    """A Hugging Face dataset (hub id, streamed, or local folder).

    ``order="shuffled"``: a dataset on disk is read in a seeded permutation of its rows (ids keep the
    row numbers); a streamed one through the datasets library's seeded shuffle (shard order and a
    10,000-row buffer; ids number the rows in that order).
    """

    def __init__(self, spec: str, name: str, split: str | None, config: str | None = None, text_field: str = "text",
                 order: str = "sequential", seed: int = 0):
        if order not in ORDERS:
            raise InnardsError(f"unknown document order '{order}' (choose {', '.join(ORDERS)})")
        self.spec, self.name, self.split, self.config, self.text_field = spec, name, split, config, text_field
        self.order, self.seed = order, seed
        self._local = Path(name).expanduser()

    def _dataset(self) -> datasets.Dataset | datasets.IterableDataset:
        datasets.disable_progress_bars()
        try:
            if _is_saved_dataset(self._local):
                ds = datasets.load_from_disk(str(self._local))
                if isinstance(ds, datasets.DatasetDict):
                    split = self.split or ("train" if "train" in ds else next(iter(ds)))
                    if split not in ds:
                        raise InnardsError(f"dataset {self.name} has no split '{split}' (splits: {', '.join(ds)})")
                    ds = ds[split]
                return ds
            return datasets.load_dataset(str(self._local) if self._local.exists() else self.name, self.config,
                                         split=self.split or "train", streaming=True)
        except InnardsError:
            raise
        except Exception as e:
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise InnardsError(f"cannot load dataset '{self.name}': {msg}") from None

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"hf|{self.name}|{self.config}|{self.split}|{self.text_field}\n".encode())
        if self._local.exists():
            if _is_saved_dataset(self._local):
                ds = self._dataset()
                h.update(str(getattr(ds, "_fingerprint", "")).encode())
            else:
                for f in sorted(q for q in self._local.rglob("*") if q.is_file()):
                    h.update(f"{f.relative_to(self._local).as_posix()}\n".encode())
                    _file_fingerprint(f, h)
        return h.hexdigest()

    def describe(self) -> dict:
        return {**super().describe(), "order": self.order}

    def _rows(self) -> Iterator[tuple[int, Any]]:
        ds = self._dataset()
        if self.order == "sequential":
            return enumerate(ds)
        if isinstance(ds, datasets.Dataset):
            perm = np.random.default_rng([self.seed, 0x5EED]).permutation(len(ds))
            return zip(perm.tolist(), ds.select(perm))
        return enumerate(ds.shuffle(seed=self.seed, buffer_size=10_000))

    def __iter__(self) -> Iterator[Document]:
        tag = f"hf:{self.name}:{self.split or 'train'}"
        try:
            for k, rec in self._rows():
                doc = _record_doc(rec, f"{tag}:{k}", self.text_field, f"{tag} row {k}")
                if doc is not None:
                    yield doc
        except InnardsError:
            raise
        except Exception as e:
            raise InnardsError(f"error reading dataset '{self.name}': {str(e).splitlines()[0][:200]}") from None


# ---------------------------------------------------------------- generate:N


class GenerateSource(TextSource):
    """N documents sampled from a causal LM, in fixed seeded blocks cached as JSON lines."""

    def __init__(self, spec: str, n: int, model: PreTrainedModel | None, cache_dir: Path | None = None, seed: int = 0,
                 max_tokens: int = 256, block: int = 64):
        self.spec, self.n, self.model, self.cache_dir = spec, n, model, cache_dir
        self.seed, self.max_tokens, self.block = seed, max_tokens, block
        self._docs: list[Document] = []
        if model is None:
            raise InnardsError(f"text '{spec}' samples from a model; none was given")
        if not hasattr(model, "generate") or not getattr(model, "can_generate", lambda: False)():
            raise InnardsError(f"text '{spec}' needs a causal LM that can generate; {type(model).__name__} cannot")

    @property
    def fingerprint(self) -> str:
        src = getattr(self.model, "innards_source", {}) or {}
        key = {k: src.get(k) for k in ("name", "revision", "sha256")}
        return hashlib.sha256(json.dumps(["generate", self.n, self.seed, self.max_tokens, self.block, key],
                                         sort_keys=True).encode()).hexdigest()

    def _blocks(self) -> int:
        return (self.n + self.block - 1) // self.block

    def _path(self, b: int) -> Path | None:
        return None if self.cache_dir is None else Path(self.cache_dir) / f"block-{b:06d}.jsonl"

    def _generate_block(self, b: int) -> list[str]:
        tok = self.model.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise InnardsError("cannot generate: the tokenizer has neither a BOS nor an EOS token")
        count = self.block  # whole blocks always: generate:N and generate:M share their common blocks
        device = next(self.model.parameters()).device
        ids = torch.full((count, 1), start, dtype=torch.long, device=device)
        cfg = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                               max_new_tokens=max(1, self.max_tokens - 1),
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else start,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(self.seed * 1_000_003 + b)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        texts = []
        for row in out[:, 1:].tolist():
            if tok.eos_token_id is not None and tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            texts.append(tok.decode(row, skip_special_tokens=True))
        return texts

    def prepare(self, rank: int = 0, world: int = 1) -> None:
        """Sample the blocks of this rank (block b goes to rank b % world) unless cached."""
        todo = [b for b in range(self._blocks()) if b % world == rank
                and not (self._path(b) is not None and self._path(b).is_file())]
        if not todo:
            return
        if self.cache_dir is not None:
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
        bar = tqdm(todo, desc="generating text", unit="block", disable=rank != 0, file=sys.stderr)
        for b in bar:
            texts = self._generate_block(b)
            path = self._path(b)
            if path is None:
                self._docs.extend(Document(f"gen:{self.seed}:{b * self.block + i}", t) for i, t in enumerate(texts))
            else:
                atomic_write_bytes(path, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())

    def __iter__(self) -> Iterator[Document]:
        if self.cache_dir is None:
            if not self._docs:
                self.prepare()
            yield from self._docs[: self.n]
            return
        for b in range(self._blocks()):
            path = self._path(b)
            if not path.is_file():
                self.prepare()  # single process: fill in whatever is missing
                if not path.is_file():
                    raise InnardsError(f"generated text block missing: {path}")
            lines = path.read_text(encoding="utf-8").splitlines()
            for i, line in enumerate(lines[: self.n - b * self.block]):
                yield Document(f"gen:{self.seed}:{b * self.block + i}", json.loads(line)["text"])


class RandomSource(TextSource):
    """N documents of uniformly random non-special token ids, ``max_tokens - 1`` long (benchmarks, smoke tests)."""

    def __init__(self, spec: str, n: int, model: PreTrainedModel | None, seed: int = 0, max_tokens: int = 256):
        if model is None or getattr(model, "tokenizer", None) is None:
            raise InnardsError(f"text '{spec}' draws token ids from a model's vocabulary; no model was given")
        tok = model.tokenizer
        vocab = min(len(tok), int(getattr(model.config, "vocab_size", len(tok)) or len(tok)))
        self.allowed = np.setdiff1d(np.arange(vocab), np.asarray(sorted(tok.all_special_ids), dtype=np.int64))
        self.spec, self.n, self.seed, self.length = spec, n, seed, max(1, max_tokens - 1)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(["random", self.n, self.seed, self.length, len(self.allowed),
                                          int(self.allowed[-1])]).encode()).hexdigest()

    def __iter__(self) -> Iterator[Document]:
        rng = np.random.default_rng(self.seed)
        for i in range(self.n):
            ids = self.allowed[rng.integers(0, len(self.allowed), self.length)]
            yield Document(f"random:{self.seed}:{i}", tokens=tuple(ids.tolist()))


# ---------------------------------------------------------------- entry points


def open_text(spec: str, *, text_field: str = "text", split: str = "blank", model: PreTrainedModel | None = None,
              seed: int = 0, max_tokens: int = 256, cache_dir: str | Path | None = None,
              order: str = "sequential") -> TextSource:
    """Parse a text source spec (see module docstring) into a :class:`TextSource`.

    ``order``: "sequential" (files in path order, datasets in row order) or "shuffled" (a seeded
    shuffle of documents across the whole input; see :class:`FileSource`). Samples of ``generate:``
    and ``random:`` are independent draws, so their order does not matter and is kept.
    """
    if order not in ORDERS:
        raise InnardsError(f"unknown document order '{order}' (choose {', '.join(ORDERS)})")
    spec = str(spec).strip()
    if not spec:
        raise InnardsError("no text source given (--text)")
    if spec.startswith("generate:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise InnardsError(f"bad text spec '{spec}' (use generate:N)") from None
        if n <= 0:
            raise InnardsError(f"bad text spec '{spec}': N must be positive")
        return GenerateSource(spec, n, model=model, cache_dir=Path(cache_dir) if cache_dir else None, seed=seed,
                              max_tokens=max_tokens)
    if spec.startswith("random:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise InnardsError(f"bad text spec '{spec}' (use random:N)") from None
        if n <= 0:
            raise InnardsError(f"bad text spec '{spec}': N must be positive")
        return RandomSource(spec, n, model, seed=seed, max_tokens=max_tokens)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0]:
            raise InnardsError(f"bad text spec '{spec}' (use hf:NAME[:SPLIT] or hf:NAME:CONFIG:SPLIT)")
        kw = {"text_field": text_field, "order": order, "seed": seed}
        if len(parts) == 1:
            return HFSource(spec, parts[0], None, **kw)
        if len(parts) == 2:
            return HFSource(spec, parts[0], parts[1], **kw)
        if len(parts) == 3:
            return HFSource(spec, parts[0], parts[2], config=parts[1], **kw)
        raise InnardsError(f"bad text spec '{spec}' (use hf:NAME[:SPLIT] or hf:NAME:CONFIG:SPLIT)")
    path = DEMO_SAMPLES if spec == "demo-samples" else Path(spec).expanduser()
    if not path.exists():
        raise InnardsError(f"text source not found: {spec}")
    if _is_saved_dataset(path) or (path.is_dir() and _has_table_files(path)
                                   and not any(_suffix(p) in TEXT_SUFFIXES for p in path.rglob("*") if p.is_file())):
        return HFSource(spec, str(path), None, text_field=text_field, order=order, seed=seed)
    if not os.access(path, os.R_OK):
        raise InnardsError(f"text source is not readable: {spec}")
    return FileSource(spec, path.resolve(), text_field=text_field, split=split, order=order, seed=seed)


def iter_documents(spec: str | TextSource, **kwargs: Any) -> Iterator[Document]:
    """Documents of a text source in their deterministic order (raises InnardsError if there are none)."""
    source = spec if isinstance(spec, TextSource) else open_text(spec, **kwargs)
    empty = True
    for doc in source:
        empty = False
        yield doc
    if empty:
        raise InnardsError(f"text source '{source.spec}' has no documents")


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Framing:
    """Special tokens put around every chunk, and the ids never harvested."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    special: frozenset[int]
    pad: int

    @property
    def content(self) -> int:
        return len(self.prefix) + len(self.suffix)


def framing(tokenizer: PreTrainedTokenizerBase) -> Framing:
    """BOS before each chunk when the tokenizer has one, else CLS ... SEP (encoders), else nothing."""
    bos, cls, sep = tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if bos is not None:
        prefix, suffix = (bos,), ()
    elif cls is not None:
        prefix, suffix = (cls,), ((sep,) if sep is not None else ())
    else:
        prefix, suffix = (), ()
    special = frozenset(int(i) for i in tokenizer.all_special_ids)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return Framing(prefix, suffix, special, int(pad))


WINDOW = 1 << 16  # characters tokenised at once: longer documents go in overlapping windows (memory flat in size)
BATCH_CHARS = 1 << 18  # characters of short documents tokenised in one call


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than the model's context are expected; they are chunked below
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _window(tokenizer: PreTrainedTokenizerBase, text: str, at: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    starts = np.fromiter((a for a, _ in enc["offset_mapping"]), dtype=np.int64, count=len(enc["input_ids"])) + at
    return np.asarray(enc["input_ids"], dtype=np.int64), starts


def text_tokens(text: str, tokenizer: PreTrainedTokenizerBase, window: int = WINDOW) -> Iterator[np.ndarray]:
    """Content token ids of a text, in pieces of about ``window`` characters, equal to tokenising it whole.

    Windows overlap by 3/64 of their length; the cut between two is a token that both
    tokenise identically, with the same tokens around it, so each piece is what the whole text gives
    there (tokenisers are local: a token depends on a few words around it). When no such cut exists
    (one pre-token longer than the overlap, or a tokenizer without offsets) the text is tokenised whole.
    """
    if len(text) <= window or not getattr(tokenizer, "is_fast", False):
        yield np.asarray(_encode(tokenizer, [text])[0], dtype=np.int64)
        return
    margin = max(1, window // 64)
    ids, starts = _window(tokenizer, text[:window], 0)
    done = 0  # tokens starting before this character have been yielded
    lo = 0
    while lo + window < len(text):
        lo = lo + window - 3 * margin  # the next window starts inside this one
        nids, nstarts = _window(tokenizer, text[lo : lo + window], lo)
        # both windows are trusted in [lo + margin, lo + 2 * margin): a margin away from either's edge
        a = (starts >= lo + margin) & (starts < lo + 2 * margin)
        b = (nstarts >= lo + margin) & (nstarts < lo + 2 * margin)
        if not a.any() or not (np.array_equal(ids[a], nids[b]) and np.array_equal(starts[a], nstarts[b])):
            ids, starts = _window(tokenizer, text, 0)  # no safe cut: the rest as the whole text gives it
            break
        cut = int(starts[a][0])
        yield ids[(starts >= done) & (starts < cut)]
        done, ids, starts = cut, nids, nstarts
    yield ids[starts >= done]


def tokenize_documents(docs: Iterable[tuple[int, Document]], tokenizer: PreTrainedTokenizerBase, batch: int = 64
                       ) -> Iterator[tuple[int, Document, Iterator[np.ndarray]]]:
    """(stream index, document) -> (stream index, document, its content token ids in pieces).

    Short documents are tokenised together (up to ``batch`` of them, ``BATCH_CHARS`` characters);
    a document longer than ``WINDOW`` characters on its own, in windows (:func:`text_tokens`).
    """
    pending: list[tuple[int, Document]] = []
    chars = 0

    def flush() -> Iterator[tuple[int, Document, Iterator[np.ndarray]]]:
        nonlocal chars
        texts = [d.text for _, d in pending if d.tokens is None]
        it = iter(_encode(tokenizer, texts) if texts else [])
        for i, d in pending:
            ids = d.tokens if d.tokens is not None else next(it)
            yield i, d, iter([np.asarray(ids, dtype=np.int64)])
        pending.clear()
        chars = 0

    for i, d in docs:
        if d.tokens is None and len(d.text) > WINDOW:
            yield from flush()
            yield i, d, text_tokens(d.text, tokenizer)
            continue
        pending.append((i, d))
        chars += len(d.text) if d.tokens is None else 0
        if len(pending) >= batch or chars >= BATCH_CHARS:
            yield from flush()
    yield from flush()


def chunk_pieces(index: int, pieces: Iterable[np.ndarray], context: int, frame: Framing, name: str = "") -> Iterator[Chunk]:
    """Cut one document's content tokens (arriving in pieces) into chunks of at most ``context`` tokens, framed."""
    room = context - frame.content
    if room <= 0:
        raise InnardsError(f"context {context} leaves no room for tokens")
    special = np.fromiter(frame.special, dtype=np.int64) if frame.special else np.zeros(0, np.int64)
    pre, suf = np.asarray(frame.prefix, np.int64), np.asarray(frame.suffix, np.int64)
    start = 0
    buf = np.zeros(0, np.int64)

    def chunk(body: np.ndarray) -> Chunk | None:
        full = np.concatenate([pre, body, suf])
        keep = np.zeros(len(full), dtype=bool)
        keep[len(pre) : len(pre) + len(body)] = ~np.isin(body, special)
        pos = np.zeros(len(full), dtype=np.int32)
        pos[len(pre) : len(pre) + len(body)] = np.arange(start, start + len(body), dtype=np.int32)
        return Chunk(index, start, full, keep, pos, name) if keep.any() else None

    for piece in pieces:
        buf = np.concatenate([buf, piece]) if len(buf) else piece
        at = 0
        while len(buf) - at >= room:
            if (c := chunk(buf[at : at + room])) is not None:
                yield c
            at += room
            start += room
        buf = buf[at:]
    if len(buf) and (c := chunk(buf)) is not None:
        yield c


def chunk_tokens(index: int, ids: np.ndarray, context: int, frame: Framing, name: str = "") -> Iterator[Chunk]:
    """Cut one document's content tokens into chunks of at most ``context`` tokens, framed."""
    return chunk_pieces(index, [np.asarray(ids, dtype=np.int64)], context, frame, name)


def iter_chunks(docs: Iterable[tuple[int, Document]], tokenizer: PreTrainedTokenizerBase, context: int) -> Iterator[Chunk]:
    """Chunks of every (stream index, document), in order."""
    frame = framing(tokenizer)
    for index, doc, pieces in tokenize_documents(docs, tokenizer):
        yield from chunk_pieces(index, pieces, context, frame, doc.id)


@dataclass
class Batch:
    """Right-padded chunks: model inputs and, for harvested tokens, where they came from."""

    input_ids: torch.Tensor  # long (B, T)
    attention_mask: torch.Tensor  # long (B, T)
    keep: torch.Tensor  # bool (B, T)
    doc: np.ndarray  # int64 (n,) per kept token, in row-major order
    pos: np.ndarray  # int32 (n,)
    tok: np.ndarray  # int32 (n,)
    names: dict[int, str] = field(default_factory=dict)  # stream index -> document id, for the batch's documents

    @property
    def rows(self) -> int:
        return int(self.doc.shape[0])


def make_batch(chunks: list[Chunk], pad: int) -> Batch:
    """Pad chunks to the longest one (not to the context) and index their kept tokens."""
    T = max(len(c.ids) for c in chunks)
    ids = np.full((len(chunks), T), pad, dtype=np.int64)
    mask = np.zeros((len(chunks), T), dtype=np.int64)
    keep = np.zeros((len(chunks), T), dtype=bool)
    pos = np.zeros((len(chunks), T), dtype=np.int32)
    doc = np.zeros((len(chunks), T), dtype=np.int64)
    for i, c in enumerate(chunks):
        n = len(c.ids)
        ids[i, :n], mask[i, :n], keep[i, :n], pos[i, :n], doc[i, :n] = c.ids, 1, c.keep, c.positions, c.doc
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(keep),
                 doc[keep], pos[keep], ids[keep].astype(np.int32), {c.doc: c.name for c in chunks})


def iter_batches(chunks: Iterable[Chunk], batch_size: int, pad: int) -> Iterator[Batch]:
    """Consecutive groups of ``batch_size`` chunks (the last may be smaller)."""
    group: list[Chunk] = []
    for c in chunks:
        group.append(c)
        if len(group) == batch_size:
            yield make_batch(group, pad)
            group = []
    if group:
        yield make_batch(group, pad)
