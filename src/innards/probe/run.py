"""``innards probe``: SAE-Probes tasks x feature sets -> per-task JSON, summary with bootstrap CIs, table, plot.

Output folder::

    OUT/config.yaml            the resolved ProbeConfig
    OUT/tasks/<task>.json      per task: sizes, classes, and per feature set the chosen feature and AUCs
    OUT/summary.json           per feature set: mean_auc, ci_low, ci_high, n_tasks, n_features, ...; skipped tasks
    OUT/table.md, OUT/summary.png
    OUT/metrics.jsonl          one record per task
    OUT/cache/                 benchmark-token activations per (model, site, task), unless --cache-dir

A rerun with the same settings reuses every per-task result it finds and extracts nothing it has
cached, so adding a feature set costs only that feature set.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from innards.config import save_config
from innards.errors import InnardsError
from innards.io import atomic_write_bytes, read_json, sha256_file, write_json
from innards.probe.onedim import CS


@dataclass
class ProbeConfig:
    """Probing run: model, site, task source, feature sets, protocol settings and output folder."""

    model: str = "demo"
    """model name, alias (demo, minilm) or folder"""
    site: str = ""
    """activation site, e.g. blocks.3.resid_post (required)"""
    tasks: str = "sae-probes"
    """folder of task CSVs (SAE-Probes layout or any *.csv[.zst] with prompt,target) or 'sae-probes'"""
    tasks_filter: list[str] = field(default_factory=list)
    """comma-separated globs on task names, e.g. '1*_*,*sent*'"""
    max_tasks: int | None = None
    """probe only the first N selected tasks that can be probed (binary, enough rows)"""
    features: list[str] = field(default_factory=lambda: ["raw"])
    """comma list of raw, mlp, glp:DIR, sae:DIR, pca:K"""
    mode: Literal["1d", "dense"] = "1d"
    """1d: best single feature (SAE-Probes/GLP protocol); dense: one probe on all features"""
    t: float = 0.1
    """noise level of GLP meta-neurons (paper: 0.1)"""
    seed: int = 42
    """seed of the GLP noise and of the bootstrap"""
    out: str = ""
    """output folder (required)"""
    split_seed: int = 42
    """seed of the balanced train/test split (SAE-Probes: 42)"""
    max_train: int = 1024
    """train rows: min(max_train, N - min_test)"""
    min_test: int = 100
    """rows kept out of train: min(max_train, N - min_test)"""
    top_k: int = 512
    """1-D pre-filter: candidates by |class-mean difference| (<= 0: all features)"""
    n_folds: int = 5
    """cross-validation folds"""
    cs: list[float] = field(default_factory=lambda: list(CS))
    """inverse L2 strengths searched by cross-validation"""
    max_iter: int = 1000
    """L-BFGS iterations of the scikit-learn fits"""
    exact: bool = True
    """re-run near-null 1-D candidates through scikit-learn so results equal it exactly"""
    token: Literal["auto", "last", "last_real"] = "auto"
    """probed token: auto (last for decoders, last real token for encoders), last, last_real"""
    max_length: int | None = None
    """truncate prompts from the left to this many tokens (default: context, at most 1024)"""
    batch_size: int = 32
    """prompts per forward pass"""
    max_batch_tokens: int = 16384
    """cap on padded tokens per forward pass"""
    dtype: str = "fp32"
    """model dtype: fp32, bf16, fp16"""
    device: str | None = None
    """cpu, cuda, cuda:1 (default: cuda when present)"""
    cache_dir: str | None = None
    """activation cache folder (default OUT/cache)"""
    n_boot: int = 10000
    """bootstrap resamples over tasks"""
    plot: bool = True
    """write summary.png"""
    resume: bool = True
    """reuse per-task results of an earlier run with the same settings"""


def _fingerprint(path: str) -> str:
    """Identity of a GLP/SAE folder: its JSON configs and weight files' digests."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.suffix == ".json":
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix == ".safetensors":
            h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()[:16]


def _settings(cfg: ProbeConfig, model: Any, site: Any, cache: Any) -> dict[str, Any]:
    """Everything a per-task result depends on besides the feature set."""
    from innards.probe.extract import TOKEN_RULES, model_tag

    return {"model": model_tag(model), "site": site.name, "token": cache.token, "token_rule": TOKEN_RULES[cache.token],
            "max_length": cache.max_length,
            "mode": cfg.mode, "split_seed": cfg.split_seed, "max_train": cfg.max_train, "min_test": cfg.min_test,
            "top_k": cfg.top_k, "n_folds": cfg.n_folds, "cs": [float(c) for c in cfg.cs], "max_iter": cfg.max_iter,
            "exact": cfg.exact, "t": cfg.t, "seed": cfg.seed}


