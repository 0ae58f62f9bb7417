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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from innards.bootstrap import bootstrap_ci
from innards.config import at_least, load_yaml, require, save_config, to_dict, within
from innards.errors import InnardsError
from innards.io import atomic_write_bytes, read_json
from innards.models.config import MODEL_ALIASES, ModelConfig
from innards.models.load import load_model
from innards.models.sites import Site, resolve_site
from innards.probe.dense import dense_probe
from innards.probe.extract import TOKEN_RULES, ActivationCache, model_tag
from innards.probe.features import FeatureBuilder, FeatureSpec, meaning, mlp_site, needed_sites, parse_features
from innards.probe.onedim import CS, one_d_probe
from innards.probe.tasks import Split, Task, list_tasks, make_split, read_task, select_tasks
from innards.run import CONFIG_FILE, Run

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# changing these adds or drops work on a finished run: it is reopened, and per-task results are reused
INCREMENTAL = ("features", "tasks_filter", "max_tasks", "plot", "n_boot", "batch_size", "max_batch_tokens",
               "cache_dir", "resume")


@dataclass
class ProbeConfig:
    """Probing run: model, site, task source, feature sets, protocol settings and output folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the language model (a plain string is taken as its name)"""
    site: str = ""
    """activation site, e.g. blocks.3.resid_post (required)"""
    tasks: str = "sae-probes"
    """folder of task CSVs (SAE-Probes layout or any *.csv[.zst] with prompt,target) or 'sae-probes'"""
    tasks_filter: list[str] = field(default_factory=list)
    """comma-separated globs on task names, e.g. '1*_*,*sent*'"""
    max_tasks: int | None = None
    """probe only the first N selected tasks that can be probed (binary, enough rows)"""
    features: list[str] = field(default_factory=lambda: ["raw"])
    """comma list of raw, mlp, glp:X, sae:X, pca:K, vpd:RUN[#ci|#act] (X: a folder or hub id)"""
    mode: Literal["1d", "dense"] = "1d"
    """1d: best single feature (SAE-Probes/GLP protocol); dense: one probe on all features"""
    t: float = 0.1
    """noise level of GLP meta-neurons (paper: 0.1)"""
    seed: int = 42
    """seed of the GLP noise and of the bootstrap"""
    glp_revision: str | None = None
    """hub revision of every glp:X given as a hub id"""
    glp_checkpoint: str | None = None
    """checkpoint of every glp:X: final (default), a reference epoch_XXXX or an innards step_XXXXXXX"""
    restats: str | None = None
    """activation store whose whole-store statistics replace the GLPs' normalisation statistics"""
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
    context: int | None = None
    """truncate prompts from the left to this many tokens (None: the model's context, at most 1024)"""
    batch_size: int = 32
    """prompts per forward pass"""
    max_batch_tokens: int = 16384
    """cap on padded tokens per forward pass"""
    cache_dir: str | None = None
    """activation cache folder (None: OUT/cache)"""
    n_boot: int = 10000
    """bootstrap resamples over tasks"""
    plot: bool = True
    """write summary.png"""
    resume: bool = True
    """reuse per-task results of an earlier run with the same settings"""
    overwrite: bool = False
    """replace an existing probe run made with other protocol settings"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        within(self, "t", 0.0, 1.0)
        at_least(self, 2, "n_folds")
        at_least(self, 1, "max_train", "max_iter", "batch_size", "max_batch_tokens", "context", "max_tasks")
        at_least(self, 0, "min_test", "seed", "split_seed")
        at_least(self, 100, "n_boot")
        require(bool(self.cs) and all(c > 0 for c in self.cs), "--cs must be positive numbers")
        require(self.mode in ("1d", "dense"), f"--mode must be 1d or dense, got {self.mode!r}")
        require(self.token in ("auto", "last", "last_real"), f"--token must be auto, last or last_real, got {self.token!r}")

    def check_inputs(self) -> list[FeatureSpec]:
        """Required flags and the feature sets (folders exist or are hub ids), before any model loads."""
        require(bool(self.site), "--site is required (e.g. --site blocks.3.resid_post; `innards sites --model M` lists them)")
        require(bool(self.out), "--out is required")
        require(self.restats is None or Path(self.restats).is_dir(), f"--restats: activation store not found: {self.restats}")
        return parse_features(self.features)


PROBE_ALIASES = {**MODEL_ALIASES, "--dtype": "--model.dtype", "--max-length": "--context",
                 "--n-bootstrap": "--n-boot", "--checkpoint": "--glp-checkpoint"}


def _settings(cfg: ProbeConfig, model: PreTrainedModel, site: Site, cache: ActivationCache) -> dict[str, object]:
    """Everything a per-task result depends on besides the feature set."""
    return {"model": model_tag(model), "site": site.name, "token": cache.token, "token_rule": TOKEN_RULES[cache.token],
            "max_length": cache.context,
            "mode": cfg.mode, "split_seed": cfg.split_seed, "max_train": cfg.max_train, "min_test": cfg.min_test,
            "top_k": cfg.top_k, "n_folds": cfg.n_folds, "cs": [float(c) for c in cfg.cs], "max_iter": cfg.max_iter,
            "exact": cfg.exact, "t": cfg.t, "seed": cfg.seed}


def _probe_one(spec: FeatureSpec, builder: FeatureBuilder, x: np.ndarray, y: np.ndarray, split: Split,
               cfg: ProbeConfig) -> dict[str, object]:
    xtr, xte = x[split.train], x[split.test]
    ytr, yte = y[split.train], y[split.test]
    t0 = time.perf_counter()
    rec: dict[str, object] = {"n_features": int(x.shape[1])}
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


def _read_tasks(cfg: ProbeConfig) -> tuple[list[Task], list[Split], list[dict[str, str]]]:
    """The tasks that can be probed, their splits, and the skipped ones with the reason."""
    refs = select_tasks(list_tasks(cfg.tasks), cfg.tasks_filter)
    # --max-tasks counts tasks that can be probed (binary, enough rows), not files: the benchmark's folder
    # mixes in regression tasks
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
    return tasks, splits, skipped


def open_incremental(run: Run, cfg: ProbeConfig) -> bool:
    """True when a complete run differs only in INCREMENTAL settings: it is reopened to add what is new."""
    if run.state != "complete" or load_yaml(run.root / CONFIG_FILE) == to_dict(cfg):
        return False
    save_config(cfg, run.root)
    run.state = "resume"
    return True


def run_probe(cfg: ProbeConfig) -> dict[str, object]:
    """Run the probing benchmark described by ``cfg``; returns the summary (also written to OUT/summary.json)."""
    specs = cfg.check_inputs()
    # read the tasks first: bad files stop the run before any model work
    tasks, splits, skipped = _read_tasks(cfg)
    out = Path(cfg.out)
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
    site = resolve_site(model, cfg.site)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    cache = ActivationCache(cache_root, model, token=cfg.token, context=cfg.context,
                            batch_size=cfg.batch_size, max_tokens=cfg.max_batch_tokens)
    builder = FeatureBuilder(specs, model, site, t=cfg.t, seed=cfg.seed, glp_revision=cfg.glp_revision,
                             glp_checkpoint=cfg.glp_checkpoint, restats=cfg.restats, cache_dir=cache_root,
                             token=cfg.token, context=cfg.context, batch_size=cfg.batch_size)
    inputs = {"tasks": cfg.tasks, "restats": cfg.restats,
              **{s.name: s.arg for s in specs if s.kind in ("glp", "sae", "vpd")}}
    with Run.open(out, "probe", cfg, inputs=inputs, always_resume=True, overwrite=cfg.overwrite,
                  free=INCREMENTAL) as run:
        if run.state == "complete" and not open_incremental(run, cfg):
            run.say_complete()
            return read_json(out / "summary.json", "probe summary")
        return _probe(cfg, run, specs, tasks, splits, skipped, model, site, cache, builder)


def _probe(cfg: ProbeConfig, run: Run, specs: list[FeatureSpec], tasks: list[Task], splits: list[Split],
           skipped: list[dict[str, str]], model: PreTrainedModel, site: Site, cache: ActivationCache,
           builder: FeatureBuilder) -> dict[str, object]:
    settings = _settings(cfg, model, site, cache)
    sources = builder.sources
    sites = needed_sites(specs, site)
    results: list[dict[str, object]] = []
    metrics = []
    for i, (task, split) in enumerate(tqdm(list(zip(tasks, splits)), desc="probe", unit="task")):
        path = run.root / "tasks" / f"{task.name}.json"
        prev = _previous(path, settings) if cfg.resume else {}
        rec = {"task": task.name, "file": str(task.path), "n": len(task.labels), "n_train": int(len(split.train)),
               "n_test": int(len(split.test)), "classes": task.classes, "settings": settings, "features": {}}
        todo = [s for s in specs if not (s.name in prev and prev[s.name].get("source") == _plain(sources[s.name]))]
        t0 = time.perf_counter()
        acts = {}
        want = [x for x in sites if any(_uses(s, x, site) for s in todo)]
        if want:
            acts = cache.get(task.name, task.prompts, want)
            rec["extract_seconds"] = round(time.perf_counter() - t0, 3)
        for s in specs:
            if s not in todo:
                rec["features"][s.name] = prev[s.name]
                continue
            x = builder.build(s, acts, split.train, task=task.name, prompts=task.prompts)
            r = _probe_one(s, builder, x, task.labels, split, cfg)
            r["source"] = sources[s.name]
            rec["features"][s.name] = r
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        run.write_json(f"tasks/{task.name}.json", rec)
        metrics.append({"step": i, "task": task.name, **{f"{k}/test_auc": v["test_auc"] for k, v in rec["features"].items()}})
        results.append(rec)
    run.write_jsonl("metrics.jsonl", metrics)
    summary = summarize(results, [s.name for s in specs], skipped, settings, n_boot=cfg.n_boot, seed=cfg.seed)
    run.write_json("summary.json", summary)
    table = format_table(summary)
    atomic_write_bytes(run.root / "table.md", (table + "\n").encode())
    print(table)
    outputs = ["summary.json", "table.md"]
    if cfg.plot and summary["n_tasks"]:
        run.save_png("summary.png", summary_figure(summary))
        outputs.append("summary.png")
    run.complete(headline={"n_tasks": summary["n_tasks"], **{f"{k}/mean_auc": v["mean_auc"]
                                                            for k, v in summary["features"].items()}},
                 outputs=outputs)
    return summary


def _plain(v: object) -> object:
    """A value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(v))


