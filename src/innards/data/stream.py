"""Streaming mode: a producer process harvests while the trainer consumes, through a bounded disk buffer.

The buffer (``OUT/stream``) holds shards of the one activation format (:mod:`innards.data.shards`,
written by the same :class:`~innards.data.shards.ShardWriter` as a store), plus::

    spec.json                     what the producer harvests (written by the trainer; keys below)
    warmup.json, stats.safetensors, val.safetensors
                                  the warm-up pass: float64 statistics and the validation rows
    ledger.json                   the producer's progress (next shard, rows, peak buffer bytes)
    buffer_full                   present while the producer waits for room
    end.json | error.json         the producer finished | failed (type, message, traceback)
    producer.log                  the producer's stdout and stderr

Spec keys: model, site, text, context, harvest_batch, dtype (storage), model_dtype, device,
shard_rows, bound_bytes, target_rows, stats_rows, val_rows, val_fraction, seed, nonfinite, dir, and
optionally order ("shuffled", the harvest's default, or "sequential"), text_field, doc_split.

Guarantees and how they are kept:
- *Disk bound.* A shard's exact size is known before its files are written; the writer waits until
  the shards on disk plus it fit under the bound, and the trainer only deletes. The design needs two
  shards of room (one being read, one being written): a smaller bound is refused.
- *Exactly once.* Rows are numbered in stream order; every shard but the last holds exactly
  ``shard_rows`` rows, so row r lives in shard r // shard_rows. The trainer takes consecutive rows
  of a fixed order (each shard permuted by a generator seeded with (seed, shard)) and records only
  the next row number in its resume state. A shard is deleted only after a saved resume state has
  moved past it; when the producer is blocked on a full buffer, the trainer saves one at the current
  step boundary (``set_commit_hook``). A restarted producer continues after its last committed shard.
- *Failures.* The producer writes error.json and exits non-zero; the trainer re-raises the error
  (InnardsError stays InnardsError); a producer that dies without a word is reported too.

What the statistics are: float64 moments of the training-document rows among the first
``stats_rows`` activations of the stream (a warm-up pass; those rows are harvested again for training,
which costs that much extra harvesting). Validation rows come from held-out documents (the store's
per-document hash split with ``val_fraction``) met during the warm-up, at most ``val_rows`` of them;
validation documents are never trained on. Shuffling is within each shard only (as the reference
does); a store on disk gives a global shuffle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from innards.data.harvest import Harvester, HarvestConfig
from innards.data.shards import SHARDS, ShardWriter, committed, read_record, read_shard, shard_bytes, shard_name
from innards.data.sources import SiteStats, Source
from innards.data.stats import Moments
from innards.errors import InnardsError
from innards.io import read_json, write_json
from innards.tensors import load_tensors, save_tensors
from innards.models.config import ModelConfig

POLL_S = 0.05


class StreamExhausted(Exception):
    """The text ran out: the producer has finished and every row has been handed out."""


class _Stopped(Exception):
    """The trainer asked a thread-mode producer to stop."""


def _check_stop(stop: threading.Event | None, ppid: int | None) -> None:
    if stop is not None and stop.is_set():
        raise _Stopped()
    if ppid is not None and os.getppid() != ppid:  # the trainer is gone: nobody will consume or free room
        raise InnardsError("the trainer exited; stopping the stream producer")


def _shard_seq(p: Path) -> int | None:
    """Shard number of any file of a buffer shard (``r000-SEQ.*``), else None."""
    name = p.name
    if name.startswith("r000-") and len(name) > 11 and name[5:11].isdigit() and name[11] == ".":
        return int(name[5:11])
    return None


def used_bytes(root: Path) -> int:
    """Bytes the shard buffer occupies now (committed shards and any file being written)."""
    total = 0
    d = root / SHARDS
    if not d.is_dir():
        return 0
    for p in d.iterdir():
        try:
            total += p.stat().st_size
        except FileNotFoundError:  # deleted by the trainer meanwhile
            pass
    return total


def shard_bytes_estimate(rows: int, width: int, dtype: str) -> int:
    """Upper bound of one buffer shard's size on disk (one site; at worst one document per row)."""
    return shard_bytes(rows, {"acts": width}, dtype, docs=rows)


