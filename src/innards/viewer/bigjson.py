"""Big JSON files of runs (``neurons.json``, ``contexts.json``: 100 MB and more) read once, then by spans.

``scan`` walks a file's top-level object once and returns, for the big containers asked for, each entry's
span (where its JSON text starts and ends) and a small digest of it; the rest of the object (the header)
is decoded as usual. ``Spans`` then decodes single entries on demand, so the viewer keeps only digests in
memory, not the whole parsed file. ``disk_cached`` keeps a scan's result in the user's cache folder (keyed
by the file's path, size and mtime), so a second ``innards view`` of the same run has its list at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION = 1
_DEC = json.JSONDecoder()
_WS = " \t\n\r"


def _ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _walk(text: str, pos: int, fn: Callable[[Any, Any], Any]) -> tuple[list, int]:
    """[(key or index, start, end, fn(key, value))] of the array or object at ``pos``, and the position after it."""
    opener = text[pos]
    closer = "]" if opener == "[" else "}"
    out: list = []
    pos = _ws(text, pos + 1)
    if text[pos] == closer:
        return out, pos + 1
    i = 0
    while True:
        key: Any = i
        if opener == "{":
            key, pos = _DEC.raw_decode(text, pos)
            pos = _ws(text, pos)
            if text[pos] != ":":
                raise ValueError(f"':' expected at {pos}")
            pos = _ws(text, pos + 1)
        value, end = _DEC.raw_decode(text, pos)
        out.append((key, pos, end, fn(key, value)))
        i += 1
        pos = _ws(text, end)
        if text[pos] == ",":
            pos = _ws(text, pos + 1)
        elif text[pos] == closer:
            return out, pos + 1
        else:
            raise ValueError(f"',' or '{closer}' expected at {pos}")


def scan(path: Path, digests: dict[str, Callable[[Any, Any], Any]]) -> tuple[dict[str, Any], dict[str, list], str | None]:
    """(header, {container: [(key or index, start, end, digest)]}, the text when not ASCII else None).

    Raises ValueError or IndexError on a truncated or malformed file.
    """
    raw = path.read_bytes()
    ascii_only = raw.isascii()
    text = raw.decode("ascii" if ascii_only else "utf-8")
    del raw
    header: dict[str, Any] = {}
    found: dict[str, list] = {k: [] for k in digests}
    pos = _ws(text, 0)
    if text[pos] != "{":
        raise ValueError("not a JSON object")
    pos = _ws(text, pos + 1)
    while text[pos] != "}":
        key, pos = _DEC.raw_decode(text, pos)
        pos = _ws(text, pos)
        if text[pos] != ":":
            raise ValueError(f"':' expected at {pos}")
        pos = _ws(text, pos + 1)
        if key in digests and text[pos] in "[{":
            found[key], pos = _walk(text, pos, digests[key])
        else:
            header[key], pos = _DEC.raw_decode(text, pos)
        pos = _ws(text, pos)
        if text[pos] == ",":
            pos = _ws(text, pos + 1)
        elif text[pos] != "}":
            raise ValueError(f"',' or '}}' expected at {pos}")
    return header, found, None if ascii_only else text


class Spans:
    """Decodes one entry of a scanned file: from the file (ASCII: byte spans) or from the text kept."""

    def __init__(self, path: Path, text: str | None = None):
        self.path, self.text = path, text

    def load(self, start: int, end: int) -> Any:
        if self.text is not None:
            return json.loads(self.text[start:end])
        with open(self.path, "rb") as f:
            f.seek(start)
            return json.loads(f.read(end - start))


def cache_dir() -> Path | None:
    """$INNARDS_VIEWER_CACHE, else ~/.cache/innards/viewer ("off": no disk cache)."""
    env = os.environ.get("INNARDS_VIEWER_CACHE")
    if env == "off":
        return None
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "innards" / "viewer"
    return base


def disk_cached(path: Path, tag: str, build: Callable[[], tuple[dict[str, Any], bool]]) -> dict[str, Any]:
    """``build()`` -> (JSON-able result, cacheable); kept on disk per (path, size, mtime, tag) when cacheable."""
    d = cache_dir()
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tag}|{VERSION}".encode()).hexdigest()
    p = d / f"{key}.json" if d else None
    if p is not None and p.is_file():
        try:
            return json.loads(p.read_bytes())
        except (OSError, ValueError):
            pass
    val, cacheable = build()
    if p is not None and cacheable:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}")
            tmp.write_text(json.dumps(val, separators=(",", ":")))
            os.replace(tmp, p)
        except OSError:
            pass  # a read-only home: no cache, same result
    return val
