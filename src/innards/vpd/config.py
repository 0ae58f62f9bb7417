"""VPD/SPD configuration dataclasses and the shipped configs found by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from innards.config import apply_overrides, at_least, from_dict, load_yaml, positive, require, to_dict, within
from innards.errors import InnardsError


@dataclass
class TargetConfig:
    """The model being decomposed: a toy trained here (tms, resid_mlp) or a loaded LM (lm)."""

    kind: Literal["tms", "resid_mlp", "lm"] = "tms"
    """tms, resid_mlp (toys trained here) or lm (a loaded language model)"""
    name: str = "demo"
    """lm only: anything innards.models.load.load_model accepts"""
    n_features: int = 5
    """toy input features"""
    n_hidden: int = 2
    """tms hidden width"""
    hidden_identity: bool = False
    """tms: fixed identity layer between W and W^T"""
    d_embed: int = 1000
    """resid_mlp residual width"""
    d_mlp: int = 50
    """resid_mlp neurons per layer"""
    n_layers: int = 1
    """resid_mlp blocks"""
    feature_prob: float = 0.05
    """probability that a feature is active"""
    steps: int = 10000
    """target training steps"""
    batch_size: int = 1024
    """target training batch"""
    lr: float = 5e-3
    """target training learning rate"""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """target training schedule (cosine reaches 0 at the last step)"""
    weight_decay: float = 0.01
    """target training AdamW weight decay"""
    seed: int = 0
    """target training seed"""
    retries: int = 8
    """further seeds tried when a target fails to learn all its features"""

    def __post_init__(self) -> None:
        at_least(self, 1, "n_features", "n_hidden", "d_embed", "d_mlp", "n_layers", "steps", "batch_size")
        at_least(self, 0, "weight_decay", "retries")
        within(self, "feature_prob", 0.0, 1.0, open_lo=True)
        positive(self, "lr")


@dataclass
class CIConfig:
    """Causal-importance function."""

    kind: Literal["mlp", "layerwise_mlp", "transformer"] = "mlp"
    """mlp: one scalar MLP per subcomponent; layerwise_mlp: one MLP per matrix on its input (the reference's shared_mlp); transformer: one shared transformer"""
    hidden: list[int] = field(default_factory=lambda: [16])
    """mlp: d_gate per subcomponent; layerwise_mlp: hidden widths"""
    d_model: int = 128
    """transformer width"""
    n_layers: int = 2
    """transformer blocks"""
    n_heads: int = 4
    """transformer heads"""
    d_ffn: int = 512
    """transformer FFN width"""
    rope_base: float = 10000.0
    """transformer RoPE base"""
    detach_inputs: bool = False
    """mlp: detach V in the CI input x·V"""


@dataclass
class AdversaryConfig:
    """Persistent PGD in training and fresh PGD in evaluation."""

    n_steps: int = 3
    """ascents per training step (n_adv): n_steps-1 warm-up ascents + 1 from the main graph"""
    lr: float = 0.01
    """persistent-PGD Adam ascent learning rate"""
    warmup_frac: float = 0.025
    """linear warm-up of the ascent learning rate over this fraction of the steps"""
    beta1: float = 0.5
    """ascent Adam beta1"""
    beta2: float = 0.99
    """ascent Adam beta2"""
    eps: float = 1e-8
    """ascent Adam epsilon (outside the square root)"""
    routing: Literal["all", "uniform_k"] = "all"
    """matrices the adversarial term masks"""
    eval_steps: int = 20
    """fresh-PGD steps in evaluation"""
    eval_step_size: float = 0.1
    """fresh-PGD sign-ascent step in evaluation"""


@dataclass
class FreshPGDTermConfig:
    """A fresh-PGD reconstruction term in training (the reference's PGDReconLoss / PGDReconSubsetLoss)."""

    coeff: float = 0.0
    """loss coefficient (0 = no such term)"""
    n_steps: int = 1
    """sign-ascent steps on new sources each training step"""
    step_size: float = 1.0
    """sign-ascent step"""
    scope: Literal["shared", "per_datapoint"] = "shared"
    """one source per subcomponent shared across the batch, or one per datapoint"""
    routing: Literal["all", "uniform_k"] = "uniform_k"
    """all matrices masked, or a uniform-k subset per datapoint"""


@dataclass
class VPDConfig:
    """One decomposition run: target, which matrices, CI function, objective and schedule."""

    target: TargetConfig = field(default_factory=TargetConfig)
    """the model being decomposed"""
    modules: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns over module paths"""
    C: int = 20
    """subcomponents per matrix"""
    C_per_module: dict[str, int] = field(default_factory=dict)
    """pattern -> C (first match wins)"""
    tie: list[list[str]] = field(default_factory=list)
    """pairs [a, b] of matrices with W_b = W_aᵀ in the target: b's U and V are views of a's Vᵀ and Uᵀ (the reference's tied TMS)"""
    ci: CIConfig = field(default_factory=CIConfig)
    """causal-importance function"""
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    """persistent PGD (training) and fresh PGD (evaluation)"""
    objective: Literal["vpd", "spd"] = "vpd"
    """vpd: stochastic subset + persistent PGD + frequency; spd: stochastic + layerwise (+ optional fresh PGD)"""
    output_loss: Literal["auto", "mse", "kl"] = "auto"
    """output divergence (auto: kl for lm, mse for toys)"""
    use_delta: bool = True
    """Δ-component with its own random/adversarial mask"""
    routing: Literal["uniform_k", "all"] = "uniform_k"
    """vpd: routing of the stochastic term"""
    spd_routing: Literal["all", "uniform_k"] = "all"
    """spd: routing of the stochastic term (uniform_k = the reference's StochasticReconSubsetLoss)"""
    stoch_coeff: float = 0.5
    """stochastic reconstruction coefficient"""
    adv_coeff: float = 0.5
    """vpd: persistent-PGD reconstruction coefficient"""
    adv_start_frac: float = 0.0
    """vpd: the adversarial term starts after this fraction of the steps (0 = from the start)"""
    layerwise_coeff: float = 1.0
    """spd: layerwise stochastic reconstruction coefficient (0 = off)"""
    train_pgd: FreshPGDTermConfig = field(default_factory=FreshPGDTermConfig)
    """spd: a fresh-PGD reconstruction term (off unless train_pgd.coeff > 0)"""
    imp_coeff: float = 2e-4
    """importance minimality coefficient"""
    freq_coeff: float = 1e-4
    """vpd: frequency minimality coefficient"""
    p_start: float = 2.0
    """importance exponent at step 0"""
    p_end: float = 0.4
    """importance exponent at the end of the annealing (linear in between)"""
    p_end_frac: float = 1.0
    """fraction of the steps over which p is annealed; constant p_end afterwards"""
    eps: float = 1e-12
    """added to CI before the power"""
    delta_coeff: float = 1e7
    """Δ-L2 coefficient in the training loss (0 = no Δ-L2 term)"""
    warmup_steps: int = 400
    """faithfulness warm-up on L_Δ over U, V only"""
    warmup_lr: float = 1e-3
    """warm-up AdamW learning rate"""
    warmup_wd: float = 0.0
    """warm-up AdamW weight decay"""
    steps: int = 1000
    """optimiser steps"""
    batch_size: int = 4096
    """global batch; toys: samples, lm: sequences"""
    seq_len: int = 64
    """lm only: tokens per sequence"""
    text: str = "generate:200"
    """lm only: an innards.data.text source"""
    max_tokens: int = 2_000_000
    """lm only: size of the token pool sampled from"""
    lr: float = 1e-3
    """main AdamW learning rate"""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """main schedule (cosine reaches lr·lr_final_frac at the last step)"""
    lr_final_frac: float = 0.0
    """cosine floor as a fraction of lr"""
    weight_decay: float = 0.0
    """main AdamW weight decay"""
    clip_uv: float = 0.0
    """global-norm clip on U, V gradients (0 = off); CI parameters are never clipped"""
    skip_inert_rows: bool = True
    """toys: leave rows whose decomposed matrices all see a zero input out of the masked forwards (exact: their output cannot depend on the masks; their CI is computed once)"""
    autocast_bf16: bool = False
    """forwards and losses under torch.autocast(bfloat16), fp32 masters (the reference's default numeric mode)"""
    fsdp: bool = False
    """under torchrun: shard target, components and CI function with FSDP2 (fully_shard) instead of replicating them"""
    activation_checkpointing: bool = False
    """recompute each target block (and CI block) in the backward pass instead of keeping its activations"""
    init_seed: int = 0
    """seed of U, V and CI initialisation"""
    seed: int = 0
    """seed of data, masks and sources"""
    device: str = "cpu"
    """torch device"""
    eval_every: int = 0
    """quick evaluation every N steps (0 = only at the end)"""
    eval_batches: int = 4
    """evaluation batches"""
    eval_batch_size: int = 0
    """evaluation batch size (0 = batch_size)"""
    ci_threshold: float = 0.1
    """L0 / rounding threshold for reports"""
    log_every: int = 50
    """metrics.jsonl every N steps"""
    checkpoint_every: int = 1000
    """checkpoint every N steps (0: only at the end)"""
    out: str = "runs/vpd"
    """run folder"""
    resume: bool = False
    """continue the run in out from its checkpoint"""
    overwrite: bool = False
    """replace what out holds (a finished or unfinished run of other settings)"""
    wandb_project: str | None = None
    """also log to this W&B project"""
    progress: bool = True
    """progress bar"""
    stop_after: int | None = None
    """end this call after a checkpoint at this step (the run stays resumable; for tests of exact resume)"""
    global_draws: bool = False
    """under torchrun every process draws data and masks for the whole batch (equals one process; for tests)"""

    def __post_init__(self) -> None:
        at_least(self, 1, "C", "steps", "batch_size", "seq_len", "max_tokens", "eval_batches", "log_every",
                 "stop_after")
        at_least(self, 0, "warmup_steps", "eval_every", "checkpoint_every", "eval_batch_size", "stoch_coeff", "adv_coeff",
                 "layerwise_coeff", "imp_coeff", "freq_coeff", "delta_coeff", "weight_decay", "warmup_wd", "clip_uv")
        positive(self, "lr", "warmup_lr", "p_end", "eps")
        within(self, "adv_start_frac", 0.0, 1.0)
        within(self, "p_end_frac", 0.0, 1.0, open_lo=True)
        within(self, "lr_final_frac", 0.0, 1.0)
        within(self, "ci_threshold", 0.0, 1.0)
        require(all(isinstance(c, int) and c >= 1 for c in self.C_per_module.values()),
                f"C_per_module values must be at least 1, got {self.C_per_module}")

    @property
    def loss_kind(self) -> str:
        if self.output_loss != "auto":
            return self.output_loss
        return "kl" if self.target.kind == "lm" else "mse"


# settings that may differ between a run and its resumption without changing the result
RESUME_FREE = {"out", "resume", "wandb_project", "progress", "checkpoint_every", "log_every", "eval_every",
               "eval_batches", "eval_batch_size", "activation_checkpointing", "stop_after", "global_draws", "overwrite"}


def shipped_configs() -> dict[str, Path]:
    """Names of the YAML configs shipped with the package -> their paths."""
    root = resources.files("innards") / "configs" / "vpd"
    out = {}
    for p in sorted(Path(str(root)).glob("*.yaml")):
        out[p.stem] = p
    return out


def load_config(name_or_file: str | None, overrides: dict[str, Any] | list[str] | None = None) -> VPDConfig:
    """A shipped config by name or a YAML file, with key=value (dotted) overrides applied."""
    data: dict[str, Any] = {}
    if name_or_file:
        known = shipped_configs()
        if name_or_file in known:
            data = load_yaml(known[name_or_file])
        elif Path(name_or_file).is_file():
            data = load_yaml(name_or_file)
        else:
            raise InnardsError(f"no config named '{name_or_file}' (shipped: {', '.join(known)}; or give a YAML file)")
    cfg = from_dict(VPDConfig, data)
    if overrides:
        if isinstance(overrides, list):
            import yaml

            kv = {}
            for item in overrides:
                if "=" not in item:
                    raise InnardsError(f"unexpected argument '{item}' (overrides are key=value)")
                k, v = item.split("=", 1)
                kv[k] = yaml.safe_load(v) if v else ""
            overrides = kv
        cfg = apply_overrides(cfg, overrides)
    return cfg


def config_from_dict(data: dict[str, Any]) -> VPDConfig:
    """Rebuild a VPDConfig from a saved dict (e.g. a run's config.yaml)."""
    return from_dict(VPDConfig, data)


def result_settings(cfg: VPDConfig) -> dict[str, Any]:
    """The settings that determine a run's result (what --resume must not change)."""
    d = to_dict(cfg)
    return {k: v for k, v in d.items() if k not in RESUME_FREE}


def replace(cfg: VPDConfig, **kw: Any) -> VPDConfig:
    return dataclasses.replace(cfg, **kw)
