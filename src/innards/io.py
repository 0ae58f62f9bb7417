"""Files that are never half-written: atomic writes, checksums, JSON and safetensors helpers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from innards.errors import ChecksumError, InnardsError


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
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically save tensors as safetensors; returns the file's SHA-256."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # safetensors reports a full disk as its own error type
            raise InnardsError(f"cannot write {path}: {str(e).splitlines()[0][:200]}") from None
        # safetensors writes through a private (0600) temporary file; artifacts follow the umask like our JSON
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def load_tensors(path: str | Path, sha256: str | None = None, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a safetensors file, verifying its checksum when one is given; one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise InnardsError(f"{what} not found: {p}")
    if sha256 is not None and sha256_file(p) != sha256:
        raise ChecksumError(f"{what} {p} is corrupted (checksum mismatch)")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise InnardsError(f"{what} {p} does not load: {str(e).splitlines()[0][:200]}") from None