def _probe_one(spec: Any, builder: Any, x: np.ndarray, y: np.ndarray, split: Any, cfg: ProbeConfig) -> dict[str, Any]:
    from innards.probe.dense import dense_probe
    from innards.probe.onedim import one_d_probe

    xtr, xte = x[split.train], x[split.test]
    ytr, yte = y[split.train], y[split.test]
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"n_features": int(x.shape[1])}
    if cfg.mode == "1d":
        r = one_d_probe(xtr, ytr, xte, yte, top_k=cfg.top_k, n_folds=cfg.n_folds, Cs=tuple(cfg.cs),
                        exact=cfg.exact, max_iter=cfg.max_iter)
        order = np.argsort(-r.cand_cv_auc, kind="stable")[:5]
        rec.update({"best": builder.locate(spec, r.best), "cv_auc": r.cv_auc, "test_auc": r.test_auc,
                    "sign": r.sign, "C": r.C, "n_candidates": int(len(r.candidates)), "n_sklearn": r.n_sklearn,
                    "n_near_null": r.extra["n_near_null"],
                    "top": [{**builder.locate(spec, int(r.candidates[j])), "cv_auc": float(r.cand_cv_auc[j]),
                             "test_auc": float(r.cand_test_auc[j])} for j in order]})
    else:
        r = dense_probe(xtr, ytr, xte, yte, blocks=builder.n_blocks(spec), Cs=tuple(cfg.cs),
                        n_folds=cfg.n_folds, max_iter=cfg.max_iter)
        rec.update({"cv_auc": r.cv_auc, "test_auc": r.test_auc, "C": r.C})
        if r.block is not None:
            rec.update({"block": r.block, "block_cv_auc": r.block_cv_auc})
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Run the probing benchmark described by ``cfg``; returns the summary (also written to OUT/summary.json)."""
    from innards.models.load import load_model
    from innards.models.sites import resolve_site
    from innards.probe.extract import ActivationCache
    from innards.probe.features import FeatureBuilder, needed_sites, parse_features
    from innards.probe.tasks import list_tasks, make_split, read_task, select_tasks
    from innards.runlog import MetricsLog

    if not cfg.site:
        raise InnardsError("--site is required (e.g. --site blocks.3.resid_post; `innards sites --model M` lists them)")
    if not cfg.out:
        raise InnardsError("--out is required")
    if cfg.n_folds < 2:
        raise InnardsError(f"--n-folds must be at least 2, got {cfg.n_folds}")
    if not cfg.cs or any(c <= 0 for c in cfg.cs):
        raise InnardsError("--cs must be positive numbers")
    specs = parse_features(cfg.features)
    refs = select_tasks(list_tasks(cfg.tasks), cfg.tasks_filter)
    # read the tasks first: bad files stop the run before any model work. --max-tasks counts tasks that
    # can be probed (binary, enough rows), not files: the benchmark's folder mixes in regression tasks.
    tasks, splits, skipped = [], [], []
    for ref in refs:
        if cfg.max_tasks and len(tasks) >= cfg.max_tasks:
            break
        if ref.path is None:
            skipped.append({"task": ref.name, "reason": "file not found"})
            continue
        task = read_task(ref.path, ref.name)
        split, why = make_split(task, seed=cfg.split_seed, max_train=cfg.max_train, min_test=cfg.min_test,
                                n_folds=cfg.n_folds)
        if split is None:
            skipped.append({"task": task.name, "reason": why})
            continue
        tasks.append(task)
        splits.append(split)

    out = Path(cfg.out)
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    site = resolve_site(model, cfg.site)
    builder = FeatureBuilder(specs, model, site, t=cfg.t, seed=cfg.seed)
    cache = ActivationCache(cfg.cache_dir or out / "cache", model, token=cfg.token, max_length=cfg.max_length,
                            batch_size=cfg.batch_size, max_tokens=cfg.max_batch_tokens)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks").mkdir(exist_ok=True)
    save_config(cfg, out)
    settings = _settings(cfg, model, site, cache)
    sources = {s.name: ({"path": str(Path(s.arg).resolve()), "fingerprint": _fingerprint(s.arg)}
                        if s.kind in ("glp", "sae") else None) for s in specs}
    sites = needed_sites(specs, site)
    log = MetricsLog(out)
    results: list[dict[str, Any]] = []
    for i, (task, split) in enumerate(tqdm(list(zip(tasks, splits)), desc="probe", unit="task")):
        path = out / "tasks" / f"{task.name}.json"
        prev = _previous(path, settings) if cfg.resume else {}
        rec = {"task": task.name, "file": str(task.path), "n": len(task.labels), "n_train": int(len(split.train)),
               "n_test": int(len(split.test)), "classes": task.classes, "settings": settings, "features": {}}
        todo = [s for s in specs if not (s.name in prev and prev[s.name].get("source") == sources[s.name])]
        t0 = time.perf_counter()
        if todo:
            acts = cache.get(task.name, task.prompts, [x for x in sites if any(_uses(s, x, site) for s in todo)])
            rec["extract_seconds"] = round(time.perf_counter() - t0, 3)
        for s in specs:
            if s not in todo:
                rec["features"][s.name] = prev[s.name]
                continue
            x = builder.build(s, acts, split.train)
            r = _probe_one(s, builder, x, task.labels, split, cfg)
            r["source"] = sources[s.name]
            rec["features"][s.name] = r
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(path, rec)
        log.log(i, task=task.name, **{f"{k}/test_auc": v["test_auc"] for k, v in rec["features"].items()})
        results.append(rec)
    log.close()
    summary = summarize(results, [s.name for s in specs], skipped, settings, n_boot=cfg.n_boot, seed=cfg.seed)
    write_json(out / "summary.json", summary)
    table = format_table(summary)
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    print(table)
    if cfg.plot and summary["n_tasks"]:
        plot_summary(summary, out / "summary.png")
    return summary


def _uses(spec: Any, site_name: str, site: Any) -> bool:
    from innards.probe.features import mlp_site

    return site_name == (mlp_site(site) if spec.kind == "mlp" else site.name)


def _previous(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Per-feature results of an earlier run of this task with identical settings ({} otherwise)."""
    if not path.is_file():
        return {}
    try:
        old = read_json(path, what="task result")
    except InnardsError:
        return {}
    if not isinstance(old, dict) or old.get("settings") != json.loads(json.dumps(settings)):
        return {}
    return old.get("features") or {}