def _harvester(spec: dict[str, Any]) -> Harvester:
    """The harvest the spec describes (the trainer's GLPTrainConfig writes it)."""
    cfg = HarvestConfig(model=ModelConfig(name=spec["model"], dtype=spec["model_dtype"], device=spec.get("device")),
                        site=[spec["site"]], text=spec["text"], tokens=max(1, int(spec["target_rows"])), out=spec["dir"],
                        context=spec.get("context"), batch_size=spec["harvest_batch"], store_dtype=spec["dtype"],
                        shard_tokens=spec["shard_rows"], val_fraction=spec["val_fraction"], seed=spec["seed"],
                        order=spec.get("order", "shuffled"), text_field=spec.get("text_field", "text"),
                        doc_split=spec.get("doc_split", "blank"))
    return Harvester(cfg)


# ===================================================================== producer (own process)
def _write_error(root: Path, e: BaseException) -> None:
    kind = "InnardsError" if isinstance(e, InnardsError) else type(e).__name__
    try:
        write_json(root / "error.json", {"type": kind, "message": str(e).splitlines()[0] if str(e) else kind,
                                        "traceback": traceback.format_exc()})
    except OSError:
        pass


def _warmup(h: Harvester, spec: dict[str, Any], root: Path, stop: threading.Event | None, ppid: int | None) -> None:
    """Statistics over the stream's first rows and the validation rows; nothing goes to the buffer."""
    site = h.sites[0]
    want_stats, want_val = int(spec["stats_rows"]), int(spec["val_rows"])
    mom = Moments.empty(site.width)
    val: list[torch.Tensor] = []
    n_val = bad = 0
    with torch.inference_mode():
        for batch in h.batches():
            _check_stop(stop, ppid)
            x = h.capture(batch)[site.name].float().cpu()
            flags = torch.from_numpy(h.val_mask(batch))
            ok = torch.isfinite(x).all(-1)
            bad += int((~ok).sum())
            tr = x[~flags & ok][: max(0, want_stats - mom.count)]
            if tr.shape[0]:
                mom.update(tr.double())
            if n_val < want_val:
                v = x[flags & ok][: want_val - n_val]
                val.append(v)
                n_val += v.shape[0]
            if mom.count >= want_stats and n_val >= want_val:
                break
    if bad and spec["nonfinite"] == "refuse":
        raise InnardsError(f"{bad} activation rows with NaN or inf in the stream's warm-up pass; refusing to train on them "
                           "(--nonfinite skip drops them)")
    if mom.count == 0:
        raise InnardsError(f"text source '{spec['text']}' gave no training activations")
    st = mom.summary()
    save_tensors(root / "stats.safetensors", {"mean": torch.from_numpy(st["mean"]), "var": torch.from_numpy(st["var"])})
    save_tensors(root / "val.safetensors", {"acts": torch.cat(val) if val else torch.zeros(0, site.width)})
    write_json(root / "warmup.json", {
        "width": site.width, "site": site.name, "site_info": h.site_meta,
        "model": {**(getattr(h.model, "innards_source", {}) or {})}, "index_convention": h.plan["index_convention"],
        "count": st["count"], "mean_norm": st["mean_norm"], "rms_norm": st["rms_norm"], "val_rows": n_val,
        "nonfinite_rows": bad,
        "note": f"float64 moments of the training-document rows among the first {want_stats} of the stream"})


def _room(root: Path, bound: int, stop: threading.Event | None, ppid: int | None, peak: list[int]) -> Callable[[int], None]:
    """The writer's wait for disk room: returns once ``need`` more bytes fit under the bound."""
    flag = root / "buffer_full"

    def wait(need: int) -> None:
        if need > bound:
            raise InnardsError(f"a stream shard of {need / 1e6:.2f} MB does not fit in --buffer-gb {bound / 1e9:g}")
        waited = False
        while (used := used_bytes(root)) + need > bound:
            if not waited:
                flag.touch()
                waited = True
            _check_stop(stop, ppid)
            time.sleep(POLL_S)
        if waited:
            flag.unlink(missing_ok=True)
        peak[0] = max(peak[0], used + need)

    return wait


