"""One output folder per command: create / resume / complete / refuse / overwrite, a lock, and run.json.

Every command opens its output with :meth:`Run.open`. The folder then holds the resolved
``config.yaml`` and a ``run.json`` that names the kind of artifact, the innards version and git
revision, the inputs it was made from (paths and content hashes) and, once complete, a few headline
numbers. A viewer discovers and renders runs from ``run.json`` alone. A command whose output is one
file (``glp eval --out eval.json``) keeps the same record beside it as ``eval.json.run.json``.

Rules, checked before anything is written or deleted:
- a folder holding another kind of artifact (a store, a GLP, a VPD run, ...) is refused, even with
  ``--overwrite``; a non-empty folder that holds no artifact is refused too;
- a finished run with the same settings and inputs is ``complete`` (the caller says so and skips),
  with other settings it is refused unless ``--overwrite``;
- an unfinished run is resumed when the caller asks (``--resume``, or commands that always resume),
  otherwise refused with the hint;
- one process at a time: the folder is locked for the life of the Run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import io
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from innards.config import diff, save_config, to_dict
from innards.errors import InnardsError
from innards.io import atomic_write_bytes, sha256_file, write_json
from innards.provenance import git_revision, provenance

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMAT = "innards.run"
FORMAT_VERSION = 1
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".innards.lock"
State = Literal["new", "resume", "complete"]

# files that identify an artifact written before run.json existed, and the file whose presence means "finished"
_LEGACY: dict[str, tuple[tuple[str, ...], str | None]] = {
    "store": (("manifest.json", "harvest.json"), "manifest.json"),
    "sae": (("sae_weights.safetensors",), "sae_weights.safetensors"),
    "vpd": (("decomposition.safetensors", "ckpt/state.json", "target.json"), "decomposition.safetensors"),
    "sweep": (("results.json", "cells"), "results.json"),
    "scale": (("scale.json",), "scale.json"),
    "neurons": (("neurons.json",), "neurons.json"),
    "demo": (("summary.json", "acts"), "summary.json"),
    "demo-lm": (("metrics_summary.json",), "metrics_summary.json"),
}
# descriptor whose hash identifies a folder's content (it records the checksums of the heavy files)
_DESCRIPTORS = ("manifest.json", "config.json", "cfg.json", "decomposition.json", "summary.json", "results.json")
# bookkeeping that never makes a folder "non-empty"
_IGNORABLE = {LOCK_FILE, ".DS_Store"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_run(path: str | Path) -> dict | None:
    """The run record of a folder (its run.json) or of a file output (NAME.run.json); None if absent."""
    p = Path(path)
    rec = _read(p / RUN_FILE) if p.is_dir() else _read(p.with_name(p.name + ".run.json"))
    return rec if rec is not None and rec.get("format") == FORMAT else None


def detect_kind(path: str | Path) -> str | None:
    """The kind of artifact a folder holds: from run.json, else from the files older versions wrote."""
    p = Path(path)
    rec = read_run(p)
    if rec is not None:
        return str(rec.get("kind"))
    if not p.is_dir():
        return None
    cfg = _read(p / "config.json")
    if cfg is not None and cfg.get("format") == "innards-glp" or (p / "resume").is_dir() and (p / "metrics.jsonl").is_file():
        return "glp"
    legacy = _read(p / RUN_FILE)
    if legacy is not None and "format" not in legacy and (p / "decomposition.safetensors").is_file():
        return "vpd"
    for kind, (markers, _) in _LEGACY.items():
        if any((p / m).exists() for m in markers):
            return kind
    return None


def content_hash(path: str | Path) -> str | None:
    """A cheap content identity for an input: a file's SHA-256, or the SHA-256 of a folder's descriptor."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        for name in _DESCRIPTORS:
            if (p / name).is_file():
                return sha256_file(p / name)
    return None


@dataclass(frozen=True)
class Input:
    """One thing a run was made from."""

    role: str
    path: str
    kind: str | None
    sha256: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"role": self.role, "path": self.path, "kind": self.kind, "sha256": self.sha256}


def describe_inputs(inputs: Mapping[str, str | Path | None]) -> list[Input]:
    """Inputs by role -> their kinds and content hashes (hub ids and other non-paths get None)."""
    out = []
    for role, value in inputs.items():
        if value in (None, ""):
            continue
        p = Path(str(value))
        local = p.exists()
        out.append(Input(role, str(value), detect_kind(p) if local else None, content_hash(p) if local else None))
    return out


