"""Steering sweep: raw vs GLP steering (SDEdit projection, prior-guided) over strengths, scored offline with CIs.

Per method and strength: concept = mean P(concept | continuation) from the offline evaluator,
fluency = mean per-token NLL of the continuation under the unsteered model and distinct-2, each with
a seeded 95% percentile bootstrap over prompts (the same resampling indices for every cell, so the
comparison between cells is paired). Finished cells are kept under ``OUT/cells`` and reused by a
re-run with the same settings (adding strengths or methods generates only the new cells).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np

from innards.bootstrap import bootstrap_ci
from innards.config import at_least, require, to_dict
from innards.errors import InnardsError
from innards.glp.model import file_sha256
from innards.io import read_json, sha256_file
from innards.models.load import load_model
from innards.run import Run
from innards.steer.config import STEER_ALIASES, PriorConfig, SteerInputs, glp_provenance, reopen_if_extended
from innards.steer.evaluator import ConceptEvaluator, concept_files, load_or_train_evaluator
from innards.steer.fluency import continuation_nll, distinct_n
from innards.steer.generate import Steering, check_can_generate, generate_steered, setup_steering
from innards.steer.texts import prompts_path, read_prompts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_STRENGTHS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
METHODS = ("raw", "glp", "prior")
# changing these adds or drops cells: the folder is reused, not refused
INCREMENTAL = ("strengths", "methods", "n_boot")


@dataclass
class SweepConfig(SteerInputs):
    """``innards steer sweep``: concept score vs fluency for raw and GLP steering over strengths."""

    strengths: list[float] = field(default_factory=lambda: list(DEFAULT_STRENGTHS))
    """relative strengths r, comma-separated (e.g. 0,0.25,0.5,1,2)"""
    methods: list[str] = field(default_factory=lambda: ["raw", "glp"])
    """raw (plain addition), glp (SDEdit projection, --project.*) and/or prior (prior-guided, --prior.*)"""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """prior-guided steering (method prior)"""
    concept: str = "sentiment"
    """concept name: 'sentiment' (shared data) and the packaged sea, royalty, food, night, winter, happy are built in; others need --concept-pos/--concept-neg"""
    concept_pos: str | None = None
    """sentences showing the concept (defines a new concept)"""
    concept_neg: str | None = None
    """sentences not showing it"""
    data_dir: str | None = None
    """shared data folder for built-in concepts (None: $INNARDS_DATA_DIR or ../shared/data)"""
    evaluator_max_per_class: int | None = None
    """subsample the evaluator's training sentences (None: all)"""
    n_boot: int = 10_000
    """bootstrap resamples over prompts"""
    out: str = "steer-sweep"
    """output folder (results.json, generations.jsonl, pareto.png, cells/, evaluator/)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.strengths = parse_strengths(self.strengths)
        self.methods = list(dict.fromkeys(str(m).strip().lower() for m in self.methods))
        bad = [m for m in self.methods if m not in METHODS]
        require(bool(self.methods) and not bad, f"--methods must be among {', '.join(METHODS)}, got {', '.join(bad) or 'none'}")
        at_least(self, 100, "n_boot")
        at_least(self, 4, "evaluator_max_per_class")

    def check_inputs(self) -> None:
        """Everything the sweep reads exists, before the evaluator trains or a model loads."""
        super().check_inputs()
        needs = [m for m in self.methods if m in ("glp", "prior")]
        require(not needs or self.glp.path is not None, f"method {needs[0] if needs else ''} needs --glp DIR (or --methods raw)")
        for f in concept_files(self.concept, self.concept_pos, self.concept_neg, self.data_dir) or ():
            require(f.is_file(), f"concept '{self.concept}': sentence file not found: {f}")
        require(bool(self.out), "--out is required")


SWEEP_ALIASES = {**STEER_ALIASES, "--n-bootstrap": "--n-boot"}


def parse_strengths(values: Iterable[float | str] | str) -> list[float]:
    """Strengths from a list or a comma string; InnardsError unless every item is a finite number."""
    items = values.split(",") if isinstance(values, str) else list(values or [])
    out = []
    for v in items:
        try:
            x = float(v) if isinstance(v, (int, float)) else float(str(v).strip())
        except ValueError:
            raise InnardsError(f"strength list does not parse: '{v}' is not a number") from None
        if not math.isfinite(x):
            raise InnardsError(f"strength list does not parse: '{v}' is not finite")
        out.append(x)
    if not out:
        raise InnardsError("strength list is empty")
    return sorted(set(out))


def _fingerprint(cfg: SweepConfig, method: str, vector_sha: str, glp_sha: str | None, prompts_sha: str, norm: float) -> str:
    """Identity of one method's cells: everything its generations depend on."""
    d = {"model": to_dict(cfg.model), "site": cfg.site, "norm_stat": cfg.norm_stat, "positions": cfg.positions,
         "generation": to_dict(cfg.generation), "vector": vector_sha, "prompts": prompts_sha, "norm": round(norm, 10),
         "v": 2}
    if method == "glp":
        d |= {"glp": glp_sha, "project": to_dict(cfg.project), "glp_source": to_dict(cfg.glp)}
    elif method == "prior":
        d |= {"glp": glp_sha, "prior": to_dict(cfg.prior), "glp_source": to_dict(cfg.glp)}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _cell_name(method: str, r: float) -> str:
    return f"{method}_r{r:+.4f}.json"


