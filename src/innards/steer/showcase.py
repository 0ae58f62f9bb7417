"""``innards steer showcase``: steering concepts a small LM can express, raw vs GLP methods at equal concept.

For each concept shipped in ``steer/prompts/`` (topics and moods of children's books: the sea,
royalty, food, night, winter, happy vs sad):

1. the steering vector is the difference of mean activations of ``<concept>.vector.txt`` and its
   contrast set (``neutral.vector.txt``; ``sad.txt`` for happy), and the offline evaluator
   (MiniLM + logistic regression) is trained on *other* sentences (``<concept>.eval.txt`` against
   neutral and other-topic sentences; ``sad.eval.txt`` for happy), its held-out accuracy reported;
2. raw steering is shown to move the concept: the paired rise of the concept score over r = 0 has a
   bootstrap CI above zero at some strength before fluency collapses (NLL up by more than
   ``collapse_nll`` nats/token, or distinct-2 below half the unsteered value); a concept that fails is
   dropped from the comparison, and said so;
3. methods on the same prompts, seeds and strengths: raw addition, GLP projection (SDEdit, each
   ``schedule:t_start`` of ``projections``), prior-guided steering (:mod:`innards.steer.prior`, one run
   per weight) and prompting (the concept stated before the prompt; no strength);
4. at equal concept: each method's curve over strengths is read at concept levels set per concept as
   fractions q of raw steering's largest rise, c(0) + q (max_r c_raw(r) - c(0)) (linear interpolation at
   the first crossing), and its fluency there (NLL under the unsteered model, distinct-2) gets a
   bootstrap CI over prompts, paired across methods and concepts (the same resampled prompts), with the
   difference to raw, per concept and averaged over the kept concepts; the prompting baseline is
   compared at its own concept level;
5. what survives projection: the fraction of a steering offset left after SDEdit (same noise with and
   without the offset) at each t_start, for each concept's vector and for a random direction, and the
   LM cost of projecting clean activations (delta LM loss on held-out documents of the store).

GLP methods are repeated for every GLP given (e.g. several training seeds) and the spread of the
equal-concept differences is reported.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch

from innards.config import at_least, require, to_dict, within
from innards.data.store import ActivationStore
from innards.glp.delta_lm import delta_lm_loss, sequences_from_rows
from innards.glp.model import GLP
from innards.errors import InnardsError
from innards.glp.projection import ProjectionConfig
from innards.hub import is_hub_id
from innards.io import atomic_write_bytes, read_json
from innards.models.config import MODEL_ALIASES, ModelConfig
from innards.models.load import load_model
from innards.models.sites import resolve_site
from innards.run import Run
from innards.steer.config import (GENERATION_ALIASES, GenerationConfig, Positions, PriorConfig, glp_provenance,
                                  reopen_if_extended)
from innards.steer.evaluator import ConceptEvaluator, train_evaluator
from innards.steer.fluency import continuation_nll, distinct_n
from innards.steer.generate import Steering, generate_steered, resolve_norm
from innards.steer.texts import CONCEPTS, concept_sentences, read_prompts
from innards.steer.vectors import diff_means

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# the concept stated before the prompt (prompting baseline), a plain and an insistent version
STATEMENTS = {
    "sea": ("This is a story about the sea.", "This is a story about the sea, the waves, the ships and the sailors."),
    "royalty": ("This is a story about a king and a queen.",
                "This is a story about a king, a queen, a prince and a princess in their palace."),
    "food": ("This is a story about food.", "This is a story about food: bread, cake, pie and soup for dinner."),
    "night": ("This is a story about the night.", "This is a story about the dark night, the moon and the stars."),
    "winter": ("This is a story about winter.", "This is a story about winter, with snow, ice and frost."),
    "happy": ("This is a happy story.", "This is a happy story, full of joy, laughter and smiles."),
}
# settings that only add or select cells (cached by content): a finished showcase is extended, not refused
INCREMENTAL = ("glp", "concepts", "strengths", "projections", "prior_weights", "seed_projections", "seed_prior_weights",
               "levels", "n_boot", "keep_failing", "survival_strengths", "survival_t", "survival_rows", "delta_lm_docs")


@dataclass
class ShowcaseConfig:
    """``innards steer showcase``: concepts the LM can express, raw steering first, then methods at equal concept."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the language model (a plain string is taken as its name)"""
    site: str = "blocks.3.resid_post"
    """activation site to steer"""
    glp: list[str] = field(default_factory=list)
    """GLP folders or hub ids of the site (required); the first is the main one, the others (e.g. other training seeds) repeat the GLP methods"""
    acts: str = ""
    """activation store of the site (required): ||a||, held-out activations for the survival of offsets, documents for the delta LM cost"""
    concepts: list[str] = field(default_factory=lambda: list(CONCEPTS))
    """packaged concepts to steer: sea, royalty, food, night, winter, happy"""
    prompts: str = "stories"
    """prompt file, one per line ('stories' = the 50 packaged story openings)"""
    strengths: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.6])
    """relative strengths r (alpha = r * ||a||), shared by every steering method"""
    projections: list[str] = field(default_factory=lambda: ["exact:0.3", "exact:0.5", "grid:0.3", "grid:0.5"])
    """GLP projections compared, as schedule:t_start (exact = paper, grid = reference code)"""
    project_steps: int = 20
    """grid points of each projection"""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """prior-guided steering: steps and noise level (its weight is taken from --prior-weights)"""
    prior_weights: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    """weights of the prior-guided runs (one method each)"""
    seed_projections: list[str] = field(default_factory=lambda: ["exact:0.3", "exact:0.5"])
    """projections repeated with the second and later GLPs (the seed spread)"""
    seed_prior_weights: list[float] = field(default_factory=lambda: [0.5])
    """prior-guided weights repeated with the second and later GLPs"""
    positions: Positions = "last"
    """positions steered (last = the reference code's: last prompt token, then every generated token)"""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(batch_size=50))
    """decoding settings (greedy by default, as the paper's sentiment steering)"""
    levels: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9])
    """concept levels at which fluency is compared, as fractions of raw steering's largest concept rise per concept"""
    keep_failing: bool = False
    """compare the methods also on concepts that raw steering does not move (they stay marked as failing)"""
    collapse_nll: float = 2.0
    """fluency has collapsed once the NLL rises by more than this (nats/token) over the unsteered text"""
    survival_strengths: list[float] = field(default_factory=lambda: [1.0])
    """strengths at which the fraction of the offset surviving SDEdit is measured"""
    survival_t: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    """t_start values of the survival and delta-LM measurements"""
    survival_rows: int = 1024
    """held-out activations used for the survival fractions"""
    delta_lm_docs: int = 128
    """held-out documents of the store for the LM cost of projecting clean activations"""
    n_boot: int = 2000
    """bootstrap resamples over prompts"""
    out: str = ""
    """output folder (results.json, pareto.png, cells/) (required)"""
    overwrite: bool = False
    """replace an existing showcase made with other settings"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        bad = [c for c in self.concepts if c not in CONCEPTS]
        require(not bad, f"--concepts must be among {', '.join(CONCEPTS)}, got {', '.join(bad)}")
        require(bool(self.strengths) and all(math.isfinite(r) and r >= 0 for r in self.strengths),
                "--strengths must be non-negative numbers")
        self.strengths = sorted(set(float(r) for r in self.strengths))
        require(self.strengths[0] == 0.0, "--strengths must include 0 (the unsteered reference)")
        for p in self.projections + self.seed_projections:
            parse_projection(p, self.project_steps)
        require(all(0 <= w <= 1 for w in self.prior_weights + self.seed_prior_weights),
                "--prior-weights and --seed-prior-weights must be in [0, 1]")
        require(all(0 < c <= 1 for c in self.levels), "--levels must be in (0, 1]")
        require(all(0 < t <= 1 for t in self.survival_t), "--survival-t must be in (0, 1]")
        at_least(self, 1, "project_steps", "survival_rows", "delta_lm_docs")
        at_least(self, 100, "n_boot")
        within(self, "collapse_nll", 0.0, 100.0, open_lo=True)

    def check_inputs(self) -> None:
        """Required flags and inputs, before any model loads."""
        require(bool(self.glp), "--glp is required (one or more GLP folders)")
        for g in self.glp:
            require(Path(g).is_dir() or is_hub_id(g), f"--glp: no GLP folder (and not a hub id): {g}")
        require(bool(self.acts) and Path(self.acts).is_dir(), f"--acts: activation store not found: {self.acts}")
        require(bool(self.out), "--out is required")
        read_prompts(self.prompts)


SHOWCASE_ALIASES = {**MODEL_ALIASES, **GENERATION_ALIASES, "--n-bootstrap": "--n-boot"}


def parse_projection(spec: str, steps: int) -> ProjectionConfig:
    """'exact:0.3' -> ProjectionConfig(schedule='exact', t_start=0.3, steps=steps)."""
    sched, _, t = spec.partition(":")
    try:
        return ProjectionConfig(t_start=float(t), steps=steps, schedule=sched)
    except ValueError:
        raise InnardsError(f"--projections entries are schedule:t_start (e.g. exact:0.3), got '{spec}'") from None


# ---------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One steering method of the comparison: its label and how it edits (or prompts)."""

    name: str
    kind: str  # raw, project, prior, prompt
    glp_index: int = 0
    project: ProjectionConfig | None = None
    prior: PriorConfig | None = None
    statement: int = 0  # prompt: which statement