class Run:
    """An open output folder (or file) of one command. Use :meth:`open`; close it (or use ``with``)."""

    def __init__(self, root: Path, kind: str, state: State, file: str | None, record: dict, lock_fd: int | None):
        self.root = root
        self.kind = kind
        self.state: State = state
        self.file = file
        self.record = record
        self._lock_fd = lock_fd

    # ----- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, out: str | Path, kind: str, config: object, *, inputs: Mapping[str, str | Path | None] | None = None,
             resume: bool = False, always_resume: bool = False, overwrite: bool = False, file: bool = False,
             free: Iterable[str] = (), main: bool = True) -> Run:
        """Check, lock and prepare the output; ``state`` says whether it is new, resumed or already complete.

        ``free`` names config keys that may differ from the saved run's (out, progress, ...);
        ``file``: ``out`` is one file (its record goes beside it); ``main``: False on non-zero torchrun ranks
        (they neither lock nor write; rank 0 does).
        """
        out = Path(out)
        root = out.parent if file else out
        name = out.name if file else None
        if not main:  # rank > 0 of torchrun: rank 0 checks, locks and writes; the caller broadcasts its state
            return cls(root, kind, "new", name, read_run(out) or {}, None)
        _check_writable_path(root, out, file)
        _classify(out, kind, file)  # refuse other kinds and foreign folders before touching anything
        created = not root.exists()
        lock_fd = _lock(root, name)
        try:
            ins = [i.as_dict() for i in describe_inputs(inputs or {})]
            settings = to_dict(config)
            state, existing = _classify(out, kind, file)  # again, now that no other process can change it
            ignore = set(free) | {"out", "resume", "overwrite", "progress"}
            if state != "new" and overwrite:
                _clear(out, file)
                state = "new"
            elif state != "new":
                saved = _saved_settings(out, file)
                changed = diff(saved, settings, ignore) if saved is not None else []
                changed += [f"input {i['role']} changed" for i in _changed_inputs(existing or {}, ins)]
                if changed:
                    raise InnardsError(f"{out} holds a {kind} run made with other settings ({'; '.join(changed[:3])}"
                                       f"{' ...' if len(changed) > 3 else ''}); use --overwrite to replace it, or another --out")
                if state == "resume" and not (resume or always_resume):
                    raise InnardsError(f"{out} holds an unfinished {kind} run; use --resume to continue it, "
                                       "--overwrite to start again, or another --out")
            elif resume and not always_resume:
                raise InnardsError(f"nothing to resume: {out} holds no {kind} run")
            record = existing if (state != "new" and existing) else {
                "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "status": "running",
                "created": _now(), "updated": _now(), "innards_version": provenance()["innards_version"],
                "git_revision": git_revision(), "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
                "config": (name + ".config.yaml") if name else CONFIG_FILE, "inputs": ins, "outputs": [],
                "headline": {}}
            run = cls(root, kind, state, name, record, lock_fd)
            if state != "complete":
                root.mkdir(parents=True, exist_ok=True)
                save_config(config, root, record["config"])
                record["status"], record["updated"], record["inputs"] = "running", _now(), ins
                run._write_record()
            return run
        except BaseException:
            _unlock(lock_fd)
            if created:  # leave no trace of a refused run in a folder we made
                (root / (f".{name}.lock" if name else LOCK_FILE)).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    root.rmdir()
            raise

    # ----- writing -----------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The output itself: the folder, or the file for a file run."""
        return self.root / self.file if self.file else self.root

    def _record_path(self) -> Path:
        return self.root / (self.file + ".run.json") if self.file else self.root / RUN_FILE

    def _write_record(self) -> None:
        write_json(self._record_path(), self.record)

    def write_json(self, name: str, obj: object, indent: int | None = 2) -> Path:
        """Atomically write a JSON file into the run folder."""
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json(p, obj, indent=indent)
        return p

    def write_jsonl(self, name: str, rows: Iterable[object]) -> Path:
        """Atomically write one JSON object per line."""
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(p, "".join(json.dumps(r) + "\n" for r in rows).encode())
        return p

    def save_png(self, name: str, fig: Figure, dpi: int = 110) -> Path:
        """Atomically save a matplotlib figure as PNG and close it."""
        return save_png(self.root / name, fig, dpi)

    def reopen(self, config: object) -> None:
        """Run a complete output again with ``config`` (settings that only extend it): save it, mark it running."""
        save_config(config, self.root, self.record.get("config") or CONFIG_FILE)
        self.record.update(status="running", updated=_now())
        self._write_record()
        self.state = "resume"

    def complete(self, headline: Mapping[str, object] | None = None, outputs: Iterable[str] = ()) -> None:
        """Mark the run finished, with its headline numbers and main output files."""
        self.record.update(status="complete", updated=_now(), headline=dict(headline or {}),
                           outputs=sorted(set(self.record.get("outputs") or []) | set(outputs)))
        self._write_record()
        self.state = "complete"

    def close(self) -> None:
        """Release the folder's lock."""
        _unlock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def say_complete(self) -> None:
        """Tell the user the run was already finished and is not redone."""
        print(f"innards: {self.path} is already complete (same settings and inputs); skipping "
              "(--overwrite recomputes it)", file=sys.stderr)