def run_sweep(cfg: SweepConfig) -> dict:
    """Generate, score and summarise every (method, strength) cell; writes results.json, pareto.png, generations.jsonl."""
    cfg.check_inputs()
    ppath = prompts_path(cfg.prompts)
    prompts = read_prompts(ppath)
    out = Path(cfg.out)
    with Run.open(out, "sweep", cfg, inputs={"vector": cfg.vector.partition("#")[0], "prompts": str(ppath),
                                             "glp": cfg.glp.path, "acts": cfg.acts, "restats": cfg.glp.restats},
                  always_resume=True, overwrite=cfg.overwrite, free=INCREMENTAL) as run:
        if run.state == "complete" and not reopen_if_extended(run, cfg):
            run.say_complete()
            return read_json(out / "results.json", "sweep results")
        return _sweep(cfg, run, prompts, ppath)


def _sweep(cfg: SweepConfig, run: Run, prompts: list[str], ppath: Path) -> dict:
    seed = cfg.generation.seed
    # the evaluator first: a concept whose data does not fit should fail before minutes of generation
    evaluator = load_or_train_evaluator(cfg.concept, cfg.concept_pos, cfg.concept_neg, cfg.data_dir,
                                        cache_dir=run.root / "evaluator", seed=seed,
                                        max_per_class=cfg.evaluator_max_per_class)
    print(f"concept evaluator '{cfg.concept}': held-out accuracy {evaluator.accuracy:.3f} "
          f"({evaluator.n_test} test sentences)")
    uses_glp = any(m in ("glp", "prior") for m in cfg.methods)
    glp = cfg.glp.load() if uses_glp else None
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
    check_can_generate(model)
    st = setup_steering(model, cfg, glp, need_norm=any(r != 0 for r in cfg.strengths))
    vector_sha = hashlib.sha256(st.vector.vector.numpy().tobytes()).hexdigest()
    glp_sha = file_sha256(cfg.glp.path, checkpoint=cfg.glp.checkpoint, revision=cfg.glp.revision) if glp else None
    prompts_sha = sha256_file(ppath)
    cells_dir = run.root / "cells"
    cells_dir.mkdir(exist_ok=True)

    records: list[dict] = []
    timings: dict[str, float] = {}
    for method in cfg.methods:
        fp = _fingerprint(cfg, method, vector_sha, glp_sha, prompts_sha, st.norm)
        for r in cfg.strengths:
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
                                st.glp if method != "raw" else None, cfg.project,
                                cfg.prior if method == "prior" else None, seed)
            t0 = time.perf_counter()
            recs = generate_steered(model, prompts, steering, cfg.generation, desc=f"{method} r={r:g}")
            secs = time.perf_counter() - t0
            for rec in recs:
                rec |= {"method": method, "strength": r, "alpha": r * st.norm}
            run.write_json(f"cells/{cell.name}", {"fingerprint": fp, "method": method, "strength": r, "seconds": secs,
                                                  "records": recs}, indent=None)
            timings[f"{method}:{r:g}"] = secs
            records.extend(recs)

    scored = score_records(model, evaluator, records, cfg.generation.batch_size)
    results = summarise(scored, cfg.methods, cfg.strengths, cfg.n_boot, seed)
    results |= {
        "concept": cfg.concept, "evaluator_accuracy": evaluator.accuracy, "evaluator": {
            "encoder": "all-MiniLM-L6-v2 + logistic regression", "n_train": evaluator.n_train,
            "n_test": evaluator.n_test, "C": evaluator.C, "provenance": evaluator.provenance},
        "model": cfg.model.name, "site": st.site, "norm": st.norm, "norm_source": st.norm_source,
        "vector": st.vector.meta, "glp": glp_provenance(glp, cfg.glp.path) if glp is not None else None,
        "projection": to_dict(cfg.project), "prior": to_dict(cfg.prior) if "prior" in cfg.methods else None,
        "positions": cfg.positions, "n_prompts": len(prompts), "prompts": str(ppath),
        "max_new_tokens": cfg.generation.max_new_tokens, "temperature": cfg.generation.temperature, "seed": seed,
        "seconds_per_cell": timings,
    }
    run.write_jsonl("generations.jsonl", scored)
    run.write_json("results.json", results)
    run.write_jsonl("metrics.jsonl", ({"step": i, **{k: v for k, v in row.items() if not isinstance(v, list)},
                                       "method": m} for i, (m, row) in
                                      enumerate((m, row) for m in cfg.methods for row in results["methods"][m])))
    run.save_png("pareto.png", pareto_figure(results))
    run.complete(headline=headline(results), outputs=["results.json", "generations.jsonl", "pareto.png"])
    print(format_table(results))
    return results


