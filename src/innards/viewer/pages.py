"""Page data: every discovered run as JSON for the viewer's pages, with paged lists for big runs.

``Pages(runs)`` builds the data of a run's page (``page``), of one page of its list of meta-neurons or
subcomponents (``list_page``; searchable) and of one list item (``item``). Big files are parsed once and
kept (keyed by their size and mtime), so after the first request a run with 50k subcomponents answers
a list page in milliseconds. Every failure to read a run becomes ``{"error": one line}``, never an
exception: a damaged run must not take the server or the report down.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from innards.data.store import ActivationStore
from innards.errors import InnardsError
from innards.io import read_json
from innards.runlog import read_metrics
from innards.viewer.bigjson import Spans, disk_cached, scan
from innards.viewer.discover import RunInfo, one_line, vpd_meta_file

LIST_KINDS = {"neurons": "meta-neurons", "vpd": "subcomponents"}
MAX_TEXT = 20_000  # config.yaml shown on a page
STRATEGIES = ["unmasked", "stochastic", "stochastic_subset", "ci", "rounded", "random", "zero"]
FAILURES = (InnardsError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError)


def r4(x: Any) -> Any:
    """A float rounded to 4 significant digits (None for NaN/inf); containers recursively."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float) or isinstance(x, np.floating):
        x = float(x)
        return float(f"{x:.4g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: r4(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [r4(v) for v in x]
    if isinstance(x, np.ndarray):
        return [r4(v) for v in x.tolist()]
    return x


def histogram(values: Any, bins: int = 40) -> dict[str, Any]:
    """{"edges", "counts"} of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(v, bins=bins)
    return {"edges": r4(edges), "counts": counts.tolist()}


def _text(p: Path) -> str | None:
    if not p.is_file():
        return None
    t = p.read_text(errors="replace")
    return t if len(t) <= MAX_TEXT else t[:MAX_TEXT] + "\n…"


def _pngs(run: RunInfo, names: list[str] | None = None) -> list[str]:
    """PNG files of the run (relative to its folder) to show on its page."""
    folder = run.folder
    if run.is_file:
        stem = run.path.name.split(".")[0]
        return sorted(p.name for p in folder.glob(f"{stem}*.png") if p.is_file())
    if names is not None:
        return [n for n in names if (folder / n).is_file()]
    return sorted(p.name for p in folder.glob("*.png") if p.is_file())


class Pages:
    """Builds (and caches) page data for a set of discovered runs."""

    def __init__(self, runs: list[RunInfo]):
        self.runs = runs
        self.by_id = {r.id: r for r in runs}
        self._cache: dict[tuple, Any] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self._tokenizers: dict[str, Any] = {}

    # ------------------------------------------------------------ plumbing

    def _memo(self, key: tuple, files: list[Path], fn: Callable[[], Any]) -> Any:
        """fn() once per key while the files keep their size and mtime (one builder at a time per key)."""
        stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in files)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
            val = fn()
            self._cache[key] = (stamp, val)
            return val

    def run(self, run_id: str) -> RunInfo:
        r = self.by_id.get(run_id)
        if r is None:
            raise KeyError(run_id)
        return r

    def index(self) -> dict[str, Any]:
        """The index page: every run, grouped by kind on the client."""
        return {"runs": [r.summary() for r in self.runs], "kinds": sorted({r.kind for r in self.runs})}

    def page(self, run_id: str) -> dict[str, Any]:
        """A run's page data; ``{"error": ...}`` inside when its files do not read."""
        run = self.run(run_id)
        out: dict[str, Any] = {"run": run.summary(), "kind": run.kind}
        builder = getattr(self, "_page_" + run.kind.replace("-", "_"), None)
        try:
            names = [str(run.meta["config"])] if run.meta.get("config") else []
            names.append("config.yaml" if run.path.is_dir() else run.path.name.split(".")[0] + ".config.yaml")
            out["config"] = next((t for t in (_text(run.folder / n) for n in names if "/" not in n) if t), None)
            out["run_json"] = run.meta if run.source == "run.json" else None
            if builder is None:
                out.update(self._page_generic(run))
            else:
                out.update(builder(run))
            if run.kind in LIST_KINDS:
                out["list"] = {"what": LIST_KINDS[run.kind], "total": len(self._rows(run))}
        except FAILURES as e:
            out["error"] = one_line(str(e) or e.__class__.__name__)
            run.damage(out["error"])
            out["run"] = run.summary()
        return out

    def list_page(self, run_id: str, offset: int = 0, limit: int = 50, q: str = "") -> dict[str, Any]:
        """One page of a run's list (meta-neurons or subcomponents), filtered by a case-insensitive query."""
        run = self.run(run_id)
        rows = self._rows(run)
        if q:
            ql = q.lower()
            rows = [r for r in rows if ql in r["search"]]
        offset = max(0, int(offset))
        limit = max(1, min(500, int(limit)))
        return {"total": len(rows), "offset": offset, "limit": limit,
                "rows": [{k: v for k, v in r.items() if k != "search"} for r in rows[offset:offset + limit]]}

    def all_rows(self, run_id: str) -> list[dict[str, Any]]:
        """The whole list of a run (for the static report, which pages on the client)."""
        return self._rows(self.run(run_id))

    def item(self, run_id: str, item_id: str) -> dict[str, Any]:
        """One meta-neuron or subcomponent page."""
        run = self.run(run_id)
        if run.kind == "neurons":
            return self._neuron(run, item_id)
        if run.kind == "vpd":
            return self._component(run, item_id)
        raise KeyError(item_id)

    def _rows(self, run: RunInfo) -> list[dict[str, Any]]:
        if run.kind == "neurons":
            return self._neuron_data(run)["rows"]
        if run.kind == "vpd":
            return self._vpd_data(run)["rows"]
        raise KeyError(f"{run.id} has no list")

    def related(self, run: RunInfo, kinds: tuple[str, ...], via: str = "used_by") -> list[RunInfo]:
        return [self.by_id[i] for i in getattr(run, via) if i in self.by_id and self.by_id[i].kind in kinds]

    def _tokenizer(self, model: Any) -> Any:
        """The model's tokenizer for decoding stored token ids, or None (offline, not found, not loadable)."""
        from innards.models.load import load_tokenizer

        name = None
        if isinstance(model, dict):
            path = model.get("path")
            name = path if path and Path(path).is_dir() else model.get("name")
        elif isinstance(model, str):
            name = model
        if not name:
            return None
        if name not in self._tokenizers:
            try:
                self._tokenizers[name] = load_tokenizer(name)
            except Exception:  # any failure (no files offline, odd tokenizer) only costs the decoding
                self._tokenizers[name] = None
        return self._tokenizers[name]

    # ------------------------------------------------------------ store

    def _page_store(self, run: RunInfo) -> dict[str, Any]:
        st = ActivationStore(run.path, verify="size")
        m = st.manifest
        sites = []
        for s in m["sites"]:
            name = s["site"]
            stats = st.stats(name)
            mean, var = np.asarray(stats["mean"]), np.asarray(stats["var"])
            step = max(1, mean.size // 4096)
            sites.append({"site": name, "width": s.get("width"), "tl_name": s.get("tl_name"),
                          "hf_module": s.get("hf_module"), "mean": r4(mean[::step]), "var": r4(var[::step]),
                          "stride": step, "mean_norm": r4(stats["mean_norm"]), "rms_norm": r4(stats["rms_norm"])})
        n = len(st)
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(n, size=min(n, 2048), replace=False)) if n else np.zeros(0, dtype=np.int64)
        norms = {}
        for s in st.sites:
            x = st.rows(idx, site=s) if len(idx) else None
            norms[s] = histogram(x.norm(dim=-1).numpy() if x is not None else [], 40)
        samples = self._store_samples(st, rng)
        model = m.get("model") or {}
        text = m.get("text") or {}
        return {"store": {
            "model": model, "tokens": m.get("tokens"), "tokens_requested": m.get("tokens_requested"),
            "dtype": m.get("dtype"), "context": m.get("context"), "shards": len(m.get("shards") or []),
            "documents": text.get("documents_with_rows"), "text": {k: v for k, v in text.items() if not isinstance(v, (dict, list))},
            "split": m.get("split"), "created": m.get("created"), "index_convention": m.get("index_convention"),
            "innards": m.get("innards")},
            "sites": sites, "norms": norms, "norm_sample": int(len(idx)), "samples": samples}

    def _store_samples(self, st: ActivationStore, rng: np.random.Generator, k: int = 10, half: int = 12) -> dict:
        n = len(st)
        if n == 0:
            return {"rows": [], "decoded": False}
        docs, pos, toks = st.doc_ids, st.positions, st.token_ids
        table = st.doc_table
        tok = self._tokenizer(st.manifest.get("model"))
        picks = np.sort(rng.choice(n, size=min(n, k), replace=False))
        out = []
        for i in picks.tolist():
            lo, hi = max(0, i - half), min(n, i + half + 1)
            js = [j for j in range(lo, hi) if docs[j] == docs[i]]
            ids = [int(toks[j]) for j in js]
            words = [tok.decode([t]) for t in ids] if tok is not None else [f"#{t}" for t in ids]
            d = int(docs[i])
            out.append({"row": i, "doc": table[d] if d < len(table) else None, "pos": int(pos[i]), "tokens": words,
                        "centre": js.index(i)})
        return {"rows": out, "decoded": tok is not None}

    # ------------------------------------------------------------ GLP, eval, scale, SAE

    def _page_glp(self, run: RunInfo) -> dict[str, Any]:
        cfg = read_json(run.path / "config.json", "GLP config")
        metrics = read_metrics(run.path)
        ckpts = []
        cdir = run.path / "checkpoints"
        if cdir.is_dir():
            for c in sorted(cdir.iterdir()):
                if (c / "config.json").is_file():
                    tr = (read_json(c / "config.json", "checkpoint config").get("training") or {})
                    ckpts.append(r4({"name": c.name, "step": tr.get("step"), "val_loss": tr.get("val_loss"),
                                     "train_loss": tr.get("train_loss"), "activations": tr.get("activations"),
                                     "flops": tr.get("flops")}))
        evals = []
        for ev in self.related(run, ("eval",)):
            try:
                evals.append({"id": ev.id, "rel": ev.rel, **self._eval_data(ev)})
            except FAILURES as e:
                evals.append({"id": ev.id, "rel": ev.rel, "error": one_line(str(e))})
        scale = None
        if run.parent and self.by_id.get(run.parent) and self.by_id[run.parent].kind == "scale":
            sr = self.by_id[run.parent]
            try:
                s = read_json(sr.path / "scale.json", "scale results")
                scale = {"id": sr.id, "fit": r4(s.get("fit")), "law": s.get("law")}
            except FAILURES as e:
                scale = {"id": sr.id, "error": one_line(str(e))}
        return {"glp": r4({k: cfg.get(k) for k in ("architecture", "n_params", "d_in", "site", "sites", "stats",
                                                 "training", "index_convention")} | {"source_model": cfg.get("source_model")}),
                "curves": _curves(metrics), "checkpoints": ckpts, "evals": evals, "scale": scale,
                "pngs": _pngs(run)}

    def _eval_data(self, run: RunInfo) -> dict[str, Any]:
        path = run.path if run.is_file else next(iter(sorted(run.path.glob("*eval*.json"))), run.path / "eval.json")
        res = read_json(path, "GLP eval")
        return {"table": eval_table(res),
                "info": r4({k: res.get(k) for k in ("model", "site", "d", "n", "steps", "solver", "seed", "heldout",
                                                    "pca_k", "pca_explained_variance", "t_start", "project_steps",
                                                    "delta_lm_docs", "delta_lm_tokens", "lm_loss_clean", "seconds")}),
                "notes": [str(x) for x in (res.get("notes") or [])] + ([str(res["delta_lm_note"])] if res.get("delta_lm_note") else []),
                "sae": r4(res.get("sae")) if isinstance(res.get("sae"), dict) else None,
                "pngs": _pngs(run)}

    def _page_eval(self, run: RunInfo) -> dict[str, Any]:
        return {"eval": self._eval_data(run)}

    def _page_scale(self, run: RunInfo) -> dict[str, Any]:
        s = read_json(run.path / "scale.json", "scale results")
        points = []
        for rr in s.get("runs") or []:
            for c in rr.get("checkpoints") or []:
                points.append(r4({"depth": rr.get("depth"), "compute": c.get("compute"), "loss": c.get("loss"),
                                  "step": c.get("step"), "on_envelope": c.get("on_envelope"), "early": c.get("early")}))
        return {"scale": r4({"fit": s.get("fit"), "law": s.get("law"), "depths": s.get("depths"),
                             "envelope": s.get("envelope"), "downstream": s.get("downstream"), "notes": s.get("notes")}),
                "points": points, "pngs": _pngs(run)}

    def _page_sae(self, run: RunInfo) -> dict[str, Any]:
        cfg = read_json(run.path / "cfg.json", "SAE config")
        summ = read_json(run.path / "summary.json", "SAE summary") if (run.path / "summary.json").is_file() else {}
        return {"sae": r4({k: v for k, v in cfg.items() if not isinstance(v, (dict, list))}), "summary": r4(summ),
                "curves": _curves(read_metrics(run.path)), "pngs": _pngs(run)}

    # ------------------------------------------------------------ steering

    def _page_sweep(self, run: RunInfo) -> dict[str, Any]:
        res = read_json(run.path / "results.json", "sweep results")
        gens: dict[str, dict[str, list]] = {}
        gpath = run.path / "generations.jsonl"
        if gpath.is_file():
            for line in gpath.read_text(errors="replace").splitlines():
                if not line.strip():
                    continue
                g = json.loads(line)
                key = f"{float(g.get('strength', 0)):g}"
                gens.setdefault(str(g.get("method")), {}).setdefault(key, []).append(r4({
                    "i": g.get("prompt_index"), "prompt": g.get("prompt"), "text": g.get("continuation"),
                    "concept": g.get("concept"), "nll": g.get("nll"), "distinct2": g.get("distinct2")}))
        for m in gens.values():
            for rows in m.values():
                rows.sort(key=lambda x: x.get("i") or 0)
        vec = res.get("vector") or {}
        return {"sweep": r4({k: res.get(k) for k in ("concept", "evaluator_accuracy", "model", "site", "norm", "norm_source",
                                                   "glp", "projection", "positions", "n_prompts", "max_new_tokens",
                                                   "temperature", "seed")}),
                "methods": r4(res.get("methods") or {}), "comparison": r4(res.get("comparison")),
                "vector": {k: vec.get(k) for k in ("method", "site", "model", "n_pos", "n_neg", "source", "token")},
                "generations": gens, "pngs": _pngs(run)}

    def _page_vector(self, run: RunInfo) -> dict[str, Any]:
        return {"vector": run.meta.get("vector") or {}}

    # ------------------------------------------------------------ probing

    def _page_probe(self, run: RunInfo) -> dict[str, Any]:
        s = read_json(run.path / "summary.json", "probe summary")
        tasks = []
        tdir = run.path / "tasks"
        for name in s.get("tasks") or []:
            p = tdir / f"{name}.json"
            if not p.is_file():
                tasks.append({"task": name, "missing": True})
                continue
            t = read_json(p, "probe task result")
            feats = {}
            for fname, f in (t.get("features") or {}).items():
                feats[fname] = r4({"test_auc": f.get("test_auc"), "cv_auc": f.get("cv_auc"), "best": f.get("best"),
                                   "sign": f.get("sign"), "n_features": f.get("n_features")})
            tasks.append({"task": name, "n": t.get("n"), "n_train": t.get("n_train"), "n_test": t.get("n_test"),
                          "classes": t.get("classes"), "features": feats})
        return {"summary": r4({"features": s.get("features"), "n_tasks": s.get("n_tasks"), "skipped": s.get("skipped"),
                               "ci": s.get("ci"), "settings": s.get("settings")}),
                "tasks": tasks, "neuron_links": self._probe_neuron_links(run, s), "pngs": _pngs(run)}

    def _probe_neuron_links(self, run: RunInfo, summary: dict) -> dict[str, str]:
        """Feature set name (glp:...) -> the meta-neurons run of that GLP, for links from chosen features."""
        out = {}
        glps = self.related(run, ("glp",), via="uses")
        for name in (summary.get("features") or {}):
            if not name.startswith("glp:"):
                continue
            arg = name[4:]
            hit = [g for g in glps if g.path.name == Path(arg).name] or glps[:1]
            for g in hit:
                for nr in self.related(g, ("neurons",)):
                    out[name] = nr.id
        return out

    # ------------------------------------------------------------ meta-neurons

    def _neuron_data(self, run: RunInfo) -> dict[str, Any]:
        """Header, list rows and entry spans of a neurons.json (scanned once; kept in the disk cache)."""
        path = run.path / "neurons.json"

        def scanned() -> tuple[dict[str, Any], bool]:
            header, found, text = scan(path, {
                "neurons": lambda _, n: [str(n["neuron"]), n.get("block"), n.get("index"), n.get("max"),
                                         [(str(e["context"]), int(e.get("max_position", 0))) for e in (n.get("examples") or [])[:1]]],
                "contexts": lambda _, c: c.get("tokens") or []})
            toks = {k: d for k, _, _, d in found["contexts"]}
            rows = []
            for _, _, _, (nid, block, index, mx, top) in found["neurons"]:
                peak, snippet = "", ""
                if top:
                    t, mp = toks.get(top[0][0]) or [], top[0][1]
                    if 0 <= mp < len(t):
                        peak, snippet = t[mp], "".join(t[max(0, mp - 6):mp + 3])
                rows.append({"id": nid, "block": block, "index": index, "max": r4(mx), "peak": peak, "snippet": snippet,
                             "search": f"{nid} {snippet}".lower()})
            val = {"header": header, "rows": rows, "spans": {d[0]: [a, b] for _, a, b, d in found["neurons"]},
                   "ctx_spans": {k: [a, b] for k, a, b, _ in found["contexts"]}}
            return ({**val, "text": text} if text is not None else val), text is None

        def build() -> dict[str, Any]:
            try:
                return disk_cached(path, "neurons", scanned)
            except (ValueError, IndexError):
                raise InnardsError(f"{path.name} is truncated or not valid JSON") from None

        return self._memo(("neurons", run.id), [path], build)

    def _page_neurons(self, run: RunInfo) -> dict[str, Any]:
        data = self._neuron_data(run)
        return {"neurons": r4(data["header"]), "pngs": _pngs(run)}

    def _neuron(self, run: RunInfo, nid: str) -> dict[str, Any]:
        data = self._neuron_data(run)
        span = data["spans"].get(nid)
        if span is None:
            raise KeyError(f"no meta-neuron {nid}")
        reader = Spans(run.path / "neurons.json", data.get("text"))
        n = reader.load(*span)
        examples, values = [], []
        for ex in n.get("examples") or []:
            cs = data["ctx_spans"].get(str(ex["context"]))
            c = reader.load(*cs) if cs else {}
            special = c.get("special") or []
            acts = ex.get("acts") or []
            values.extend(a for a, s in zip(acts, special) if not s)
            examples.append({"doc": c.get("doc_id"), "tokens": c.get("tokens") or [], "special": special,
                             "acts": acts, "max": r4(ex.get("max")), "max_position": ex.get("max_position")})
        return {"id": nid, "block": n.get("block"), "index": n.get("index"), "max": r4(n.get("max")),
                "examples": examples, "histogram": histogram(values, 30), "probes": self._neuron_probes(run).get(nid, []),
                "header": r4(data["header"])}

    def _neuron_probes(self, run: RunInfo) -> dict[str, list]:
        """meta-neuron id -> the probing tasks where it is the selected 1-D feature."""

        def build() -> dict[str, list]:
            out: dict[str, list] = {}
            for glp in self.related(run, ("glp",), via="uses"):
                for pr in self.related(glp, ("probe",)):
                    tdir = pr.path / "tasks"
                    for p in sorted(tdir.glob("*.json")) if tdir.is_dir() else []:
                        try:
                            t = read_json(p, "probe task result")
                        except InnardsError:
                            continue
                        for fname, f in (t.get("features") or {}).items():
                            best = f.get("best") or {}
                            if not fname.startswith("glp:") or "block" not in best:
                                continue
                            if Path(fname[4:]).name != glp.path.name:
                                continue
                            out.setdefault(f"{best['block']}:{best['neuron']}", []).append(r4({
                                "probe": pr.id, "task": t.get("task"), "feature_set": fname,
                                "test_auc": f.get("test_auc"), "cv_auc": f.get("cv_auc"), "sign": f.get("sign")}))
            return out

        return self._memo(("neuron-probes", run.id), [], build)

    # ------------------------------------------------------------ VPD

    def _contexts_index(self, cr: RunInfo) -> dict[str, Any]:
        """A vpd contexts.json scanned once: header and, per component, [start, end, mean CI, firing, snippet]."""
        path = cr.path / "contexts.json"

        def digest(_: Any, e: dict) -> list:
            top = e.get("examples") or []
            snippet = (top[0].get("left", "")[-24:] + "[" + top[0].get("token", "") + "]" + top[0].get("right", "")[:12]) if top else ""
            return [r4(e.get("mean_ci")), r4(e.get("firing_frac")), snippet]

        def scanned() -> tuple[dict[str, Any], bool]:
            header, found, text = scan(path, {"components": digest})
            val = {"header": header, "comps": {k: [a, b, *d] for k, a, b, d in found["components"]}}
            return ({**val, "text": text} if text is not None else val), text is None

        def build() -> dict[str, Any]:
            try:
                return disk_cached(path, "vpd-contexts", scanned)
            except (ValueError, IndexError):
                raise InnardsError(f"{path.name} is truncated or not valid JSON") from None

        return self._memo(("vpd-contexts", cr.id), [path], build)

    def _vpd_data(self, run: RunInfo) -> dict[str, Any]:
        """Rows (one per subcomponent, most important first), where each one's contexts are, the CI spectrum."""
        ctx_runs = self.related(run, ("vpd-contexts",))
        meta_p = vpd_meta_file(run.path)
        files = [p for p in [meta_p] if p] + [c.path / "contexts.json" for c in ctx_runs]

        def build() -> dict[str, Any]:
            meta = read_json(meta_p, "VPD run metadata") if meta_p else {}
            where: dict[str, tuple[RunInfo, list]] = {}
            thr = None
            for cr in ctx_runs:
                try:
                    ix = self._contexts_index(cr)
                except InnardsError:
                    continue
                thr = ix["header"].get("threshold")
                where.update({k: (cr, v) for k, v in ix["comps"].items()})
            rows = []
            names = [(c["name"], int(c.get("C", 0))) for c in meta.get("components") or []]
            if not names:  # metadata unreadable: list what the contexts name
                names = [(k.rpartition(":")[0], 0) for k in where]
                ids = list(where)
            else:
                ids = [f"{n}:{i}" for n, C in names for i in range(C)]
            for cid in ids:
                name, _, i = cid.rpartition(":")
                hit = where.get(cid)
                mean_ci, firing, snippet = hit[1][2:5] if hit else (None, None, "")
                rows.append({"id": cid, "matrix": name, "idx": int(i), "mean_ci": mean_ci, "firing": firing,
                             "snippet": snippet, "search": f"{cid} {snippet}".lower()})
            rows.sort(key=lambda r: (r["mean_ci"] is None, -(r["mean_ci"] or 0.0), r["matrix"], r["idx"]))
            spectrum: dict[str, dict[str, list]] = {}
            for r in rows:  # already in descending mean CI
                if r["mean_ci"] is not None:
                    sp = spectrum.setdefault(r["matrix"], {"mean_ci": [], "firing": []})
                    sp["mean_ci"].append(r["mean_ci"])
                    sp["firing"].append(r["firing"])
            return {"rows": rows, "by_id": {r["id"]: r for r in rows}, "where": where, "meta": meta, "threshold": thr,
                    "spectrum": spectrum}

        return self._memo(("vpd", run.id), files, build)

    def _page_vpd(self, run: RunInfo) -> dict[str, Any]:
        data = self._vpd_data(run)
        meta = data["meta"]
        ev = read_json(run.path / "eval.json", "VPD eval") if (run.path / "eval.json").is_file() else None
        spec = data["spectrum"]
        return {"vpd": r4({k: meta.get(k) for k in ("objective", "target", "step", "components", "last", "world")}),
                "eval": vpd_eval_tables(ev) if ev else None, "spectrum": spec, "threshold": data["threshold"],
                "curves": _curves(read_metrics(run.path)),
                "analyses": [{"id": a.id, "kind": a.kind, "rel": a.rel, "headline": a.headline}
                             for a in self.related(run, ("vpd-contexts", "vpd-graph", "vpd-ablate", "vpd-eval"))],
                "pngs": _pngs(run)}

    def _component(self, run: RunInfo, cid: str) -> dict[str, Any]:
        data = self._vpd_data(run)
        row = data["by_id"].get(cid)
        if row is None:
            raise KeyError(f"no subcomponent {cid}")
        hit = data["where"].get(cid)
        e = Spans(hit[0].path / "contexts.json", self._contexts_index(hit[0]).get("text")).load(*hit[1][:2]) if hit else {}
        an = self._vpd_analyses(run)
        matrix, _, idx = cid.rpartition(":")
        ablations = [{"id": aid, **res} for aid, res in an["ablations"] if res.get("component") == cid]
        graphs = [{"id": gid, "highlight": nodes[cid], "graph": gd, "order": self._matrix_order(run)}
                  for gid, gd, nodes in an["graphs"] if cid in nodes]
        return {"id": cid, "matrix": matrix, "idx": int(idx), "mean_ci": row["mean_ci"], "firing": row["firing"],
                "examples": r4(e.get("examples") or []), "ablations": ablations, "graphs": graphs,
                "threshold": data["threshold"], "vpd": run.id}

    def _vpd_analyses(self, run: RunInfo) -> dict[str, list]:
        """The run's ablations and attribution graphs, read once (an item page looks up its own)."""
        abl = self.related(run, ("vpd-ablate",))
        grs = self.related(run, ("vpd-graph",))
        files = [a.path if a.is_file else a.path / "ablate.json" for a in abl] + [g.path / "graph.json" for g in grs]

        def build() -> dict[str, list]:
            ablations, graphs = [], []
            for a in abl:
                try:
                    ablations.append((a.id, r4(read_json(a.path if a.is_file else a.path / "ablate.json", "VPD ablation"))))
                except InnardsError as err:
                    ablations.append((a.id, {"error": one_line(str(err))}))
            for g in grs:
                try:
                    gd = r4(read_json(g.path / "graph.json", "VPD graph"))
                except InnardsError:
                    continue
                nodes: dict[str, list[str]] = {}
                for n in gd.get("nodes") or []:
                    if "component" in n:
                        nodes.setdefault(f"{n['matrix']}:{n['component']}", []).append(n["id"])
                graphs.append((g.id, gd, nodes))
            return {"ablations": ablations, "graphs": graphs}

        return self._memo(("vpd-analyses", run.id), files, build)

    def _matrix_order(self, run: RunInfo) -> list[str]:
        meta = self._vpd_data(run)["meta"]
        return sorted((c["name"] for c in meta.get("components") or []), key=forward_key)

    def _page_vpd_contexts(self, run: RunInfo) -> dict[str, Any]:
        ix = self._contexts_index(run)
        comps = ix["comps"]
        top = sorted(comps.items(), key=lambda kv: -(kv[1][2] or 0))[:100]
        return {"contexts": r4(ix["header"]), "n": len(comps),
                "top": [{"id": k, "mean_ci": v[2], "firing": v[3], "snippet": v[4]} for k, v in top],
                "vpd": next((u for u in run.uses if self.by_id.get(u) and self.by_id[u].kind == "vpd"), None)}

    def _page_vpd_graph(self, run: RunInfo) -> dict[str, Any]:
        g = read_json(run.path / "graph.json", "VPD graph")
        vpd = next((self.by_id[u] for u in run.uses if self.by_id.get(u) and self.by_id[u].kind == "vpd"), None)
        return {"graph": r4(g), "vpd": vpd.id if vpd else None, "order": self._matrix_order(vpd) if vpd else [],
                "pngs": _pngs(run)}

    def _page_vpd_ablate(self, run: RunInfo) -> dict[str, Any]:
        res = read_json(run.path if run.is_file else run.path / "ablate.json", "VPD ablation")
        vpd = next((u for u in run.uses if self.by_id.get(u) and self.by_id[u].kind == "vpd"), None)
        return {"ablation": r4(res), "vpd": vpd}

    def _page_vpd_eval(self, run: RunInfo) -> dict[str, Any]:
        res = read_json(run.path if run.is_file else run.path / "eval.json", "VPD eval")
        return {"eval": vpd_eval_tables(res), "pngs": _pngs(run)}

    # ------------------------------------------------------------ demo and anything else

    def _page_demo(self, run: RunInfo) -> dict[str, Any]:
        s = read_json(run.path / "summary.json", "demo summary")
        return {"demo": r4(s), "pngs": _pngs(run)}

    def _page_generic(self, run: RunInfo) -> dict[str, Any]:
        files = []
        if run.path.is_dir():
            for p in sorted(run.path.iterdir())[:200]:
                if p.is_file() and not p.name.startswith("."):
                    files.append({"name": p.name, "bytes": p.stat().st_size})
        return {"files": files, "pngs": _pngs(run)}


# ---------------------------------------------------------------- tables shared by pages

# where a matrix sits inside its block, in forward order (attention before MLP; GPT-2's and Llama's names)
_IN_BLOCK = ["q_proj", "k_proj", "v_proj", "c_attn", "o_proj", "out_proj", "dense", "gate_proj", "up_proj", "c_fc",
             "fc1", "down_proj", "fc2", "linear1", "linear2"]


def forward_key(name: str) -> tuple:
    """Sort key that puts decomposed matrices in forward order without loading the model."""
    m = re.search(r"(?:layers|h|blocks|layer)\.(\d+)", name)
    layer = int(m.group(1)) if m else -1
    part = 0 if "attn" in name or "attention" in name else 1 if "mlp" in name else 2
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "c_proj":  # GPT-2: attn.c_proj after c_attn, mlp.c_proj last
        pos = _IN_BLOCK.index("o_proj") if part == 0 else len(_IN_BLOCK)
    else:
        pos = _IN_BLOCK.index(leaf) if leaf in _IN_BLOCK else len(_IN_BLOCK) + 1
    return (layer, part, pos, name)


def _curves(metrics: list[dict]) -> dict[str, Any]:
    """Scalar series by name (x = step) and per-t-bucket series of list-valued losses."""
    series: dict[str, list] = {}
    buckets: dict[str, list[list]] = {}
    for rec in metrics:
        step = rec.get("step")
        if not isinstance(step, (int, float)):
            continue
        for k, v in rec.items():
            if k in ("step", "time"):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                series.setdefault(k, []).append([step, r4(float(v))])
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) or x is None for x in v):
                b = buckets.setdefault(k, [[] for _ in v])
                for j, x in enumerate(v[:len(b)]):
                    if x is not None and math.isfinite(x):
                        b[j].append([step, r4(float(x))])
    if len(metrics) > 2000:  # keep pages small: every k-th point
        k = len(metrics) // 1000
        series = {n: s[::k] + ([s[-1]] if (len(s) - 1) % k else []) for n, s in series.items()}
        buckets = {n: [s[::k] for s in b] for n, b in buckets.items()}
    return {"series": series, "buckets": buckets}


