"""Sparse autoencoders in SAELens's layout: standard (ReLU), TopK and JumpReLU, acting on raw activations.

Weights as SAELens stores them: W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in),
plus ``threshold`` for JumpReLU. The forward pass follows SAELens 6 exactly:

- input: run-time normalisation (``constant_norm_rescale``: x * sqrt(d_in) / |x|; ``layer_norm``:
  (x - mean) / (std + 1e-5), both undone on the output), then x - b_dec when ``apply_b_dec_to_input``;
  SAELens's ``expected_average_only_in`` is a constant factor that the loader folds into the weights
  (``fold_activation_norm_scaling_factor``), as SAELens's ``from_pretrained`` does;
- pre-activations (x - b_dec) W_enc + b_enc, times |W_dec row| for a TopK SAE with
  ``rescale_acts_by_decoder_norm``;
- ReLU; TopK: ReLU of the k largest pre-activations, the rest 0; JumpReLU: ReLU(pre) * (pre > threshold);
- decoder z W_dec + b_dec (z / |W_dec row| first when ``rescale_acts_by_decoder_norm``).

:class:`TopKSAE` adds the training-time operations of innards' own trainer (``innards.sae.train``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from innards.errors import InnardsError
from innards.io import write_json
from innards.tensors import save_tensors

ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"

NormContext = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


class SparseAutoencoder(nn.Module):
    """An SAE in SAELens layout (standard/ReLU, topk or jumprelu) acting on raw activations."""

    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", k: int | None = None,
                 apply_b_dec_to_input: bool = True, normalize_activations: str = "none",
                 rescale_acts_by_decoder_norm: bool = False, cfg: dict[str, Any] | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise InnardsError(f"unsupported SAE architecture '{architecture}' (supported: {', '.join(ARCHITECTURES)})")
        if normalize_activations not in NORMALIZATIONS:
            raise InnardsError(f"unsupported SAE normalize_activations '{normalize_activations}' "
                               f"(supported: {', '.join(NORMALIZATIONS)}; expected_average_only_in is folded at load)")
        if architecture == "topk" and (k is None or not 0 < k <= d_sae):
            raise InnardsError(f"a topk SAE needs 0 < k <= d_sae ({d_sae}), got k={k}")
        self.d_in, self._d_sae = int(d_in), int(d_sae)
        self.architecture = architecture
        self.k = int(k) if k is not None else None
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize_activations = normalize_activations
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
    def _norm_in(self, x: torch.Tensor) -> tuple[torch.Tensor, NormContext]:
        if self.normalize_activations == "constant_norm_rescale":
            c = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zero row stays finite
            return x * c, c
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            sd = xc.std(dim=-1, keepdim=True)
            return xc / (sd + 1e-5), (mu, sd)
        return x, None

    def _norm_out(self, y: torch.Tensor, ctx: NormContext) -> torch.Tensor:
        if self.normalize_activations == "constant_norm_rescale":
            return y / ctx
        if self.normalize_activations == "layer_norm":
            mu, sd = ctx
            return y * sd + mu
        return y

    # -- the SAE itself ------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of already-normalised inputs."""
        xin = x - self.b_dec * self.apply_b_dec_to_input
        pre = xin @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent activations from pre-activations (ReLU, TopK+ReLU or JumpReLU)."""
        if self.architecture == "topk":
            vals, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        return pre.relu()

    def _decode_normed(self, z: torch.Tensor) -> torch.Tensor:
        if self.feature_scale is not None:
            z = z * self.feature_scale
        if self.rescale_acts_by_decoder_norm:
            z = z * (1 / self.W_dec.norm(dim=-1))
        return z @ self.W_dec + self.b_dec

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.W_enc.device, dtype=self.W_enc.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations (..., d_sae) of raw activations (..., d_in)."""
        xn, _ = self._norm_in(self._cast(x))
        return self.activate(self.pre_activations(xn))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction from latents (the per-sample norms of constant_norm_rescale/layer_norm are not undone)."""
        return self._decode_normed(self._cast(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """SAE(x) on raw activations, in the input's dtype and device, batched over any leading shape."""
        xn, ctx = self._norm_in(self._cast(x))
        y = self._norm_out(self._decode_normed(self.activate(self.pre_activations(xn))), ctx)
        return y.to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    # -- weight folding, as SAELens does it ----------------------------------------------------------
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Make an SAE that reads x * s read raw x: W_enc *= s, W_dec /= s, b_dec /= s (SAELens semantics)."""
        s = float(scaling_factor)
        if not (math.isfinite(s) and s > 0):
            raise InnardsError(f"SAE activation-norm scaling factor must be positive, got {scaling_factor}")
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Unit-norm decoder rows with unchanged outputs: W_dec /= n, W_enc *= n, b_enc *= n (and the JumpReLU threshold).

        SAELens semantics: a TopK SAE is folded only with ``rescale_acts_by_decoder_norm``, because
        otherwise the rescaling would change which k latents win.
        """
        if self.architecture == "topk" and not self.rescale_acts_by_decoder_norm:
            raise InnardsError("folding decoder norms would change which latents a TopK SAE picks "
                               "(only TopK SAEs with rescale_acts_by_decoder_norm can be folded)")
        n = self.W_dec.norm(dim=-1).clamp(min=1e-8)
        self.W_dec.div_(n[:, None])
        self.W_enc.mul_(n[None, :])
        self.b_enc.mul_(n)
        if self.architecture == "jumprelu":
            self.threshold.mul_(n)


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
        """Make an SAE trained on x*scale act on raw x (TopK choices unchanged)."""
        self.fold_activation_norm_scaling_factor(scale)

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