def summarize(results: list[dict[str, Any]], names: list[str], skipped: list[dict[str, str]],
              settings: dict[str, Any], n_boot: int = 10000, seed: int = 42) -> dict[str, Any]:
    """Mean test AUC per feature set over tasks with 95% percentile bootstrap CIs (paired resamples)."""
    from innards.bootstrap import bootstrap_ci

    feats: dict[str, Any] = {}
    ref = names[0] if names else None
    for name in names:
        aucs = np.array([r["features"][name]["test_auc"] for r in results], dtype=np.float64)
        cvs = np.array([r["features"][name]["cv_auc"] for r in results], dtype=np.float64)
        nf = sorted({int(r["features"][name]["n_features"]) for r in results})
        mean, lo, hi = bootstrap_ci(aucs, n_resamples=n_boot, seed=seed) if len(aucs) else (float("nan"),) * 3
        entry = {"mean_auc": mean, "ci_low": lo, "ci_high": hi, "n_tasks": int(len(aucs)),
                 "n_features": (nf[0] if len(nf) == 1 else nf) if nf else 0,
                 "mean_cv_auc": float(cvs.mean()) if len(cvs) else float("nan"),
                 "median_auc": float(np.median(aucs)) if len(aucs) else float("nan")}
        if name != ref and len(aucs):
            # same seed and task count -> the same resamples as the reference set: a paired CI of the gap
            base = np.array([r["features"][ref]["test_auc"] for r in results], dtype=np.float64)
            d, dlo, dhi = bootstrap_ci(aucs - base, n_resamples=n_boot, seed=seed)
            entry[f"delta_vs_{ref}"] = {"mean": d, "ci_low": dlo, "ci_high": dhi,
                                        "wins": int((aucs > base).sum()), "losses": int((aucs < base).sum())}
        feats[name] = entry
    return {"features": feats, "n_tasks": len(results), "tasks": [r["task"] for r in results],
            "skipped": skipped, "settings": settings, "ci": {"level": 0.95, "method": "percentile bootstrap over tasks",
                                                              "n_resamples": n_boot, "seed": seed}}


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: feature set, features, mean test AUC with 95% CI, tasks."""
    mode = summary.get("settings", {}).get("mode", "1d")
    lines = [f"| feature set ({mode}) | features | mean test AUC | 95% CI | tasks |", "|---|---:|---:|---|---:|"]
    for name, e in summary["features"].items():
        nf = e["n_features"]
        nf = f"{nf:,}" if isinstance(nf, int) else f"{min(nf):,}-{max(nf):,}"
        lines.append(f"| {name} | {nf} | {e['mean_auc']:.3f} | [{e['ci_low']:.3f}, {e['ci_high']:.3f}] | {e['n_tasks']} |")
    if summary["skipped"]:
        lines.append(f"\nskipped {len(summary['skipped'])} task(s): "
                     + "; ".join(f"{s['task']} ({s['reason']})" for s in summary["skipped"][:10])
                     + (" ..." if len(summary["skipped"]) > 10 else ""))
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Bar chart of mean test AUC per feature set with 95% CI error bars (PNG, written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["features"])
    means = np.array([summary["features"][n]["mean_auc"] for n in names])
    lo = means - np.array([summary["features"][n]["ci_low"] for n in names])
    hi = np.array([summary["features"][n]["ci_high"] for n in names]) - means
    fig, ax = plt.subplots(figsize=(1.4 + 1.2 * len(names), 3.6))
    ax.bar(range(len(names)), means, yerr=np.vstack([lo, hi]), capsize=5, color="#4c72b0")
    for i, m in enumerate(means):
        ax.text(i, 0.505, f"{m:.3f}", ha="center", va="bottom", color="white", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0.5, 1.0)
    mode = summary.get("settings", {}).get("mode", "1d")
    ax.set_ylabel("mean test ROC-AUC")
    ax.set_title(f"{'1-D' if mode == '1d' else 'dense'} probing, {summary['n_tasks']} tasks (95% bootstrap CI)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
