"""``innards report``: the viewer's pages as a static site that opens from ``file://`` or any static host.

Layout of ``SITE/``: ``index.html`` (the same app as ``innards view``), ``static/`` (its assets),
``data/`` (page data as ``.js`` files: browsers refuse ``fetch()`` of JSON from ``file://`` but load
scripts), ``files/RUN/NAME.png`` (the plots the pages show). Lists of meta-neurons and subcomponents are
one compact file per run (paged in the browser), their items grouped ``ITEMS_PER_FILE`` to a file.
The site is built in a temporary folder next to ``SITE`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from innards.errors import InnardsError
from innards.run import Run
from innards.viewer.discover import REPORT_MARKER, discover, one_line, safe_file
from innards.viewer.pages import FAILURES, LIST_KINDS, Pages
from innards.viewer.server import STATIC, app_html

ITEMS_PER_FILE = 50


@dataclass
class ReportConfig:
    """Write the pages of every innards run under some folders as a static site."""

    dirs: list[str] = field(default_factory=list)
    """folders to search for runs"""
    out: str = "report"
    """output folder of the site (replaced when it holds an earlier report; refused when it holds anything else)"""


def js_literal(obj: Any) -> str:
    """JSON that is also safe inside a ``<script>`` (no ``</script>``, ``<!--``, U+2028/9 breaks)."""
    s = json.dumps(obj, ensure_ascii=False, allow_nan=False, default=str, separators=(",", ":"))
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _write_data(root: Path, key: str, obj: Any) -> None:
    p = root / "data" / f"{key}.js"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"innardsReceive({js_literal(key)},{js_literal(obj)});\n", encoding="utf-8")


def _copy_files(root: Path, run: Any, names: list[str]) -> None:
    for name in names:
        src = safe_file(run, name)
        if src is not None:
            dst = root / "files" / run.id / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def _pngs_of(page: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(run id, PNG names) that a page shows, its own and those of the evals it embeds."""
    out = [(page["run"]["id"], list(page.get("pngs") or []))]
    for key in ("eval",):
        sub = page.get(key)
        if isinstance(sub, dict) and sub.get("pngs"):
            out.append((page["run"]["id"], list(sub["pngs"])))
    for ev in page.get("evals") or []:
        out.append((ev["id"], list(ev.get("pngs") or [])))
    return out


def write_site(dirs: list[Path], root: Path) -> dict[str, int]:
    """Write the whole site into ``root`` (an empty folder); returns counts for the summary line."""
    runs = discover(dirs)
    pages = Pages(runs)
    by_id = {r.id: r for r in runs}
    n_items = 0
    for run in runs:
        page = pages.page(run.id)
        if run.kind in LIST_KINDS and not page.get("error"):
            try:
                rows = pages.all_rows(run.id)
                _write_data(root, f"run/{run.id}/list", {"rows": [{k: v for k, v in r.items() if k != "search"}
                                                                   for r in rows],
                                                          "search": [r["search"] for r in rows],
                                                          "per_file": ITEMS_PER_FILE})
                for k in range(0, len(rows), ITEMS_PER_FILE):
                    chunk = {}
                    for r in rows[k:k + ITEMS_PER_FILE]:
                        try:
                            chunk[r["id"]] = pages.item(run.id, r["id"])
                        except FAILURES as e:
                            chunk[r["id"]] = {"id": r["id"], "error": one_line(str(e))}
                        n_items += 1
                    _write_data(root, f"run/{run.id}/items-{k // ITEMS_PER_FILE}", chunk)
            except FAILURES as e:
                page["error"] = one_line(str(e))
                run.damage(page["error"])
                page["run"] = run.summary()
        _write_data(root, f"run/{run.id}", page)
        for rid, names in _pngs_of(page):
            if rid in by_id:
                _copy_files(root, by_id[rid], names)
    index = pages.index()
    index["playground"] = False
    _write_data(root, "index", index)
    (root / "static").mkdir(exist_ok=True)
    for p in STATIC.iterdir():
        if p.is_file() and p.name != "index.html":
            shutil.copyfile(p, root / "static" / p.name)
    (root / "index.html").write_text(app_html("static"), encoding="utf-8")
    (root / REPORT_MARKER).write_text("written by innards report; innards view skips this folder\n")
    return {"runs": len(runs), "damaged": sum(r.status == "damaged" for r in runs), "items": n_items}


# what an innards.run output folder holds before its command writes anything: kept when the report goes in
RUN_RECORD = {"run.json", "config.yaml", ".innards.lock"}


def build_report(dirs: list[Path], out: Path) -> Path:
    """Write the static report of every run under ``dirs`` to ``out``; returns ``out/index.html``.

    ``out`` may be new, an earlier report (replaced), or an innards.run folder holding only its record.
    """
    out = Path(out)
    if out.exists():
        extra = {p.name for p in out.iterdir()} - RUN_RECORD
        if not out.is_dir() or (extra and not (out / REPORT_MARKER).is_file()):
            raise InnardsError(f"{out} exists and is not an innards report; choose another --out")
    missing = [str(d) for d in dirs if not Path(d).exists()]
    if missing:
        raise InnardsError(f"folder not found: {missing[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_site([Path(d) for d in dirs], tmp)
        os.chmod(tmp, 0o755)
        if not out.exists():
            tmp.rename(out)
        else:  # swap the site's entries in one by one; the run record (if any) stays
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            for p in out.iterdir():
                if p.name not in RUN_RECORD:
                    p.rename(old / p.name)
            for p in tmp.iterdir():
                p.rename(out / p.name)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def report(cfg: ReportConfig) -> int:
    """CLI entry: build the site (an innards.run folder of kind "report", rebuilt every time) and say where it is."""
    if not cfg.dirs:
        raise InnardsError("give at least one folder to look for runs in (innards report DIR --out SITE)")
    missing = [d for d in cfg.dirs if not Path(d).exists()]
    if missing:
        raise InnardsError(f"folder not found: {missing[0]}")
    with Run.open(cfg.out, "report", cfg, inputs={f"dir{i}": d for i, d in enumerate(cfg.dirs)}, overwrite=True) as run:
        index = build_report([Path(d) for d in cfg.dirs], Path(cfg.out))
        text = (index.parent / "data" / "index.js").read_text(encoding="utf-8")
        runs = json.loads(text[text.index(",") + 1:text.rindex(")")])["runs"]
        run.complete(headline={"runs": len(runs), "damaged": sum(r["status"] == "damaged" for r in runs)},
                     outputs=["index.html"])
    print(f"wrote {index}  (open it in a browser, or serve {index.parent} from any static host)")
    return 0
