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
from collections.abc import Iterable, Mapping
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
    tmp = stage_checkpoint(folder, step, tag=str(os.getpid()))
    digests = {fname: save_tensors(tmp / fname, dict(tensors)) for fname, tensors in files.items()}
    return commit_checkpoint(folder, tmp, step, state, digests)


def stage_checkpoint(folder: str | Path, step: int, tag: str = "", create: bool = True) -> Path:
    """An empty temporary folder for the files of checkpoint ``step``; several processes may write into it
    (one creates it, the others pass ``create=False`` to learn its name)."""
    root = Path(folder)
    tmp = root / f".step_{step:07d}.tmp{tag}"
    if create:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def commit_checkpoint(folder: str | Path, tmp: Path, step: int, state: Mapping[str, object],
                      digests: Mapping[str, str]) -> Path:
    """Record ``digests`` (file name -> SHA-256 of the staged files) and make the staged checkpoint the current one."""
    root = Path(folder)
    write_json(tmp / STATE, {**state, "step": step, "files": dict(digests)})
    name = f"step_{step:07d}"
    final = root / name
    n = 1
    while final.exists():  # the same step saved again (e.g. a resumed run that stops where it was stopped)
        final = root / f"{name}-{n}"
        n += 1
    os.replace(tmp, final)
    write_json(root / LATEST, {"name": final.name, "step": step})
    _prune(root, keep=final.name)
    return final


def current_checkpoint(folder: str | Path) -> Path | None:
    """The folder of the committed checkpoint (None: there is none)."""
    root = Path(folder)
    if (root / LATEST).is_file():
        for _ in range(3):  # a run still writing may commit a newer one and prune this one between the two reads
            d = root / str(read_json(root / LATEST, what="checkpoint pointer").get("name", ""))
            if (d / STATE).is_file():
                return d
        raise InnardsError(f"checkpoint {d} named by {root / LATEST} is missing; the run cannot be resumed")
    return root if (root / STATE).is_file() else None  # innards 0.1: one folder, swapped in by two renames


def load_checkpoint(folder: str | Path, only: Iterable[str] | None = None) -> tuple[dict, Files]:
    """The committed checkpoint's state and tensor files (checksums verified); ``only``: just these files."""
    d = current_checkpoint(folder)
    if d is None:
        raise InnardsError(f"nothing to resume: {folder} holds no checkpoint")
    state = read_json(d / STATE, what="checkpoint state")
    wanted = None if only is None else set(only)
    files = {fname: load_tensors(d / fname, sha256=digest, what="checkpoint file")
             for fname, digest in (state.get("files") or {}).items() if wanted is None or fname in wanted}
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
