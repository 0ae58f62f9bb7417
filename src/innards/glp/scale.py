"""Compute scaling of GLP meta-models: a depth sweep, its compute-efficient envelope, a power-law fit.

Compute is counted as C = 6 * N_params * D (D = activations seen).  The envelope keeps, among all
checkpoints of all runs, those whose validation loss is below every checkpoint that used less
compute.  L(C) = E + A * C^-alpha is fitted to the envelope by least squares on log L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.ticker import LogFormatter
from scipy.optimize import curve_fit

from innards.config import at_least, diff, require, save_config, to_dict, within
from innards.data.store import ActivationStore
from innards.errors import InnardsError
from innards.glp.c2st import c2st_auc
from innards.glp.delta_lm import delta_lm_loss, sequences_from_rows
from innards.glp.model import GLP
from innards.glp.train import GLPOptimConfig, GLPTrainConfig, train_glp
from innards.io import read_json, write_json
from innards.models.load import load_model
from innards.run import Run, read_run, save_png
from innards.runtime import default_device


def envelope(compute: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """Indices (in increasing compute) of the points whose loss beats every point of smaller compute."""
    c = np.asarray(compute, dtype=np.float64)
    L = np.asarray(loss, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(L) & (c > 0))
    order = ok[np.lexsort((L[ok], c[ok]))]
    keep = []
    best = math.inf
    for i in order:
        if L[i] < best:
            keep.append(i)
            best = L[i]
    return np.asarray(keep, dtype=np.int64)


def power_law(C: float | np.ndarray | Sequence[float], E: float, A: float, alpha: float) -> np.ndarray:
    """L(C) = E + A * C^-alpha."""
    return E + A * np.power(np.asarray(C, dtype=np.float64), -alpha)


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> dict[str, Any]:
    """Fit L(C) = E + A*C^-alpha in log space; returns E, A, alpha, R^2 (log and linear space) and n."""
    C = np.asarray(compute, dtype=np.float64)
    L = np.asarray(loss, dtype=np.float64)
    if C.size < 3 or not (np.all(C > 0) and np.all(L > 0)):
        raise InnardsError(f"a power-law fit needs at least 3 points with positive compute and loss, got {C.size}")
    # C spans many decades: work with x = ln(C / C0) so that A stays O(loss) and the problem is well scaled
    C0 = float(np.exp(np.mean(np.log(C))))
    x = np.log(C / C0)
    y = np.log(L)
    Lmin = float(L.min())

    def model(x: np.ndarray, E: float, logB: float, alpha: float) -> np.ndarray:
        return np.log(E + np.exp(logB - alpha * x))

    # seed the optimiser from a grid over E: for each E the rest is a straight line in log-log
    best = None
    for frac in (0.0, 0.25, 0.5, 0.7, 0.85, 0.95, 0.99):
        E0 = frac * Lmin
        slope, icpt = np.polyfit(x, np.log(L - E0), 1)
        alpha0 = float(np.clip(-slope, 1e-3, 5.0))
        sse = float(np.sum((model(x, E0, icpt, alpha0) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, E0, float(icpt), alpha0)
    _, E0, logB0, alpha0 = best
    lo = [0.0, -50.0, 1e-6]
    hi = [Lmin * (1 - 1e-9), 50.0, 10.0]
    p0 = [min(max(E0, lo[0]), hi[0] * 0.999), logB0, min(max(alpha0, 1e-4), 9.9)]
    try:
        (E, logB, alpha), _ = curve_fit(model, x, y, p0=p0, bounds=(lo, hi), maxfev=20000)
    except (RuntimeError, ValueError) as e:
        raise InnardsError(f"power-law fit did not converge: {e}") from None
    # back to the C scale: A C^-alpha = exp(logB) (C/C0)^-alpha
    A = float(np.exp(logB) * C0 ** alpha)
    pred = power_law(C, E, A, alpha)
    r2_log = 1.0 - float(np.sum((np.log(pred) - y) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-300))
    r2_lin = 1.0 - float(np.sum((pred - L) ** 2) / max(np.sum((L - L.mean()) ** 2), 1e-300))
    return {"E": float(E), "A": A, "alpha": float(alpha), "r2": r2_log, "r2_linear": r2_lin, "n_points": int(C.size),
            "E_at_bound": bool(E <= 1e-12 or E >= hi[0] * 0.9999)}


# ----- the sweep --------------------------------------------------------------------------------------

@dataclass
class ScaleConfig:
    """Configuration of ``innards glp scale`` (and of :func:`scale`)."""

    acts: str | None = None
    """activation store folder (innards harvest)"""
    out: str = "runs/glp-scale"
    """output folder: one run per depth (d1/, d2/, ...), scale.json, scaling.png, downstream.png"""
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    """GLP depths of the sweep (comma-separated)"""
    tokens: int | None = None
    """activations per run (None: one pass over the store)"""
    batch_size: int = 4096
    """activations per optimiser step of every run"""
    optim: GLPOptimConfig = field(default_factory=GLPOptimConfig)
    """AdamW and its schedule for every run (the same as innards glp train's)"""
    d_model: int | None = None
    """model width of every run (None: 2 x activation width)"""
    d_mlp: int | None = None
    """SwiGLU width of every run (None: 4 x activation width)"""
    checkpoints: int = 12
    """log-spaced checkpoints per run (the points of the scaling plot)"""
    fit_from: float = 0.01
    """checkpoints before this fraction of their run (the warm-up plateau) are drawn but not fitted"""
    val_rows: int = 16384
    """held-out activations for the validation loss (the same rows and noise for every run)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast or fp32 (see innards glp train)"""
    seed: int = 0
    """seed of every run and of the downstream evaluations"""
    device: str | None = None
    """training device (None: cuda if available, else cpu)"""
    model: str | None = None
    """language model for delta_lm_glp of the envelope checkpoints"""
    downstream: bool = True
    """measure c2st_auc_glp (and delta_lm_glp with --model) on the envelope checkpoints"""
    eval_n: int = 2000
    """held-out activations and samples per downstream C2ST"""
    eval_steps: int = 32
    """sampler steps for the downstream C2ST samples"""
    eval_solver: Literal["euler", "heun"] = "heun"
    """sampler for the downstream C2ST samples"""
    lm_docs: int = 64
    """held-out documents for the downstream delta LM loss"""
    context: int = 128
    """tokens per held-out sequence for the downstream delta LM loss"""
    overwrite: bool = False
    """retrain runs whose settings differ from a previous sweep in --out"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        require(bool(self.depths) and min(self.depths) >= 1, f"--depths must list positive depths, e.g. 1,2,3,6; got {self.depths}")
        at_least(self, 1, "tokens", "batch_size", "d_model", "d_mlp", "eval_n", "eval_steps", "lm_docs")
        at_least(self, 2, "checkpoints", "context")
        at_least(self, 0, "val_rows")
        within(self, "fit_from", 0.0, 1.0, open_hi=True)


# settings that only change the analysis of finished runs, not the runs
ANALYSIS = {"fit_from", "model", "downstream", "eval_n", "eval_steps", "eval_solver", "lm_docs", "context", "device"}


def _train_cfg(cfg: ScaleConfig, depth: int, run: Path) -> GLPTrainConfig:
    return GLPTrainConfig(acts=cfg.acts, out=str(run), depth=depth, d_model=cfg.d_model, d_mlp=cfg.d_mlp,
                          tokens=cfg.tokens, batch_size=cfg.batch_size, optim=cfg.optim, checkpoints=cfg.checkpoints,
                          val_rows=cfg.val_rows, precision=cfg.precision, seed=cfg.seed, device=cfg.device,
                          progress=cfg.progress, overwrite=cfg.overwrite)


def _run_depth(cfg: ScaleConfig, depth: int, run: Path) -> None:
    """Train one run of the sweep: a finished run with the same settings is reused, a cut one resumed."""
    tcfg = _train_cfg(cfg, depth, run)
    rec = read_run(run)
    tcfg.resume = rec is not None and rec.get("status") == "running" and not cfg.overwrite
    train_glp(tcfg)


def _checkpoints(run: Path) -> list[dict[str, Any]]:
    pts = []
    for ck in sorted((run / "checkpoints").glob("step_*")):
        if not (ck / "config.json").is_file():
            continue
        info = read_json(ck / "config.json", what="GLP checkpoint config")
        tr = info.get("training") or {}
        n_params = int(tr.get("n_params") or info.get("n_params"))
        d = int(tr.get("activations") or 0)
        loss = tr.get("val_loss")
        pts.append({"dir": str(ck), "step": int(tr.get("step") or int(ck.name.split("_")[-1])),
                    "total_steps": tr.get("total_steps"), "activations": d, "n_params": n_params,
                    "compute": 6.0 * n_params * d, "val_loss": loss, "train_loss": tr.get("train_loss")})
    return pts


def scale(cfg: ScaleConfig) -> dict[str, Any]:
    """Train the depth sweep, fit L(C) = E + A C^-alpha to the envelope, draw the plots; writes scale.json."""
    if not cfg.acts:
        raise InnardsError("give --acts DIR (an activation store)")
    if not Path(cfg.acts).exists():
        raise InnardsError(f"activation store not found: {cfg.acts}")
    out = Path(cfg.out)
    saved = read_run(out)
    with Run.open(out, "scale", cfg, inputs={"acts": cfg.acts}, overwrite=cfg.overwrite, always_resume=True,
                  free=ANALYSIS) as run:
        if run.state == "complete" and saved is not None and _same(out, cfg):
            run.say_complete()
            return read_json(out / "scale.json", what="scaling result")
        save_config(cfg, out)
        res = _sweep(cfg, out, sorted(set(cfg.depths)))
        fit = res["fit"]
        run.complete(headline={k: fit[k] for k in ("E", "A", "alpha", "r2")} if fit else {},
                     outputs=["scale.json", *[Path(v).name for v in res["plots"].values()]])
        return res


def _same(out: Path, cfg: ScaleConfig) -> bool:
    """Whether the finished sweep in ``out`` was made with exactly these settings (analysis included)."""
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return not diff(saved or {}, to_dict(cfg), {"out", "progress", "overwrite"}) and (out / "scale.json").is_file()


def _sweep(cfg: ScaleConfig, out: Path, depths: list[int]) -> dict[str, Any]:
    runs = []
    for depth in depths:
        run = out / f"d{depth}"
        _run_depth(cfg, depth, run)
        pts = _checkpoints(run)
        if not pts:
            raise InnardsError(f"run {run} wrote no checkpoints")
        runs.append({"depth": depth, "dir": str(run), "n_params": pts[-1]["n_params"], "checkpoints": pts})
    notes = []
    flat = [(r["depth"], p) for r in runs for p in r["checkpoints"]]
    if any(p["val_loss"] is None for _, p in flat):
        notes.append("some checkpoints have no validation loss (no validation split?): their train loss is used")
    loss = [p["val_loss"] if p["val_loss"] is not None else p["train_loss"] for _, p in flat]
    comp = [p["compute"] for _, p in flat]
    # the first steps sit on the loss plateau of the initialisation, which no power law of compute describes
    early = [bool(p.get("total_steps")) and p["step"] < cfg.fit_from * p["total_steps"] for _, p in flat]
    env = envelope(comp, [float("nan") if v is None or e else v for v, e in zip(loss, early)])
    on_env = set(env.tolist())
    for i, (_, p) in enumerate(flat):
        p["loss"] = loss[i]
        p["early"] = early[i]
        p["on_envelope"] = i in on_env
    if any(early):
        notes.append(f"{sum(early)} checkpoints before {cfg.fit_from:.0%} of their run are left out of the envelope and fit")
    env_pts = [{"depth": flat[i][0], **{k: flat[i][1][k] for k in ("step", "activations", "n_params", "compute", "loss", "dir")}}
               for i in env]
    try:
        fit = fit_power_law([p["compute"] for p in env_pts], [p["loss"] for p in env_pts])
    except InnardsError as e:
        fit = None
        notes.append(f"no fit: {e}")
    if fit and fit["E_at_bound"]:
        notes.append("the fitted E sits on its bound (0 or the lowest loss): the envelope does not pin down the "
                     "irreducible loss; train longer or larger runs before trusting E and alpha")
    res: dict[str, Any] = {"acts": str(Path(cfg.acts).resolve()), "depths": depths, "runs": runs,
                           "envelope": env_pts, "fit": fit, "law": "L(C) = E + A * C^-alpha, C = 6 * N_params * D",
                           "notes": notes}
    res["plots"] = {"scaling": str(plot_scaling(res, out / "scaling.png"))}
    if cfg.downstream and env_pts:
        res["downstream"] = _downstream(cfg, env_pts, notes)
        res["plots"]["downstream"] = str(plot_downstream(res["downstream"], out / "downstream.png"))
    write_json(out / "scale.json", res)
    if fit:
        print(f"L(C) = {fit['E']:.4g} + {fit['A']:.4g} * C^-{fit['alpha']:.4g}   (R^2 = {fit['r2']:.4f}, "
              f"{fit['n_points']} envelope points)")
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out / 'scale.json'}")
    return res


def _downstream(cfg: ScaleConfig, env_pts: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """c2st_auc_glp (and delta_lm_glp with a model) of every envelope checkpoint."""
    store = ActivationStore(cfg.acts)
    device = default_device(cfg.device)
    try:
        rows = store.split_rows("val")
    except InnardsError:
        notes.append("no validation split: downstream metrics skipped")
        return []
    idx = np.sort(np.random.default_rng(cfg.seed).choice(rows, size=min(cfg.eval_n, rows.size), replace=False))
    model = seqs = None
    first = GLP.from_pretrained(env_pts[0]["dir"])
    site = first.meta["site"]
    x_val = store.rows(idx, site=site).float()
    if cfg.model:
        model = load_model(cfg.model, device=str(device) if cfg.device else None)
        first.check_compatible(model, site, store.width(site))
        tok = model.tokenizer
        seqs = sequences_from_rows(store.doc_ids[rows], store.positions[rows], store.token_ids[rows],
                                   bos_id=tok.bos_token_id, max_len=cfg.context, max_docs=cfg.lm_docs, seed=cfg.seed)
    else:
        notes.append("delta_lm_glp of the envelope checkpoints needs --model")
    out = []
    for p in env_pts:
        glp = GLP.from_pretrained(p["dir"], device=device)
        s = glp.sample(x_val.shape[0], steps=cfg.eval_steps, solver=cfg.eval_solver, seed=cfg.seed, site=site).cpu()
        rec = {"depth": p["depth"], "step": p["step"], "loss": p["loss"], "compute": p["compute"],
               "c2st_auc_glp": c2st_auc(x_val, s, seed=cfg.seed), "delta_lm_glp": None}
        if model is not None and seqs:
            tok = model.tokenizer
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            fn = lambda x, g=glp: g.project(x.float(), t_start=0.5, steps=20, seed=cfg.seed, site=site)  # noqa: E731
            d = delta_lm_loss(model, site, seqs, {"glp": fn}, bos_id=tok.bos_token_id, pad_id=pad, max_len=cfg.context,
                              progress=False)
            rec.update(delta_lm_glp=d["delta_lm_glp"], delta_lm_glp_se=d["delta_lm_glp_se"], lm_loss_clean=d["lm_loss_clean"])
        out.append(rec)
    return out


def plot_scaling(res: dict[str, Any], path: Path) -> Path:
    """Log-log validation loss vs compute for every checkpoint, the envelope and the fitted law."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    cmap = plt.get_cmap("viridis")
    runs = res["runs"]
    for i, r in enumerate(runs):
        pts = [p for p in r["checkpoints"] if p.get("loss") is not None and p["compute"] > 0]
        color = cmap(i / max(1, len(runs) - 1))
        ax.plot([p["compute"] for p in pts], [p["loss"] for p in pts], "-", lw=1, color=color)
        late = [p for p in pts if not p.get("early")]
        ax.plot([p["compute"] for p in late], [p["loss"] for p in late], "o", ms=3, color=color,
                label=f"d{r['depth']} ({r['n_params'] / 1e6:.3g}M params)")
        early = [p for p in pts if p.get("early")]
        if early:
            ax.plot([p["compute"] for p in early], [p["loss"] for p in early], "x", ms=4, color=color, alpha=0.6)
    env = res["envelope"]
    if env:
        ax.plot([p["compute"] for p in env], [p["loss"] for p in env], "o", mfc="none", mec="k", ms=7, label="envelope")
    fit = res.get("fit")
    if fit and env:
        c = np.geomspace(min(p["compute"] for p in env), max(p["compute"] for p in env) * 3, 200)
        ax.plot(c, power_law(c, fit["E"], fit["A"], fit["alpha"]), "k--", lw=1.2,
                label=f"{fit['E']:.3g} + {fit['A']:.3g} C^-{fit['alpha']:.3g} (R²={fit['r2']:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("compute C = 6 N D (FLOPs)")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    return save_png(path, fig)


def plot_downstream(points: list[dict[str, Any]], path: Path) -> Path:
    """c2st_auc_glp and delta_lm_glp against validation loss for the envelope checkpoints."""
    keys = [("c2st_auc_glp", "C2ST AUC (0.5 = indistinguishable)"), ("delta_lm_glp", "delta LM loss (GLP projection)")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (k, label) in zip(axes, keys):
        pts = [p for p in points if p.get(k) is not None and p.get("loss") is not None]
        if pts:
            sc = ax.scatter([p["loss"] for p in pts], [p[k] for p in pts], c=[p["depth"] for p in pts], cmap="viridis")
            fig.colorbar(sc, ax=ax, label="depth")
        else:
            ax.text(0.5, 0.5, "not measured (needs --model)" if k == "delta_lm_glp" else "not measured",
                    ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("validation loss")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.25)
    fig.suptitle("envelope checkpoints")
    fig.tight_layout()
    return save_png(path, fig)
