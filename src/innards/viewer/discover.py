"""Find every innards run under some folders: ``run.json`` first, else the files each command writes.

A run is a folder (a store, a GLP, a sweep, a VPD run, ...) or, for commands whose output is one file,
that file (a GLP eval JSON, a steering vector, a VPD ablation). Discovery reads only small descriptors
and file headers (no torch, no checksums of big files), so ``innards view`` starts fast; a damaged run
is kept, with a one-line reason, instead of raising.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
RUN_FORMAT = "innards.run"
REPORT_MARKER = ".innards-report"
MAX_DEPTH = 10
MAX_FOLDERS = 50_000
BIG_JSON = 8 << 20  # larger descriptors are checked for truncation, not parsed, at discovery
# folders that never hold runs of their own (skipping them keeps the walk cheap on big stores)
SKIP_ALWAYS = {".git", "__pycache__", "node_modules", ".venv", "shards", "resume", "ckpt", "cells", "evaluator",
               "cache", "generated"}
SKIP_IN = {"glp": {"checkpoints"}, "probe": {"tasks"}, "scale": set()}
# weights files that are part of a folder run, never steering vectors
_NOT_VECTORS = {"model.safetensors", "decomposition.safetensors", "stats.safetensors", "sae_weights.safetensors",
                "target.safetensors", "state.safetensors"}


@dataclass
class RunInfo:
    """One discovered run: where it is, what kind, whether it is usable, its headline numbers."""

    id: str
    kind: str
    path: Path
    root: Path
    rel: str
    source: str = "files"  # "run.json" or "files" (recognised by the files it holds)
    status: str = "complete"  # complete | running | damaged
    reason: str | None = None
    headline: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    uses: list[str] = field(default_factory=list)
    used_by: list[str] = field(default_factory=list)
    parent: str | None = None
    children: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """The folder whose files belong to the run (the run itself, or the file's folder)."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def is_file(self) -> bool:
        return not self.path.is_dir()

    def damage(self, reason: str) -> None:
        """Mark the run damaged (the first reason is kept)."""
        if self.status != "damaged":
            self.status, self.reason = "damaged", one_line(reason)

    def summary(self) -> dict[str, Any]:
        """JSON for the index page."""
        return {"id": self.id, "kind": self.kind, "rel": self.rel, "name": self.path.name, "source": self.source,
                "status": self.status, "reason": self.reason, "headline": self.headline, "uses": self.uses,
                "used_by": self.used_by, "parent": self.parent, "children": self.children,
                "created": self.meta.get("created"), "file": self.is_file}


def one_line(text: str, limit: int = 200) -> str:
    """First line of a message, bounded."""
    s = str(text).strip().splitlines()[0] if str(text).strip() else "unknown error"
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ---------------------------------------------------------------- small cheap readers


class Damaged(Exception):
    """A file that exists but cannot be read as what it should be."""


def read_json_small(path: Path) -> Any:
    """Parse a JSON descriptor; Damaged (one line) when missing, truncated or not JSON."""
    if not path.is_file():
        raise Damaged(f"{path.name} missing")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Damaged(f"{path.name} is not valid JSON ({e.__class__.__name__}: truncated?)") from None
    except OSError as e:
        raise Damaged(f"{path.name} unreadable ({e.strerror})") from None


def json_head(path: Path, stop_key: str, limit: int = 1 << 16) -> dict[str, Any]:
    """The leading scalar keys of a big one-line JSON object written header first (up to ``stop_key``)."""
    with open(path, "rb") as f:
        head = f.read(limit).decode("utf-8", "replace")
    cut = head.find(f'"{stop_key}"')
    if cut <= 0:
        return {}
    try:
        return json.loads(head[:cut].rstrip().rstrip(",") + "}")
    except json.JSONDecodeError:
        return {}


def check_json_tail(path: Path) -> None:
    """Damaged unless the file ends like a JSON object or array (cheap truncation check for big files)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 64))
            tail = f.read().rstrip()
    except OSError as e:
        raise Damaged(f"{path.name} unreadable ({e.strerror})") from None
    if not tail or tail[-1:] not in (b"}", b"]"):
        raise Damaged(f"{path.name} is truncated")


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file size (truncation, garbage)."""
    if not path.is_file():
        raise Damaged(f"{path.name} missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise Damaged(f"{path.name} is truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise Damaged(f"{path.name} is not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Damaged(f"{path.name} is not a safetensors file (unreadable header)") from None
    except OSError as e:
        raise Damaged(f"{path.name} unreadable ({e.strerror})") from None
    if not isinstance(header, dict):
        raise Damaged(f"{path.name} is not a safetensors file")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
              default=0)
    if 8 + n + end != size:
        raise Damaged(f"{path.name} is truncated or corrupted ({size} bytes, header says {8 + n + end})")
    return header


def _num(v: Any) -> Any:
    """A headline value: finite numbers rounded to 4 significant digits, short strings kept."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return float(f"{v:.4g}") if v == v and abs(v) != float("inf") else None
    if isinstance(v, str):
        if re.fullmatch(r"-?\d+", v):
            return int(v)
        return v[:60]
    return None


def _headline(pairs: dict[str, Any]) -> dict[str, Any]:
    return {k: _num(v) for k, v in pairs.items() if _num(v) is not None}


# ---------------------------------------------------------------- recognisers (folders written before run.json)


def _store(d: Path, info: RunInfo) -> None:
    m = read_json_small(d / "manifest.json")
    if m.get("format") != "innards.activation_store":
        raise Damaged("manifest.json is not an innards activation store manifest")
    sites = m.get("sites") or []
    text = m.get("text") or {}
    model = m.get("model") or {}
    info.headline = _headline({"tokens": m.get("tokens"), "sites": len(sites),
                               "width": sites[0].get("width") if sites else None,
                               "documents": text.get("documents_with_rows"), "dtype": m.get("dtype"),
                               "model": model.get("name") if isinstance(model, dict) else model})
    info.meta["created"] = m.get("created")
    for s in m.get("shards") or []:
        for f in (s.get("files") or {}).values():
            p = d / f["path"]
            if not p.is_file():
                raise Damaged(f"shard file {f['path']} missing")
            if p.stat().st_size != int(f.get("bytes", -1)):
                raise Damaged(f"shard file {f['path']} is truncated ({p.stat().st_size} of {f.get('bytes')} bytes)")
    safetensors_header(d / (m.get("stats") or {}).get("path", "stats.safetensors"))


def _glp(d: Path, info: RunInfo) -> None:
    cfg = read_json_small(d / "config.json")
    tr = cfg.get("training") or {}
    arch = cfg.get("architecture") or {}
    src = cfg.get("source_model")
    info.headline = _headline({"val_loss": tr.get("val_loss"), "train_loss": tr.get("train_loss"),
                               "step": tr.get("step"), "params": cfg.get("n_params"), "depth": arch.get("n_blocks"),
                               "site": cfg.get("site"), "model": src.get("name") if isinstance(src, dict) else src})
    data = tr.get("data") or {}
    if isinstance(data, dict) and data.get("store"):
        info.inputs.append(str(data["store"]))
    safetensors_header(d / "model.safetensors")


def _sae(d: Path, info: RunInfo) -> None:
    cfg = read_json_small(d / "cfg.json")
    summ = read_json_small(d / "summary.json") if (d / "summary.json").is_file() else {}
    ev = summ.get("val") or summ.get("eval") or summ
    info.headline = _headline({"d_sae": cfg.get("d_sae"), "k": cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k"),
                               "val_fvu": ev.get("val_fvu", ev.get("fvu")), "site": cfg.get("hook_name")})
    if summ.get("store"):
        info.inputs.append(str(summ["store"]))
    safetensors_header(d / "sae_weights.safetensors")


def _sweep(d: Path, info: RunInfo) -> None:
    res = read_json_small(d / "results.json")
    methods = res.get("methods") or {}
    hl: dict[str, Any] = {"concept": res.get("concept"), "evaluator_acc": res.get("evaluator_accuracy")}
    for m, rows in methods.items():
        if rows:
            top = max(rows, key=lambda r: r.get("strength", 0))
            hl[f"{m}_concept@{top.get('strength'):g}"] = top.get("concept")
            hl[f"{m}_nll@{top.get('strength'):g}"] = top.get("nll")
    comp = res.get("comparison") or {}
    if "glp_frontier_dominates_at_r_ge_1" in comp:
        hl["glp_frontier_dominates"] = comp["glp_frontier_dominates_at_r_ge_1"]
    info.headline = _headline(hl)
    for key in ("glp",):
        if res.get(key):
            info.inputs.append(str(res[key]))
    src = (res.get("vector") or {}).get("source")
    if src:
        info.inputs.append(str(src))


def _probe(d: Path, info: RunInfo) -> None:
    s = read_json_small(d / "summary.json")
    hl: dict[str, Any] = {"tasks": s.get("n_tasks")}
    for name, e in (s.get("features") or {}).items():
        if isinstance(e, dict) and e.get("mean_auc") is not None:
            hl[f"{name}"] = f"{e['mean_auc']:.3f} [{e.get('ci_low', float('nan')):.3f}, {e.get('ci_high', float('nan')):.3f}]"
    info.headline = _headline(hl)


def _neurons(d: Path, info: RunInfo) -> None:
    p = d / "neurons.json"
    if p.stat().st_size > BIG_JSON:
        check_json_tail(p)
        head = json_head(p, "neurons")
    else:
        head = {k: v for k, v in read_json_small(p).items() if k not in ("neurons", "contexts")}
    info.headline = _headline({"neurons": head.get("n_neurons"), "contexts": head.get("n_contexts"),
                               "tokens": head.get("n_tokens"), "site": head.get("site"), "t": head.get("t")})
    if head.get("glp"):
        info.inputs.append(str(head["glp"]))


def _scale(d: Path, info: RunInfo) -> None:
    s = read_json_small(d / "scale.json")
    fit = s.get("fit") or {}
    info.headline = _headline({"alpha": fit.get("alpha"), "E": fit.get("E"), "r2": fit.get("r2"),
                               "depths": ",".join(str(x) for x in s.get("depths") or [])})
    if s.get("acts"):
        info.inputs.append(str(s["acts"]))


def vpd_meta_file(d: Path) -> Path | None:
    """The VPD run's own metadata file (``run.json`` before innards.run took that name)."""
    for name in ("decomposition.json", RUN_FILE):
        p = d / name
        if p.is_file():
            try:
                m = json.loads(p.read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(m, dict) and "components" in m and m.get("format") != RUN_FORMAT:
                return p
    return None


def _vpd(d: Path, info: RunInfo) -> None:
    meta_p = vpd_meta_file(d)
    meta = read_json_small(meta_p) if meta_p else {}
    comps = meta.get("components") or []
    hl: dict[str, Any] = {"objective": meta.get("objective"), "target": meta.get("target"), "step": meta.get("step"),
                          "subcomponents": sum(int(c.get("C", 0)) for c in comps) or None, "matrices": len(comps) or None}
    if (d / "eval.json").is_file():
        ev = read_json_small(d / "eval.json")
        for k in ("ce_target", "ce_stochastic", "kl_stochastic", "kl_adversarial", "mse_stochastic", "l0_total",
                  "alive_total"):
            hl[k] = ev.get(k)
        gt = ev.get("ground_truth") or {}
        for k in ("mmcs", "ml2r", "passed"):
            if k in gt:
                hl[k] = gt[k]
    info.headline = _headline(hl)
    if (d / "decomposition.safetensors").is_file():
        safetensors_header(d / "decomposition.safetensors")
    elif not (d / "ckpt" / "state.json").is_file():
        raise Damaged("no decomposition.safetensors and no checkpoint")
    else:
        info.status = "running"


def _vpd_contexts(d: Path, info: RunInfo) -> None:
    p = d / "contexts.json"
    if p.stat().st_size > BIG_JSON:
        check_json_tail(p)
        head = json_head(p, "components")
    else:
        full = read_json_small(p)
        head = {k: v for k, v in full.items() if k != "components"}
        head["n"] = len(full.get("components") or {})
    info.headline = _headline({"components": head.get("n"), "tokens": head.get("tokens"),
                               "threshold": head.get("threshold")})
    if head.get("run"):
        info.inputs.append(str(head["run"]))


def _vpd_graph(d: Path, info: RunInfo) -> None:
    g = read_json_small(d / "graph.json")
    info.headline = _headline({"prompt": g.get("prompt"), "next": g.get("output_token"),
                               "nodes": len(g.get("nodes") or []), "edges": len(g.get("edges") or [])})


def _demo(d: Path, info: RunInfo) -> None:
    s = read_json_small(d / "summary.json")
    ev = s.get("eval") or {}
    info.headline = _headline({"model": s.get("model"), "site": s.get("site"), "fd": ev.get("fd"),
                               "fd_floor": ev.get("fd_floor"), "c2st_auc_glp": ev.get("c2st_auc_glp"),
                               "delta_lm_glp": ev.get("delta_lm_glp")})


def _is_json_with(p: Path, keys: tuple[str, ...]) -> bool:
    if not p.is_file():
        return False
    try:
        d = json.loads(p.read_bytes()) if p.stat().st_size < BIG_JSON else {}
    except (OSError, ValueError):
        return True  # a damaged file with the right name still names the run
    return isinstance(d, dict) and all(k in d for k in keys)


# (kind, test on the folder, reader) in order: the first that matches names the folder
FOLDER_KINDS: list[tuple[str, Any, Any]] = [
    ("store", lambda d: (d / "harvest.json").is_file() or _is_store_manifest(d / "manifest.json"), _store),
    ("glp", lambda d: _is_json_with(d / "config.json", ("format",)) and _glp_format(d), _glp),
    ("sae", lambda d: _is_json_with(d / "cfg.json", ("d_sae",)), _sae),
    ("sweep", lambda d: (d / "results.json").is_file() and ((d / "pareto.png").exists() or (d / "generations.jsonl").exists()),
     _sweep),
    ("probe", lambda d: (d / "summary.json").is_file() and (d / "tasks").is_dir(), _probe),
    ("neurons", lambda d: (d / "neurons.json").is_file(), _neurons),
    ("scale", lambda d: (d / "scale.json").is_file(), _scale),
    ("vpd", lambda d: (d / "config.yaml").is_file() and ((d / "decomposition.safetensors").exists()
                                                        or (d / "ckpt" / "state.json").is_file()), _vpd),
    ("vpd-contexts", lambda d: (d / "contexts.json").is_file(), _vpd_contexts),
    ("vpd-graph", lambda d: (d / "graph.json").is_file(), _vpd_graph),
    ("demo", lambda d: _is_json_with(d / "summary.json", ("stages",)), _demo),
]


def _is_store_manifest(p: Path) -> bool:
    try:
        return p.is_file() and json.loads(p.read_bytes()).get("format") == "innards.activation_store"
    except (OSError, ValueError, AttributeError):
        return False


def _glp_format(d: Path) -> bool:
    try:
        return json.loads((d / "config.json").read_bytes()).get("format") == "innards-glp"
    except (OSError, ValueError, AttributeError):
        return (d / "model.safetensors").exists()


def _eval_file(p: Path, info: RunInfo) -> None:
    res = read_json_small(p)
    info.headline = _headline({k: res.get(k) for k in ("fd", "fd_floor", "fd_gaussian", "fd_sae", "c2st_auc_glp",
                                                        "delta_lm_glp")})
    for k in ("glp", "acts", "val_acts"):
        if res.get(k):
            info.inputs.append(str(res[k]))
    sae = res.get("sae")
    if isinstance(sae, dict) and sae.get("path"):
        info.inputs.append(str(sae["path"]))


def _ablate_file(p: Path, info: RunInfo) -> None:
    res = read_json_small(p)
    info.headline = _headline({"component": res.get("component"), "kl": res.get("kl_target_to_ablated"),
                               "prompt": res.get("prompt")})


def _vector_file(p: Path, info: RunInfo) -> None:
    meta = (safetensors_header(p).get("__metadata__") or {})
    info.headline = _headline({"site": meta.get("site"), "width": meta.get("width"), "method": meta.get("method"),
                               "model": meta.get("model"), "n_pos": meta.get("n_pos"), "n_neg": meta.get("n_neg")})
    info.meta["vector"] = dict(meta)


def _file_kind(p: Path) -> str | None:
    """Kind of a single-file output written before run.json sidecars (None: not a run)."""
    if p.suffix == ".json" and not p.name.endswith(".run.json"):
        if p.stat().st_size >= BIG_JSON:
            return None
        try:
            d = json.loads(p.read_bytes())
        except (OSError, ValueError):
            return "eval" if p.name.endswith("eval.json") else None
        if isinstance(d, dict):
            if "fd" in d and "fd_floor" in d:
                return "eval"
            if "most_increased" in d and "component" in d:
                return "vpd-ablate"
        return None
    if p.suffix == ".safetensors" and p.name not in _NOT_VECTORS:
        try:
            meta = safetensors_header(p).get("__metadata__") or {}
        except Damaged:
            return None
        return "vector" if str(meta.get("format", "")).startswith("innards.steering_vector") else None
    return None


FILE_READERS = {"eval": _eval_file, "vpd-ablate": _ablate_file, "vector": _vector_file}
FOLDER_READERS = {k: f for k, _, f in FOLDER_KINDS}


# ---------------------------------------------------------------- run.json


def _from_run_json(rj: Path, target: Path, info: RunInfo) -> None:
    """Fill ``info`` from an innards.run descriptor (folder ``run.json`` or ``FILE.run.json``)."""
    info.source = "run.json"
    m = read_json_small(rj)
    if not isinstance(m, dict) or m.get("format") != RUN_FORMAT:
        raise Damaged(f"{rj.name} is not an innards run descriptor")
    info.kind = str(m.get("kind") or "run")
    info.meta = {k: m.get(k) for k in ("created", "updated", "innards_version", "git_revision", "argv", "config",
                                       "outputs", "status")}
    info.headline = _headline(m.get("headline") or {})
    info.inputs = [str(i["path"]) for i in m.get("inputs") or [] if isinstance(i, dict) and i.get("path")]
    if m.get("status") == "running":
        info.status = "running"
    if info.status != "running":
        base = target.parent if target.is_file() else target
        for o in m.get("outputs") or []:
            p = base / str(o)
            if not p.exists():
                raise Damaged(f"output {o} missing")
            if p.suffix == ".safetensors":
                safetensors_header(p)
            elif p.suffix == ".json" and p.is_file():
                if p.stat().st_size > BIG_JSON:
                    check_json_tail(p)
                else:
                    read_json_small(p)
    # the kind's own reader adds headline numbers run.json left out (and checks the files it needs)
    reader = (FILE_READERS if target.is_file() else FOLDER_READERS).get(info.kind)
    if reader is not None:
        hl = dict(info.headline)
        status = info.status
        try:
            reader(target, info)
        except (Damaged, KeyError, TypeError, ValueError, AttributeError, OSError) as e:
            if status != "running":
                raise Damaged(str(e)) from None
        info.headline = {**info.headline, **hl}
        info.status = status  # run.json's own status wins over what the files suggest


# ---------------------------------------------------------------- the walk


def _slug(rel: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", rel).strip("-.") or "run"
    return s[:80]


class _Ids:
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def make(self, rel: str, path: Path) -> str:
        base = _slug(rel)
        rid = base
        if rid in self.seen:
            rid = f"{base[:70]}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        self.seen.add(rid)
        return rid


INPUT_KEYS = ("acts", "glp", "sae", "vector", "run", "val_acts", "store")


def config_inputs(path: Path) -> list[str]:
    """Input paths named in a saved config.yaml (acts, glp, vector, ...; ``glp:DIR`` feature sets)."""
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return []
    if not isinstance(cfg, dict):
        return []
    out = [str(cfg[k]) for k in INPUT_KEYS if isinstance(cfg.get(k), str) and cfg[k]]
    for f in cfg.get("features") or []:
        kind, _, arg = str(f).partition(":")
        if kind in ("glp", "sae") and arg:
            out.append(arg)
    return out


def _inspect(info: RunInfo, reader: Any) -> None:
    if info.source == "files":
        cfg = info.path / "config.yaml" if not info.is_file else info.path.with_name(info.path.name.split(".")[0] + ".config.yaml")
        info.inputs.extend(x for x in config_inputs(cfg) if x not in info.inputs)
    try:
        reader(info.path, info)
    except Damaged as e:
        info.damage(str(e))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        info.damage(f"unexpected content ({e.__class__.__name__}: {e})")
    except OSError as e:
        info.damage(f"unreadable ({e.strerror or e})")


def discover(dirs: list[Path] | list[str]) -> list[RunInfo]:
    """Every run under ``dirs`` (depth-first, sorted by path), with relations between them resolved."""
    ids = _Ids()
    runs: list[RunInfo] = []
    seen_paths: set[Path] = set()
    for given in dirs:
        root = Path(given).resolve()
        if not root.exists():
            continue
        base = root.parent
        if root.is_file():
            _consider_file(root, root, base, ids, runs, seen_paths)
            continue
        count = 0
        stack = [(root, 0)]
        while stack and count < MAX_FOLDERS:
            d, depth = stack.pop()
            count += 1
            if d in seen_paths:
                continue
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            if any(e.name == REPORT_MARKER for e in entries):
                continue  # a report written by innards report: pages, not runs
            names = {e.name for e in entries}
            kind = _folder_run(d, root, base, names, ids, runs, seen_paths)
            for e in entries:
                if e.is_file(follow_symlinks=False):
                    _consider_file(Path(e.path), root, base, ids, runs, seen_paths)
            skip = SKIP_ALWAYS | SKIP_IN.get(kind or "", set())
            if depth < MAX_DEPTH:
                subs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and e.name not in skip
                        and not e.name.startswith(".")]
                stack.extend((s, depth + 1) for s in reversed(subs))
    runs.sort(key=lambda r: str(r.path))
    link(runs)
    return runs


def _folder_run(d: Path, root: Path, base: Path, names: set[str], ids: _Ids, runs: list[RunInfo],
                seen: set[Path]) -> str | None:
    rel = str(d.relative_to(base))
    if RUN_FILE in names:
        info = RunInfo(id="", kind="run", path=d, root=root, rel=rel)
        try:
            m = json.loads((d / RUN_FILE).read_bytes())
        except (OSError, ValueError):
            m = None
        if isinstance(m, dict) and m.get("format") == RUN_FORMAT:
            _inspect(info, lambda p, i: _from_run_json(p / RUN_FILE, p, i))
            info.id = ids.make(rel, d)
            runs.append(info)
            seen.add(d)
            return info.kind
        if m is None and vpd_meta_file(d) is None and "config.yaml" not in names:
            info.id = ids.make(rel, d)
            info.source = "run.json"
            info.damage(f"{RUN_FILE} is not valid JSON (truncated?)")
            runs.append(info)
            seen.add(d)
            return None
    for kind, test, reader in FOLDER_KINDS:
        try:
            hit = test(d)
        except OSError:
            hit = False
        if hit:
            info = RunInfo(id=ids.make(rel, d), kind=kind, path=d, root=root, rel=rel)
            if kind == "store" and "manifest.json" not in names:
                info.damage("incomplete store (harvest.json without manifest.json: rerun the harvest to finish it)")
            else:
                _inspect(info, reader)
            runs.append(info)
            seen.add(d)
            return kind
    return None


def _consider_file(p: Path, root: Path, base: Path, ids: _Ids, runs: list[RunInfo], seen: set[Path]) -> None:
    if p in seen:
        return
    rel = str(p.relative_to(base))
    if p.name.endswith(".run.json") and p.name != RUN_FILE:
        target = p.with_name(p.name[: -len(".run.json")])
        info = RunInfo(id=ids.make(rel[: -len(".run.json")], target), kind="run", path=target, root=root,
                       rel=rel[: -len(".run.json")])
        if not target.exists():
            info.damage(f"{target.name} missing (its {p.name} is there)")
        else:
            _inspect(info, lambda t, i: _from_run_json(p, t, i))
        runs.append(info)
        seen.add(target)
        return
    if p.with_name(p.name + ".run.json").is_file():
        return  # described by its sidecar
    try:
        kind = _file_kind(p)
    except OSError:
        kind = None
    if kind is None:
        return
    info = RunInfo(id=ids.make(rel, p), kind=kind, path=p, root=root, rel=rel)
    _inspect(info, FILE_READERS[kind])
    runs.append(info)
    seen.add(p)


# ---------------------------------------------------------------- relations


def _match(given: str, runs: list[RunInfo], near: Path) -> RunInfo | None:
    """The run a recorded input path names: exact when absolute, else by path suffix (cwd unknown)."""
    p = Path(given)
    if p.is_absolute():
        try:
            rp = p.resolve()
        except OSError:
            rp = p
        for r in runs:
            if r.path == rp:
                return r
    parts = Path(os.path.normpath(given)).parts
    parts = tuple(x for x in parts if x not in ("/", "."))
    if not parts or ".." in parts:
        return None
    hits = [r for r in runs if r.path.parts[-len(parts):] == parts]
    if not hits:
        return None
    # several folders may end the same way: prefer the one closest to the run that names it
    return max(hits, key=lambda r: len(os.path.commonpath([str(r.path), str(near)])))


def link(runs: list[RunInfo]) -> None:
    """Fill uses / used_by (recorded inputs) and parent / children (runs nested in run folders)."""
    by_path = {r.path: r for r in runs}
    for r in runs:
        for given in r.inputs:
            hit = _match(given, runs, r.path)
            if hit is not None and hit is not r and hit.id not in r.uses:
                r.uses.append(hit.id)
                hit.used_by.append(r.id)
        up = r.path.parent
        while up != up.parent and up != r.root.parent:
            if up in by_path and by_path[up].path.is_dir():
                r.parent = by_path[up].id
                by_path[up].children.append(r.id)
                break
            up = up.parent
        # an analysis written inside a VPD run (contexts/, graph/, ablations) uses that run
        if r.kind in ("vpd-contexts", "vpd-graph", "vpd-ablate", "vpd-eval") and r.parent and r.parent not in r.uses:
            par = next(x for x in runs if x.id == r.parent)
            if par.kind == "vpd":
                r.uses.append(par.id)
                par.used_by.append(r.id)


def safe_file(run: RunInfo, rel: str) -> Path | None:
    """The file ``rel`` of a run, or None for anything outside it (``..``, absolute, symlinks out, not a file)."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    folder = run.folder.resolve()
    try:
        p = (folder / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not p.is_relative_to(folder) or not p.is_file():
        return None
    if run.is_file:
        # a file-run owns the files named after it (eval.json -> eval_pca.png, eval.config.yaml, ...)
        stem = run.path.name.split(".")[0]
        if p.parent != folder or not p.name.startswith(stem):
            return None
    return p