def headline(results: dict) -> dict[str, float | str | bool | None]:
    """A few numbers for an index page: evaluator accuracy, each method's concept and NLL at its largest strength."""
    h: dict[str, float | str | bool | None] = {"concept": results.get("concept"),
                                               "evaluator_accuracy": results.get("evaluator_accuracy")}
    for m, rows in results["methods"].items():
        top = max(rows, key=lambda row: abs(row["strength"]))
        h[f"{m}_concept_at_r{top['strength']:g}"] = top["concept"]
        h[f"{m}_nll_at_r{top['strength']:g}"] = top["nll"]
    comp = results.get("comparison")
    if comp:
        h["glp_frontier_dominates_at_r_ge_1"] = comp["glp_frontier_dominates_at_r_ge_1"]
    return h


def score_records(model: PreTrainedModel, evaluator: ConceptEvaluator, records: list[dict],
                  batch_size: int = 16) -> list[dict]:
    """Add concept probability, unsteered NLL and distinct-2 to every generation record."""
    concept = evaluator.score([r["continuation"] for r in records])
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


def summarise(scored: list[dict], methods: list[str], strengths: list[float], n_boot: int = 10_000,
              seed: int = 0) -> dict:
    """Per method and strength: means and bootstrap CIs; paired GLP - raw differences; dominance at r >= 1."""
    by: dict[tuple[str, float], list[dict]] = {}
    for rec in scored:
        by.setdefault((rec["method"], float(rec["strength"])), []).append(rec)
    table: dict[str, list[dict]] = {}
    for m in methods:
        rows = []
        for r in strengths:
            recs = sorted(by.get((m, r), []), key=lambda x: x["prompt_index"])
            c, n, d = (bootstrap_ci(_arr(recs, k), n_boot, seed=seed) for k in ("concept", "nll", "distinct2"))
            rows.append({"strength": r, "concept": c[0], "concept_ci": [c[1], c[2]], "nll": n[0], "nll_ci": [n[1], n[2]],
                         "distinct2": d[0], "distinct2_ci": [d[1], d[2]], "n": len(recs)})
        table[m] = rows
    res: dict[str, object] = {"methods": table}
    if "raw" in methods and "glp" in methods:
        res["comparison"] = compare(by, strengths, n_boot, seed, table, "glp")
    if "raw" in methods and "prior" in methods:
        res["comparison_prior"] = compare(by, strengths, n_boot, seed, table, "prior")
    return res