EVAL_METHODS = [("glp", "GLP"), ("floor", "floor (train vs held-out)"), ("gaussian", "Gaussian"), ("pca", "PCA"),
                ("sae", "SAE"), ("glp_projection", "GLP projection"), ("mean", "mean")]


def eval_table(res: dict[str, Any]) -> dict[str, Any]:
    """A GLP eval as rows (FD, C2ST AUC, ΔLM) x columns (GLP and every baseline), CIs where recorded."""
    cols = [m for m, _ in EVAL_METHODS]
    rows = []
    for metric, prefix in (("FD", "fd"), ("C2ST AUC", "c2st_auc"), ("ΔLM loss", "delta_lm")):
        cells = {}
        for m in cols:
            key = prefix if (prefix == "fd" and m == "glp") else f"{prefix}_{m}"
            v = res.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            cell: dict[str, Any] = {"value": r4(float(v))}
            se = res.get(f"{key}_se")
            ci = res.get(f"{key}_ci")
            if isinstance(ci, list) and len(ci) == 2:
                cell["ci"] = r4(ci)
            elif isinstance(se, (int, float)) and math.isfinite(se):
                cell["ci"] = r4([v - 1.96 * se, v + 1.96 * se])
            cells[m] = cell
        if cells:
            rows.append({"metric": metric, "key": prefix, "cells": cells})
    return {"columns": [{"key": m, "label": label} for m, label in EVAL_METHODS], "rows": rows,
            "lm_loss_clean": r4(res.get("lm_loss_clean"))}


