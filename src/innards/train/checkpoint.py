"""Resume checkpoints: several safetensors files + one JSON state, committed atomically by one rename.

Layout of a checkpoint folder (e.g. ``RUN/resume``)::

    LATEST                 {"name": "step_0000500", "step": 500}   <- the commit point
    step_0000500/state.json, model.safetensors, optimizer.safetensors, ...

A new checkpoint is written into a temporary folder beside the current one, renamed to its final
name, and made current by atomically replacing ``LATEST``; the previous one is deleted only after
that. A kill at any moment leaves either the old or the new checkpoint, never a mixture, and the
next save removes whatever a kill left behind. ``state.json`` records every file's SHA-256, so a
damaged checkpoint is refused rather than half-loaded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from innards.errors import InnardsError
from innards.io import read_json, write_json
from innards.tensors import load_tensors, save_tensors

LATEST = "LATEST"
STATE = "state.json"

Files = dict[str, dict[str, torch.Tensor]]


def has_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a committed checkpoint (or one in the single-folder layout of innards 0.1)."""
    d = Path(folder)
    return (d / LATEST).is_file() or (d / STATE).is_file()


def save_checkpoint(folder: str | Path, step: int, files: Mapping[str, Mapping[str, torch.Tensor]],
                    state: Mapping[str, object]) -> Path:
    """Write and commit a checkpoint of ``step``; returns its folder."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    digests = {fname: save_tensors(tmp / fname, dict(tensors)) for fname, tensors in files.items()}
    write_json(tmp / STATE, {**state, "step": step, "files": digests})
    final = root / name
    n = 1
    while final.exists():  # the same step saved again (e.g. a resumed run that stops where it was stopped)
        final = root / f"{name}-{n}"
        n += 1
    os.replace(tmp, final)
    write_json(root / LATEST, {"name": final.name, "step": step})
    _prune(root, keep=final.name)
    return final


def load_checkpoint(folder: str | Path) -> tuple[dict, Files]:
    """The committed checkpoint's state and tensor files (checksums verified)."""
    root = Path(folder)
    if (root / LATEST).is_file():
        latest = read_json(root / LATEST, what="checkpoint pointer")
        d = root / str(latest.get("name", ""))
        if not (d / STATE).is_file():
            raise InnardsError(f"checkpoint {d} named by {root / LATEST} is missing; the run cannot be resumed")
    elif (root / STATE).is_file():
        d = root  # innards 0.1: one folder, swapped in by two renames
    else:
        raise InnardsError(f"nothing to resume: {root} holds no checkpoint")
    state = read_json(d / STATE, what="checkpoint state")
    files = {fname: load_tensors(d / fname, sha256=digest, what="checkpoint file")
             for fname, digest in (state.get("files") or {}).items()}
    return state, files


def _prune(root: Path, keep: str) -> None:
    for p in root.iterdir():
        if p.name in (keep, LATEST):
            continue
        if p.is_dir() and (p.name.startswith("step_") or p.name.startswith(".step_")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{LATEST}.tmp"):
            p.unlink(missing_ok=True)


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors for safetensors, the JSON-able rest)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict = {"param_groups": sd["param_groups"], "state": {}}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{i}.{k}"] = v
            else:
                plain["state"].setdefault(str(i), {})[k] = v
    return tensors, plain


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], plain: Mapping) -> dict:
    """Inverse of :func:`flatten_optimizer`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    for i, st in (plain.get("state") or {}).items():
        state.setdefault(int(i), {}).update(st)
    return {"state": state, "param_groups": plain["param_groups"]}