def methods_of(cfg: ShowcaseConfig) -> list[Method]:
    """Every method compared: raw, each projection and prior weight (the seed subset for later GLPs), prompting."""
    out = [Method("raw", "raw")]
    for g in range(len(cfg.glp)):
        tag = "" if g == 0 else f"@glp{g}"
        for p in (cfg.projections if g == 0 else cfg.seed_projections):
            out.append(Method(f"sdedit-{p}{tag}", "project", g, project=parse_projection(p, cfg.project_steps)))
        for w in (cfg.prior_weights if g == 0 else cfg.seed_prior_weights):
            pr = PriorConfig(weight=w, steps=cfg.prior.steps, t=cfg.prior.t)
            out.append(Method(f"prior-w{w:g}{tag}", "prior", g, prior=pr))
    out += [Method("prompt-1", "prompt", statement=0), Method("prompt-2", "prompt", statement=1)]
    return out


def _cell_key(cfg: ShowcaseConfig, m: Method, concept: str, r: float, vector: torch.Tensor, norm: float,
              glp_ids: list[str]) -> str:
    d = {"model": to_dict(cfg.model), "site": cfg.site, "positions": cfg.positions, "generation": to_dict(cfg.generation),
         "prompts": read_prompts(cfg.prompts), "concept": concept, "method": m.name, "r": r, "norm": round(norm, 10),
         "vector": hashlib.sha256(vector.numpy().tobytes()).hexdigest(), "v": 1}
    if m.kind in ("project", "prior"):
        d |= {"glp": glp_ids[m.glp_index], "project": to_dict(m.project) if m.project else None,
              "prior": to_dict(m.prior) if m.prior else None}
    if m.kind == "prompt":
        d = {k: d[k] for k in ("model", "generation", "prompts", "concept", "method", "v")} | {
            "statement": STATEMENTS[concept][m.statement]}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- statistics
def _boot_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _ci(x: np.ndarray) -> list[float]:
    x = x[np.isfinite(x)]
    return [float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))] if x.size else [math.nan, math.nan]


def at_level(conc: np.ndarray, vals: np.ndarray, level: float) -> np.ndarray:
    """Values read off a curve at a concept level: conc, vals (S, B) along strengths -> (B,) (NaN when never reached).

    The first crossing is used (a curve that rises and then falls in gibberish is read where it first gets
    there); a curve already above the level at r = 0 reads its r = 0 value.
    """
    above = conc >= level
    reached = above.any(0)
    k = np.argmax(above, axis=0)
    cols = np.arange(conc.shape[1])
    km = np.maximum(k - 1, 0)
    c0, c1 = conc[km, cols], conc[k, cols]
    v0, v1 = vals[km, cols], vals[k, cols]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(c1 > c0, (level - c0) / (c1 - c0), 1.0)
    out = np.where(k == 0, vals[0, cols], v0 + np.clip(w, 0, 1) * (v1 - v0))
    return np.where(reached, out, np.nan)


