"""``innards bench view``: the viewer on runs of real size (20k meta-neurons, 50k VPD subcomponents).

Synthetic but well-formed runs are written to a work folder (a ``glp neurons`` folder and a VPD run with
its contexts), then timed: the one-time scan of their big JSON files (without and with the disk cache,
and read back from it), discovery, the start of ``innards view`` as a command (time to its URL), the
server's warm-up, first and later list pages (offset, search), item pages, and the static report (time,
files, bytes of the list each browser page loads).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from innards.bench.memory import peak_rss_mb
from innards.io import write_json
from innards.tensors import save_tensors
from innards.viewer.discover import discover
from innards.viewer.pages import Pages
from innards.viewer.report import build_report
from innards.viewer.server import ViewerServer

WORDS = ("the fox ran to a river and sang while an owl in the old tree said you are my little friend "
         "every morning queen king castle garden wood hill mouse bear duck girl boy").split()


@dataclass
class BenchViewConfig:
    """Time the viewer on a 20k-meta-neuron folder and a 50k-subcomponent VPD run."""

    neurons: int = 20_000
    """meta-neurons of the synthetic glp neurons folder"""
    subcomponents: int = 50_000
    """subcomponents of the synthetic VPD run (25 matrices)"""
    top: int = 10
    """top contexts per meta-neuron"""
    context: int = 64
    """tokens per context"""
    report: bool = True
    """also time innards report of both runs"""
    work: str | None = None
    """folder for the synthetic runs (None: a temporary folder, removed afterwards)"""
    out: str | None = None
    """also write the JSON result to this file"""


def _neurons_run(d: Path, n: int, top: int, ctx_len: int, rng: random.Random) -> None:
    d.mkdir(parents=True, exist_ok=True)
    n_ctx = 4000
    contexts = {str(c): {"doc": c, "doc_id": f"corpus.txt:{c}", "tokens": ["<|bos|>"] + [" " + rng.choice(WORDS) for _ in range(ctx_len - 1)],
                         "special": [True] + [False] * (ctx_len - 1)} for c in range(n_ctx)}
    d_mlp = 1000
    neurons = []
    base = [round(rng.gauss(0, 0.3), 3) for _ in range(4096)]
    for j in range(n):
        ex = []
        for r in range(top):
            off = rng.randrange(0, 4096 - ctx_len)
            acts = base[off:off + ctx_len]
            mp = max(range(1, ctx_len), key=lambda k: acts[k])
            ex.append({"context": rng.randrange(n_ctx), "max": acts[mp], "max_position": mp, "acts": acts})
        ex.sort(key=lambda e: -e["max"])
        neurons.append({"neuron": f"{j // d_mlp}:{j % d_mlp}", "block": j // d_mlp, "index": j % d_mlp,
                        "max": ex[0]["max"], "examples": ex})
    header = {"glp": str(d.parent / "glp"), "model": "demo", "site": "blocks.3.resid_post", "t": 0.1, "seed": 0,
              "context": ctx_len, "top": top, "highlight": 0.4, "text": "synthetic", "n_contexts": n_ctx,
              "n_tokens": n_ctx * ctx_len, "n_neurons": n, "d_mlp": d_mlp, "n_blocks": -(-n // d_mlp)}
    write_json(d / "neurons.json", {**header, "neurons": neurons, "contexts": contexts}, indent=None)


def _vpd_run(d: Path, n: int, rng: random.Random) -> None:
    (d / "contexts").mkdir(parents=True, exist_ok=True)
    mats = [f"model.layers.{i // 5}.{['self_attn.q_proj', 'self_attn.v_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'][i % 5]}"
            for i in range(25)]
    C = n // len(mats)
    comps = [{"name": m, "C": C, "d_in": 128, "d_out": 384} for m in mats]
    digest = save_tensors(d / "decomposition.safetensors", {"x": torch.zeros(1)})
    write_json(d / "run.json", {"step": 1, "objective": "vpd", "components": comps, "target": "demo", "sha256": digest})
    (d / "config.yaml").write_text("target: {kind: lm, name: demo}\nobjective: vpd\n")
    words = lambda k: "".join(" " + rng.choice(WORDS) for _ in range(k))  # noqa: E731
    cx = {}
    for m in mats:
        for i in range(C):
            cx[f"{m}:{i}"] = {"mean_ci": rng.random() ** 3, "firing_frac": rng.random() ** 2,
                              "examples": [{"ci": round(rng.random(), 4), "left": words(12), "token": " " + rng.choice(WORDS),
                                            "right": words(3)} for _ in range(5)]}
    write_json(d / "contexts" / "contexts.json", {"run": str(d), "text": "synthetic", "tokens": 100000, "threshold": 0.1,
                                                  "components": cx}, indent=None)


def _get(url: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as r:
        body = json.loads(r.read())
    return time.perf_counter() - t0, body


def _cli_start(folder: Path) -> float:
    """Seconds from ``innards view FOLDER`` being started to its URL being printed (then it is stopped)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "innards", "view", str(folder), "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in p.stdout:  # type: ignore[union-attr]
            if "open http" in line:
                return round(time.perf_counter() - t0, 3)
        return float("nan")
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def bench_view(cfg: BenchViewConfig) -> dict[str, Any]:
    """Write the synthetic runs, time the viewer on them, print (and optionally save) the figures."""
    tmp = tempfile.TemporaryDirectory(prefix="innards-bench-view-") if cfg.work is None else None
    work = Path(cfg.work) if cfg.work else Path(tmp.name)  # type: ignore[union-attr]
    rng = random.Random(0)
    res: dict[str, Any] = {"n_neurons": cfg.neurons, "n_subcomponents": cfg.subcomponents, "top": cfg.top,
                           "context": cfg.context}
    try:
        t0 = time.perf_counter()
        _neurons_run(work / "runs" / "neurons", cfg.neurons, cfg.top, cfg.context, rng)
        _vpd_run(work / "runs" / "vpd", cfg.subcomponents, rng)
        res["write_s"] = round(time.perf_counter() - t0, 2)
        res["neurons_json_mb"] = round((work / "runs" / "neurons" / "neurons.json").stat().st_size / 2**20, 1)
        res["contexts_json_mb"] = round((work / "runs" / "vpd" / "contexts" / "contexts.json").stat().st_size / 2**20, 1)

        t0 = time.perf_counter()
        runs = discover([work / "runs"])
        res["discover_s"] = round(time.perf_counter() - t0, 3)
        ids = {r.kind: r.id for r in runs}

        # the big files: scanned with no disk cache, scanned and cached, then read back from the cache
        saved_env = os.environ.get("INNARDS_VIEWER_CACHE")
        try:
            for kind in ("neurons", "vpd"):
                out = res.setdefault(kind, {})
                for label, env in (("scan_no_cache_s", "off"), ("scan_and_cache_s", str(work / "cache")),
                                   ("from_cache_s", str(work / "cache"))):
                    os.environ["INNARDS_VIEWER_CACHE"] = env
                    t0 = time.perf_counter()
                    Pages(runs).all_rows(ids[kind])
                    out[label] = round(time.perf_counter() - t0, 3)
            res["cli_start_s"] = _cli_start(work / "runs")
        finally:
            if saved_env is None:
                os.environ.pop("INNARDS_VIEWER_CACHE", None)
            else:
                os.environ["INNARDS_VIEWER_CACHE"] = saved_env

        os.environ["INNARDS_VIEWER_CACHE"] = str(work / "cache")
        t0 = time.perf_counter()
        srv = ViewerServer([work / "runs"], port=0).start()
        res["server_listening_s"] = round(time.perf_counter() - t0, 3)
        srv.viewer.warmed.wait()
        res["server_warmup_s"] = round(time.perf_counter() - t0, 2)
        base = f"http://127.0.0.1:{srv.port}/api"
        try:
            for kind, n in (("neurons", cfg.neurons), ("vpd", cfg.subcomponents)):
                rid = ids[kind]
                t_first, _ = _get(f"{base}/run/{rid}/list?offset=0&limit=50")
                t_page, page = _get(f"{base}/run/{rid}/list?offset={n // 2}&limit=50")
                item = page["rows"][0]["id"]
                t_search, found = _get(f"{base}/run/{rid}/list?offset=0&limit=50&q=river")
                t_run, _ = _get(f"{base}/run/{rid}")
                t_item, _ = _get(f"{base}/run/{rid}/item/{urllib.request.quote(item)}")
                res[kind] |= {"first_list_page_s": round(t_first, 3), "later_list_page_s": round(t_page, 4),
                             "search_s": round(t_search, 4), "search_hits": found["total"], "run_page_s": round(t_run, 4),
                             "item_page_s": round(t_item, 4)}
        finally:
            srv.shutdown()
        if cfg.report:
            t0 = time.perf_counter()
            index = build_report([work / "runs"], work / "site")
            res["report_s"] = round(time.perf_counter() - t0, 2)
            files = [p for p in index.parent.rglob("*") if p.is_file()]
            res["report_files"] = len(files)
            res["report_mb"] = round(sum(p.stat().st_size for p in files) / 2**20, 1)
            for kind in ("neurons", "vpd"):
                lst = index.parent / "data" / "run" / ids[kind] / "list.js"
                res[kind]["report_list_mb"] = round(lst.stat().st_size / 2**20, 2)
                t0 = time.perf_counter()
                text = lst.read_text()
                json.loads(text[text.index(",") + 1:text.rindex(")")])
                res[kind]["report_list_parse_s"] = round(time.perf_counter() - t0, 3)
        res["peak_rss_mb"] = peak_rss_mb()
        if saved_env is None:
            os.environ.pop("INNARDS_VIEWER_CACHE", None)
        else:
            os.environ["INNARDS_VIEWER_CACHE"] = saved_env
        res["threads"] = threading.active_count()
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps(res, indent=1))
    if cfg.out:
        write_json(cfg.out, res)
    return res
