"""Sparse autoencoders: a TopK SAE trained on an activation store, and loading of SAELens-format SAEs.

Why our own trainer: EleutherAI's sparsify trains only by running an HF model over a token dataset
(its Trainer hooks the model itself), so it cannot read a store of precomputed activations; SAELens
pulls in TransformerLens, wandb, plotly and ~40 other packages for what is ~150 lines here.  The
saved folder is SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors`` with W_enc
(d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec), so SAELens and ``load_sae`` both read it.

TopK SAE (Gao et al. 2024): z = ReLU(TopK((x - b_dec) W_enc + b_enc)), x_hat = z W_dec + b_dec, unit-norm
decoder rows during training, AuxK loss reviving dead latents, Adam.  Training runs on inputs scaled
so that their mean norm is sqrt(d_in); the scale is folded into the saved weights, which therefore
act on raw activations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from innards.errors import InnardsError

ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


class SparseAutoencoder(nn.Module):
    """An SAE in SAELens layout (standard/ReLU, topk or jumprelu) acting on raw activations."""

    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", k: int | None = None,
                 apply_b_dec_to_input: bool = True, normalize_activations: str = "none",
                 input_scale: float = 1.0, rescale_acts_by_decoder_norm: bool = False,
                 cfg: dict[str, Any] | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise InnardsError(f"unsupported SAE architecture '{architecture}' (supported: {', '.join(ARCHITECTURES)})")
        if normalize_activations not in NORMALIZATIONS:
            raise InnardsError(f"unsupported SAE normalize_activations '{normalize_activations}'")
        if architecture == "topk" and (k is None or not 0 < k <= d_sae):
            raise InnardsError(f"a topk SAE needs 0 < k <= d_sae ({d_sae}), got k={k}")
        self.d_in, self._d_sae = int(d_in), int(d_sae)
        self.architecture = architecture
        self.k = int(k) if k is not None else None
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize_activations = normalize_activations
        self.input_scale = float(input_scale)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.cfg = dict(cfg or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(d_sae) if architecture == "jumprelu" else None)
        self.register_buffer("feature_scale", None)

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self._d_sae

    @property
    def hook_name(self) -> str | None:
        """The site the SAE was trained on, as its cfg names it."""
        meta = self.cfg.get("metadata") or {}
        return meta.get("hook_name") or self.cfg.get("hook_name")

    @property
    def site(self) -> str | None:
        """The innards site name the SAE was trained on (SAEs trained here), else its hook name."""
        meta = self.cfg.get("metadata") or {}
        return meta.get("innards_site") or self.hook_name

    @property
    def model_name(self) -> str | None:
        """The model the SAE was trained on, as its cfg names it."""
        meta = self.cfg.get("metadata") or {}
        return meta.get("model_name") or self.cfg.get("model_name")

    # -- normalisation of the input, undone on the output -----------------------------------------
    def _norm_in(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.normalize_activations == "expected_average_only_in":
            return x * self.input_scale, self.input_scale
        if self.normalize_activations == "constant_norm_rescale":
            c = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * c, c
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            sd = xc.std(dim=-1, keepdim=True)
            return xc / (sd + 1e-5), (mu, sd)
        return x, None

    def _norm_out(self, y: torch.Tensor, ctx: Any) -> torch.Tensor:
        if self.normalize_activations in ("expected_average_only_in", "constant_norm_rescale"):
            return y / ctx
        if self.normalize_activations == "layer_norm":
            mu, sd = ctx
            return y * sd + mu
        return y

    # -- the SAE itself ------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of already-normalised inputs."""
        xin = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = xin @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent activations from pre-activations (ReLU, TopK+ReLU or JumpReLU)."""
        if self.architecture == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold.relu()).to(pre.dtype)
        return pre.relu()

    def _decode_normed(self, z: torch.Tensor) -> torch.Tensor:
        if self.feature_scale is not None:
            z = z * self.feature_scale
        if self.rescale_acts_by_decoder_norm:
            z = z / self.W_dec.norm(dim=-1)
        return z @ self.W_dec + self.b_dec

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.W_enc.device, dtype=self.W_enc.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations (..., d_sae) of raw activations (..., d_in)."""
        xn, _ = self._norm_in(self._cast(x))
        return self.activate(self.pre_activations(xn))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw-scale reconstruction from latents (per-sample norms of constant_norm_rescale/layer_norm are not undone)."""
        y = self._decode_normed(self._cast(z))
        return y / self.input_scale if self.normalize_activations == "expected_average_only_in" else y

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """SAE(x) on raw activations, in the input's dtype and device, batched over any leading shape."""
        xn, ctx = self._norm_in(self._cast(x))
        y = self._norm_out(self._decode_normed(self.activate(self.pre_activations(xn))), ctx)
        return y.to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)


