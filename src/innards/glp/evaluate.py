"""Honest evaluation of a GLP meta-model against held-out activations, the finite-sample floor and baselines.

Fréchet distance (FD) sees only the first two moments, so it is reported next to the two numbers
that make it readable: the floor (train vs held-out real activations, same N) and a Gaussian with
the train mean and covariance (which an FD cannot tell from the data).  The classifier two-sample
test (C2ST AUC, 0.5 = indistinguishable) sees more.  With a model, the delta LM loss measures what
replacing the site's activations by each reconstruction costs the LM on held-out text.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from innards.errors import InnardsError


@dataclass
class EvalConfig:
    """Configuration of ``innards glp eval`` (and of :func:`evaluate_glp`)."""

    glp: str | None = None
    """GLP folder (innards glp train)"""
    acts: str | None = None
    """activation store the GLP was trained on (train split: floor and baselines; val split: held-out)"""
    out: str = "glp_eval.json"
    """output JSON file (a PNG and the resolved config are written next to it)"""
    model: str | None = None
    """language model for the delta LM loss (must be the one the store was harvested from)"""
    site: str | None = None
    """site to evaluate (default: the GLP's only site)"""
    n: int = 10000
    """activations per set (held-out, train, GLP samples, Gaussian samples)"""
    sae: str | None = None
    """SAELens-format SAE folder for the SAE baseline (default: train a TopK SAE on the store)"""
    pca_k: int = 32
    """components of the PCA baseline (default 32, the SAE's k: equal active coefficients)"""
    val_acts: str | None = None
    """a separate store of held-out activations (default: the validation documents of --acts)"""
    steps: int = 1000
    """sampler steps for the GLP samples"""
    solver: Literal["euler", "heun"] = "euler"
    seed: int = 42
    t_start: float = 0.5
    """SDEdit start time of the GLP projection (delta LM loss, projection FD)"""
    project_steps: int = 20
    """grid points of the projection (exact schedule: project_steps - 1 evaluations)"""
    project_schedule: Literal["exact", "grid"] = "exact"
    """exact (paper) or grid (reference code: t = 0.474 for t_start 0.5, 20 steps)"""
    c2st: bool = True
    """run the classifier two-sample tests"""
    lm_docs: int = 256
    """held-out documents for the delta LM loss"""
    max_len: int = 128
    """tokens per held-out sequence (BOS included) for the delta LM loss"""
    lm_batch_size: int = 16
    sae_k: int = 32
    sae_latents: str = "8*d"
    sae_tokens: int | None = None
    """activations for the SAE trained when --sae is not given (default: one pass, at most 4M)"""
    train_sae: bool = True
    """train a TopK SAE when --sae is not given (otherwise the SAE baseline is skipped)"""
    model_dtype: str = "fp32"
    device: str | None = None
    plot: bool = True
    progress: bool = True


# ----- small pieces ------------------------------------------------------------------------------------

def _rows(store: Any, split: str | None, n: int, seed: int) -> np.ndarray:
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
    """PNG: real vs each generated set on the top-2 principal components of the real set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from innards.io import atomic_write_bytes

    r = real.double()
    mu = r.mean(0)
    _, _, Vh = torch.linalg.svd(r - mu, full_matrices=False)
    P = Vh[:2].T
    proj = lambda x: ((x.double() - mu) @ P).numpy()  # noqa: E731
    pr = proj(r)
    fig, axes = plt.subplots(1, len(others), figsize=(5 * len(others), 4.6), squeeze=False)
    m = min(len(pr), 5000)
    for ax, (name, x) in zip(axes[0], others.items()):
        po = proj(x)
        ax.scatter(pr[:m, 0], pr[:m, 1], s=2, alpha=0.35, label="real (held-out)", color="tab:blue")
        ax.scatter(po[:m, 0], po[:m, 1], s=2, alpha=0.35, label=name, color="tab:orange")
        ax.set_xlabel("PC 1 (of real)")
        ax.set_ylabel("PC 2 (of real)")
        ax.set_title(f"real vs {name}")
        ax.legend(markerscale=5, loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def format_table(res: dict[str, Any]) -> str:
    """A readable summary table of an evaluation result."""
    lines = [f"GLP evaluation  site={res.get('site')}  n={res.get('n')}  d={res.get('d')}", ""]
    lines.append(f"{'Fréchet distance (raw scale)':<36}{'value':>12}{'/ floor':>10}")
    floor = res.get("fd_floor")
    for key, label in [("fd_floor", "floor: train vs held-out"), ("fd", "GLP samples"),
                       ("fd_gaussian", "Gaussian (train mean, cov)"), ("fd_pca", f"PCA-{res.get('pca_k')} reconstruction"),
                       ("fd_sae", "SAE reconstruction"), ("fd_glp_projection", f"GLP projection (t={res.get('t_start')})")]:
        v = res.get(key)
        ratio = v / floor if isinstance(v, (int, float)) and floor else None
        lines.append(f"  {label:<34}{_fmt(v):>12}{_fmt(ratio):>10}")
    if any(k.startswith("c2st_auc") for k in res):
        lines += ["", f"{'C2ST ROC-AUC (0.5 = indistinguishable)':<36}{'value':>12}"]
        for key, label in [("c2st_auc_floor", "train vs held-out"), ("c2st_auc_glp", "GLP samples"),
                           ("c2st_auc_gaussian", "Gaussian"), ("c2st_auc_pca", "PCA reconstruction"),
                           ("c2st_auc_sae", "SAE reconstruction")]:
            if key in res:
                lines.append(f"  {label:<34}{_fmt(res[key]):>12}")
    if res.get("lm_loss_clean") is not None:
        lines += ["", f"{'delta LM loss (non-pad tokens)':<36}{'value':>12}{'+- se':>10}{'padded':>10}",
                  f"  {'clean LM loss':<34}{_fmt(res['lm_loss_clean']):>12}"]
        for name in ("glp", "sae", "pca", "mean"):
            if res.get(f"delta_lm_{name}") is not None:
                lines.append(f"  {name:<34}{_fmt(res[f'delta_lm_{name}']):>12}{_fmt(res.get(f'delta_lm_{name}_se')):>10}"
                             f"{_fmt(res.get(f'delta_lm_{name}_padded')):>10}")
    if res.get("notes"):
        lines += [""] + [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


# ----- the evaluation ---------------------------------------------------------------------------------

def _open_store(path: str | None, what: str) -> Any:
    from innards.data.store import ActivationStore

    if not path:
        raise InnardsError(f"give --{what} DIR (an activation store)")
    if not Path(path).exists():
        raise InnardsError(f"activation store not found: {path}")
    return ActivationStore(path)


def _check_store(glp: Any, store: Any, site: str, what: str) -> None:
    if site not in store.sites:
        raise InnardsError(f"the GLP models site '{site}', which is not in the {what} store {store.path} "
                           f"(it has {', '.join(store.sites)})")
    model = (store.manifest or {}).get("model")
    if model:
        glp.check_compatible(model, site, store.width(site))
    elif store.width(site) != glp.config.d_in:
        raise InnardsError(f"the GLP models width {glp.config.d_in}, the {what} store has width {store.width(site)}")


def _quick_sae(cfg: EvalConfig, site: str, out_json: Path) -> Path:
    from innards.sae.train import SAETrainConfig, train_sae

    store = _open_store(cfg.acts, "acts")
    n_train = len(store.split_rows("train"))
    tokens = cfg.sae_tokens if cfg.sae_tokens is not None else min(n_train, 4_000_000)
    out = out_json.with_name(out_json.stem + "_sae")
    return train_sae(SAETrainConfig(acts=cfg.acts, out=str(out), site=site, k=cfg.sae_k, latents=cfg.sae_latents,
                                    # small budgets get small batches, so the SAE still takes hundreds of steps
                                    tokens=tokens, batch_size=max(64, min(4096, n_train, tokens // 500)),
                                    seed=cfg.seed, device=cfg.device,
                                    overwrite=True, progress=cfg.progress))


def evaluate_glp(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation, print a table, write the JSON (and a PCA plot) to ``cfg.out``; returns the result."""
    from innards.config import save_config
    from innards.glp.c2st import c2st_auc
    from innards.glp.fd import frechet_distance, frechet_distance_from_moments, moments
    from innards.glp.model import GLP
    from innards.io import write_json
    from innards.runtime import default_device

    if not cfg.glp:
        raise InnardsError("give --glp DIR (a GLP folder)")
    if cfg.n < 16:
        raise InnardsError(f"-n must be at least 16, got {cfg.n}")
    if cfg.steps < 1 or cfg.project_steps < 1:
        raise InnardsError("--steps and --project-steps must be at least 1")
    out = Path(cfg.out)
    if out.suffix.lower() != ".json":
        raise InnardsError(f"--out must name a .json file, got {out}")
    device = default_device(cfg.device)
    glp = GLP.from_pretrained(cfg.glp, device=device)
    sites = glp.meta.get("sites") or []
    site = cfg.site or (sites[0] if len(sites) == 1 else None)
    if site is None:
        raise InnardsError(f"this GLP models several sites ({', '.join(sites)}); choose one with --site")
    if site not in sites:
        raise InnardsError(f"this GLP was trained on {', '.join(sites)}, not '{site}'")
    store = _open_store(cfg.acts, "acts")
    _check_store(glp, store, site, "--acts")
    vstore, vsplit = store, "val"
    if cfg.val_acts:
        vstore, vsplit = _open_store(cfg.val_acts, "val-acts"), None
        _check_store(glp, vstore, site, "--val-acts")
    d = glp.config.d_in
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
    tick("load")

    # ---- generated and reconstructed sets
    samples = glp.sample(n, steps=cfg.steps, solver=cfg.solver, seed=cfg.seed, site=site,
                         progress=cfg.progress).cpu().float()
    tick("glp_sample")
    gauss = gaussian_samples(mu_t, S_t, n, cfg.seed + 2)
    pca = PCARecon(mu_t, S_t, cfg.pca_k)
    if pca.k >= d:
        notes.append(f"--pca-k {cfg.pca_k} >= width {d}: the PCA baseline is the identity")
    x_pca = pca(x_val)
    x_proj = glp.project(x_val.to(device), t_start=cfg.t_start, steps=cfg.project_steps, schedule=cfg.project_schedule,
                         seed=cfg.seed + 3, site=site).cpu().float()
    tick("baselines")

    sae, sae_info, x_sae = None, None, None
    if cfg.sae or cfg.train_sae:
        from innards.sae.load import load_sae
        from innards.sae.train import evaluate_sae

        sae_dir = Path(cfg.sae) if cfg.sae else _quick_sae(cfg, site, out)
        sae = load_sae(sae_dir)
        if sae.d_in != d:
            raise InnardsError(f"the SAE in {sae_dir} has width {sae.d_in}, the site has {d}")
        trained_on = (sae.cfg.get("metadata") or {}).get("innards_site")
        if trained_on and trained_on != site:
            notes.append(f"the SAE was trained on '{trained_on}', evaluated here on '{site}'")
        x_sae = torch.cat([sae.reconstruct(x_val[i:i + 4096]) for i in range(0, n, 4096)]).float()
        sae_info = {"path": str(sae_dir), "architecture": sae.architecture, "k": sae.k, "d_sae": sae.d_sae,
                    "trained_here": not cfg.sae}
        if vsplit == "val":
            sae_info.update(evaluate_sae(sae, store, site, n, cfg.seed))
        tick("sae")
    else:
        notes.append("fd_sae/delta_lm_sae: no SAE given and --no-train-sae")

    res: dict[str, Any] = {
        "glp": str(Path(cfg.glp).resolve()), "acts": str(Path(cfg.acts).resolve()),
        "val_acts": str(Path(cfg.val_acts).resolve()) if cfg.val_acts else None,
        "heldout": "val_acts store (all rows)" if cfg.val_acts else "validation documents of --acts",
        "model": (glp.meta.get("model") or {}).get("name") if isinstance(glp.meta.get("model"), dict) else glp.meta.get("model"),
        "site": site, "d": d, "n": n, "steps": cfg.steps, "solver": cfg.solver, "seed": cfg.seed,
        "glp_n_params": glp.n_params, "glp_training": {k: glp.meta.get("training", {}).get(k)
                                                       for k in ("activations", "val_loss", "train_loss", "step", "flops")},
        "pca_k": pca.k, "pca_explained_variance": pca.explained, "t_start": cfg.t_start,
        "project_steps": cfg.project_steps, "project_schedule": cfg.project_schedule,
    }
    # ---- Fréchet distances (held-out is always the reference set)
    bad = int((~torch.isfinite(samples).all(-1)).sum())
    res["glp_nonfinite_samples"] = bad
    if bad:
        notes.append(f"{bad} of {n} GLP samples hold NaN/inf: fd and c2st_auc_glp are not defined")
    res["fd"] = frechet_distance_from_moments(*moments(samples), mu_v, S_v) if not bad else None
    res["fd_floor"] = frechet_distance_from_moments(mu_t, S_t, mu_v, S_v)
    res["fd_gaussian"] = frechet_distance(gauss, x_val)
    res["fd_pca"] = frechet_distance(x_pca, x_val)
    res["fd_sae"] = frechet_distance(x_sae, x_val) if x_sae is not None else None
    if x_sae is None:
        res["fd_sae_reason"] = "no SAE given (--sae) and SAE training switched off (--no-train-sae)"
    res["fd_glp_projection"] = frechet_distance(x_proj, x_val) if torch.isfinite(x_proj).all() else None
    res["sae"] = sae_info
    tick("fd")
    # ---- classifier two-sample tests
    if cfg.c2st:
        res["c2st_auc_floor"] = c2st_auc(x_val, x_train, seed=cfg.seed)
        res["c2st_auc_glp"] = c2st_auc(x_val, samples, seed=cfg.seed) if not bad else None
        res["c2st_auc_gaussian"] = c2st_auc(x_val, gauss, seed=cfg.seed)
        res["c2st_auc_pca"] = c2st_auc(x_val, x_pca, seed=cfg.seed)
        if x_sae is not None:
            res["c2st_auc_sae"] = c2st_auc(x_val, x_sae, seed=cfg.seed)
        tick("c2st")
    else:
        res["c2st_auc_glp"] = res["c2st_auc_gaussian"] = None
    # ---- delta LM loss
    for key in ("lm_loss_clean", "delta_lm_glp", "delta_lm_sae", "delta_lm_pca", "delta_lm_mean"):
        res[key] = None
    if cfg.model:
        res.update(_delta_lm(cfg, glp, site, store, vstore, vsplit, sae, pca, device, notes))
        tick("delta_lm")
    else:
        notes.append("delta LM losses need --model")
    res["notes"] = notes
    res["seconds"] = timing
    # ---- outputs
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.plot:
        sets = {"GLP samples": samples[torch.isfinite(samples).all(-1)], "Gaussian": gauss}
        png = pca_plot(x_val, sets, out.with_name(out.stem + "_pca.png"),
                       title=f"{res['model']} {site}: FD GLP {_fmt(res['fd'])}, Gaussian {_fmt(res['fd_gaussian'])}, "
                             f"floor {_fmt(res['fd_floor'])}")
        res["plot"] = str(png)
    write_json(out, res)
    save_config(cfg, out.parent, name=out.stem + ".config.yaml")
    print(format_table(res))
    print(f"wrote {out}")
    return res


def _delta_lm(cfg: EvalConfig, glp: Any, site: str, store: Any, vstore: Any, vsplit: str | None, sae: Any,
              pca: PCARecon, device: torch.device, notes: list[str]) -> dict[str, Any]:
    from innards.glp.delta_lm import delta_lm_loss, sequences_from_rows
    from innards.models.load import load_model

    model = load_model(cfg.model, dtype=cfg.model_dtype, device=str(device) if cfg.device else None)
    width = store.width(site)
    glp.check_compatible(model, site, width)
    if not hasattr(model, "lm_head") and not hasattr(model, "get_output_embeddings"):
        notes.append("delta LM losses need a language model with an LM head")
        return {}
    if model.get_output_embeddings() is None:
        notes.append(f"{cfg.model} has no LM head: no delta LM loss")
        return {}
    tok = model.tokenizer
    bos = tok.bos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id if tok.eos_token_id is not None else 0)
    rows = vstore.split_rows(vsplit)
    seqs = sequences_from_rows(vstore.doc_ids[rows], vstore.positions[rows], vstore.token_ids[rows], bos_id=bos,
                               max_len=cfg.max_len, max_docs=cfg.lm_docs, seed=cfg.seed)
    if not seqs:
        notes.append("no held-out document with at least 2 tokens: no delta LM loss")
        return {}
    mean = torch.as_tensor(store.stats(site)["mean"], dtype=torch.float32)
    calls = {"n": 0}

    def glp_fn(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # fresh, reproducible noise for every batch
        return glp.project(x.float(), t_start=cfg.t_start, steps=cfg.project_steps, schedule=cfg.project_schedule,
                           seed=cfg.seed + 1000 + calls["n"], site=site)

    reps = {"glp": glp_fn, "pca": pca, "mean": lambda x: mean.to(x.device, x.dtype).expand_as(x)}
    if sae is not None:
        reps["sae"] = sae.reconstruct
    res = delta_lm_loss(model, site, seqs, reps, bos_id=bos, pad_id=pad, batch_size=cfg.lm_batch_size,
                        max_len=cfg.max_len, progress=cfg.progress)
    res["delta_lm_note"] = ("mean over non-pad next-token predictions; *_padded: reference-compatible per-document "
                            f"mean over max_len - 1 = {cfg.max_len - 1} predictions with pad counted as 0")
    return res