def _mean_std(x: list[float]) -> dict[str, float]:
    a = np.array([v for v in x if v is not None and math.isfinite(v)], dtype=float)
    return {"mean": float(a.mean()) if a.size else math.nan, "std": float(a.std(ddof=1)) if a.size > 1 else math.nan,
            "n": int(a.size)}


# ---------------------------------------------------------------- the run
def run_showcase(cfg: ShowcaseConfig) -> dict:
    """Generate, score and compare every concept x method x strength; writes results.json and pareto.png."""
    cfg.check_inputs()
    out = Path(cfg.out)
    with Run.open(out, "steer-showcase", cfg, inputs={"acts": cfg.acts, **{f"glp{i}": g for i, g in enumerate(cfg.glp)}},
                  always_resume=True, overwrite=cfg.overwrite, free=INCREMENTAL) as run:
        if run.state == "complete" and not reopen_if_extended(run, cfg):
            run.say_complete()
            return read_json(out / "results.json", "showcase results")
        return _showcase(cfg, run)


def _showcase(cfg: ShowcaseConfig, run: Run) -> dict:
    t_start = time.perf_counter()
    seed = cfg.generation.seed
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
    site = resolve_site(model, cfg.site).name
    glps = [GLP.from_pretrained(g) for g in cfg.glp]
    for g in glps:
        g.check_compatible(model, site)
        g.to(next(model.parameters()).device).eval()
    glp_ids = [json.dumps(glp_provenance(g, p), sort_keys=True) + str(g.meta.get("training", {}).get("val_loss"))
               for g, p in zip(glps, cfg.glp)]
    norm, norm_source = resolve_norm(site, acts=cfg.acts, model=model)
    prompts = read_prompts(cfg.prompts)
    methods = methods_of(cfg)
    idx = _boot_idx(len(prompts), cfg.n_boot, seed)
    results: dict = {"model": cfg.model.name, "site": site, "norm": norm, "norm_source": norm_source,
                     "glps": [glp_provenance(g, p) for g, p in zip(glps, cfg.glp)],
                     "glp_val_loss": [g.meta.get("training", {}).get("val_loss") for g in glps],
                     "n_prompts": len(prompts), "strengths": cfg.strengths, "positions": cfg.positions,
                     "generation": to_dict(cfg.generation), "levels": cfg.levels,
                     "methods": [{"name": m.name, "kind": m.kind, "glp": m.glp_index if m.kind in ("project", "prior") else None,
                                  "project": to_dict(m.project) if m.project else None,
                                  "prior": to_dict(m.prior) if m.prior else None} for m in methods],
                     "concepts": {}}
    vectors: dict[str, torch.Tensor] = {}
    for concept in cfg.concepts:
        results["concepts"][concept], vectors[concept] = _concept(cfg, run, model, site, glps, glp_ids, norm, prompts,
                                                                  methods, idx, concept)
    results["summary"] = summarise_showcase(results, cfg, methods)
    for c in results["concepts"].values():
        c.pop("_boot_nll_minus_raw", None)
    results["projection"] = [projection_costs(cfg, model, site, g, norm, vectors) for g in glps]
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    run.write_json("results.json", json_safe(results))
    run.save_png("pareto.png", showcase_figure(results))
    atomic_write_bytes(run.root / "summary.md", showcase_markdown(results).encode())
    s = results["summary"]
    run.complete(headline={"concepts_kept": len(s["kept"]), "concepts_dropped": len(s["dropped"]),
                           **{f"{k}_mean_dnll_vs_raw": v for k, v in s["best_at_equal_concept"].items()}},
                 outputs=["results.json", "pareto.png", "summary.md"])
    print(format_showcase(results))
    return results


def _concept(cfg: ShowcaseConfig, run: Run, model: PreTrainedModel, site: str, glps: list[GLP], glp_ids: list[str],
             norm: float, prompts: list[str], methods: list[Method], idx: np.ndarray, concept: str
             ) -> tuple[dict, torch.Tensor]:
    seed = cfg.generation.seed
    sents = concept_sentences(concept)
    ev = train_evaluator(concept, sents["eval_pos"], sents["eval_neg"], seed=seed)
    ev_id = hashlib.sha256(ev.coef.tobytes() + str(ev.intercept).encode()).hexdigest()[:16]
    sv = diff_means(model, site, sents["vector_pos"], sents["vector_neg"], token="mean")
    overlap = set(sents["vector_pos"] + sents["vector_neg"]) & set(sents["eval_pos"] + sents["eval_neg"])
    tok = model.tokenizer
    orig_ids = [list(tok(p)["input_ids"]) for p in prompts]
    cells: dict[str, dict[float, list[dict]]] = {}
    raw, prompting = methods[0], [m for m in methods if m.kind == "prompt"]
    order = [raw] + [m for m in methods if m is not raw]
    passed = False
    for m in order:
        if m is not raw and m.kind != "prompt" and not (passed or cfg.keep_failing):
            continue  # raw steering does not move this concept: it is dropped from the method comparison
        cells[m.name] = {}
        for r in ([None] if m.kind == "prompt" else cfg.strengths):
            key = _cell_key(cfg, m, concept, r, sv.vector, norm, glp_ids)
            name = f"cells/{concept}/{m.name}_r{(r if r is not None else 0):+.3f}.json"
            path = run.root / name
            recs = None
            if path.is_file():
                saved = read_json(path, "showcase cell")
                if saved.get("key") == key:
                    recs = saved["records"]
                    if saved.get("evaluator") != ev_id:  # the generations stand; only the concept score is redone
                        for x, c in zip(recs, ev.score([x["continuation"] for x in recs])):
                            x["concept"] = float(c)
                        run.write_json(name, {"key": key, "evaluator": ev_id, "records": recs}, indent=None)
            if recs is None:
                recs = _generate(cfg, model, site, glps, sv.vector, norm, prompts, m, r, concept)
                recs = score(model, ev, recs, orig_ids, cfg.generation.batch_size)
                run.write_json(name, {"key": key, "evaluator": ev_id, "records": recs}, indent=None)
            cells[m.name][r] = recs
        if m is raw:
            passed = analyse_concept(cfg, ev, sv.meta, cells, [raw], idx, len(overlap))["raw_test"]["passes"]
    used = methods if passed or cfg.keep_failing else [raw, *prompting]
    return analyse_concept(cfg, ev, sv.meta, cells, used, idx, len(overlap)), sv.vector