class TopKSAE(SparseAutoencoder):
    """A TopK SAE with the training-time operations (unit-norm decoder rows, AuxK, scale folding)."""

    def __init__(self, d_in: int, d_sae: int, k: int, cfg: dict[str, Any] | None = None, **kw: Any):
        super().__init__(d_in, d_sae, architecture="topk", k=k, cfg=cfg, **kw)

    @torch.no_grad()
    def init_weights_(self, mean: torch.Tensor | None = None, seed: int = 0) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose, b_dec at the data mean."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.d_sae, self.d_in, generator=g)
        self.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.copy_(mean if mean is not None else torch.zeros(self.d_in))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project decoder rows back to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop the gradient component along each (unit) decoder row, which the renormalisation would undo."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g.sub_((g * self.W_dec).sum(dim=-1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on x*scale act on raw x: W_enc*=s, W_dec/=s, b_dec/=s (TopK choices unchanged)."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def losses(self, x: torch.Tensor, dead: torch.Tensor | None, aux_k: int) -> dict[str, torch.Tensor]:
        """Reconstruction MSE (summed over dims), FVU, AuxK loss and the latents that fired."""
        pre = self.pre_activations(x)
        z = self.activate(pre)
        recon = z @ self.W_dec + self.b_dec
        err = recon - x
        mse = err.pow(2).sum(-1).mean()
        total_var = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        out = {"mse": mse, "fvu": mse / total_var, "fired": (z > 0).any(0)}
        aux = x.new_zeros(())
        if dead is not None and bool(dead.any()) and aux_k > 0:
            # AuxK: the dead latents try to explain what the live ones missed, so they get gradient again
            kk = min(aux_k, int(dead.sum()))
            vals, idx = pre.masked_fill(~dead, -math.inf).topk(kk, dim=-1, sorted=False)
            za = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
            resid = (x - recon).detach()
            aux = (za @ self.W_dec - resid).pow(2).sum(-1).mean() / (resid - resid.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            aux = torch.nan_to_num(aux, nan=0.0)
        out["aux"] = aux
        return out

    def save_pretrained(self, out_dir: str | Path, hook_name: str | None = None, model_name: str | None = None,
                        extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` in SAELens's format (atomically)."""
        from innards.io import save_tensors, write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"model_name": model_name, "hook_name": hook_name, "sae_lens_training_version": None,
                "trained_with": "innards", **(extra_metadata or {})}
        cfg = {"architecture": "topk", "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
               "rescale_acts_by_decoder_norm": False, "reshape_activations": "none", "metadata": meta,
               # flat copies for loaders that predate SAELens 6's metadata block
               "model_name": model_name, "hook_name": hook_name,
               "activation_fn_str": "topk", "activation_fn_kwargs": {"k": self.k}}
        sha = save_tensors(out / WEIGHTS_FILE, {"W_enc": self.W_enc.float(), "b_enc": self.b_enc.float(),
                                                "W_dec": self.W_dec.float(), "b_dec": self.b_dec.float()})
        cfg["metadata"]["weights_sha256"] = sha
        write_json(out / CFG_FILE, cfg)
        self.cfg = cfg
        return out


def load_sae(path: str | Path, scaling_factor: float | None = None, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAELens-format SAE folder (standard, topk or jumprelu) acting on raw activations.

    ``scaling_factor`` is the activation-norm factor of SAEs saved with
    ``normalize_activations="expected_average_only_in"`` whose factor is not folded into the weights.
    """
    from innards.io import load_tensors, read_json

    p = Path(path)
    if not p.is_dir():
        raise InnardsError(f"SAE folder not found: {p}")
    if not (p / CFG_FILE).is_file():
        raise InnardsError(f"{p} is not an SAE folder (no {CFG_FILE})")
    cfg = read_json(p / CFG_FILE, what="SAE config")
    if not isinstance(cfg, dict):
        raise InnardsError(f"SAE config {p / CFG_FILE} is not a mapping")
    weights = p / WEIGHTS_FILE
    if not weights.is_file():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise InnardsError(f"SAE folder {p} has no {WEIGHTS_FILE}")
        weights = found[0]
    sha = (cfg.get("metadata") or {}).get("weights_sha256")
    w = load_tensors(weights, sha256=sha, what="SAE weights")
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k")
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":  # SAELens < 6 spelling
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    if (cfg.get("reshape_activations") or "none") != "none":
        raise InnardsError(f"SAE {p} reshapes its input ({cfg['reshape_activations']}); only flat sites are supported")
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in w]
    if missing:
        raise InnardsError(f"SAE weights {weights} lack {', '.join(missing)}")
    d_in, d_sae = w["W_enc"].shape
    if (cfg.get("d_in", d_in), cfg.get("d_sae", d_sae)) != (d_in, d_sae) or tuple(w["W_dec"].shape) != (d_sae, d_in) \
            or w["b_enc"].shape != (d_sae,) or w["b_dec"].shape != (d_in,):
        raise InnardsError(f"SAE weights {weights} do not match cfg d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}")
    norm = cfg.get("normalize_activations", "none") or "none"
    factor = scaling_factor
    if factor is None:
        factor = cfg.get("norm_scaling_factor") or (cfg.get("metadata") or {}).get("norm_scaling_factor")
    if norm == "expected_average_only_in" and factor is None:
        raise InnardsError(f"SAE {p} expects inputs scaled by an activation-norm factor: pass scaling_factor")
    sae = SparseAutoencoder(d_in, d_sae, architecture=arch, k=k,
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            normalize_activations=norm, input_scale=float(factor or 1.0),
                            rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)), cfg=cfg)
    with torch.no_grad():
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, n).copy_(w[n].float())
        if arch == "jumprelu":
            if "threshold" in w:
                sae.threshold.copy_(w["threshold"].float())
            elif "log_threshold" in w:
                sae.threshold.copy_(w["log_threshold"].float().exp())
            else:
                raise InnardsError(f"jumprelu SAE weights {weights} lack a threshold")
        if "scaling_factor" in w:  # SAELens < 6 fine-tuning scale on the latents
            sae.feature_scale = w["scaling_factor"].float()
    return sae.to(device).eval().requires_grad_(False)


# -- training -------------------------------------------------------------------------------------------

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
                 log: Any = None, log_every: int = 50, progress: bool = True) -> SAEFitResult:
    """Train ``sae`` on (B, d) batches (already on its device and scale) for ``steps`` Adam steps."""
    from tqdm import tqdm

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
    out: str = "runs/sae"
    site: str | None = None
    k: int = 32
    latents: str = "8*d"
    tokens: int | None = None
    batch_size: int = 4096
    lr: float | None = None
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000
    seed: int = 0
    device: str | None = None
    val_rows: int = 16384
    log_every: int = 50
    overwrite: bool = False
    progress: bool = True

    __field_help__ = {
        "acts": "activation store folder (innards harvest)",
        "out": "output folder (SAELens format: cfg.json + sae_weights.safetensors)",
        "site": "site to model (default: the store's only site)",
        "k": "active latents per activation (TopK)",
        "latents": "number of latents: a number or an expression of the width d such as 8*d",
        "tokens": "activations to train on (default: one pass over the store's train split)",
        "lr": "Adam learning rate (default 2e-4 / sqrt(latents / 2^14), Gao et al. 2024)",
        "aux_k": "dead latents used by the AuxK loss (default d/2; 0 = off)",
        "dead_tokens": "a latent is dead after this many activations without firing",
        "val_rows": "held-out activations (validation documents) for the final FVU",
    }


def _pick_site(store: Any, site: str | None) -> str:
    if site is None:
        if len(store.sites) != 1:
            raise InnardsError(f"the store has several sites ({', '.join(store.sites)}); choose one with --site")
        return store.sites[0]
    if site not in store.sites:
        raise InnardsError(f"site '{site}' is not in the store (it has {', '.join(store.sites)})")
    return site


def _store_batches(store: Any, site: str, batch: int, seed: int, scale: float, device: torch.device) -> Iterator[torch.Tensor]:
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
    import shutil
    import os

    from innards.config import save_config, to_dict
    from innards.data.store import ActivationStore
    from innards.io import write_json
    from innards.runlog import MetricsLog
    from innards.runtime import default_device, seed_everything

    if not cfg.acts:
        raise InnardsError("give --acts DIR (an activation store)")
    if not Path(cfg.acts).exists():
        raise InnardsError(f"activation store not found: {cfg.acts}")
    out = Path(cfg.out)
    if (out / CFG_FILE).exists() and not cfg.overwrite:
        raise InnardsError(f"{out} already holds an SAE; use --overwrite to replace it, or another --out")
    if cfg.k < 1 or cfg.batch_size < 1:
        raise InnardsError("--k and --batch-size must be at least 1")
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
def evaluate_sae(sae: SparseAutoencoder, store: Any, site: str, n: int = 16384, seed: int = 0) -> dict[str, Any]:
    """FVU, mean L0 and never-firing fraction of an SAE on held-out (validation) rows of a store."""
    import numpy as np

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
