"""Where an artifact came from: the innards version, the git revision of its source, library versions."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from innards import __version__


@functools.cache
def git_revision() -> str | None:
    """The commit of the innards source tree when it is a git checkout (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def library_versions(names: tuple[str, ...] = ("torch", "transformers", "safetensors", "numpy")) -> dict[str, str | None]:
    """Installed versions of the libraries that decide an artifact's numbers."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def provenance() -> dict[str, object]:
    """innards version, git revision, Python, platform and library versions, as a JSON-ready dict."""
    return {"innards_version": __version__, "git_revision": git_revision(), "python": sys.version.split()[0],
            "platform": platform.platform(terse=True), "libraries": library_versions()}
