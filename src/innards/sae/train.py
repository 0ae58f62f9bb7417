"""Train a TopK SAE on an activation store (innards' own SAE baseline), and evaluate SAEs on held-out rows.

Why our own trainer: EleutherAI's sparsify trains only by running an HF model over a token dataset
(its Trainer hooks the model itself), so it cannot read a store of precomputed activations; SAELens
pulls in TransformerLens, wandb, plotly and ~40 other packages for what is ~150 lines here. The
saved folder is SAELens's on-disk format, so SAELens and ``load_sae`` both read it.

TopK SAE (Gao et al. 2024): z = ReLU(TopK((x - b_dec) W_enc + b_enc)), x_hat = z W_dec + b_dec, unit-norm
decoder rows during training, AuxK loss reviving dead latents, Adam. Training runs on inputs scaled
so that their mean norm is sqrt(d_in); the scale is folded into the saved weights, which therefore
act on raw activations.

The loop runs on the shared skeleton (``innards.train``): the SAE's schedule is ``OptimConfig`` with
``schedule="wsd"``, ``final_lr_frac=0``, ``decay=0.2`` (flat, then linear to 0 over the last 20% of the
steps, as before) after a warm-up of 5% of the steps, at most 100. The flat and decay phases are
exactly the previous trainer's; the warm-up is the skeleton's linear ramp from lr / w (the previous
trainer climbed (i + 1) lr / w, so steps 1..w-1 of the warm-up differ by less than lr / w). Resume
states (model, Adam moments, dead-latent counters, loader position) are committed atomically by
``innards.train.checkpoint``, and ``--resume`` continues bit-exactly; the folder is an ``innards.run``
run of kind "sae" that still holds SAELens's cfg.json + sae_weights.safetensors.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
import torch
from tqdm import tqdm

from innards.config import at_least, positive, require, to_dict, within
from innards.data.store import ActivationStore, StoreLoader
from innards.errors import InnardsError
from innards.io import remove_orphans
from innards.run import Run
from innards.runlog import MetricsLog
from innards.runtime import default_device, seed_everything
from innards.sae.model import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder, TopKSAE
from innards.train.checkpoint import flatten_optimizer, load_checkpoint, save_checkpoint, unflatten_optimizer
from innards.train.optim import OptimConfig, adamw, clip_grads, lr_factor, set_lr, warmup_steps

RESUME_DIR = "resume"
# settings that may change on --resume (or on a rerun of a finished run) without changing the result
FREE = {"device", "log_every", "save_every", "stop_after"}


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
class SAEOptimConfig(OptimConfig):
    """Adam and the SAE's schedule: warm-up, flat, then linear to 0 over the last 20% of the steps."""

    lr: float | None = None
    """peak learning rate (None: 2e-4 / sqrt(latents / 2^14), Gao et al. 2024)"""
    weight_decay: float = 0.0
    """weight decay (0: Adam, as in Gao et al. 2024)"""
    clip: float = 1.0
    """global gradient-norm clip (0 = off)"""
    schedule: Literal["cosine", "constant", "wsd"] = "wsd"
    """after warm-up: wsd (flat, then linear to final_lr_frac over `decay`), cosine or constant"""
    warmup: float | None = None
    """fraction of the steps spent warming up linearly (None: 5% of the steps, at most 100 steps)"""
    warmup_start: float | None = None
    """learning rate at step 0 of the warm-up, as a fraction of lr (None: 1 / the number of warm-up steps)"""
    final_lr_frac: float = 0.0
    """learning rate at the end, as a fraction of lr"""
    decay: float = 0.2
    """wsd only: fraction of the steps in the final linear decay"""

    def resolved(self, steps: int, d_sae: int) -> OptimConfig:
        """The plain OptimConfig of a ``steps``-step run with ``d_sae`` latents (defaults filled in)."""
        lr = self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2 ** 14)
        warmup = self.warmup if self.warmup is not None else min(100, steps // 20) / steps
        w = warmup_steps(steps, dataclasses.replace(self, warmup=warmup, lr=lr))
        start = self.warmup_start if self.warmup_start is not None else (1.0 / w if w else 0.01)
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimConfig)}
        return OptimConfig(**{**kw, "lr": lr, "warmup": warmup, "warmup_start": start})


@dataclass
class SAEFitResult:
    """What a call of :func:`fit_topk_sae` did."""

    steps: int
    """optimiser steps taken in this call"""
    tokens: int
    """activations seen in this call"""
    final_fvu: float
    """smoothed training FVU at the end"""
    dead_fraction: float
    """fraction of latents that have not fired for dead_tokens activations"""
    seconds: float
    """wall time of the call"""


