"""One resolver for "local folder | Hugging Face hub id [@revision]", used by GLP, SAE and model loading.

A spec is tried as a local path first (never touching the network). Otherwise, if it reads as a hub
id ``org/name`` (optionally ``org/name/sub/folder`` for repos that hold several artifacts, and
``@revision`` or ``revision=``), the Hugging Face cache is consulted first; the network is used only
when ``HF_HUB_OFFLINE`` is not set, and then only for the files the caller names (``patterns``), so a
GLP's ``checkpoints/*`` are not downloaded unless one is asked for.

The cache is ``cache_dir`` when given, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub`` (read at call
time, so a test or a user can point it anywhere), else huggingface_hub's own default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from innards.errors import InnardsError

# org/name, optional sub/folder parts, optional @revision (branch, tag or commit)
_HUB_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?P<sub>(?:/[\w.=-]+)*)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class HubId:
    """A parsed hub spec: repository, folder inside it, revision."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class Resolved:
    """Where a spec was found: a local folder, and the hub coordinates when it came from the hub."""

    path: Path
    spec: str
    repo_id: str | None = None
    revision: str | None = None  # the commit hash of the cached snapshot
    subfolder: str | None = None

    def source(self) -> dict[str, str]:
        """Provenance record: the spec as given plus hub repo, commit and folder when from the hub."""
        out = {"name": self.spec, "path": str(self.path)}
        if self.repo_id:
            out["repo_id"] = self.repo_id
            if self.revision:
                out["revision"] = self.revision
            if self.subfolder:
                out["subfolder"] = self.subfolder
        return out


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir(explicit: str | os.PathLike | None = None) -> str | None:
    """The hub cache to use: the argument, $HF_HUB_CACHE, $HF_HOME/hub, or None (huggingface_hub's default)."""
    if explicit:
        return str(Path(explicit).expanduser())
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def parse_hub_id(spec: str, revision: str | None = None, single: bool = False) -> HubId | None:
    """``org/name[/folder...][@rev]`` -> HubId, or None when ``spec`` cannot be a hub id.

    ``single``: also accept a bare ``name`` (legacy top-level repos such as ``gpt2``).
    """
    s = str(spec).strip()
    if s.startswith((".", "/", "~")) or "\\" in s or "//" in s:
        return None
    m = _HUB_SPEC.match(s)
    if not m:
        return None
    repo = m.group("repo")
    if "/" not in repo and (not single or m.group("sub")):
        return None
    rev = m.group("rev")
    if rev and revision and rev != revision:
        raise InnardsError(f"'{spec}' names revision '{rev}' but revision='{revision}' was also given")
    sub = m.group("sub").strip("/") or None
    return HubId(repo, sub, rev or revision)


def is_hub_id(spec: str) -> bool:
    """True when ``spec`` is not an existing local path but reads as ``org/name[...]``."""
    return not Path(str(spec)).expanduser().exists() and parse_hub_id(spec) is not None


def resolve(spec: str | os.PathLike, *, what: str = "model", revision: str | None = None,
            patterns: Sequence[str] | None = None, complete: Callable[[Path], bool] | None = None,
            cache: str | os.PathLike | None = None, single: bool = False, subfolder: str | None = None) -> Resolved:
    """A local folder or a hub spec -> the folder holding it (cache first, network only when allowed).

    ``patterns``: the files to download (relative to the spec's folder). ``complete(folder)``: whether
    a cached snapshot already has what the caller needs; an incomplete one is topped up when online.
    ``subfolder``: a folder inside the repo (appended to one the spec names).
    """
    s = str(spec).strip()
    if not s:
        raise InnardsError(f"empty {what} name")
    local = Path(s).expanduser()
    if local.exists():
        if revision:
            raise InnardsError(f"revision='{revision}' was given for the local {what} folder {local}")
        return Resolved(local.resolve(), s)
    hid = parse_hub_id(s, revision, single=single)
    if hid is None:
        raise InnardsError(f"{what} folder not found: {s}")
    if subfolder:
        hid = HubId(hid.repo_id, "/".join(p for p in (hid.subfolder, subfolder.strip("/")) if p), hid.revision)
    sub = f"{hid.subfolder}/" if hid.subfolder else ""
    allow = [sub + p for p in patterns] if patterns else ([f"{sub}*"] if sub else None)
    where = cache_dir(cache)
    rev = f" --revision {hid.revision}" if hid.revision else ""
    hint = f"hf download {hid.repo_id}{rev}" + (f" --include '{sub}*'" if sub else "")
    try:
        snap = Path(snapshot_download(hid.repo_id, revision=hid.revision, cache_dir=where, allow_patterns=allow,
                                      local_files_only=True))
    except HFValidationError:
        raise InnardsError(f"unknown {what} or path: '{s}' (not a local folder, and not a valid hub id)") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        snap = None
    if snap is not None and (complete is None or complete(snap / sub)):
        return _found(snap, s, hid, what)
    if offline():
        state = "is in the Hugging Face cache without the files needed" if snap is not None else \
            "is not in the Hugging Face cache"
        raise InnardsError(f"unknown {what} or path: '{s}' (not a local folder; the hub repo {state}"
                           f"{f' ({where})' if where else ''}, and HF_HUB_OFFLINE is set: download it first with "
                           f"`{hint}`, or unset HF_HUB_OFFLINE)")
    try:
        snap = Path(snapshot_download(hid.repo_id, revision=hid.revision, cache_dir=where, allow_patterns=allow))
    except GatedRepoError:
        raise InnardsError(f"{what} '{s}' is a gated hub repo: accept its terms on huggingface.co and log in "
                           "(`hf auth login`)") from None
    except RevisionNotFoundError:
        raise InnardsError(f"{what} '{s}': the hub repo {hid.repo_id} has no revision '{hid.revision}'") from None
    except RepositoryNotFoundError:
        raise InnardsError(f"unknown {what} or path: '{s}' (not a local folder, and no such hub repo, or it is "
                           "private: log in with `hf auth login`)") from None
    except Exception as e:  # network failures come from several libraries (httpx, requests, urllib3)
        raise InnardsError(f"unknown {what} or path: '{s}' (not a local folder, not in the Hugging Face cache, and "
                           f"the hub download failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return _found(snap, s, hid, what)


def _found(snap: Path, spec: str, hid: HubId, what: str) -> Resolved:
    path = snap / hid.subfolder if hid.subfolder else snap
    if not path.is_dir():
        raise InnardsError(f"{what} '{spec}': the hub repo {hid.repo_id} has no folder '{hid.subfolder}'")
    return Resolved(path, spec, hid.repo_id, snap.name, hid.subfolder)  # snapshot folders are named by commit
