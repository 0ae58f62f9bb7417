"""safetensors files written atomically with their SHA-256, and read back with the checksum verified."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from innards.errors import ChecksumError, InnardsError
from innards.io import sha256_file


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