def vpd_eval_tables(ev: dict[str, Any]) -> dict[str, Any]:
    """A VPD eval as tables: per mask strategy (CE/KL or MSE), per matrix (C, alive, L0), ground truth."""
    lm = "ce_target" in ev
    strat = []
    for s in STRATEGIES + ["adversarial"]:
        row: dict[str, Any] = {"masks": s}
        if lm:
            if f"ce_{s}" in ev:
                row["ce"] = ev[f"ce_{s}"]
                row["dce"] = ev[f"ce_{s}"] - ev["ce_target"] if ev.get("ce_target") is not None and ev[f"ce_{s}"] is not None else None
                row["unrecovered"] = (ev.get("ce_unrecovered") or {}).get(s)
            if f"kl_{s}" in ev:
                row["kl"] = ev[f"kl_{s}"]
        elif f"mse_{s}" in ev:
            row["mse"] = ev[f"mse_{s}"]
        if len(row) > 1:
            strat.append(r4(row))
    mats = [r4({"matrix": n, "C": (ev.get("C") or {}).get(n), "alive": (ev.get("alive") or {}).get(n),
                "dead": (ev.get("dead") or {}).get(n), "l0": v}) for n, v in (ev.get("l0") or {}).items()]
    gt = ev.get("ground_truth")
    gtab = None
    if isinstance(gt, dict):
        per = gt.get("per_matrix") or {}
        gtab = {"summary": r4({k: v for k, v in gt.items() if not isinstance(v, (dict, list))}),
                "matter": r4(gt.get("components_that_matter")),
                "per_matrix": [r4({"matrix": n, **{k: v for k, v in m.items() if not isinstance(v, list)}})
                               for n, m in per.items()],
                "features": [r4({"matrix": n, "cosine": m.get("cosine"), "norm_ratio": m.get("norm_ratio")})
                             for n, m in per.items() if isinstance(m.get("cosine"), list)]}
    return {"lm": lm, "ce_target": r4(ev.get("ce_target")), "strategies": strat, "matrices": mats,
            "l0_total": r4(ev.get("l0_total")), "alive_total": ev.get("alive_total"), "delta_l2": r4(ev.get("delta_l2")),
            "threshold": ev.get("threshold"), "pgd": r4(ev.get("pgd")), "ground_truth": gtab}