def _produce(h: Harvester, spec: dict[str, Any], root: Path, stop: threading.Event | None, ppid: int | None) -> None:
    """Write the training rows as shards of exactly shard_rows rows, waiting for room under the bound."""
    site = h.sites[0].name
    R, target, bound = int(spec["shard_rows"]), int(spec["target_rows"]), int(spec["bound_bytes"])
    ledger_path = root / "ledger.json"
    ledger = read_json(ledger_path, "stream ledger") if ledger_path.is_file() else {"next_seq": 0, "max_bytes": 0}
    seq = int(ledger["next_seq"])
    seq += len(committed(root, 0, start=seq))  # shards committed after the last ledger write; cleans up after a crash
    done = seq * R  # every shard before seq is full
    peak = [int(ledger.get("max_bytes", 0))]

    def on_commit(record: dict) -> None:
        n = int(record["name"].split("-")[1])
        write_json(ledger_path, {"next_seq": n + 1, "rows": n * R + record["rows"], "max_bytes": peak[0], "bound_bytes": bound})

    writer = ShardWriter(root, {site: h.widths[site]}, spec["dtype"], R, start_seq=seq,
                         room=_room(root, bound, stop, ppid, peak), on_commit=on_commit)
    seen = 0  # training rows of the stream so far, stored earlier or now
    try:
        with torch.inference_mode():
            for batch in h.batches():
                _check_stop(stop, ppid)
                if seen >= target:
                    break
                keep = ~h.val_mask(batch)
                n = int(keep.sum())
                if seen + n <= done:  # already in committed shards: replay the text without the model
                    seen += n
                    continue
                x = h.capture(batch)[site][torch.from_numpy(keep).to(h.device)]
                lo, hi = max(0, done - seen), min(n, target - seen)
                writer.add({site: x[lo:hi]}, batch.doc[keep][lo:hi], batch.pos[keep][lo:hi], batch.tok[keep][lo:hi],
                           batch.names)
                seen += n
    except BaseException:
        writer.abort()  # never commit a partial shard before the end: row r must stay in shard r // R
        raise
    writer.close()
    write_json(root / "end.json", {"shards": writer.seq, "rows": min(seen, target), "target_rows": target,
                                   "exhausted": seen < target, "max_bytes": peak[0]})


def producer_main(spec_path: str | Path, stop: threading.Event | None = None) -> int:
    """The producer: warm-up pass, then shards until the target (or the text) ends; 0 on success.

    In its own process (the default) it watches for the trainer's exit; in a thread it watches ``stop``.
    Every failure is written to error.json for the trainer to re-raise.
    """
    root = Path(spec_path).parent
    ppid = int(os.environ["INNARDS_STREAM_PARENT"]) if stop is None and "INNARDS_STREAM_PARENT" in os.environ else None
    try:
        spec = read_json(spec_path, "stream spec")
        h = _harvester(spec)
        width = h.sites[0].width
        one = shard_bytes_estimate(int(spec["shard_rows"]), width, spec["dtype"])
        if int(spec["bound_bytes"]) < 2 * one:
            raise InnardsError(f"--buffer-gb {spec['bound_bytes'] / 1e9:g} is too small: the stream keeps two shards of "
                               f"{spec['shard_rows']} activations x {width} ({one / 1e6:.2f} MB each) on disk; raise "
                               "--buffer-gb or lower the shard size")
        h.source.prepare(0, 1)
        if not (root / "warmup.json").is_file():
            _warmup(h, spec, root, stop, ppid)
        _produce(h, spec, root, stop, ppid)
        return 0
    except _Stopped:
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the trainer
        _write_error(root, e)
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return 2 if isinstance(e, InnardsError) else 1