def _uses(spec: FeatureSpec, site_name: str, site: Site) -> bool:
    return site_name == (mlp_site(site) if spec.kind == "mlp" else site.name)


def _previous(path: Path, settings: dict[str, object]) -> dict[str, dict]:
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


def summarize(results: list[dict], names: list[str], skipped: list[dict[str, str]],
              settings: dict[str, object], n_boot: int = 10000, seed: int = 42) -> dict:
    """Mean test AUC per feature set over tasks with 95% percentile bootstrap CIs (paired resamples)."""
    feats: dict[str, dict] = {}
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


def format_table(summary: dict) -> str:
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


def summary_figure(summary: dict) -> plt.Figure:
    """Bar chart of mean test AUC per feature set with 95% CI error bars."""
    names = list(summary["features"])
    means = np.array([summary["features"][n]["mean_auc"] for n in names])
    lo = means - np.array([summary["features"][n]["ci_low"] for n in names])
    hi = np.array([summary["features"][n]["ci_high"] for n in names]) - means
    fig, ax = plt.subplots(figsize=(1.4 + 1.2 * len(names), 3.6))
    ax.bar(range(len(names)), means, yerr=np.vstack([lo, hi]), capsize=5, color="#4c72b0")
    for i, m in enumerate(means):
        ax.text(i, 0.505, f"{m:.3f}", ha="center", va="bottom", color="white", fontsize=9)
    ax.set_xticks(range(len(names)), [meaning(n) for n in names], rotation=20, ha="right")
    ax.set_ylim(0.5, 1.0)
    mode = summary.get("settings", {}).get("mode", "1d")
    ax.set_ylabel("mean test ROC-AUC")
    ax.set_title(f"{'1-D' if mode == '1d' else 'dense'} probing, {summary['n_tasks']} tasks (95% bootstrap CI)", fontsize=10)
    fig.tight_layout()
    return fig