def _generate(cfg: ShowcaseConfig, model: PreTrainedModel, site: str, glps: list[GLP], vector: torch.Tensor, norm: float,
              prompts: list[str], m: Method, r: float | None, concept: str) -> list[dict]:
    desc = f"{concept} {m.name}" + (f" r={r:g}" if r is not None else "")
    if m.kind == "prompt":
        stated = [f"{STATEMENTS[concept][m.statement]} {p}" for p in prompts]
        return generate_steered(model, stated, None, cfg.generation, desc=desc)
    glp = glps[m.glp_index] if m.kind in ("project", "prior") else None
    steering = Steering(site, vector, float(r) * norm, cfg.positions, glp, m.project or ProjectionConfig(),
                        m.prior, cfg.generation.seed)
    return generate_steered(model, prompts, steering, cfg.generation, desc=desc)


def score(model: PreTrainedModel, ev: ConceptEvaluator, recs: list[dict], orig_ids: list[list[int]],
          batch_size: int) -> list[dict]:
    """Concept probability, NLL under the unsteered model given the *original* prompt, distinct-2 (compact records)."""
    conc = ev.score([x["continuation"] for x in recs])
    nll = continuation_nll(model, [orig_ids[x["prompt_index"]] for x in recs], [x["continuation_ids"] for x in recs],
                           batch_size=batch_size, progress=False)
    return [{"prompt_index": x["prompt_index"], "continuation": x["continuation"], "concept": float(c),
             "nll": None if math.isnan(n) else float(n), "distinct2": _nan_none(distinct_n(x["continuation"], 2))}
            for x, c, n in zip(recs, conc, nll)]