def compare(by: dict[tuple[str, float], list[dict]], strengths: list[float], n_boot: int, seed: int,
            table: dict[str, list[dict]], other: str = "glp") -> dict:
    """``other`` minus raw per strength (paired over prompts) and whether ``other`` dominates at r >= 1."""
    paired = []
    for r in strengths:
        raw = {x["prompt_index"]: x for x in by.get(("raw", r), [])}
        oth = {x["prompt_index"]: x for x in by.get((other, r), [])}
        common = sorted(set(raw) & set(oth))
        row: dict[str, object] = {"strength": r}
        for k in ("concept", "nll", "distinct2"):
            diff = [(math.nan if oth[i].get(k) is None or raw[i].get(k) is None else oth[i][k] - raw[i][k]) for i in common]
            m, lo, hi = bootstrap_ci(diff, n_boot, seed=seed)
            row[f"{k}_diff"], row[f"{k}_diff_ci"] = m, [lo, hi]
        paired.append(row)
    big = [r for r in strengths if abs(r) >= 1]
    raw_pts = {row["strength"]: row for row in table["raw"]}
    oth_pts = {row["strength"]: row for row in table[other]}
    pointwise = [oth_pts[r]["concept"] >= raw_pts[r]["concept"] and oth_pts[r]["nll"] <= raw_pts[r]["nll"] for r in big]
    # frontier: is each large-r raw point weakly dominated by some point of the other method (any strength)?
    frontier = [any(g["concept"] >= raw_pts[r]["concept"] and g["nll"] <= raw_pts[r]["nll"] for g in table[other])
                for r in big]
    name = "glp" if other == "glp" else other
    return {
        f"paired_{name}_minus_raw": paired,
        "large_r": big,
        f"{name}_dominates_pointwise_at_r_ge_1": bool(big) and all(pointwise),
        "pointwise_dominated_fraction": (sum(pointwise) / len(big)) if big else None,
        f"{name}_frontier_dominates_at_r_ge_1": bool(big) and all(frontier),
        "frontier_dominated_fraction": (sum(frontier) / len(big)) if big else None,
        "definition": (f"pointwise: at each |r| >= 1 the {name} mean concept is >= raw and its mean NLL <= raw; "
                       f"frontier: each raw point with |r| >= 1 is weakly dominated by some {name} point of the sweep"),
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
    for key, name in (("comparison", "GLP"), ("comparison_prior", "prior")):
        comp = results.get(key)
        if comp:
            k = "glp" if name == "GLP" else "prior"
            lines.append(f"{name} dominates raw at |r| >= 1: pointwise {comp[f'{k}_dominates_pointwise_at_r_ge_1']} "
                         f"({comp['pointwise_dominated_fraction']}), frontier {comp[f'{k}_frontier_dominates_at_r_ge_1']} "
                         f"({comp['frontier_dominated_fraction']})")
    return "\n".join(lines)


COLORS = {"raw": "tab:red", "glp": "tab:blue", "prior": "tab:green"}


def pareto_figure(results: dict) -> plt.Figure:
    """Concept score vs fluency NLL for every method, strengths annotated, 95% CI error bars."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for m, rows in results["methods"].items():
        x = np.array([r["nll"] for r in rows], dtype=float)
        y = np.array([r["concept"] for r in rows], dtype=float)
        xerr = np.abs(np.array([[r["nll"] - r["nll_ci"][0], r["nll_ci"][1] - r["nll"]] for r in rows], dtype=float).T)
        yerr = np.abs(np.array([[r["concept"] - r["concept_ci"][0], r["concept_ci"][1] - r["concept"]] for r in rows],
                               dtype=float).T)
        label = {"raw": "raw addition", "glp": "GLP projection (SDEdit)", "prior": "prior-guided (GLP score)"}.get(m, m)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o-", color=COLORS.get(m), label=label, capsize=2, alpha=0.9,
                    lw=1.2, ms=4)
        for r, xi, yi in zip(rows, x, y):
            if np.isfinite(xi) and np.isfinite(yi):
                ax.annotate(f"{r['strength']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=COLORS.get(m))
    acc = results.get("evaluator_accuracy")
    ax.set_xlabel("fluency: NLL of continuation under the unsteered model (nats/token, lower is better)")
    ax.set_ylabel(f"concept: P({results.get('concept', 'concept')} | continuation), offline evaluator")
    ax.set_title(f"steering at {results.get('site', '')}: concept vs fluency per strength r (labels)" +
                 (f"\nevaluator held-out acc. {acc:.2f}; 95% bootstrap CIs over prompts" if acc is not None else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig

