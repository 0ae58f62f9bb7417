"""Steering sweep: raw vs GLP-projected steering over strengths, scored offline with CIs.

Per method and strength: concept = mean P(concept | continuation) from the offline evaluator,
fluency = mean per-token NLL of the continuation under the unsteered model and distinct-2, each with
a seeded 95% percentile bootstrap over prompts (the same resampling indices for every cell, so the
comparison between cells is paired). Finished cells are kept under ``OUT/cells`` and reused by a
re-run with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from innards.errors import InnardsError
from innards.steer.generate import Positions

DEFAULT_STRENGTHS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
METHODS = ("raw", "glp")


@dataclass
class SweepConfig:
    """``innards steer sweep``: concept score vs fluency for raw and GLP steering over strengths."""

    model: str = "demo"
    site: str = ""
    vector: str = ""
    glp: str | None = None
    strengths: list[float] = field(default_factory=lambda: list(DEFAULT_STRENGTHS))
    """relative strengths r, comma-separated (e.g. 0,0.25,0.5,1,2)"""
    methods: list[str] = field(default_factory=lambda: ["raw", "glp"])
    """raw and/or glp"""
    prompts: str = "stories"
    """prompt file, one per line ('stories' = the packaged story openings)"""
    concept: str = "sentiment"
    """concept name: 'sentiment' is built in; others need --concept-pos/--concept-neg"""
    concept_pos: str | None = None
    """sentences showing the concept (defines a new concept)"""
    concept_neg: str | None = None
    """sentences not showing it"""
    data_dir: str | None = None
    """shared data folder for built-in concepts (default $INNARDS_DATA_DIR or ../shared/data)"""
    evaluator_max_per_class: int | None = None
    """subsample the evaluator's training sentences (default: all)"""
    norm: float | None = None
    acts: str | None = None
    norm_stat: Literal["mean_norm", "rms_norm"] = "mean_norm"
    t_start: float = 0.5
    steps: int = 20
    schedule: Literal["exact", "grid"] = "exact"
    positions: Positions = "generated"
    """generated | prompt | all | last (see innards.steer.generate)"""
    max_new_tokens: int = 30
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    n_bootstrap: int = 10_000
    dtype: str = "fp32"
    device: str | None = None
    out: str = "steer-sweep"


def parse_strengths(values: Any) -> list[float]:
    """Strengths from a list or a comma string; InnardsError unless every item is a finite number."""
    items = values.split(",") if isinstance(values, str) else list(values or [])
    out = []
    for v in items:
        try:
            x = float(str(v).strip()) if not isinstance(v, (int, float)) else float(v)
        except ValueError:
            raise InnardsError(f"strength list does not parse: '{v}' is not a number") from None
        if not math.isfinite(x):
            raise InnardsError(f"strength list does not parse: '{v}' is not finite")
        out.append(x)
    if not out:
        raise InnardsError("strength list is empty")
    return sorted(set(out))


def _fingerprint(cfg: SweepConfig, vector_sha: str, glp_sha: str | None, prompts_sha: str, norm: float) -> str:
    keys = ("model", "site", "norm_stat", "t_start", "steps", "schedule", "positions", "max_new_tokens",
            "temperature", "top_p", "seed", "batch_size", "dtype")
    d = {k: getattr(cfg, k) for k in keys} | {"vector": vector_sha, "glp": glp_sha, "prompts": prompts_sha,
                                               "norm": round(norm, 10), "v": 1}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _cell_name(method: str, r: float) -> str:
    return f"{method}_r{r:+.4f}.json"


