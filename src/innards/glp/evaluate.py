"""Honest evaluation of a GLP meta-model against held-out activations, the finite-sample floor and baselines.

Fréchet distance (FD) sees only the first two moments, so it is reported next to the numbers that
make it readable: the floor (train vs held-out real activations, same N) and a Gaussian with the
train mean and covariance (which an FD cannot tell from the data). The classifier two-sample test
(C2ST AUC, 0.5 = indistinguishable) sees more. The delta LM loss measures what replacing the
site's activations by each reconstruction costs the LM on held-out text.

The "no structure" prior is the exact flow of that Gaussian (:mod:`innards.glp.gaussian`): its
SDEdit projection is reported beside the GLP's (``fd_gaussian_projection``, ``c2st_auc_gaussian_projection``,
``delta_lm_gaussian``), so a GLP is credited only for what it knows beyond two moments.

With ``--val-acts`` the held-out set is another store: train vs that store measures a corpus
shift, not the finite-sample floor. It is then labelled as a shift (``fd_floor_kind``), and the
within-store floor (train vs the validation documents of ``--acts``) is reported as well
(``fd_floor_within_store``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from transformers import PreTrainedModel

from innards.config import at_least, require
from innards.data.store import ActivationStore
from innards.errors import InnardsError
from innards.glp.c2st import c2st_auc
from innards.glp.delta_lm import delta_lm_loss, sequences_from_rows
from innards.glp.fd import frechet_distance, frechet_distance_from_moments, moments
from innards.glp.gaussian import GaussianFlow
from innards.glp.model import GLP
from innards.glp.projection import ProjectionConfig
from innards.io import read_json
from innards.models.config import ModelConfig
from innards.models.load import load_model
from innards.run import Run, save_png
from innards.runtime import default_device
from innards.sae.load import load_sae
from innards.sae.model import SparseAutoencoder
from innards.sae.train import SAETrainConfig, heldout_metrics, train_sae

Result = dict[str, object]


@dataclass
class EvalConfig:
    """Configuration of ``innards glp eval`` (and of :func:`evaluate_glp`)."""

    glp: str | None = None
    """GLP folder (innards glp train) or hub id"""
    acts: str | None = None
    """activation store the GLP was trained on (train split: floor and baselines; val split: held-out)"""
    out: str = "glp_eval.json"
    """output JSON file (a PCA plot, the resolved config and the run record are written next to it)"""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    """language model of the delta LM losses (empty name: the one recorded in the GLP)"""
    delta_lm: bool = True
    """measure the delta LM losses"""
    site: str | None = None
    """site to evaluate (None: the GLP's only site)"""
    n: int = 10000
    """activations per set (held-out, train, GLP samples, Gaussian samples)"""
    sae: str | None = None
    """SAELens-format SAE folder or hub id for the SAE baseline (None: train a TopK SAE on the store)"""
    pca_k: int = 32
    """components of the PCA baseline (32 = the SAE's k: equal active coefficients)"""
    val_acts: str | None = None
    """a separate store of held-out activations (None: the validation documents of --acts)"""
    steps: int = 1000
    """sampler steps for the GLP samples"""
    solver: Literal["euler", "heun"] = "euler"
    """sampler for the GLP samples"""
    seed: int = 42
    """seed of the row choice, the samples and the projection noise"""
    project: ProjectionConfig = field(default_factory=ProjectionConfig)
    """the SDEdit projection of the delta LM loss and the projection FD (GLP and Gaussian flow alike)"""
    c2st: bool = True
    """run the classifier two-sample tests"""
    lm_docs: int = 256
    """held-out documents for the delta LM loss"""
    context: int = 128
    """tokens per held-out sequence (BOS included) for the delta LM loss"""
    lm_batch_size: int = 16
    """sequences per forward pass of the delta LM loss"""
    sae_k: int = 32
    """active latents of the SAE trained when --sae is not given"""
    sae_latents: str = "8*d"
    """latents of the SAE trained when --sae is not given (a number or an expression of the width d)"""
    sae_tokens: int | None = None
    """activations for the SAE trained when --sae is not given (None: one pass, at most 4M)"""
    train_sae: bool = True
    """train a TopK SAE when --sae is not given (otherwise the SAE baseline is skipped)"""
    restats: str | None = None
    """activation store whose whole-store statistics replace the GLP's normalisation (see glp/reference.py)"""
    plot: bool = True
    """write a PCA plot of real vs generated activations"""
    overwrite: bool = False
    """replace an evaluation made with other settings"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):  # the flat spelling of innards 0.1
            self.model = ModelConfig(name=self.model)
        at_least(self, 16, "n")
        at_least(self, 1, "steps", "pca_k", "lm_docs", "lm_batch_size", "sae_k", "sae_tokens")
        at_least(self, 2, "context")


# ----- small pieces ------------------------------------------------------------------------------------

def _rows(store: ActivationStore, split: str | None, n: int, seed: int) -> np.ndarray:
    rows = store.split_rows(split)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=min(n, rows.size), replace=False))


def gaussian_samples(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """n draws from N(mu, cov) (float32), through the eigen-decomposition so a singular cov is fine."""
    w, V = np.linalg.eigh(cov)
    L = V * np.sqrt(np.clip(w, 0.0, None))
    z = np.random.default_rng(seed).standard_normal((n, mu.size))
    return torch.from_numpy(mu + z @ L.T).float()


class PCARecon:
    """Reconstruction through the top-k principal components of a reference set."""

    def __init__(self, mu: np.ndarray, cov: np.ndarray, k: int):
        w, V = np.linalg.eigh(cov)
        order = np.argsort(w)[::-1]
        self.k = int(min(k, mu.size))
        self.explained = float(w[order[:self.k]].sum() / max(w.sum(), 1e-300))
        self.mu = torch.from_numpy(mu).float()
        self.V = torch.from_numpy(np.ascontiguousarray(V[:, order[:self.k]])).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mu, V = self.mu.to(x.device), self.V.to(x.device)
        xc = x.float() - mu
        return ((xc @ V) @ V.T + mu).to(x.dtype)


def pca_plot(real: torch.Tensor, others: dict[str, torch.Tensor], path: Path, title: str = "") -> Path:
    """PNG: real vs each generated set on the top-2 principal components of the real set (shared axes)."""
    r = real.double()
    mu = r.mean(0)
    _, _, Vh = torch.linalg.svd(r - mu, full_matrices=False)
    P = Vh[:2].T
    pr = ((r - mu) @ P).numpy()
    fig, axes = plt.subplots(1, len(others), figsize=(5 * len(others), 4.6), squeeze=False, sharex=True, sharey=True)
    m = min(len(pr), 5000)
    for ax, (name, x) in zip(axes[0], others.items()):
        po = ((x.double() - mu) @ P).numpy()
        ax.scatter(pr[:m, 0], pr[:m, 1], s=2, alpha=0.35, label="real (held-out)", color="tab:blue")
        ax.scatter(po[:m, 0], po[:m, 1], s=2, alpha=0.35, label=name, color="tab:orange")
        ax.set_xlabel("PC 1 (of real)")
        ax.set_ylabel("PC 2 (of real)")
        ax.set_title(f"real vs {name}")
        ax.legend(markerscale=5, loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(path, fig)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def format_table(res: Result) -> str:
    """A readable summary table of an evaluation result."""
    lines = [f"GLP evaluation  site={res.get('site')}  n={res.get('n')}  d={res.get('d')}", ""]
    lines.append(f"{'Fréchet distance (raw scale)':<40}{'value':>12}{'/ floor':>10}")
    floor = res.get("fd_floor")
    shift = res.get("val_acts") is not None
    t = res.get("t_start")
    rows = [("fd_floor", "shift: --acts train vs --val-acts" if shift else "floor: train vs held-out")]
    if shift:
        rows.append(("fd_floor_within_store", "floor within --acts: train vs val"))
    rows += [("fd", "GLP samples"), ("fd_gaussian", "Gaussian (train mean, cov)"),
             ("fd_pca", f"PCA-{res.get('pca_k')} reconstruction"), ("fd_sae", "SAE reconstruction"),
             ("fd_glp_projection", f"GLP projection (t={t})"), ("fd_gaussian_projection", f"Gaussian-flow projection (t={t})")]
    for key, label in rows:
        v = res.get(key)
        ratio = v / floor if isinstance(v, (int, float)) and isinstance(floor, (int, float)) and floor else None
        lines.append(f"  {label:<38}{_fmt(v):>12}{_fmt(ratio):>10}")
    if any(k.startswith("c2st_auc") and res[k] is not None for k in res):
        lines += ["", f"{'C2ST ROC-AUC (0.5 = indistinguishable)':<40}{'value':>12}"]
        for key, label in [("c2st_auc_floor", "train vs held-out"), ("c2st_auc_floor_within_store", "train vs val of --acts"),
                           ("c2st_auc_glp", "GLP samples"), ("c2st_auc_gaussian", "Gaussian"),
                           ("c2st_auc_pca", "PCA reconstruction"), ("c2st_auc_sae", "SAE reconstruction"),
                           ("c2st_auc_glp_projection", "GLP projection"),
                           ("c2st_auc_gaussian_projection", "Gaussian-flow projection")]:
            if res.get(key) is not None:
                lines.append(f"  {label:<38}{_fmt(res[key]):>12}")
    if res.get("lm_loss_clean") is not None:
        lines += ["", f"{'delta LM loss (non-pad tokens)':<40}{'value':>12}{'+- se':>10}{'padded':>10}",
                  f"  {'clean LM loss':<38}{_fmt(res['lm_loss_clean']):>12}"]
        for name, label in (("glp", "GLP projection"), ("gaussian", "Gaussian-flow projection"), ("sae", "SAE"),
                            ("pca", "PCA"), ("mean", "mean")):
            if res.get(f"delta_lm_{name}") is not None:
                lines.append(f"  {label:<38}{_fmt(res[f'delta_lm_{name}']):>12}{_fmt(res.get(f'delta_lm_{name}_se')):>10}"
                             f"{_fmt(res.get(f'delta_lm_{name}_padded')):>10}")
    sae = res.get("sae")
    if isinstance(sae, dict) and sae.get("val_fvu") is not None:
        lines += ["", f"SAE on the held-out set: FVU {_fmt(sae['val_fvu'])}, L0 {_fmt(sae.get('val_l0'))}, "
                      f"dead {_fmt(sae.get('val_dead_fraction'))}"]
    if res.get("notes"):
        lines += [""] + [f"note: {n}" for n in res["notes"]]  # type: ignore[union-attr]
    return "\n".join(lines)


# ----- the evaluation ---------------------------------------------------------------------------------

def _open_store(path: str | None, what: str) -> ActivationStore:
    if not path:
        raise InnardsError(f"give --{what} DIR (an activation store)")
    if not Path(path).exists():
        raise InnardsError(f"activation store not found: {path}")
    return ActivationStore(path)


def check_store(glp: GLP, store: ActivationStore, site: str, what: str) -> None:
    """Refuse a store that lacks the GLP's site, comes from another model or has another width."""
    if site not in store.sites:
        raise InnardsError(f"the GLP models site '{site}', which is not in the {what} store {store.path} "
                           f"(it has {', '.join(store.sites)})")
    model = (store.manifest or {}).get("model")
    if model:
        glp.check_compatible(model, site, store.width(site))
    elif store.width(site) != glp.config.d_in:
        raise InnardsError(f"the GLP models width {glp.config.d_in}, the {what} store has width {store.width(site)}")


def quick_sae(cfg: EvalConfig, site: str, store: ActivationStore, out_json: Path) -> Path:
    """Train the TopK SAE baseline on the store (beside ``out_json`` as NAME_sae/) and return its folder."""
    n_train = len(store.split_rows("train"))
    tokens = cfg.sae_tokens if cfg.sae_tokens is not None else min(n_train, 4_000_000)
    out = out_json.with_name(out_json.stem + "_sae")
    return train_sae(SAETrainConfig(acts=cfg.acts, out=str(out), site=site, k=cfg.sae_k, latents=cfg.sae_latents,
                                    # small budgets get small batches, so the SAE still takes hundreds of steps
                                    tokens=tokens, batch_size=max(64, min(4096, n_train, tokens // 500)),
                                    seed=cfg.seed, device=cfg.model.device, overwrite=True, progress=cfg.progress))


def evaluate_glp(cfg: EvalConfig) -> Result:
    """Run the evaluation, print a table, write the JSON (and a PCA plot) to ``cfg.out``; returns the result."""
    if not cfg.glp:
        raise InnardsError("give --glp DIR (a GLP folder)")
    out = Path(cfg.out)
    if out.suffix.lower() != ".json":
        raise InnardsError(f"--out must name a .json file, got {out}")
    device = default_device(cfg.model.device)
    glp = GLP.from_pretrained(cfg.glp, device=device, restats=cfg.restats)
    sites = glp.meta.get("sites") or []
    site = cfg.site or (sites[0] if len(sites) == 1 else None)
    if site is None:
        raise InnardsError(f"this GLP models several sites ({', '.join(sites)}); choose one with --site")
    if site not in sites:
        raise InnardsError(f"this GLP was trained on {', '.join(sites)}, not '{site}'")
    store = _open_store(cfg.acts, "acts")
    check_store(glp, store, site, "--acts")
    vstore, vsplit = store, "val"
    if cfg.val_acts:
        vstore, vsplit = _open_store(cfg.val_acts, "val-acts"), None
        check_store(glp, vstore, site, "--val-acts")
    with Run.open(out, "eval", cfg, file=True, overwrite=cfg.overwrite, free={"plot"},
                  inputs={"glp": cfg.glp, "acts": cfg.acts, "val_acts": cfg.val_acts, "sae": cfg.sae,
                          "restats": cfg.restats}) as run:
        if run.state == "complete":
            run.say_complete()
            return read_json(out, what="evaluation")
        res = _evaluate(cfg, glp, site, store, vstore, vsplit, device, out)
        outputs = [out.name]
        if cfg.plot:
            sets = {"GLP samples": res.pop("_samples"), "Gaussian": res.pop("_gauss")}
            png = pca_plot(res.pop("_x_val"), sets, out.with_name(out.stem + "_pca.png"),
                           title=f"{res['model']} {site}: FD GLP {_fmt(res['fd'])}, Gaussian {_fmt(res['fd_gaussian'])}, "
                                 f"floor {_fmt(res['fd_floor'])}; C2ST AUC GLP {_fmt(res.get('c2st_auc_glp'))}, "
                                 f"Gaussian {_fmt(res.get('c2st_auc_gaussian'))}")
            res["plot"] = str(png)
            outputs.append(png.name)
        for k in ("_samples", "_gauss", "_x_val"):
            res.pop(k, None)
        run.write_json(out.name, res)
        run.complete(headline={k: res[k] for k in ("fd", "fd_floor", "fd_gaussian", "c2st_auc_glp", "delta_lm_glp",
                                                   "delta_lm_gaussian") if isinstance(res.get(k), (int, float))},
                     outputs=outputs)
        print(format_table(res))
        print(f"wrote {out}")
        return res


def _evaluate(cfg: EvalConfig, glp: GLP, site: str, store: ActivationStore, vstore: ActivationStore, vsplit: str | None,
              device: torch.device, out: Path) -> Result:
    d = glp.config.d_in
    pj = cfg.project
    notes: list[str] = []
    timing: dict[str, float] = {}
    t0 = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal t0
        timing[name] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()

    # ---- the real sets: held-out and train, N each
    val_idx = _rows(vstore, vsplit, cfg.n, cfg.seed)
    train_idx = _rows(store, "train", cfg.n, cfg.seed + 1)
    n = int(min(len(val_idx), len(train_idx)))
    if n < cfg.n:
        notes.append(f"only {n} rows per set (asked for {cfg.n}): held-out has {len(val_idx)}, train {len(train_idx)}")
    if n < 16:
        raise InnardsError(f"too few rows to evaluate: {n} (held-out {len(val_idx)}, train {len(train_idx)})")
    x_val = vstore.rows(val_idx[:n], site=site).float()
    x_train = store.rows(train_idx[:n], site=site).float()
    for name, x in (("held-out", x_val), ("train", x_train)):
        if not torch.isfinite(x).all():
            raise InnardsError(f"the {name} activations hold NaN or inf values")
    mu_v, S_v = moments(x_val)
    mu_t, S_t = moments(x_train)
    x_within = None
    if vsplit is None:  # a separate held-out store: the store's own validation rows give the within-store floor
        try:
            w_idx = _rows(store, "val", n, cfg.seed)
            x_within = store.rows(w_idx, site=site).float() if len(w_idx) >= 16 else None
        except InnardsError:
            x_within = None
        if x_within is None:
            notes.append("--acts has no validation split: no within-store floor")
    tick("load")

    # ---- generated and reconstructed sets
    samples = glp.sample(n, steps=cfg.steps, solver=cfg.solver, seed=cfg.seed, site=site, progress=cfg.progress).cpu().float()
    tick("glp_sample")
    gauss = gaussian_samples(mu_t, S_t, n, cfg.seed + 2)
    gflow = GaussianFlow(mu_t, S_t, glp.norm_mean[glp.site_index(site)].double().cpu().numpy(),
                         glp.norm_std[glp.site_index(site)].double().cpu().numpy())
    pca = PCARecon(mu_t, S_t, cfg.pca_k)
    if pca.k >= d:
        notes.append(f"--pca-k {cfg.pca_k} >= width {d}: the PCA baseline is the identity")
    x_pca = pca(x_val)
    x_proj = glp.project(x_val.to(device), **pj.kwargs(), seed=cfg.seed + 3, site=site).cpu().float()
    x_gproj = gflow.project(x_val, t_start=pj.t_start, steps=pj.steps, schedule=pj.schedule, seed=cfg.seed + 3).float()
    tick("baselines")

    sae, sae_info, x_sae = None, None, None
    if cfg.sae or cfg.train_sae:
        sae_dir = cfg.sae or str(quick_sae(cfg, site, store, out))
        sae = load_sae(sae_dir)
        if sae.d_in != d:
            raise InnardsError(f"the SAE in {sae_dir} has width {sae.d_in}, the site has {d}")
        trained_on = (sae.cfg.get("metadata") or {}).get("innards_site")
        if trained_on and trained_on != site:
            notes.append(f"the SAE was trained on '{trained_on}', evaluated here on '{site}'")
        x_sae = torch.cat([sae.reconstruct(x_val[i:i + 4096]) for i in range(0, n, 4096)]).float()
        # the SAE's error on the held-out set in use, whichever it is (--val-acts too)
        sae_info = {"path": str(sae_dir), "architecture": sae.architecture, "k": sae.k, "d_sae": sae.d_sae,
                    "trained_here": not cfg.sae, **heldout_metrics(sae, x_val)}
        tick("sae")
    else:
        notes.append("fd_sae/delta_lm_sae: no SAE given and --no-train-sae")

    model_rec = glp.meta.get("model")
    res: Result = {
        "glp": str(Path(cfg.glp).resolve()) if Path(cfg.glp).exists() else cfg.glp,  # type: ignore[arg-type]
        "acts": str(Path(cfg.acts).resolve()),  # type: ignore[arg-type]
        "val_acts": str(Path(cfg.val_acts).resolve()) if cfg.val_acts else None,
        "heldout": "val_acts store (all rows)" if cfg.val_acts else "validation documents of --acts",
        "model": model_rec.get("name") if isinstance(model_rec, dict) else model_rec,
        "site": site, "d": d, "n": n, "steps": cfg.steps, "solver": cfg.solver, "seed": cfg.seed,
        "glp_n_params": glp.n_params, "glp_training": {k: glp.meta.get("training", {}).get(k)
                                                       for k in ("activations", "val_loss", "train_loss", "step", "flops")},
        "pca_k": pca.k, "pca_explained_variance": pca.explained, "t_start": pj.t_start,
        "project_steps": pj.steps, "project_schedule": pj.schedule, "project_solver": pj.solver,
        "restats": cfg.restats,
    }
    # ---- Fréchet distances (held-out is always the reference set)
    bad = int((~torch.isfinite(samples).all(-1)).sum())
    res["glp_nonfinite_samples"] = bad
    if bad:
        notes.append(f"{bad} of {n} GLP samples hold NaN/inf: fd and c2st_auc_glp are not defined")
    res["fd"] = frechet_distance_from_moments(*moments(samples), mu_v, S_v) if not bad else None
    res["fd_floor"] = frechet_distance_from_moments(mu_t, S_t, mu_v, S_v)
    res["fd_floor_kind"] = ("corpus shift: train rows of --acts vs the --val-acts store, not a finite-sample floor"
                            if cfg.val_acts else "finite-sample floor: train vs validation documents of --acts")
    res["fd_floor_within_store"] = (frechet_distance(x_train, x_within) if x_within is not None
                                    else (res["fd_floor"] if not cfg.val_acts else None))
    res["fd_gaussian"] = frechet_distance(gauss, x_val)
    res["fd_pca"] = frechet_distance(x_pca, x_val)
    res["fd_sae"] = frechet_distance(x_sae, x_val) if x_sae is not None else None
    if x_sae is None:
        res["fd_sae_reason"] = "no SAE given (--sae) and SAE training switched off (--no-train-sae)"
    res["fd_glp_projection"] = frechet_distance(x_proj, x_val) if torch.isfinite(x_proj).all() else None
    res["fd_gaussian_projection"] = frechet_distance(x_gproj, x_val)
    res["sae"] = sae_info
    tick("fd")
    # ---- classifier two-sample tests
    if cfg.c2st:
        res["c2st_auc_floor"] = c2st_auc(x_val, x_train, seed=cfg.seed)
        if cfg.val_acts:
            res["c2st_auc_floor_within_store"] = c2st_auc(x_within, x_train, seed=cfg.seed) if x_within is not None else None
        res["c2st_auc_glp"] = c2st_auc(x_val, samples, seed=cfg.seed) if not bad else None
        res["c2st_auc_gaussian"] = c2st_auc(x_val, gauss, seed=cfg.seed)
        res["c2st_auc_pca"] = c2st_auc(x_val, x_pca, seed=cfg.seed)
        res["c2st_auc_glp_projection"] = c2st_auc(x_val, x_proj, seed=cfg.seed) if res["fd_glp_projection"] is not None else None
        res["c2st_auc_gaussian_projection"] = c2st_auc(x_val, x_gproj, seed=cfg.seed)
        if x_sae is not None:
            res["c2st_auc_sae"] = c2st_auc(x_val, x_sae, seed=cfg.seed)
        tick("c2st")
    else:
        res["c2st_auc_glp"] = res["c2st_auc_gaussian"] = None
    # ---- delta LM loss
    for key in ("lm_loss_clean", "delta_lm_glp", "delta_lm_gaussian", "delta_lm_sae", "delta_lm_pca", "delta_lm_mean"):
        res[key] = None
    res["delta_lm_model"] = None
    if cfg.delta_lm:
        res.update(_delta_lm(cfg, glp, gflow, site, store, vstore, vsplit, sae, pca, device, notes))
        tick("delta_lm")
    else:
        notes.append("delta LM losses switched off (--no-delta-lm)")
    res["notes"] = notes
    res["seconds"] = timing
    res["_samples"], res["_gauss"], res["_x_val"] = samples[torch.isfinite(samples).all(-1)], gauss, x_val
    return res


def _lm(cfg: EvalConfig, glp: GLP, device: torch.device, notes: list[str]) -> tuple[PreTrainedModel | None, str | None]:
    """The model of the delta LM loss: --model, else the GLP's own (a note, not an error, when it cannot be loaded)."""
    name = cfg.model.name or glp.source_model
    if not name:
        notes.append("delta LM losses need a model: the GLP records none, pass --model")
        return None, None
    kw = {"dtype": cfg.model.dtype, "device": str(device) if cfg.model.device else None, "revision": cfg.model.revision}
    if cfg.model.name:
        return load_model(name, **kw), name
    try:
        return load_model(name, **kw), name
    except InnardsError as e:
        notes.append(f"delta LM losses skipped: the GLP's recorded model '{name}' cannot be loaded ({e}); pass --model")
        return None, None


def _delta_lm(cfg: EvalConfig, glp: GLP, gflow: GaussianFlow, site: str, store: ActivationStore, vstore: ActivationStore,
              vsplit: str | None, sae: SparseAutoencoder | None, pca: PCARecon, device: torch.device,
              notes: list[str]) -> Result:
    model, name = _lm(cfg, glp, device, notes)
    if model is None:
        return {}
    width = store.width(site)
    glp.check_compatible(model, site, width)
    if model.get_output_embeddings() is None:
        notes.append(f"{name} has no LM head: no delta LM loss")
        return {}
    tok = model.tokenizer
    bos = tok.bos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id if tok.eos_token_id is not None else 0)
    rows = vstore.split_rows(vsplit)
    seqs = sequences_from_rows(vstore.doc_ids[rows], vstore.positions[rows], vstore.token_ids[rows], bos_id=bos,
                               max_len=cfg.context, max_docs=cfg.lm_docs, seed=cfg.seed)
    if not seqs:
        notes.append("no held-out document with at least 2 tokens: no delta LM loss")
        return {}
    mean = torch.as_tensor(store.stats(site)["mean"], dtype=torch.float32)
    pj = cfg.project
    calls = {"glp": 0, "gaussian": 0}

    def glp_fn(x: torch.Tensor) -> torch.Tensor:
        calls["glp"] += 1  # fresh, reproducible noise for every batch
        return glp.project(x.float(), **pj.kwargs(), seed=cfg.seed + 1000 + calls["glp"], site=site)

    def gauss_fn(x: torch.Tensor) -> torch.Tensor:
        calls["gaussian"] += 1
        return gflow.project(x.float(), t_start=pj.t_start, steps=pj.steps, schedule=pj.schedule,
                             seed=cfg.seed + 1000 + calls["gaussian"])

    reps = {"glp": glp_fn, "gaussian": gauss_fn, "pca": pca, "mean": lambda x: mean.to(x.device, x.dtype).expand_as(x)}
    if sae is not None:
        reps["sae"] = sae.reconstruct
    res = delta_lm_loss(model, site, seqs, reps, bos_id=bos, pad_id=pad, batch_size=cfg.lm_batch_size,
                        max_len=cfg.context, progress=cfg.progress)
    res["delta_lm_model"] = name
    res["delta_lm_note"] = ("mean over non-pad next-token predictions; *_padded: reference-compatible per-document "
                            f"mean over context - 1 = {cfg.context - 1} predictions with pad counted as 0; gaussian: "
                            "SDEdit with the exact flow of a Gaussian with the train mean and covariance")
    return res