def save_png(path: str | Path, fig: Figure, dpi: int = 110) -> Path:
    """Atomically save a matplotlib figure as PNG and close it (the one PNG writer)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot = sys.modules.get("matplotlib.pyplot")  # a figure made with pyplot is closed there; importing it here would slow every command
    if pyplot is not None:
        pyplot.close(fig)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, buf.getvalue())
    return p


# ----- helpers ---------------------------------------------------------------------------------------
def _check_writable_path(root: Path, out: Path, file: bool) -> None:
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise InnardsError(f"cannot write {out}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise InnardsError(f"cannot write {out}: {parent} is not writable")
            break
    if file and out.is_dir():
        raise InnardsError(f"output {out} is a folder; give a file name")
    if not file and out.exists() and not out.is_dir():
        raise InnardsError(f"output path {out} exists and is not a folder")


def _lock(root: Path, name: str | None) -> int:
    root.mkdir(parents=True, exist_ok=True)
    path = root / (f".{name}.lock" if name else LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise InnardsError(f"{root / name if name else root} is being written by another innards process"
                           f"{f' (pid {holder})' if holder else ''}; wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)  # closing the descriptor releases the flock
        except OSError:
            pass


def _classify(out: Path, kind: str, file: bool) -> tuple[State, dict | None]:
    """new / resume / complete for an output of ``kind``; refuses another kind or unknown content."""
    if file:
        if not out.exists():
            return "new", None
        rec = read_run(out)
        if rec is None:
            raise InnardsError(f"{out} exists and was not written by innards as a {kind}; use --overwrite to replace it")
        if rec.get("kind") != kind:
            raise InnardsError(f"{out} is a {rec.get('kind')} output, not a {kind}; choose another --out")
        return ("complete" if rec.get("status") == "complete" else "resume"), rec
    if not out.is_dir():
        return "new", None
    found = detect_kind(out)
    if found is None:
        if any(p.name not in _IGNORABLE and not p.name.startswith(".") for p in out.iterdir()):
            raise InnardsError(f"output folder {out} is not empty and holds no {kind} run; choose another --out")
        return "new", None
    if found != kind:
        raise InnardsError(f"{out} holds a {found} run, not a {kind} run; choose another --out "
                           f"(even --overwrite does not replace another kind of artifact)")
    rec = read_run(out)
    if rec is not None:
        return ("complete" if rec.get("status") == "complete" else "resume"), rec
    done = _LEGACY.get(kind, ((), None))[1]
    if kind == "glp":
        done = "config.json"
    return ("complete" if done and (out / done).exists() else "resume"), None


def _saved_settings(out: Path, file: bool) -> dict | None:
    p = out.with_name(out.stem + ".config.yaml") if file else out / CONFIG_FILE
    if file:
        rec = read_run(out)
        if rec is not None and rec.get("config"):
            p = out.parent / rec["config"]
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _changed_inputs(existing: dict, now: list[dict]) -> Iterator[dict]:
    before = {i.get("role"): i.get("sha256") for i in existing.get("inputs") or []}
    for i in now:
        if i["role"] in before and before[i["role"]] is not None and i["sha256"] is not None and before[i["role"]] != i["sha256"]:
            yield i


def _clear(out: Path, file: bool) -> None:
    """Remove a run of the same kind before it is replaced (``--overwrite``)."""
    if file:
        for p in (out, out.with_name(out.name + ".run.json")):
            p.unlink(missing_ok=True)
        return
    # first what marks the folder as a (finished) artifact, so an interrupted clear never looks complete
    for name in (RUN_FILE, *_DESCRIPTORS):
        (out / name).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.name == LOCK_FILE:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