def run_sweep(cfg: SweepConfig) -> dict:
    """Generate, score and summarise every (method, strength) cell; writes results.json, pareto.png, generations.jsonl."""
    from innards.config import save_config
    from innards.io import read_json, sha256_file, write_json
    from innards.models.load import load_model
    from innards.runlog import MetricsLog
    from innards.steer.evaluator import load_or_train_evaluator
    from innards.steer.generate import Steering, generate_steered, setup_steering, write_jsonl
    from innards.steer.texts import prompts_path, read_prompts

    strengths = parse_strengths(cfg.strengths)
    methods = list(dict.fromkeys(str(m).strip().lower() for m in cfg.methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise InnardsError(f"methods must be raw and/or glp, got {', '.join(bad) or 'none'}")
    if "glp" in methods and not cfg.glp:
        raise InnardsError("method glp needs --glp DIR (or --methods raw)")
    if cfg.n_bootstrap < 100:
        raise InnardsError("n-bootstrap must be at least 100")
    ppath = prompts_path(cfg.prompts)
    prompts = read_prompts(ppath)
    out = Path(cfg.out)

    # the evaluator first: a concept without data should fail before minutes of generation
    evaluator = load_or_train_evaluator(cfg.concept, cfg.concept_pos, cfg.concept_neg, cfg.data_dir,
                                        cache_dir=out / "evaluator", seed=cfg.seed,
                                        max_per_class=cfg.evaluator_max_per_class)
    print(f"concept evaluator '{cfg.concept}': held-out accuracy {evaluator.accuracy:.3f} "
          f"({evaluator.n_test} test sentences)")

    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    st = setup_steering(model, cfg.site, cfg.vector, cfg.glp if "glp" in methods else None, cfg.norm, cfg.acts,
                        cfg.norm_stat, need_norm=any(r != 0 for r in strengths))
    vector_sha = hashlib.sha256(st.vector.vector.numpy().tobytes()).hexdigest()
    glp_sha = None
    if st.glp is not None:
        from innards.glp.model import file_sha256

        glp_sha = file_sha256(cfg.glp)
    fp = _fingerprint(cfg, vector_sha, glp_sha, sha256_file(ppath), st.norm)
    save_config(cfg, out)
    cells_dir = out / "cells"
    cells_dir.mkdir(exist_ok=True)

    records: list[dict] = []
    timings: dict[str, float] = {}
    for method in methods:
        for r in strengths:
            cell = cells_dir / _cell_name(method, r)
            if cell.is_file():
                try:
                    saved = read_json(cell, "sweep cell")
                    if saved.get("fingerprint") == fp and len(saved.get("records", [])) == len(prompts):
                        records.extend(saved["records"])
                        timings[f"{method}:{r:g}"] = float(saved.get("seconds", math.nan))
                        continue
                except InnardsError:
                    pass  # unreadable: regenerate
            steering = Steering(st.site, st.vector.vector, r * st.norm, cfg.positions,
                                st.glp if method == "glp" else None, cfg.t_start, cfg.steps, cfg.schedule, cfg.seed)
            t0 = time.perf_counter()
            recs = generate_steered(model, prompts, steering, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                    cfg.seed, cfg.batch_size, desc=f"{method} r={r:g}")
            secs = time.perf_counter() - t0
            for rec in recs:
                rec |= {"method": method, "strength": r, "alpha": r * st.norm}
            write_json(cell, {"fingerprint": fp, "method": method, "strength": r, "seconds": secs, "records": recs},
                       indent=None)
            timings[f"{method}:{r:g}"] = secs
            records.extend(recs)

    scored = score_records(model, evaluator, records, cfg.batch_size)
    results = summarise(scored, methods, strengths, cfg.n_bootstrap, cfg.seed)
    results |= {
        "concept": cfg.concept, "evaluator_accuracy": evaluator.accuracy, "evaluator": {
            "encoder": "all-MiniLM-L6-v2 + logistic regression", "n_train": evaluator.n_train,
            "n_test": evaluator.n_test, "C": evaluator.C, "provenance": evaluator.provenance},
        "model": cfg.model, "site": st.site, "norm": st.norm, "norm_source": st.norm_source,
        "vector": st.vector.meta, "glp": cfg.glp if "glp" in methods else None,
        "projection": {"t_start": cfg.t_start, "steps": cfg.steps, "schedule": cfg.schedule},
        "positions": cfg.positions, "n_prompts": len(prompts), "prompts": str(ppath),
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed,
        "seconds_per_cell": timings,
    }
    write_jsonl(out / "generations.jsonl", scored)
    write_json(out / "results.json", results)
    log = MetricsLog(out)
    for i, row in enumerate(r for m in methods for r in results["methods"][m]):
        log.log(i, **{k: v for k, v in row.items() if not isinstance(v, list)})
    log.close()
    plot_pareto(results, out / "pareto.png")
    print(format_table(results))
    return results


def score_records(model: Any, evaluator: Any, records: list[dict], batch_size: int = 16) -> list[dict]:
    """Add concept probability, unsteered NLL and distinct-2 to every generation record."""
    from innards.steer.fluency import continuation_nll, distinct_n

    texts = [r["continuation"] for r in records]
    concept = evaluator.score(texts)
    nll = continuation_nll(model, [r["prompt_ids"] for r in records], [r["continuation_ids"] for r in records],
                           batch_size=max(1, batch_size))
    out = []
    for rec, c, n in zip(records, concept, nll):
        out.append(rec | {"concept": float(c), "nll": None if math.isnan(n) else float(n),
                          "distinct2": _none_nan(distinct_n(rec["continuation"], 2))})
    return out


def _none_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _arr(rows: list[dict], key: str) -> np.ndarray:
    return np.array([math.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)


def summarise(scored: list[dict], methods: list[str], strengths: list[float], n_bootstrap: int = 10_000,
              seed: int = 0) -> dict:
    """Per method and strength: means and bootstrap CIs; paired GLP - raw differences; dominance at r >= 1."""
    from innards.bootstrap import bootstrap_ci

    by: dict[tuple[str, float], list[dict]] = {}
    for rec in scored:
        by.setdefault((rec["method"], float(rec["strength"])), []).append(rec)
    table: dict[str, list[dict]] = {}
    for m in methods:
        rows = []
        for r in strengths:
            recs = sorted(by.get((m, r), []), key=lambda x: x["prompt_index"])
            c, n, d = (bootstrap_ci(_arr(recs, k), n_bootstrap, seed=seed) for k in ("concept", "nll", "distinct2"))
            rows.append({"strength": r, "concept": c[0], "concept_ci": [c[1], c[2]], "nll": n[0], "nll_ci": [n[1], n[2]],
                         "distinct2": d[0], "distinct2_ci": [d[1], d[2]], "n": len(recs)})
        table[m] = rows
    res: dict[str, Any] = {"methods": table}
    if "raw" in methods and "glp" in methods:
        res["comparison"] = compare(by, strengths, n_bootstrap, seed, table)
    return res


def compare(by: dict, strengths: list[float], n_bootstrap: int, seed: int, table: dict) -> dict:
    """GLP minus raw per strength (paired over prompts) and whether GLP dominates at r >= 1."""
    from innards.bootstrap import bootstrap_ci

    paired = []
    for r in strengths:
        raw = {x["prompt_index"]: x for x in by.get(("raw", r), [])}
        glp = {x["prompt_index"]: x for x in by.get(("glp", r), [])}
        common = sorted(set(raw) & set(glp))
        row: dict[str, Any] = {"strength": r}
        for k in ("concept", "nll", "distinct2"):
            diff = [(math.nan if glp[i].get(k) is None or raw[i].get(k) is None else glp[i][k] - raw[i][k]) for i in common]
            m, lo, hi = bootstrap_ci(diff, n_bootstrap, seed=seed)
            row[f"{k}_diff"], row[f"{k}_diff_ci"] = m, [lo, hi]
        paired.append(row)
    big = [r for r in strengths if abs(r) >= 1]
    raw_pts = {row["strength"]: row for row in table["raw"]}
    glp_pts = {row["strength"]: row for row in table["glp"]}
    pointwise = [glp_pts[r]["concept"] >= raw_pts[r]["concept"] and glp_pts[r]["nll"] <= raw_pts[r]["nll"] for r in big]
    # frontier: is each large-r raw point weakly dominated by some GLP point (any strength)?
    frontier = [any(g["concept"] >= raw_pts[r]["concept"] and g["nll"] <= raw_pts[r]["nll"] for g in table["glp"])
                for r in big]
    return {
        "paired_glp_minus_raw": paired,
        "large_r": big,
        "glp_dominates_pointwise_at_r_ge_1": bool(big) and all(pointwise),
        "pointwise_dominated_fraction": (sum(pointwise) / len(big)) if big else None,
        "glp_frontier_dominates_at_r_ge_1": bool(big) and all(frontier),
        "frontier_dominated_fraction": (sum(frontier) / len(big)) if big else None,
        "definition": ("pointwise: at each |r| >= 1 the GLP mean concept is >= raw and its mean NLL <= raw; "
                       "frontier: each raw point with |r| >= 1 is weakly dominated by some GLP point of the sweep"),
    }


def format_table(results: dict) -> str:
    """A plain-text table of the sweep (one row per method and strength)."""
    lines = [f"concept evaluator held-out accuracy: {results.get('evaluator_accuracy', math.nan):.3f}",
             f"{'method':<6} {'r':>6} {'concept':>8} {'95% CI':>17} {'NLL':>7} {'95% CI':>17} {'dist-2':>7}"]
    for m, rows in results["methods"].items():
        for row in rows:
            lines.append(f"{m:<6} {row['strength']:>6.2f} {row['concept']:>8.3f} "
                         f"[{row['concept_ci'][0]:.3f}, {row['concept_ci'][1]:.3f}] {row['nll']:>7.3f} "
                         f"[{row['nll_ci'][0]:.3f}, {row['nll_ci'][1]:.3f}] {row['distinct2']:>7.3f}")
    comp = results.get("comparison")
    if comp:
        lines.append(f"GLP dominates raw at |r| >= 1: pointwise {comp['glp_dominates_pointwise_at_r_ge_1']} "
                     f"({comp['pointwise_dominated_fraction']}), frontier {comp['glp_frontier_dominates_at_r_ge_1']} "
                     f"({comp['frontier_dominated_fraction']})")
    return "\n".join(lines)


def plot_pareto(results: dict, path: str | Path) -> Path:
    """Concept score vs fluency NLL for every method, strengths annotated, 95% CI error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from innards.io import atomic_write_bytes

    colors = {"raw": "tab:red", "glp": "tab:blue"}
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for m, rows in results["methods"].items():
        x = np.array([r["nll"] for r in rows], dtype=float)
        y = np.array([r["concept"] for r in rows], dtype=float)
        xerr = np.abs(np.array([[r["nll"] - r["nll_ci"][0], r["nll_ci"][1] - r["nll"]] for r in rows], dtype=float).T)
        yerr = np.abs(np.array([[r["concept"] - r["concept_ci"][0], r["concept_ci"][1] - r["concept"]] for r in rows],
                               dtype=float).T)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o-", color=colors.get(m), label=m.upper() if m == "glp" else m,
                    capsize=2, alpha=0.9, lw=1.2, ms=4)
        for r, xi, yi in zip(rows, x, y):
            if np.isfinite(xi) and np.isfinite(yi):
                ax.annotate(f"{r['strength']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colors.get(m))
    acc = results.get("evaluator_accuracy")
    ax.set_xlabel("fluency: NLL of continuation under the unsteered model (lower is better)")
    ax.set_ylabel(f"concept: P({results.get('concept', 'concept')} | continuation)")
    ax.set_title(f"steering at {results.get('site', '')}: raw vs GLP" +
                 (f"  (evaluator acc. {acc:.2f})" if acc is not None else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    atomic_write_bytes(p, tmp.read_bytes())
    tmp.unlink()
    return p