class _FitState:
    """The mutable state of a TopK SAE fit: everything a resume state must hold besides the weights and Adam."""

    def __init__(self, sae: TopKSAE):
        self.step = 0
        self.tokens = 0
        self.fvu_ema: float | None = None
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_dec.device)


def fit_topk_sae(sae: TopKSAE, batches: Iterable[torch.Tensor], steps: int, lr: float | None = None, aux_k: int = 1,
                 aux_coef: float = 1 / 32, dead_tokens: int = 1_000_000, warmup: int = 0,
                 log: MetricsLog | None = None, log_every: int = 50, progress: bool = True,
                 optim: OptimConfig | None = None, opt: torch.optim.Optimizer | None = None,
                 state: _FitState | None = None, stop_at: int | None = None,
                 on_step: Callable[[], None] | None = None) -> SAEFitResult:
    """Train ``sae`` on (B, d) batches (already on its device and scale) up to optimiser step ``steps``.

    ``optim``: the schedule (default: ``lr`` with a ``warmup``-step ramp, flat, linear to 0 over the last
    20%); ``opt``/``state``: a resumed optimiser and fit state; ``stop_at``: end this call after that many
    steps in total; ``on_step``: called after every step (resume states).
    """
    if optim is None:
        if lr is None:
            raise InnardsError("fit_topk_sae needs lr or optim")
        optim = SAEOptimConfig(lr=lr, warmup=warmup / steps if warmup else 0.0).resolved(steps, sae.d_sae)
    device = sae.W_dec.device
    opt = opt if opt is not None else adamw(sae.parameters(), optim, device)
    st = state if state is not None else _FitState(sae)
    end = min(steps, stop_at) if stop_at is not None else steps
    t0, first, tokens0 = time.time(), st.step, st.tokens
    it: Iterator[torch.Tensor] = iter(batches)
    bar = tqdm(total=end, initial=st.step, desc="sae", unit="step", disable=not progress)
    while st.step < end:
        i = st.step
        try:
            x = next(it)
        except StopIteration:
            raise InnardsError(f"the activation source ran out after {i} of {steps} steps") from None
        lr_i = optim.lr * lr_factor(i, steps, optim)
        set_lr(opt, lr_i)
        dead = st.since_fired >= dead_tokens
        out = sae.losses(x, dead, aux_k)
        loss = out["mse"] + aux_coef * out["aux"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grads_()
        clip_grads(sae.parameters(), optim.clip)
        opt.step()
        sae.normalize_decoder_()
        st.since_fired += x.shape[0]
        st.since_fired[out["fired"]] = 0
        st.tokens += x.shape[0]
        f = float(out["fvu"].detach())
        if not math.isfinite(f):
            raise InnardsError(f"SAE training diverged at step {i} (non-finite loss); lower --optim.lr")
        st.fvu_ema = f if st.fvu_ema is None else 0.95 * st.fvu_ema + 0.05 * f
        st.step += 1
        bar.update(1)
        if i % log_every == 0 or i == steps - 1:
            dead_frac = float(dead.float().mean())
            bar.set_postfix(fvu=f"{st.fvu_ema:.4f}", dead=f"{dead_frac:.3f}")
            if log is not None:
                log.log(i, mse=float(out["mse"].detach()), fvu=f, aux=float(out["aux"].detach()), dead_fraction=dead_frac,
                        lr=lr_i, tokens=st.tokens)
        if on_step is not None:
            on_step()
    bar.close()
    return SAEFitResult(steps=st.step - first, tokens=st.tokens - tokens0,
                        final_fvu=float(st.fvu_ema if st.fvu_ema is not None else math.nan),
                        dead_fraction=float((st.since_fired >= dead_tokens).float().mean()), seconds=time.time() - t0)


@dataclass
class SAETrainConfig:
    """Configuration of ``innards sae train`` (and of :func:`train_sae`)."""

    acts: str | None = None
    """activation store folder (innards harvest)"""
    out: str = "runs/sae"
    """output folder (SAELens format: cfg.json + sae_weights.safetensors; with run.json, config.yaml, metrics.jsonl)"""
    site: str | None = None
    """site to model (None: the store's only site)"""
    k: int = 32
    """active latents per activation (TopK)"""
    latents: str = "8*d"
    """number of latents: a number or an expression of the width d such as 8*d"""
    tokens: int | None = None
    """activations to train on, in whole batches (None: one pass over the store's train split)"""
    steps: int | None = None
    """optimiser steps (alternative to --tokens)"""
    batch_size: int = 4096
    """activations per optimiser step (at most the train split)"""
    optim: SAEOptimConfig = field(default_factory=SAEOptimConfig)
    """Adam and its learning-rate schedule"""
    aux_k: int | None = None
    """dead latents used by the AuxK loss (None: d/2; 0 = off)"""
    aux_coef: float = 1 / 32
    """weight of the AuxK loss"""
    dead_tokens: int = 1_000_000
    """a latent is dead after this many activations without firing"""
    seed: int = 0
    """seed of the initialisation and the data order"""
    device: str | None = None
    """device (None: cuda when available, else cpu)"""
    val_rows: int = 16384
    """held-out activations (validation documents) for the final FVU (0 = none)"""
    log_every: int = 50
    """steps between metrics.jsonl records"""
    save_every: int = 500
    """steps between resume states"""
    stop_after: int | None = None
    """end this invocation after N steps in total, leaving a resume state (continue with --resume)"""
    resume: bool = False
    """continue the run in --out exactly where its resume state left it"""
    overwrite: bool = False
    """replace an SAE run in --out made with other settings"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        at_least(self, 1, "k", "batch_size", "tokens", "steps", "dead_tokens", "log_every", "save_every", "stop_after")
        at_least(self, 0, "aux_k", "aux_coef", "val_rows")
        require(self.tokens is None or self.steps is None, "give --tokens or --steps, not both")
        parse_latents(self.latents, 1 << 20)  # the expression itself; its value is checked against the width later


def _pick_site(store: ActivationStore, site: str | None) -> str:
    if site is None:
        if len(store.sites) != 1:
            raise InnardsError(f"the store has several sites ({', '.join(store.sites)}); choose one with --site")
        return store.sites[0]
    if site not in store.sites:
        raise InnardsError(f"site '{site}' is not in the store (it has {', '.join(store.sites)})")
    return site


def _batches(loader: StoreLoader, scale: float, device: torch.device) -> Iterator[torch.Tensor]:
    """Scaled training batches, epoch after epoch (the loader's position is its resume state)."""
    while True:
        for x in loader:
            bad = int((~torch.isfinite(x).all(-1)).sum())
            if bad:
                raise InnardsError(f"{bad} activation rows with NaN or inf in the store; refusing to train an SAE on them")
            yield x.to(device) * scale


def train_sae(cfg: SAETrainConfig) -> Path:
    """Train a TopK SAE on a store's train split; writes an SAELens-format folder and returns its path."""
    if not cfg.acts:
        raise InnardsError("give --acts DIR (an activation store)")
    if not Path(cfg.acts).exists():
        raise InnardsError(f"activation store not found: {cfg.acts}")
    out = Path(cfg.out)
    store = ActivationStore(cfg.acts)
    site = _pick_site(store, cfg.site)
    d = store.width(site)
    d_sae = parse_latents(cfg.latents, d)
    if cfg.k > d_sae:
        raise InnardsError(f"--k {cfg.k} exceeds the number of latents {d_sae}")
    n_train = len(store.split_rows("train"))
    batch = min(cfg.batch_size, n_train)
    steps = cfg.steps if cfg.steps is not None else max(1, math.ceil((cfg.tokens or n_train) / batch))
    optim = cfg.optim.resolved(steps, d_sae)
    aux_k = cfg.aux_k if cfg.aux_k is not None else max(1, d // 2)
    st = store.stats(site)
    # inputs scaled to mean norm sqrt(d): the learning rate then means the same for every model and site
    scale = math.sqrt(d) / max(float(st["mean_norm"]), 1e-12)
    device = default_device(cfg.device)

    with Run.open(out, "sae", cfg, inputs={"acts": cfg.acts}, resume=cfg.resume, overwrite=cfg.overwrite,
                  free=FREE) as run:
        if run.state == "complete":
            run.say_complete()
            return out
        seed_everything(cfg.seed)
        sae = TopKSAE(d, d_sae, k=cfg.k)
        sae.init_weights_(mean=torch.as_tensor(st["mean"], dtype=torch.float32) * scale, seed=cfg.seed)
        sae.to(device)
        opt = adamw(sae.parameters(), optim, device)
        fit = _FitState(sae)
        loader = store.loader(batch, shuffle=True, seed=cfg.seed, normalize=False, sites=site, split="train", drop_last=True)
        if run.state == "resume":
            _load(out / RESUME_DIR, sae, opt, fit, loader)
            remove_orphans(out)

        saved = [fit.step if run.state == "resume" else -1]  # the step of the committed resume state

        def save() -> None:
            if saved[0] == fit.step:
                return
            saved[0] = fit.step
            opt_t, opt_plain = flatten_optimizer(opt)
            save_checkpoint(out / RESUME_DIR, fit.step, {"model.safetensors": sae.state_dict(), "optimizer.safetensors": opt_t,
                                                          "fit.safetensors": {"since_fired": fit.since_fired}},
                            {"optimizer": opt_plain, "tokens": fit.tokens, "fvu_ema": fit.fvu_ema, "total_steps": steps,
                             "loader": loader.state_dict()})

        def on_step() -> None:
            if fit.step % cfg.save_every == 0 and fit.step < steps:
                save()

        log = MetricsLog(out, config=to_dict(cfg), resume_step=fit.step if run.state == "resume" else None)
        try:
            res = fit_topk_sae(sae, _batches(loader, scale, device), steps=steps, aux_k=aux_k, aux_coef=cfg.aux_coef,
                               dead_tokens=cfg.dead_tokens, log=log, log_every=cfg.log_every, progress=cfg.progress,
                               optim=optim, opt=opt, state=fit, stop_at=cfg.stop_after, on_step=on_step)
        finally:
            log.close()
        if fit.step < steps:
            save()
            print(f"innards: SAE stopped at step {fit.step} of {steps}; continue with --resume")
            return out
        sae.cpu().fold_input_scale_(scale)
        val = evaluate_sae(sae, store, site, cfg.val_rows, cfg.seed)
        man = store.manifest or {}
        model = man.get("model")
        model_name = model.get("name") if isinstance(model, dict) else model
        # SAELens/TransformerLens users look the SAE up by the TransformerLens hook name
        tl = next((e.get("tl_name") for e in man.get("sites", []) if isinstance(e, dict) and e.get("site") == site), None)
        summary = {"site": site, "store": str(Path(cfg.acts).resolve()), "tokens": fit.tokens, "steps": fit.step,
                   "batch_size": batch, "lr": optim.lr, "aux_k": aux_k, "input_scale": scale,
                   "train_fvu": float(fit.fvu_ema) if fit.fvu_ema is not None else None,
                   "train_dead_fraction": res.dead_fraction, **val}
        sae.save_pretrained(out, hook_name=tl or site, model_name=model_name,
                            extra_metadata={"innards_site": site, "innards_model": model, "training": summary})
        run.write_json("summary.json", summary)
        run.complete(headline={k: summary[k] for k in ("val_fvu", "val_l0", "val_dead_fraction", "train_fvu", "steps")
                               if isinstance(summary.get(k), (int, float))},
                     outputs=[CFG_FILE, WEIGHTS_FILE, "summary.json", "metrics.jsonl"])
        shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
    fvu, dead = summary.get("val_fvu"), summary.get("val_dead_fraction")
    print(f"sae: {out}: {d_sae:,} latents, k={cfg.k}, {fit.tokens:,} activations, validation FVU "
          f"{'-' if fvu is None else f'{fvu:.4g}'}, dead latents {'-' if dead is None else f'{dead:.2%}'}")
    return out


def _load(folder: Path, sae: TopKSAE, opt: torch.optim.Optimizer, fit: _FitState, loader: StoreLoader) -> None:
    """Continue exactly from the committed resume state."""
    state, files = load_checkpoint(folder)
    sae.load_state_dict(files["model.safetensors"])
    opt.load_state_dict(unflatten_optimizer(files["optimizer.safetensors"], state["optimizer"]))
    fit.since_fired.copy_(files["fit.safetensors"]["since_fired"])
    fit.step, fit.tokens, fit.fvu_ema = int(state["step"]), int(state["tokens"]), state.get("fvu_ema")
    loader.load_state_dict(state["loader"])


@torch.no_grad()
def heldout_metrics(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float | int]:
    """FVU, mean L0 and never-firing fraction of an SAE on the rows ``x`` (raw activations)."""
    z = torch.cat([sae.encode(x[i:i + 4096]) for i in range(0, x.shape[0], 4096)])
    recon = torch.cat([sae.reconstruct(x[i:i + 4096]) for i in range(0, x.shape[0], 4096)])
    fvu = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    return {"val_fvu": fvu, "val_l0": float((z > 0).sum(-1).float().mean()),
            "val_dead_fraction": float((~(z > 0).any(0)).float().mean()), "val_rows": int(x.shape[0])}


def evaluate_sae(sae: SparseAutoencoder, store: ActivationStore, site: str, n: int = 16384, seed: int = 0) -> dict[str, float | int | None]:
    """:func:`heldout_metrics` on up to ``n`` held-out (validation) rows of a store."""
    try:
        rows = store.split_rows("val")
    except InnardsError:
        rows = np.empty(0, dtype=np.int64)
    if n <= 0 or rows.size == 0:
        return {"val_fvu": None, "val_l0": None, "val_dead_fraction": None, "val_rows": 0}
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(rows, size=min(n, rows.size), replace=False))
    return heldout_metrics(sae, store.rows(idx, site=site).float())