def json_safe(o: object) -> object:
    """A copy with NaN and infinities as None (strict JSON: browsers and the viewer reject NaN)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _matrix(recs: list[dict], key: str, n: int) -> np.ndarray:
    a = np.full(n, np.nan)
    for x in recs:
        if x.get(key) is not None:
            a[x["prompt_index"]] = x[key]
    return a


def analyse_concept(cfg: ShowcaseConfig, ev: ConceptEvaluator, vector_meta: dict, cells: dict[str, dict],
                    methods: list[Method], idx: np.ndarray, overlap: int) -> dict:
    """Curves with CIs, the raw-steering test, and every method read at the concept levels (paired bootstrap)."""
    with warnings.catch_warnings():
        # continuations too short for distinct-2 are NaN; a resample of only such rows has no mean
        warnings.simplefilter("ignore", RuntimeWarning)
        return _analyse(cfg, ev, vector_meta, cells, methods, idx, overlap)


def _analyse(cfg: ShowcaseConfig, ev: ConceptEvaluator, vector_meta: dict, cells: dict[str, dict],
             methods: list[Method], idx: np.ndarray, overlap: int) -> dict:
    n = idx.shape[1]
    S = cfg.strengths
    res: dict = {"evaluator": {"accuracy": ev.accuracy, "n_train": ev.n_train, "n_test": ev.n_test, "C": ev.C,
                               "sentences_shared_with_vector": overlap},
                 "vector": {"raw_norm": vector_meta["raw_norm"], "n_pos": vector_meta["n_pos"],
                            "n_neg": vector_meta["n_neg"], "token": vector_meta["token"]},
                 "curves": {}, "prompting": {}}
    boot: dict[str, dict[str, np.ndarray]] = {}
    for m in methods:
        if m.kind == "prompt":
            recs = cells[m.name][None]
            arr = {k: _matrix(recs, k, n) for k in ("concept", "nll", "distinct2")}
            b = {k: np.nanmean(v[idx], axis=1) for k, v in arr.items()}
            res["prompting"][m.name] = {k: float(np.nanmean(arr[k])) for k in arr} | {
                f"{k}_ci": _ci(b[k]) for k in arr} | {"statement": None}
            boot[m.name] = {k: v[None] for k, v in b.items()}
            continue
        arr = {k: np.stack([_matrix(cells[m.name][r], k, n) for r in S]) for k in ("concept", "nll", "distinct2")}
        b = {k: np.nanmean(v[:, idx], axis=2) for k, v in arr.items()}  # (S, B)
        boot[m.name] = b
        res["curves"][m.name] = [{"strength": r, **{k: float(np.nanmean(arr[k][i])) for k in arr},
                                  **{f"{k}_ci": _ci(b[k][i]) for k in arr}} for i, r in enumerate(S)]
        if m.name == "raw":
            res["raw_test"] = raw_moves(arr, b, S, cfg.collapse_nll)
    # equal concept: each method's NLL and distinct-2 at the levels, and its paired difference to raw
    eq: dict = {}
    raw = boot["raw"]
    c0, cmax = res["curves"]["raw"][0]["concept"], max(p["concept"] for p in res["curves"]["raw"])
    levels = [c0 + q * (cmax - c0) for q in cfg.levels]
    res["levels"] = {"fractions": list(cfg.levels), "concept": levels, "raw_c0": c0, "raw_cmax": cmax}
    diffs: dict[str, list[np.ndarray]] = {}
    for m in methods:
        if m.kind == "prompt":
            continue
        bm = boot[m.name]
        rows = []
        diffs[m.name] = []
        for q, lv in zip(cfg.levels, levels):
            nl, d2 = at_level(bm["concept"], bm["nll"], lv), at_level(bm["concept"], bm["distinct2"], lv)
            rn, rd = at_level(raw["concept"], raw["nll"], lv), at_level(raw["concept"], raw["distinct2"], lv)
            diffs[m.name].append(nl - rn)
            rows.append({"fraction": q, "level": lv, "reached": float(np.isfinite(nl).mean()),
                         "nll": _nanmean(nl), "nll_ci": _ci(nl), "distinct2": _nanmean(d2), "distinct2_ci": _ci(d2),
                         "nll_minus_raw": _nanmean(nl - rn), "nll_minus_raw_ci": _ci(nl - rn),
                         "distinct2_minus_raw": _nanmean(d2 - rd), "distinct2_minus_raw_ci": _ci(d2 - rd)})
        eq[m.name] = rows
    res["equal_concept"] = eq
    res["_boot_nll_minus_raw"] = diffs  # per method and level, (B,): pooled over concepts in the summary
    # the prompting baseline at its own concept level: each steering method's NLL there, minus prompting's
    for p in [m for m in methods if m.kind == "prompt"]:
        bp = boot[p.name]
        level = float(res["prompting"][p.name]["concept"])
        cmp = {}
        for m in methods:
            if m.kind == "prompt":
                continue
            bm = boot[m.name]
            nl = np.array([at_level(bm["concept"][:, [j]], bm["nll"][:, [j]], bp["concept"][0, j])[0]
                           for j in range(bm["concept"].shape[1])])
            cmp[m.name] = {"nll": _nanmean(nl), "nll_ci": _ci(nl), "reached": float(np.isfinite(nl).mean()),
                           "nll_minus_prompting": _nanmean(nl - bp["nll"][0]),
                           "nll_minus_prompting_ci": _ci(nl - bp["nll"][0])}
        res["prompting"][p.name] |= {"level": level, "methods_at_this_concept": cmp}
    return res


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def raw_moves(arr: dict[str, np.ndarray], b: dict[str, np.ndarray], strengths: list[float], collapse_nll: float) -> dict:
    """Does raw steering raise the concept (paired CI above 0) at some strength before fluency collapses?"""
    base_nll, base_d2 = float(np.nanmean(arr["nll"][0])), float(np.nanmean(arr["distinct2"][0]))
    rows, first_sig, collapse = [], None, None
    for i, r in enumerate(strengths):
        if i == 0:
            continue
        d = b["concept"][i] - b["concept"][0]
        lo, hi = _ci(d)
        nll, d2 = float(np.nanmean(arr["nll"][i])), float(np.nanmean(arr["distinct2"][i]))
        collapsed = nll - base_nll > collapse_nll or d2 < 0.5 * base_d2
        if collapsed and collapse is None:
            collapse = r
        if lo > 0 and collapse is None and first_sig is None:
            first_sig = r
        rows.append({"strength": r, "concept_rise": float(np.nanmean(arr["concept"][i] - arr["concept"][0])),
                     "concept_rise_ci": [lo, hi], "nll": nll, "distinct2": d2, "collapsed": collapsed})
    return {"passes": first_sig is not None, "first_significant_strength": first_sig, "collapse_strength": collapse,
            "unsteered_nll": base_nll, "unsteered_distinct2": base_d2, "by_strength": rows,
            "rule": f"pass: the paired 95% CI of concept(r) - concept(0) excludes 0 at some r below the first r where "
                    f"NLL rises by more than {collapse_nll:g} nats/token or distinct-2 falls below half its unsteered value"}


def summarise_showcase(results: dict, cfg: ShowcaseConfig, methods: list[Method]) -> dict:
    """Across kept concepts: NLL difference to raw at each level (pooled paired bootstrap), best method, seed spread."""
    kept = [c for c, r in results["concepts"].items() if r["raw_test"]["passes"] and len(r["curves"]) > 1]
    dropped = {c: r["raw_test"] for c, r in results["concepts"].items() if c not in kept}
    names = [m.name for m in methods if m.kind not in ("prompt",)]
    per_level: dict = {}
    for li, q in enumerate(cfg.levels):
        row = {}
        for name in names:
            per = [results["concepts"][c]["equal_concept"][name][li] for c in kept]
            # pooled over the concepts whose curve gets to the level (in most resamples); the same prompt resamples
            # for every concept, so each resample's mean over those concepts gives the CI
            pool = [c for c, x in zip(kept, per) if x["reached"] >= 0.5]
            stack = np.stack([results["concepts"][c]["_boot_nll_minus_raw"][name][li] for c in pool]) if pool else None
            reached = np.isfinite(stack).all(0) if stack is not None else np.zeros(0, bool)
            mean_b = stack.mean(0) if stack is not None else np.zeros(0)
            row[name] = {"mean_nll_minus_raw": _nanmean(np.array([x["nll_minus_raw"] for x in per], dtype=float)),
                         "pooled_concepts": pool,
                         "pooled_nll_minus_raw": float(mean_b[reached].mean()) if reached.any() else math.nan,
                         "pooled_nll_minus_raw_ci": _ci(mean_b[reached]) if reached.any() else [math.nan, math.nan],
                         "pooled_reached": float(reached.mean()) if reached.size else 0.0,
                         "concepts_compared": sum(1 for x in per if math.isfinite(x["nll_minus_raw"])),
                         "concepts_better_ci": sum(1 for x in per if x["nll_minus_raw_ci"][1] < 0),
                         "concepts_worse_ci": sum(1 for x in per if x["nll_minus_raw_ci"][0] > 0)}
        # best: lowest NLL difference among methods that get there in every concept raw does (else a method could
        # win by being compared only where it is easy)
        full = [n for n in names if len(row[n]["pooled_concepts"]) == len(row["raw"]["pooled_concepts"])
                and math.isfinite(row[n]["pooled_nll_minus_raw"])]
        best = min(full, key=lambda n: row[n]["pooled_nll_minus_raw"], default=None)
        per_level[f"{q:g}"] = {"methods": row, "best": best,
                               "best_beats_raw": bool(best and best != "raw" and row[best]["pooled_nll_minus_raw_ci"][1] < 0)}
    base = sorted({m.name.split("@")[0] for m in methods if m.kind in ("project", "prior")})
    # spread over GLPs (training seeds): a method's pooled NLL difference at each level, one value per GLP
    spread: dict = {}
    for b in base:
        spread[b] = {}
        for lv, pl in per_level.items():
            vals = [pl["methods"][n]["pooled_nll_minus_raw"] for n in names if n.split("@")[0] == b]
            spread[b][lv] = _mean_std(vals) | {"values": vals}
    overall = {b: _nanmean(np.array([pl["methods"][b]["pooled_nll_minus_raw"] for pl in per_level.values()], dtype=float))
               for b in base}
    return {"kept": kept, "dropped": {c: {"first_significant_strength": d["first_significant_strength"],
                                          "collapse_strength": d["collapse_strength"]} for c, d in dropped.items()},
            "per_level": per_level, "glp_seed_spread": spread, "best_at_equal_concept": overall,
            "levels_are": "fractions of raw steering's largest concept rise, per concept"}


# ---------------------------------------------------------------- projection costs
@torch.no_grad()
def projection_costs(cfg: ShowcaseConfig, model: PreTrainedModel, site: str, glp: GLP, norm: float,
                     vectors: dict[str, torch.Tensor] | None = None) -> dict:
    """Fraction of a steering offset surviving SDEdit per t_start (each concept's vector and a random direction),
    and the delta LM loss of projecting clean activations."""
    store = ActivationStore(cfg.acts)
    rows = store.split_rows("val")
    rng = np.random.default_rng(cfg.generation.seed)
    pick = np.sort(rng.choice(rows, size=min(cfg.survival_rows, rows.size), replace=False))
    a = store.rows(pick, site=site, normalize=False).float().to(glp.device)
    g = torch.Generator(device="cpu").manual_seed(cfg.generation.seed)
    rand = torch.randn(a.shape[1], generator=g)
    directions = {"random": rand / rand.norm(), **(vectors or {})}
    surv: dict = {name: {} for name in directions}
    for sched in ("exact", "grid"):
        for t in cfg.survival_t:
            pc = ProjectionConfig(t_start=t, steps=cfg.project_steps, schedule=sched)
            noise = torch.randn(a.shape, generator=g).to(glp.device)
            base = glp.project(a, noise=noise, site=site, **pc.kwargs())
            for name, v in directions.items():
                v = v.to(glp.device)
                row = {}
                for r in cfg.survival_strengths:
                    alpha = r * norm
                    moved = glp.project(a + alpha * v, noise=noise, site=site, **pc.kwargs())
                    kept = ((moved - base) @ v) / alpha
                    row[f"r{r:g}"] = {"kept_fraction": float(kept.mean()), "kept_fraction_sd": float(kept.std()),
                                      "kept_vs_clean": float((((moved - a) @ v) / alpha).mean())}
                surv[name][f"{sched}:{t:g}"] = row
    docs = sequences_from_rows(store.doc_ids[rows], store.positions[rows], store.token_ids[rows],
                               model.tokenizer.bos_token_id, max_len=64, max_docs=cfg.delta_lm_docs, seed=0)
    reps = {}
    for sched in ("exact", "grid"):
        for t in cfg.survival_t:
            pc = ProjectionConfig(t_start=t, steps=cfg.project_steps, schedule=sched)
            reps[f"{sched}:{t:g}"] = (lambda x, pc=pc: glp.project(x.float(), seed=0, site=site, **pc.kwargs()))
    dl = delta_lm_loss(model, site, docs, reps, bos_id=model.tokenizer.bos_token_id,
                       pad_id=model.tokenizer.pad_token_id or 0, progress=False)
    return {"offset_survival": surv,
            "delta_lm": {"lm_loss_clean": dl["lm_loss_clean"], "docs": dl["delta_lm_docs"], "tokens": dl["delta_lm_tokens"],
                         **{k: {"delta": dl[f"delta_lm_{k}"], "se": dl[f"delta_lm_{k}_se"]} for k in reps}},
            "note": "kept_fraction = <P(a + alpha v) - P(a), v> / alpha with the same noise for both (1 = the offset "
                    "survives whole); kept_vs_clean = <P(a + alpha v) - a, v> / alpha; v each concept's steering vector "
                    "or a random unit direction; a = held-out activations of the store"}


# ---------------------------------------------------------------- reporting
def _color(name: str) -> str:
    """One color per method family: raw red, SDEdit blues, prior-guided greens."""
    if name == "raw":
        return "tab:red"
    blues = {"sdedit-exact:0.3": "tab:blue", "sdedit-exact:0.5": "navy", "sdedit-grid:0.3": "tab:cyan",
             "sdedit-grid:0.5": "teal"}
    if name in blues:
        return blues[name]
    greens = ["yellowgreen", "tab:green", "darkgreen", "olive"]
    return greens[hash(name) % len(greens)] if name.startswith("prior") else "tab:purple"


def showcase_figure(results: dict) -> plt.Figure:
    """Concept panels (concept vs NLL per method along r, prompting as stars), then the equal-concept summary,
    the offset survival and the LM cost of projection."""
    concepts = list(results["concepts"])
    cols = 3
    rows = math.ceil((len(concepts) + 3) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.3 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, c in zip(flat, concepts):
        r = results["concepts"][c]
        for name, curve in r["curves"].items():
            if "@" in name:
                continue
            x = [p["nll"] for p in curve]
            y = [p["concept"] for p in curve]
            ax.plot(x, y, "o-", ms=3, lw=1.2, color=_color(name), label=name)
            ax.annotate(f"r={curve[-1]['strength']:g}", (x[-1], y[-1]), fontsize=6, color=_color(name))
        for name, p in r["prompting"].items():
            ax.errorbar([p["nll"]], [p["concept"]], xerr=[[p["nll"] - p["nll_ci"][0]], [p["nll_ci"][1] - p["nll"]]],
                        yerr=[[p["concept"] - p["concept_ci"][0]], [p["concept_ci"][1] - p["concept"]]],
                        fmt="*", ms=10, color="black" if name == "prompt-1" else "gray", label=name)
        status = "kept" if c in results["summary"]["kept"] else "DROPPED: raw steering does not move it"
        ax.set_title(f"{c} (evaluator acc. {r['evaluator']['accuracy']:.2f}; {status})", fontsize=9)
        ax.set_xlabel("fluency: NLL under the unsteered LM (nats/token, lower = better)", fontsize=8)
        ax.set_ylabel(f"concept: P({c} | continuation)", fontsize=8)
        ax.grid(alpha=0.3)
    flat[0].legend(fontsize=6, loc="best")
    # equal concept: pooled NLL - raw per level and method, main GLP
    ax = flat[len(concepts)]
    levels = list(results["summary"]["per_level"])
    for name in results["summary"]["per_level"][levels[0]]["methods"]:
        if "@" in name:
            continue
        m = [results["summary"]["per_level"][q]["methods"][name] for q in levels]
        y = np.array([v["pooled_nll_minus_raw"] for v in m], dtype=float)
        lo = np.array([v["pooled_nll_minus_raw_ci"][0] for v in m], dtype=float)
        hi = np.array([v["pooled_nll_minus_raw_ci"][1] for v in m], dtype=float)
        x = np.array([float(q) for q in levels])
        ax.errorbar(x, y, yerr=[np.abs(y - lo), np.abs(hi - y)], fmt="o-", ms=3, capsize=2, color=_color(name), label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(f"at equal concept: NLL - raw, mean over {len(results['summary']['kept'])} kept concepts (95% CI)", fontsize=9)
    ax.set_xlabel("concept level q: fraction of raw steering's largest rise", fontsize=8)
    ax.set_ylabel("NLL difference to raw (nats/token; < 0 = more fluent)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    # what survives projection and what projecting costs (main GLP)
    pr = results["projection"][0]
    surv = pr["offset_survival"]
    ax = flat[len(concepts) + 1]
    for d, per in surv.items():
        for sched, style in (("exact", "o-"), ("grid", "s--")):
            ks = [k for k in per if k.startswith(sched + ":")]
            ts = [float(k.split(":")[1]) for k in ks]
            r0 = list(per[ks[0]])[-1]
            ax.plot(ts, [per[k][r0]["kept_fraction"] for k in ks], style, ms=3, lw=1,
                    color="black" if d == "random" else None, label=f"{d} ({sched})")
    ts = sorted({float(k.split(":")[1]) for k in next(iter(surv.values()))})
    ax.plot(ts, [1 - t for t in ts], ":", color="gray", label="1 - t")
    ax.set_title("fraction of a steering offset left after SDEdit", fontsize=9)
    ax.set_xlabel("t_start", fontsize=8)
    ax.set_ylabel("<P(a + alpha v) - P(a), v> / alpha", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5, ncol=2)
    ax = flat[len(concepts) + 2]
    for sched, style in (("exact", "o-"), ("grid", "s--")):
        ks = [k for k in pr["delta_lm"] if isinstance(pr["delta_lm"][k], dict) and k.startswith(sched + ":")]
        ts = [float(k.split(":")[1]) for k in ks]
        ax.errorbar(ts, [pr["delta_lm"][k]["delta"] for k in ks], yerr=[pr["delta_lm"][k]["se"] for k in ks], fmt=style,
                    ms=3, capsize=2, label=sched)
    ax.set_title(f"LM cost of projecting clean activations (clean loss {pr['delta_lm']['lm_loss_clean']:.2f})", fontsize=9)
    ax.set_xlabel("t_start", fontsize=8)
    ax.set_ylabel("delta LM loss (nats/token, +- se)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax in flat[len(concepts) + 3:]:
        ax.axis("off")
    fig.suptitle(f"Steering the LM '{results['model']}' at {results['site']}: concept vs fluency along strength r = 0..{results['strengths'][-1]:g} "
                 f"({results['n_prompts']} prompts, greedy; main GLP), prompting baseline as stars", fontsize=11)
    fig.tight_layout()
    return fig


def format_showcase(results: dict) -> str:
    """Plain-text summary: per concept the raw test, then per level the best method and its mean NLL difference."""
    lines = []
    for c, r in results["concepts"].items():
        t = r["raw_test"]
        lines.append(f"{c:<8} evaluator acc {r['evaluator']['accuracy']:.2f}  raw moves it: {t['passes']} "
                     f"(first significant r {t['first_significant_strength']}, collapse at r {t['collapse_strength']})")
    s = results["summary"]
    for lv, pl in s["per_level"].items():
        best = pl["best"]
        if best:
            b = pl["methods"][best]
            lines.append(f"level q={lv}: best {best} (pooled NLL {b['pooled_nll_minus_raw']:+.3f} vs raw "
                         f"{_ci_s(b['pooled_nll_minus_raw_ci'], '+.3f')}, better in {b['concepts_better_ci']}/"
                         f"{b['concepts_compared']} concepts with CI)")
    return "\n".join(lines)


def _f(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ci_s(ci: list[float], spec: str = ".3f") -> str:
    return f"[{_f(ci[0], spec)}, {_f(ci[1], spec)}]"


def showcase_markdown(results: dict) -> str:
    """The showcase's tables as Markdown: raw test, equal-concept comparison, prompting, seeds, projection costs."""
    L = [f"# Steering showcase: {results['model']} at {results['site']}", "",
         f"{results['n_prompts']} prompts, strengths r = {', '.join(f'{r:g}' for r in results['strengths'])} "
         f"(alpha = r x ||a|| = r x {results['norm']:.3f}), positions {results['positions']}, "
         f"{results['generation']['max_new_tokens']} new tokens, temperature {results['generation']['temperature']:g}. "
         f"GLP val loss: {', '.join(_f(v) for v in results['glp_val_loss'])}.", "",
         "## 1. Does raw steering move each concept?", "",
         "| concept | evaluator acc. (held out) | first r with rise CI > 0 | rise there [95% CI] | collapse at r | kept |",
         "|---|---:|---:|---|---:|---|"]
    for c, r in results["concepts"].items():
        t = r["raw_test"]
        fs = t["first_significant_strength"]
        row = next((x for x in t["by_strength"] if x["strength"] == fs), None)
        best = max(t["by_strength"], key=lambda x: x["concept_rise"])
        rise = (f"{row['concept_rise']:+.3f} {_ci_s(row['concept_rise_ci'])}" if row else
                f"best {best['concept_rise']:+.3f} {_ci_s(best['concept_rise_ci'])} at r={best['strength']:g}")
        L.append(f"| {c} | {r['evaluator']['accuracy']:.3f} (n={r['evaluator']['n_test']}) | {_f(fs, 'g')} | {rise} | "
                 f"{_f(t['collapse_strength'], 'g')} | {'yes' if c in results['summary']['kept'] else 'DROPPED'} |")
    L += ["", "## 2. Fluency at equal concept (NLL under the unsteered LM, nats/token; lower is better)", "",
          "Levels are fractions q of raw steering's largest concept rise for each concept (level = c(0) + q (max c_raw - c(0))). "
          "Each method's curve over r is read there (first crossing, linear interpolation); CIs are 95% paired bootstrap "
          "over prompts; 'reached' is the fraction of resamples in which the curve gets there.", ""]
    for c in results["summary"]["kept"]:
        eq = results["concepts"][c]["equal_concept"]
        L += [f"### {c}", "", "| method | q | level | reached | NLL [95% CI] | NLL - raw [95% CI] | distinct-2 | distinct-2 - raw |",
              "|---|---:|---:|---:|---|---|---:|---:|"]
        for name, rows in eq.items():
            for x in rows:
                L.append(f"| {name} | {x['fraction']:g} | {x['level']:.3f} | {x['reached']:.2f} | {_f(x['nll'])} {_ci_s(x['nll_ci'])} | "
                         f"{_f(x['nll_minus_raw'], '+.3f')} {_ci_s(x['nll_minus_raw_ci'], '+.3f')} | {_f(x['distinct2'])} | "
                         f"{_f(x['distinct2_minus_raw'], '+.3f')} |")
        L.append("")
    L += ["## 3. Summary over kept concepts", "",
          "NLL - raw averaged over the kept concepts whose curve gets to the level (in at least half the resamples; "
          "'pooled over'), with a 95% CI from the same prompt resamples in every concept. 'best' is the lowest among the "
          "methods that get there wherever raw does.", "",
          "| q | method | NLL - raw, pooled [95% CI] | pooled over | concepts better (CI) | worse (CI) | compared |",
          "|---:|---|---|---|---:|---:|---:|"]
    for lv, pl in results["summary"]["per_level"].items():
        for name, m in pl["methods"].items():
            if name == "raw" or "@" in name:
                continue
            star = " **best**" if name == pl["best"] else ""
            L.append(f"| {lv} | {name}{star} | {_f(m['pooled_nll_minus_raw'], '+.3f')} "
                     f"{_ci_s(m['pooled_nll_minus_raw_ci'], '+.3f')} | {', '.join(m['pooled_concepts']) or '–'} | {m['concepts_better_ci']} | "
                     f"{m['concepts_worse_ci']} | {m['concepts_compared']} |")
    L += ["", "## 4. Prompting baseline (the concept stated before the prompt)", "",
          "| concept | prompt | concept score [95% CI] | NLL [95% CI] | raw NLL at that concept - prompting [95% CI] |",
          "|---|---|---|---|---|"]
    for c, r in results["concepts"].items():
        for name, p in r["prompting"].items():
            rawp = p.get("methods_at_this_concept", {}).get("raw", {})
            L.append(f"| {c} | {name} | {p['concept']:.3f} {_ci_s(p['concept_ci'])} | {p['nll']:.3f} {_ci_s(p['nll_ci'])} | "
                     f"{_f(rawp.get('nll_minus_prompting'), '+.3f')} {_ci_s(rawp.get('nll_minus_prompting_ci', [math.nan] * 2), '+.3f')} |")
    if len(results["glps"]) > 1:
        L += ["", "## 5. Spread over GLP training seeds (mean NLL - raw over kept concepts, per level)", "",
              "| method | " + " | ".join(f"level {lv}" for lv in results["summary"]["per_level"]) + " |",
              "|---|" + "---|" * len(results["summary"]["per_level"])]
        for b, per in results["summary"]["glp_seed_spread"].items():
            if per and next(iter(per.values()))["n"] > 1:
                L.append(f"| {b} | " + " | ".join(f"{_f(v['mean'], '+.3f')} ± {_f(v['std'], '.3f')} (n={v['n']})"
                                                   for v in per.values()) + " |")
    L += ["", "## 6. What survives projection, and what projecting costs", ""]
    for gi, pr in enumerate(results["projection"]):
        surv = pr["offset_survival"]
        dirs = list(surv)
        keys = list(surv[dirs[0]])
        r0 = list(surv[dirs[0]][keys[0]])[-1]
        L += [f"GLP {gi}: fraction of a steering offset (r x ||a||, {r0}) left after SDEdit, per direction; "
              f"delta LM loss of projecting clean activations ({pr['delta_lm']['docs']} held-out documents, "
              f"{pr['delta_lm']['tokens']} tokens, clean loss {pr['delta_lm']['lm_loss_clean']:.3f}).", "",
              "| schedule:t_start | " + " | ".join(f"kept: {d}" for d in dirs) + " | delta LM [± se] |",
              "|---|" + "---:|" * (len(dirs) + 1)]
        for k in keys:
            dl = pr["delta_lm"].get(k, {})
            L.append(f"| {k} | " + " | ".join(f"{surv[d][k][r0]['kept_fraction']:.3f}" for d in dirs) +
                     f" | {_f(dl.get('delta'), '+.4f')} ± {_f(dl.get('se'), '.4f')} |")
        L.append("")
    return "\n".join(L) + "\n"
