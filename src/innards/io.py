"""Files that are never half-written: atomic writes, checksums, JSON (no torch here: every command imports it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from innards.errors import InnardsError


def atomic_write_bytes(path: str | Path, data: bytes | memoryview | list[bytes | memoryview]) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``.

    ``data`` may be a list of buffers, written in order without first joining them (no extra copy).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in data if isinstance(data, list) else [data]:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_orphans(folder: str | Path) -> int:
    """Delete temporary files (``.NAME.tmpPID``) left in ``folder`` by processes that no longer run."""
    n = 0
    for p in Path(folder).glob(".*.tmp*"):
        pid = p.name.rsplit(".tmp", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # tensors and numpy arrays
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON with a one-line error when missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise InnardsError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InnardsError(f"{what} {p} is not valid JSON ({e.__class__.__name__})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