# ===================================================================== consumer (trainer side)
class StreamSource(Source):
    """The trainer's view of the stream: batches in a fixed order, resumable, deleting what is safe."""

    def __init__(self, root: str | Path, spec: dict[str, Any], batch_rows: int, resume: bool = False,
                 timeout_s: float | None = None, producer: str = "process", wait: bool = True):
        self.root = Path(root)
        self.spec = spec
        self.R = int(spec["shard_rows"])
        self.B = int(batch_rows)
        self.seed = int(spec["seed"])
        self.timeout_s = timeout_s
        self.pos = 0  # next row number to hand out
        self._hook: Callable[[], None] | None = None
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if producer not in ("process", "thread"):
            raise InnardsError(f"unknown stream producer mode '{producer}' (choose process or thread)")
        self.mode = producer
        if not resume:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "error.json").unlink(missing_ok=True)
        (self.root / "buffer_full").unlink(missing_ok=True)
        write_json(self.root / "spec.json", spec)
        if not (self.root / "end.json").is_file():
            self._start()
        self.warm: dict[str, Any] = {}
        self.sites: list[str] = [spec["site"]]
        self.width = 0
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the producer's warm-up pass (statistics, validation rows) is on disk."""
        try:
            self._wait_for(self.root / "warmup.json", "the producer's warm-up pass")
        except BaseException:
            self.close()
            raise
        self.warm = read_json(self.root / "warmup.json", "stream warm-up record")
        self.sites = [self.warm["site"]]
        self.width = int(self.warm["width"])

    # ----- producer lifecycle
    def _start(self) -> None:
        if self.mode == "thread":
            self._thread = threading.Thread(target=producer_main, args=(self.root / "spec.json", self._stop),
                                            name="innards-stream-producer", daemon=True)
            self._thread.start()
            return
        env = dict(os.environ, INNARDS_STREAM_PARENT=str(os.getpid()))
        log = open(self.root / "producer.log", "ab")
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "innards.data.stream", str(self.root / "spec.json")],
                                          stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()

    def _check_producer(self) -> None:
        err = self.root / "error.json"
        if err.is_file():
            e = read_json(err, "stream error record")
            if e.get("type") == "InnardsError":
                raise InnardsError(f"stream producer: {e.get('message')}")
            raise RuntimeError(f"stream producer failed: {e.get('type')}: {e.get('message')}\n{e.get('traceback', '')}")
        dead = (self._proc is not None and self._proc.poll() is not None) or (self._thread is not None and not self._thread.is_alive())
        if dead and not (self.root / "end.json").is_file():
            time.sleep(0.2)  # error.json is written before exit; give the file system a moment
            if (self.root / "error.json").is_file():
                return self._check_producer()
            status = self._proc.returncode if self._proc is not None else "?"
            raise RuntimeError(f"stream producer exited with status {status} without a result (see {self.root / 'producer.log'})")

    def _wait_for(self, path: Path, what: str) -> None:
        t0 = time.monotonic()
        while not path.is_file():
            self._check_producer()
            if self.timeout_s is not None and time.monotonic() - t0 > self.timeout_s:
                raise InnardsError(f"timed out waiting for {what}")
            time.sleep(POLL_S)
        self._check_producer()

    def close(self) -> None:
        """Stop the producer if it is still running (it has nothing left to do or the trainer failed)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.wait(timeout=5 if (self.root / "end.json").is_file() else 0.01)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        self._proc = None

    # ----- Source protocol
    def stats(self, site: str) -> SiteStats:
        t = load_tensors(self.root / "stats.safetensors", what="stream statistics")
        return SiteStats(mean=t["mean"].numpy(), var=t["var"].numpy(), count=self.warm["count"],
                         mean_norm=self.warm["mean_norm"], rms_norm=self.warm["rms_norm"], source=self.warm["note"])

    def meta(self) -> dict[str, Any]:
        return {"model": self.warm["model"], "sites": self.sites, "site_info": self.warm["site_info"],
                "index_convention": self.warm["index_convention"], "store": None,
                "stream": {k: self.spec[k] for k in ("text", "context", "val_fraction", "stats_rows", "shard_rows")}}

    def train_rows(self) -> int | None:
        return None

    def identity(self) -> dict[str, Any]:
        return {"stream": str(self.root.resolve()), "model": self.spec["model"], "site": self.spec["site"],
                "text": self.spec["text"]}

    def val_batch(self, n: int, seed: int) -> torch.Tensor | None:
        v = load_tensors(self.root / "val.safetensors", what="stream validation rows")["acts"]
        return v[:n] if v.shape[0] else None

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])
        self._cache.clear()
        self.after_save(state)

    def set_commit_hook(self, fn: Callable[[], None]) -> None:
        """``fn()`` persists ``state_dict()``; called when consumed shards must go to make room."""
        self._hook = fn

    def after_save(self, state: dict[str, Any]) -> None:
        """A resume state at row ``state['pos']`` is on disk: shards before its shard are no longer needed."""
        keep_from = int(state["pos"]) // self.R
        end = self.root / "end.json"
        if end.is_file() and int(state["pos"]) >= int(read_json(end, "stream end record")["rows"]):
            keep_from = 1 << 62  # every row handed out and saved: the buffer can go
        d = self.root / SHARDS
        if not d.is_dir():
            return
        gone = sorted(((s, p) for p in d.iterdir() if (s := _shard_seq(p)) is not None and s < keep_from),
                      key=lambda sp: (sp[0], not sp[1].name.endswith(".json")))
        for _, p in gone:  # each shard's record first: a shard half-deleted by a kill is no longer committed
            p.unlink(missing_ok=True)

    # ----- batches
    def _shard(self, seq: int, entry: int) -> dict[str, torch.Tensor] | None:
        if seq in self._cache:
            return self._cache[seq]
        t0 = time.monotonic()
        asked = False
        while (record := read_record(self.root, shard_name(0, seq))) is None:
            self._check_producer()
            end = self.root / "end.json"
            if end.is_file() and seq >= int(read_json(end, "stream end record")["shards"]):
                return None
            if not asked and (self.root / "buffer_full").is_file() and self._deletable(entry):
                # the producer waits for room that only a saved resume state can free
                if self._hook is not None:
                    self._hook()
                self.after_save({"pos": entry})
                asked = True
            if self.timeout_s is not None and time.monotonic() - t0 > self.timeout_s:
                raise InnardsError(f"timed out waiting for stream shard {seq}")
            time.sleep(POLL_S)
        try:
            acts, index = read_shard(self.root, record, self.sites[0], self.spec["dtype"])
        except (OSError, ValueError) as e:
            raise InnardsError(f"stream shard {shard_name(0, seq)} does not load: {str(e).splitlines()[0][:160]}") from None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + seq)
        t = {"acts": acts, "doc": torch.from_numpy(index["doc"].copy()), "pos": torch.from_numpy(index["pos"].copy()),
             "perm": torch.randperm(acts.shape[0], generator=g)}
        self._cache = {k: v for k, v in self._cache.items() if k >= seq - 1}
        self._cache[seq] = t
        return t

    def _deletable(self, entry: int) -> bool:
        d = self.root / SHARDS
        return any((s := _shard_seq(p)) is not None and s < entry // self.R for p in d.iterdir()) if d.is_dir() else False

    def next_with_index(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The next batch (raw float32 rows) with each row's (document, position)."""
        entry = self.pos
        r = entry
        xs, docs, poss = [], [], []
        while r < entry + self.B:
            seq, off = divmod(r, self.R)
            t = self._shard(seq, entry)
            if t is None or off >= t["acts"].shape[0]:
                break
            take = min(t["acts"].shape[0] - off, entry + self.B - r)
            idx = t["perm"][off:off + take]
            xs.append(t["acts"][idx])
            docs.append(t["doc"][idx].numpy())
            poss.append(t["pos"][idx].numpy())
            r += take
            if t["acts"].shape[0] < self.R and off + take == t["acts"].shape[0]:
                break  # the last, partial shard is used up
        if not xs:
            raise StreamExhausted(f"the stream ended after {entry} activations")
        self.pos = r
        return torch.cat(xs), np.concatenate(docs), np.concatenate(poss)

    def next_batch(self) -> torch.Tensor:
        return self.next_with_index()[0]


if __name__ == "__main__":
    sys.exit(producer_main(sys.argv[1]))
