"""Evaluation of a decomposition: CE/KL (or MSE for toys) under each mask type and a fresh adversary,
L0 and alive counts per matrix, Δ-L2, the log mean-CI spectrum, and ground truth for toys."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from innards.config import at_least, require
from innards.errors import InnardsError
from innards.io import atomic_write_bytes, read_json, write_json
from innards.runlog import read_metrics
from innards.train.checkpoint import current_checkpoint
from innards.vpd.adversary import fresh_pgd
from innards.vpd.data import TokenPool, ToyData
from innards.vpd.ground_truth import ground_truth
from innards.vpd.losses import divergence
from innards.vpd.masks import constant_masks, stochastic_masks
from innards.vpd.run import Built, ci_values, load_run, read_meta

STRATEGIES = ["unmasked", "stochastic", "ci", "rounded", "random", "zero"]


@dataclass
class EvalConfig:
    """innards vpd eval: evaluate a run folder."""

    run: str = ""
    """run folder of innards vpd train"""
    out: str | None = None
    """JSON path (None: RUN/eval.json)"""
    batches: int = 0
    """evaluation batches (0: the run's eval_batches)"""
    batch_size: int = 0
    """batch size (0: the run's eval_batch_size, else its batch_size)"""
    pgd_steps: int = -1
    """fresh-PGD steps (-1: the run's adversary.eval_steps)"""
    pgd_step_size: float = -1.0
    """fresh-PGD step size (-1: the run's adversary.eval_step_size)"""
    threshold: float = -1.0
    """CI threshold for L0 and rounded masks (-1: the run's ci_threshold)"""
    seed: int = 1234
    """seed of the evaluation batches and masks"""
    model: str | None = None
    """load the target from here instead (must be the same model)"""
    device: str | None = None
    """torch device (None: the run's)"""
    png: bool = True
    """also write the CI spectrum PNG"""

    def __post_init__(self) -> None:
        at_least(self, 0, "batches", "batch_size")
        at_least(self, -1, "pgd_steps")
        require(self.pgd_step_size == -1 or self.pgd_step_size > 0,
                f"--pgd-step-size must be positive (or -1: the run's), got {self.pgd_step_size}")
        require(self.threshold == -1 or 0 <= self.threshold <= 1,
                f"--threshold must be in [0, 1] (or -1: the run's), got {self.threshold}")


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def evaluate_built(b: Built, data: ToyData | TokenPool, n_batches: int, batch_size: int, pgd_steps: int, pgd_step_size: float,
                   threshold: float, seed: int = 1234, progress: bool = False) -> dict[str, Any]:
    """All metrics for a built decomposition on ``n_batches`` evaluation batches."""
    cfg = b.cfg
    lm = cfg.target.kind == "lm"
    kind = cfg.loss_kind
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    ci_sum = {c.name: torch.zeros(c.C, dtype=torch.float64) for c in b.decomp.components}
    ci_max = {c.name: torch.zeros(c.C) for c in b.decomp.components}
    l0 = {c.name: 0.0 for c in b.decomp.components}
    n_pos = 0
    pgd_traces = []

    def add(k: str, v: float) -> None:
        sums[k] = sums.get(k, 0.0) + float(v)

    for _ in tqdm(range(n_batches), desc="vpd eval", disable=not progress, leave=False):
        x = data.eval_batch(batch_size, gen)
        with torch.no_grad():
            clean, inputs = b.decomp.clean(x)
            g, _ = ci_values(b, inputs)
            g = {n: v.detach() for n, v in g.items()}
            if lm:
                add("ce_target", _ce(clean, x))
            outs = {}
            for s in STRATEGIES:
                if s == "stochastic":
                    masks = stochastic_masks(g, gen, cfg.use_delta, "all")
                else:
                    masks = constant_masks(g, s, threshold, gen)
                outs[s] = b.decomp.masked(x, masks)
            if cfg.objective == "vpd":
                outs["stochastic_subset"] = b.decomp.masked(x, stochastic_masks(g, gen, cfg.use_delta, cfg.routing))
        with torch.enable_grad():
            final, trace = fresh_pgd(b.decomp, x, clean, g, kind, pgd_steps, pgd_step_size, cfg.use_delta, gen,
                                     return_trace=True)
        pgd_traces.append(trace)
        with torch.no_grad():
            for s, o in outs.items():
                if lm:
                    add(f"ce_{s}", _ce(o, x))
                    add(f"kl_{s}", divergence(clean, o, "kl"))
                else:
                    add(f"mse_{s}", divergence(clean, o, "mse"))
            add("kl_adversarial" if lm else "mse_adversarial", final)
            for n, gn in g.items():
                flat = gn.reshape(-1, gn.shape[-1]).float().cpu()
                ci_sum[n] += flat.double().sum(0)
                ci_max[n] = torch.maximum(ci_max[n], flat.max(0).values)
                l0[n] += float((flat > threshold).sum(1).float().mean())
            n_pos += next(iter(g.values()))[..., 0].numel()
    res: dict[str, Any] = {k: v / n_batches for k, v in sums.items()}
    if lm:
        # the adversary's CE is not recomputed in fresh PGD; report the KL it reached
        ce_t, ce_z = res["ce_target"], res["ce_zero"]
        res["ce_unrecovered"] = {s: (res[f"ce_{s}"] - ce_t) / (ce_z - ce_t) if ce_z != ce_t else float("nan")
                                 for s in STRATEGIES + (["stochastic_subset"] if "ce_stochastic_subset" in res else [])}
    mean_ci = {n: (ci_sum[n] / n_pos).float() for n in ci_sum}
    res["l0"] = {n: v / n_batches for n, v in l0.items()}
    res["l0_total"] = sum(res["l0"].values())
    res["alive"] = {n: int((mean_ci[n] > 1e-6).sum()) for n in mean_ci}
    res["dead"] = {c.name: c.C - res["alive"][c.name] for c in b.decomp.components}
    res["alive_total"] = sum(res["alive"].values())
    res["C"] = {c.name: c.C for c in b.decomp.components}
    res["delta_l2"] = float(b.decomp.delta_l2().detach())
    res["pgd"] = {"steps": pgd_steps, "step_size": pgd_step_size,
                  "trace": [sum(t[i] for t in pgd_traces) / len(pgd_traces) for i in range(len(pgd_traces[0]))]}
    res["threshold"] = threshold
    res["n_batches"], res["batch_size"] = n_batches, batch_size
    res["_mean_ci"] = mean_ci
    if not lm:
        res["ground_truth"] = ground_truth(b)
    return res


def quick_metrics(b: Built, data: ToyData | TokenPool, n_batches: int = 2) -> dict[str, Any]:
    """Scalars for metrics.jsonl during training."""
    cfg = b.cfg
    bs = cfg.eval_batch_size or min(cfg.batch_size, 4096)
    r = evaluate_built(b, data, n_batches, bs, cfg.adversary.eval_steps, cfg.adversary.eval_step_size, cfg.ci_threshold)
    out = {f"eval/{k}": v for k, v in r.items() if isinstance(v, float)}
    out["eval/l0"] = r["l0"]
    out["eval/alive"] = r["alive"]
    gt = r.get("ground_truth")
    if gt:
        for k in ("mmcs", "ml2r", "min_cosine", "ci_error"):
            if gt.get(k) is not None:
                out[f"eval/{k}"] = gt[k]
        out["eval/components_that_matter"] = gt["components_that_matter"]
        if "one_component_features" in gt:
            out["eval/one_component_features"] = gt["one_component_features"]
    return out


def spectrum_png(mean_ci: dict[str, torch.Tensor], path: Path) -> None:
    """Sorted log10 mean CI per matrix (the alive/dead cut-off is read from its knee)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, v in mean_ci.items():
        vals = v.sort(descending=True).values.clamp_min(1e-12).log10().numpy()
        ax.plot(range(1, len(vals) + 1), vals, label=n, lw=1)
    ax.axhline(-6, color="k", ls=":", lw=0.8)
    ax.set_xlabel("rank")
    ax.set_ylabel("log10 mean CI")
    ax.set_title("mean causal importance spectrum")
    if len(mean_ci) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def format_table(res: dict[str, Any], lm: bool) -> str:
    """The printed evaluation table."""
    lines = []
    if lm:
        lines.append(f"{'masks':<18}{'CE':>9}{'ΔCE':>9}{'unrecov.':>10}{'KL':>10}")
        lines.append(f"{'target':<18}{res['ce_target']:>9.4f}")
        for s in STRATEGIES + ["stochastic_subset"]:
            if f"ce_{s}" in res:
                d = res[f"ce_{s}"] - res["ce_target"]
                lines.append(f"{s:<18}{res[f'ce_{s}']:>9.4f}{d:>9.4f}{res['ce_unrecovered'][s]:>10.3f}{res[f'kl_{s}']:>10.4f}")
        lines.append(f"{'adversarial':<18}{'':>9}{'':>9}{'':>10}{res['kl_adversarial']:>10.4f}   "
                     f"(fresh PGD {res['pgd']['steps']}×{res['pgd']['step_size']})")
    else:
        lines.append(f"{'masks':<18}{'MSE':>12}")
        for s in STRATEGIES + ["stochastic_subset", "adversarial"]:
            if f"mse_{s}" in res:
                lines.append(f"{s:<18}{res[f'mse_{s}']:>12.3e}")
    lines.append("")
    lines.append(f"{'matrix':<34}{'C':>6}{'alive':>7}{'L0':>9}")
    for n in res["l0"]:
        lines.append(f"{n:<34}{res['C'][n]:>6}{res['alive'][n]:>7}{res['l0'][n]:>9.3f}")
    lines.append(f"{'total':<34}{sum(res['C'].values()):>6}{res['alive_total']:>7}{res['l0_total']:>9.3f}")
    lines.append(f"Δ-L2 {res['delta_l2']:.3e}   (L0 threshold {res['threshold']})")
    gt = res.get("ground_truth")
    if gt:
        lines.append("")
        parts = [f"{k} {gt[k]:.4f}" for k in ("mmcs", "ml2r", "min_cosine") if gt.get(k) is not None]
        parts += [f"ci_error {gt['ci_error']}", f"components that matter {gt['components_that_matter']}"]
        if "one_component_features" in gt:
            parts.append(f"one-component features {gt['one_component_features']}")
        parts.append(f"passed {gt['passed']}")
        lines.append("ground truth: " + ", ".join(parts))
    return "\n".join(lines)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a run folder; writes JSON (and the CI spectrum PNG) and prints the table."""
    if not cfg.run:
        raise InnardsError("--run DIR is required")
    b = load_run(cfg.run, cfg.model, cfg.device)
    rc = b.cfg
    data = TokenPool(rc, b.target.tokenizer, model=b.target, device=rc.device) if rc.target.kind == "lm" else ToyData(rc, rc.device)
    n = cfg.batches or rc.eval_batches
    bs = cfg.batch_size or rc.eval_batch_size or rc.batch_size
    steps = cfg.pgd_steps if cfg.pgd_steps >= 0 else rc.adversary.eval_steps
    size = cfg.pgd_step_size if cfg.pgd_step_size >= 0 else rc.adversary.eval_step_size
    thr = cfg.threshold if cfg.threshold >= 0 else rc.ci_threshold
    res = evaluate_built(b, data, n, bs, steps, size, thr, cfg.seed, progress=True)
    mean_ci = res.pop("_mean_ci")
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.png:
        png = out.with_suffix(".ci_spectrum.png")
        spectrum_png(mean_ci, png)
        res["ci_spectrum_png"] = str(png)
    res["run"] = str(cfg.run)
    write_json(out, _finite(res))
    print(format_table(res, rc.target.kind == "lm"))
    print(f"\nwrote {out}")
    return res


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


@dataclass
class CurveConfig:
    """innards vpd curve: L0, CE and KL over training, from a run's metrics.jsonl."""

    run: str = ""
    """run folder of innards vpd train"""
    out: str | None = None
    """Markdown path (None: RUN/curve.md; .json and .png beside it)"""
    tail_frac: float = 0.2
    """the last fraction of the steps over which the changes are reported"""


_EVAL_COLS = ["l0_total", "ce_target", "ce_unmasked", "ce_stochastic", "ce_ci", "ce_rounded", "kl_stochastic",
              "kl_ci", "kl_adversarial", "mse_stochastic", "mse_ci", "mse_adversarial", "alive_total"]
_TRAIN_COLS = ["stochastic", "adversarial", "layerwise", "importance", "p", "lr"]


def curve(cfg: CurveConfig) -> dict[str, Any]:
    """Rows at every evaluation step (eval metrics + training losses averaged since the previous one); JSON, MD, PNG."""
    if not cfg.run:
        raise InnardsError("--run DIR is required")
    d = Path(cfg.run)
    recs = read_metrics(d)
    if not recs:
        raise InnardsError(f"no metrics.jsonl in {d}")
    ck = current_checkpoint(d / "ckpt")
    meta = read_meta(d) or (read_json(ck / "state.json", "checkpoint metadata") if ck is not None else {})
    comps = meta.get("components", [])
    C_total = sum(c["C"] for c in comps) or None
    rows: list[dict[str, Any]] = []
    acc: dict[str, list[float]] = {}
    for r in recs:
        if "total" in r:  # a training log line
            l0 = sum(v for k, v in r.items() if k.startswith("l0/"))
            for k, v in [("train_l0", l0)] + [(k, r[k]) for k in _TRAIN_COLS if k in r]:
                acc.setdefault(k, []).append(float(v))
        if "eval/l0_total" in r:
            row: dict[str, Any] = {"step": r["step"]}
            row.update({k: r[f"eval/{k}"] for k in _EVAL_COLS if f"eval/{k}" in r})
            row.update({k: sum(v) / len(v) for k, v in acc.items() if v})
            if C_total:
                row["l0_frac_of_C"] = row["l0_total"] / C_total
            if row.get("alive_total"):
                row["l0_frac_of_alive"] = row["l0_total"] / row["alive_total"]
            rows.append(row)
            acc = {}
    if not rows:
        raise InnardsError(f"{d} has no evaluation records (train with eval_every > 0)")
    last = rows[-1]["step"]
    ref = [r for r in rows if r["step"] <= last * (1 - cfg.tail_frac)]
    base = ref[-1] if ref else rows[0]
    change = {k: (rows[-1][k] - base[k]) / abs(base[k]) if base.get(k) else None
              for k in ("l0_total", "ce_ci", "ce_stochastic", "kl_adversarial", "mse_ci") if k in rows[-1] and k in base}
    res = {"run": str(d), "C_total": C_total, "rows": rows, "tail": {"from_step": base["step"], "to_step": last,
                                                                     "relative_change": change}}
    out = Path(cfg.out) if cfg.out else d / "curve.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), _finite(res))
    cols = ["step"] + [k for k in ["l0_total", "l0_frac_of_C", "l0_frac_of_alive", "alive_total", "ce_target",
                                   "ce_unmasked", "ce_stochastic", "ce_ci", "ce_rounded", "kl_ci", "kl_adversarial",
                                   "mse_stochastic", "mse_ci", "mse_adversarial", "train_l0", "stochastic",
                                   "adversarial", "p", "lr"] if any(k in r for r in rows)]
    lines = [f"# Training curve of `{d}`", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |")
    lines += ["", f"Relative change from step {base['step']} to step {last}: " +
              ", ".join(f"{k} {100 * v:+.1f}%" for k, v in change.items() if v is not None), ""]
    atomic_write_bytes(out, "\n".join(lines).encode())
    _curve_png(rows, out.with_suffix(".png"))
    print("\n".join(lines))
    return res


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def _curve_png(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["l0_total"] for r in rows], "o-", color="C0", label="L0 per token (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("L0 per token", color="C0")
    key = "ce_ci" if "ce_ci" in rows[-1] else "mse_ci"
    ax2 = ax.twinx()
    ax2.plot(steps, [r.get(key) for r in rows], "s-", color="C1", label=key)
    if "ce_target" in rows[-1]:
        ax2.axhline(rows[-1]["ce_target"], color="C1", ls=":", lw=0.8)
    ax2.set_ylabel(key.replace("_", " ") + " (dotted: target)", color="C1")
    ax.set_title("L0 and reconstruction under CI masks during training")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
