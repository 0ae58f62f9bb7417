"""Train a TopK SAE on an activation store (innards' own SAE baseline), and evaluate SAEs on held-out rows.

Why our own trainer: EleutherAI's sparsify trains only by running an HF model over a token dataset
(its Trainer hooks the model itself), so it cannot read a store of precomputed activations; SAELens
pulls in TransformerLens, wandb, plotly and ~40 other packages for what is ~150 lines here. The
saved folder is SAELens's on-disk format, so SAELens and ``load_sae`` both read it.

TopK SAE (Gao et al. 2024): z = ReLU(TopK((x - b_dec) W_enc + b_enc)), x_hat = z W_dec + b_dec, unit-norm
decoder rows during training, AuxK loss reviving dead latents, Adam. Training runs on inputs scaled
so that their mean norm is sqrt(d_in); the scale is folded into the saved weights, which therefore
act on raw activations.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from innards.config import at_least, positive, save_config, to_dict
from innards.data.store import ActivationStore
from innards.errors import InnardsError
from innards.io import write_json
from innards.runlog import MetricsLog
from innards.runtime import default_device, seed_everything
from innards.sae.model import CFG_FILE, SparseAutoencoder, TopKSAE


def parse_latents(spec: str | int, d_in: int) -> int:
    """Latent count from an int or an expression of the width: '2048', '8*d', '8x'."""
    s = str(spec).strip().lower().replace(" ", "")
    try:
        if s.endswith("x"):
            n = float(s[:-1]) * d_in
        elif "*" in s:
            a, b = s.split("*", 1)
            n = float(a if b == "d" else b) * d_in if "d" in (a, b) else float(a) * float(b)
        else:
            n = float(s)
    except ValueError:
        raise InnardsError(f"cannot read latents '{spec}' (use a number, '8*d' or '8x')") from None
    if n < 1 or n != int(n):
        raise InnardsError(f"latents '{spec}' gives {n}, not a positive whole number")
    return int(n)


@dataclass
class SAEFitResult:
    """What a call of :func:`fit_topk_sae` did."""

    steps: int
    tokens: int
    final_fvu: float
    dead_fraction: float
    seconds: float


def fit_topk_sae(sae: TopKSAE, batches: Iterable[torch.Tensor], steps: int, lr: float, aux_k: int,
                 aux_coef: float = 1 / 32, dead_tokens: int = 1_000_000, warmup: int = 0,
                 log: MetricsLog | None = None, log_every: int = 50, progress: bool = True) -> SAEFitResult:
    """Train ``sae`` on (B, d) batches (already on its device and scale) for ``steps`` Adam steps."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    decay_from = int(0.8 * steps)

    def lr_at(i: int) -> float:
        # warm-up, flat, then linear decay over the last 20%: the end of training settles the dictionary
        if warmup and i < warmup:
            return lr * (i + 1) / warmup
        if i >= decay_from:
            return lr * max(0.0, (steps - i) / max(1, steps - decay_from))
        return lr

    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_dec.device)
    t0 = time.time()
    tokens = 0
    fvu_ema = None
    it: Iterator[torch.Tensor] = iter(batches)
    bar = tqdm(range(steps), desc="sae", unit="step", disable=not progress)
    for i in bar:
        try:
            x = next(it)
        except StopIteration:
            raise InnardsError(f"the activation source ran out after {i} of {steps} steps") from None
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        dead = since_fired >= dead_tokens
        out = sae.losses(x, dead, aux_k)
        loss = out["mse"] + aux_coef * out["aux"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grads_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder_()
        since_fired += x.shape[0]
        since_fired[out["fired"]] = 0
        tokens += x.shape[0]
        f = float(out["fvu"].detach())
        if not math.isfinite(f):
            raise InnardsError(f"SAE training diverged at step {i} (non-finite loss); lower --lr")
        fvu_ema = f if fvu_ema is None else 0.95 * fvu_ema + 0.05 * f
        if i % log_every == 0 or i == steps - 1:
            dead_frac = float(dead.float().mean())
            bar.set_postfix(fvu=f"{fvu_ema:.4f}", dead=f"{dead_frac:.3f}")
            if log is not None:
                log.log(i, mse=float(out["mse"].detach()), fvu=f, aux=float(out["aux"].detach()), dead_fraction=dead_frac,
                        lr=lr_at(i), tokens=tokens)
    return SAEFitResult(steps=steps, tokens=tokens, final_fvu=float(fvu_ema if fvu_ema is not None else math.nan),
                        dead_fraction=float((since_fired >= dead_tokens).float().mean()), seconds=time.time() - t0)


@dataclass
class SAETrainConfig:
    """Configuration of ``innards sae train`` (and of :func:`train_sae`)."""

    acts: str | None = None
    """activation store folder (innards harvest)"""
    out: str = "runs/sae"
    """output folder (SAELens format: cfg.json + sae_weights.safetensors)"""
    site: str | None = None
    """site to model (default: the store's only site)"""
    k: int = 32
    """active latents per activation (TopK)"""
    latents: str = "8*d"
    """number of latents: a number or an expression of the width d such as 8*d"""
    tokens: int | None = None
    """activations to train on (default: one pass over the store's train split)"""
    batch_size: int = 4096
    """activations per optimiser step"""
    lr: float | None = None
    """Adam learning rate (default 2e-4 / sqrt(latents / 2^14), Gao et al. 2024)"""
    aux_k: int | None = None
    """dead latents used by the AuxK loss (default d/2; 0 = off)"""
    aux_coef: float = 1 / 32
    """weight of the AuxK loss"""
    dead_tokens: int = 1_000_000
    """a latent is dead after this many activations without firing"""
    seed: int = 0
    """seed of the initialisation and the data order"""
    device: str | None = None
    """device (default: cuda when available, else cpu)"""
    val_rows: int = 16384
    """held-out activations (validation documents) for the final FVU"""
    log_every: int = 50
    """steps between metrics.jsonl records"""
    overwrite: bool = False
    """replace an SAE already in --out"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        at_least(self, 1, "k", "batch_size", "tokens", "dead_tokens", "log_every")
        at_least(self, 0, "aux_k", "aux_coef", "val_rows")
        positive(self, "lr")


def _pick_site(store: ActivationStore, site: str | None) -> str:
    if site is None:
        if len(store.sites) != 1:
            raise InnardsError(f"the store has several sites ({', '.join(store.sites)}); choose one with --site")
        return store.sites[0]
    if site not in store.sites:
        raise InnardsError(f"site '{site}' is not in the store (it has {', '.join(store.sites)})")
    return site


def _store_batches(store: ActivationStore, site: str, batch: int, seed: int, scale: float, device: torch.device) -> Iterator[torch.Tensor]:
    epoch = 0
    while True:
        for x in store.loader(batch, shuffle=True, seed=seed + epoch, normalize=False, sites=site, split="train",
                              drop_last=True):
            bad = int((~torch.isfinite(x).all(-1)).sum())
            if bad:
                raise InnardsError(f"{bad} activation rows with NaN or inf in the store; refusing to train an SAE on them")
            yield x.to(device) * scale
        epoch += 1


def train_sae(cfg: SAETrainConfig) -> Path:
    """Train a TopK SAE on a store's train split; writes an SAELens-format folder and returns its path."""
    if not cfg.acts:
        raise InnardsError("give --acts DIR (an activation store)")
    if not Path(cfg.acts).exists():
        raise InnardsError(f"activation store not found: {cfg.acts}")
    out = Path(cfg.out)
    if (out / CFG_FILE).exists() and not cfg.overwrite:
        raise InnardsError(f"{out} already holds an SAE; use --overwrite to replace it, or another --out")
    store = ActivationStore(cfg.acts)
    site = _pick_site(store, cfg.site)
    d = store.width(site)
    d_sae = parse_latents(cfg.latents, d)
    if cfg.k > d_sae:
        raise InnardsError(f"--k {cfg.k} exceeds the number of latents {d_sae}")
    n_train = len(store.split_rows("train"))
    batch = min(cfg.batch_size, n_train)
    tokens = int(cfg.tokens) if cfg.tokens is not None else n_train
    if tokens < 1:
        raise InnardsError("--tokens must be at least 1")
    steps = max(1, math.ceil(tokens / batch))
    lr = cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(d_sae / 2 ** 14)
    aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, d // 2)
    st = store.stats(site)
    # inputs scaled to mean norm sqrt(d): the learning rate then means the same for every model and site
    scale = math.sqrt(d) / max(float(st["mean_norm"]), 1e-12)
    device = default_device(cfg.device)
    seed_everything(cfg.seed)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sae = TopKSAE(d, d_sae, k=cfg.k)
        sae.init_weights_(mean=torch.as_tensor(st["mean"], dtype=torch.float32) * scale, seed=cfg.seed)
        sae.to(device)
        log = MetricsLog(tmp, config=to_dict(cfg))
        res = fit_topk_sae(sae, _store_batches(store, site, batch, cfg.seed, scale, device), steps=steps, lr=lr,
                           aux_k=aux_k, aux_coef=cfg.aux_coef, dead_tokens=cfg.dead_tokens, warmup=min(100, steps // 20),
                           log=log, log_every=cfg.log_every, progress=cfg.progress)
        log.close()
        sae.cpu().fold_input_scale_(scale)
        val = evaluate_sae(sae, store, site, cfg.val_rows, cfg.seed)
        man = store.manifest or {}
        model = man.get("model")
        model_name = model.get("name") if isinstance(model, dict) else model
        # SAELens/TransformerLens users look the SAE up by the TransformerLens hook name
        tl = next((e.get("tl_name") for e in man.get("sites", []) if isinstance(e, dict) and e.get("site") == site), None)
        summary = {"site": site, "store": str(Path(cfg.acts).resolve()), "tokens": res.tokens, "steps": res.steps,
                   "batch_size": batch, "lr": lr, "aux_k": aux_k, "input_scale": scale, "train_fvu": res.final_fvu,
                   "train_dead_fraction": res.dead_fraction, "seconds": round(res.seconds, 2), **val}
        sae.save_pretrained(tmp, hook_name=tl or site, model_name=model_name,
                            extra_metadata={"innards_site": site, "innards_model": model, "training": summary})
        write_json(tmp / "summary.json", summary)
        save_config(cfg, tmp)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"sae: {d_sae} latents, k={cfg.k}, {res.tokens} activations, val FVU {summary.get('val_fvu')}, "
          f"dead {summary.get('val_dead_fraction')} -> {out}")
    return out


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, store: ActivationStore, site: str, n: int = 16384, seed: int = 0) -> dict[str, float | int | None]:
    """FVU, mean L0 and never-firing fraction of an SAE on held-out (validation) rows of a store."""
    try:
        rows = store.split_rows("val")
    except InnardsError:
        return {"val_fvu": None, "val_l0": None, "val_dead_fraction": None, "val_rows": 0}
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(rows, size=min(n, rows.size), replace=False))
    x = store.rows(idx, site=site).float()
    z = torch.cat([sae.encode(x[i:i + 4096]) for i in range(0, x.shape[0], 4096)])
    recon = torch.cat([sae.reconstruct(x[i:i + 4096]) for i in range(0, x.shape[0], 4096)])
    fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    return {"val_fvu": fvu, "val_l0": float((z > 0).sum(-1).float().mean()),
            "val_dead_fraction": float((~(z > 0).any(0)).float().mean()), "val_rows": int(x.shape[0])}
