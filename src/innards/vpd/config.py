"""VPD/SPD configuration dataclasses and the shipped configs found by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from innards.config import apply_overrides, from_dict, load_yaml, to_dict
from innards.errors import InnardsError


@dataclass
class TargetConfig:
    """The model being decomposed: a toy trained here (tms, resid_mlp) or a loaded LM (lm)."""

    kind: Literal["tms", "resid_mlp", "lm"] = "tms"
    name: str = "demo"  # lm only: anything innards.models.load.load_model accepts
    n_features: int = 5
    n_hidden: int = 2  # tms hidden width
    hidden_identity: bool = False  # tms: fixed identity layer between W and W^T
    d_embed: int = 1000  # resid_mlp residual width
    d_mlp: int = 50  # resid_mlp neurons per layer
    n_layers: int = 1  # resid_mlp blocks
    feature_prob: float = 0.05
    steps: int = 10000
    batch_size: int = 1024
    lr: float = 5e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.01
    seed: int = 0
    retries: int = 8  # further seeds tried when a target fails to learn all its features


@dataclass
class CIConfig:
    """Causal-importance function."""

    kind: Literal["mlp", "layerwise_mlp", "transformer"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [16])  # mlp: d_gate per component; layerwise_mlp: widths
    d_model: int = 128  # transformer
    n_layers: int = 2
    n_heads: int = 4
    d_ffn: int = 512
    rope_base: float = 10000.0
    detach_inputs: bool = False


@dataclass
class AdversaryConfig:
    """Persistent PGD in training and fresh PGD in evaluation."""

    n_steps: int = 3  # ascents per training step (n_adv): n_steps-1 warm-up ascents + 1 from the main graph
    lr: float = 0.01
    warmup_frac: float = 0.025
    beta1: float = 0.5
    beta2: float = 0.99
    eps: float = 1e-8
    routing: Literal["all", "uniform_k"] = "all"
    eval_steps: int = 20
    eval_step_size: float = 0.1


@dataclass
class VPDConfig:
    """One decomposition run: target, which matrices, CI function, objective and schedule."""

    target: TargetConfig = field(default_factory=TargetConfig)
    modules: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns over module paths
    C: int = 20
    C_per_module: dict[str, int] = field(default_factory=dict)  # pattern -> C (first match wins)
    ci: CIConfig = field(default_factory=CIConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    objective: Literal["vpd", "spd"] = "vpd"
    output_loss: Literal["auto", "mse", "kl"] = "auto"
    use_delta: bool = True
    routing: Literal["uniform_k", "all"] = "uniform_k"  # stochastic term (spd always uses all + layerwise)
    stoch_coeff: float = 0.5
    adv_coeff: float = 0.5
    adv_start_frac: float = 0.0  # the adversarial term starts after this fraction of the steps (0 = from the start)
    layerwise_coeff: float = 1.0  # spd only
    imp_coeff: float = 2e-4
    freq_coeff: float = 1e-4  # vpd only
    p_start: float = 2.0
    p_end: float = 0.4
    eps: float = 1e-12
    delta_coeff: float = 1e7
    warmup_steps: int = 400  # faithfulness warm-up on L_delta over U, V only
    warmup_lr: float = 1e-3
    warmup_wd: float = 0.0
    steps: int = 1000
    batch_size: int = 4096  # global; toys: samples, lm: sequences
    seq_len: int = 64  # lm only
    text: str = "generate:200"  # lm only: an innards.data.text source
    max_tokens: int = 2_000_000  # lm only: size of the token pool sampled from
    lr: float = 1e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_final_frac: float = 0.0
    weight_decay: float = 0.0
    clip_uv: float = 0.0  # global-norm clip on U, V gradients (0 = off); CI parameters are never clipped
    init_seed: int = 0
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4
    eval_batch_size: int = 0  # 0 = batch_size
    ci_threshold: float = 0.1  # L0 / rounding threshold for reports
    log_every: int = 50
    checkpoint_every: int = 1000
    out: str = "runs/vpd"
    resume: bool = False
    wandb_project: str | None = None
    progress: bool = True

    @property
    def loss_kind(self) -> str:
        if self.output_loss != "auto":
            return self.output_loss
        return "kl" if self.target.kind == "lm" else "mse"


# settings that may differ between a run and its resumption without changing the result
RESUME_FREE = {"out", "resume", "wandb_project", "progress", "checkpoint_every", "log_every", "eval_every",
               "eval_batches", "eval_batch_size"}


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
