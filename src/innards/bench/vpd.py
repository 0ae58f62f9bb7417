"""innards bench vpd: training-only steps per second and a per-phase breakdown of VPD/SPD decompositions, with
the reference (goodfire-ai/spd) timed interleaved in the same run when a checkout is given; and peak memory per
process of sharded (FSDP2) against unsharded decomposition of language models.

Only what this run measured is reported: rates are steps divided by the seconds timed here, and a speed-up is
the ratio of two rates measured in the same run, interleaved chunk by chunk on the same thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from innards.errors import InnardsError
from innards.io import write_json
from innards.models.load import load_model
from innards.vpd.config import load_config
from innards.vpd.ground_truth import ground_truth
from innards.vpd.run import Built, build, load_decomposition_tensors, load_target, read_meta
from innards.vpd.shard import launch_ranks, random_llama
from innards.vpd.train import PhaseTimer, Trainer

# innards config -> the reference's shipped config it reproduces (or, for VPD objectives, is compared with)
REFERENCE_CONFIGS = {
    "tms-5-2-spd": "spd/experiments/tms/tms_5-2_config.yaml",
    "tms-5-2-id-spd": "spd/experiments/tms/tms_5-2-id_config.yaml",
    "tms-40-10-spd": "spd/experiments/tms/tms_40-10_config.yaml",
    "tms-40-10-id-spd": "spd/experiments/tms/tms_40-10-id_config.yaml",
    "resid-mlp-1-spd": "spd/experiments/resid_mlp/resid_mlp1_config.yaml",
    "resid-mlp-2-spd": "spd/experiments/resid_mlp/resid_mlp2_config.yaml",
    "resid-mlp-3-spd": "spd/experiments/resid_mlp/resid_mlp3_config.yaml",
    "tms-5-2": "spd/experiments/tms/tms_5-2_config.yaml",
}


@dataclass
class BenchVPDConfig:
    """Benchmark VPD/SPD decomposition training (training steps only) against the reference, interleaved."""

    steps: int = 2000
    """timed training steps per case (a case may say NAME:STEPS)"""
    cases: list[str] = field(default_factory=lambda: ["tms-5-2-spd", "tms-5-2", "resid-mlp-1-spd"])
    """shipped configs to time, each NAME or NAME:STEPS"""
    overrides: list[str] = field(default_factory=list)
    """key=value applied to every innards case (e.g. autocast_bf16=false)"""
    chunk: int = 50
    """steps per interleaved chunk (innards and the reference alternate)"""
    untimed: int = 5
    """untimed steps of each implementation before timing"""
    reference: str | None = None
    """path to a goodfire-ai/spd checkout importable by this Python; timed in the same run (skipped when absent)"""
    threads: int = 1
    """torch threads"""
    seed: int = 0
    """seed of both implementations"""
    target_steps: int = 0
    """0 = each config's own target training; smaller only for smoke tests"""
    recovery: bool = True
    """ground-truth recovery of both after the timed steps"""
    memory: bool = False
    """also measure peak RSS per process: 1 process vs 2 processes (replicated, FSDP2, FSDP2 + checkpointing)"""
    memory_steps: int = 3
    """training steps per memory run"""
    memory_models: list[str] = field(default_factory=lambda: ["demo", "wide-llama"])
    """targets of the memory benchmark: demo (the demo LM) and/or wide-llama (a random wider Llama)"""
    out: str | None = None
    """also write the JSON here"""


def _case(spec: str, default_steps: int) -> tuple[str, int]:
    name, _, steps = spec.partition(":")
    return name, int(steps) if steps else default_steps


def _overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise InnardsError(f"override '{it}' is not key=value")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


# ------------------------------------------------------------------------------------------- the reference
def reference_available(path: str | None) -> str | None:
    """None when the reference checkout can be imported from ``path``, else why not."""
    if not path:
        return "no --reference path given"
    p = Path(path)
    if not (p / "spd" / "run_spd.py").is_file():
        return f"{p} is not a goodfire-ai/spd checkout (no spd/run_spd.py)"
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
    try:
        import spd.losses  # noqa: F401
        import spd.run_spd  # noqa: F401
    except Exception as e:  # its dependencies or Python version may be missing here
        return f"the reference does not import here ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


def _ref_config(path: str, name: str, icfg: Any) -> Any:
    """The reference's Config: its shipped YAML for -spd cases; for VPD configs its closest objective."""
    import yaml
    from spd.configs import Config

    data = yaml.safe_load((Path(path) / REFERENCE_CONFIGS[name]).read_text())
    data.update(wandb_project=None, pretrained_model_path=None, autocast_bf16=bool(icfg.autocast_bf16))
    if icfg.objective == "vpd":
        # the reference has no persistent adversary at this commit: its fresh PGD with as many ascent forwards
        # (n_steps - 1 warm-up ascents + the final forward) is the same amount of work per step
        data["loss_metric_configs"] = [
            {"classname": "ImportanceMinimalityLoss", "coeff": icfg.imp_coeff, "pnorm": icfg.p_start,
             "beta": icfg.freq_coeff / icfg.imp_coeff if icfg.imp_coeff else 0.0, "p_anneal_start_frac": 0.0,
             "p_anneal_final_p": icfg.p_end, "p_anneal_end_frac": 1.0, "eps": icfg.eps},
            {"classname": "StochasticReconSubsetLoss", "coeff": icfg.stoch_coeff},
            {"classname": "PGDReconLoss", "coeff": icfg.adv_coeff, "init": "random", "step_size": 0.1,
             "n_steps": max(icfg.adversary.n_steps - 1, 0), "mask_scope": "unique_per_datapoint"},
            {"classname": "FaithfulnessLoss", "coeff": icfg.delta_coeff},
        ]
        data["lr_schedule"] = {"start_val": icfg.lr, "fn_type": icfg.lr_schedule, "warmup_pct": 0.0,
                               "final_val_frac": icfg.lr_final_frac if icfg.lr_schedule == "cosine" else 1.0}
        data["grad_clip_norm_components"] = icfg.clip_uv or None
        data["faithfulness_warmup_steps"] = icfg.warmup_steps
        data["faithfulness_warmup_lr"] = icfg.warmup_lr
        data["faithfulness_warmup_weight_decay"] = icfg.warmup_wd
        data["steps"] = icfg.steps
    return Config(**data)


def _ref_target(tcfg: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The reference's toy class holding innards' target weights."""
    if tcfg.kind == "tms":
        from spd.experiments.tms.configs import TMSModelConfig
        from spd.experiments.tms.models import TMSModel

        m = TMSModel(TMSModelConfig(n_features=tcfg.n_features, n_hidden=tcfg.n_hidden,
                                    n_hidden_layers=1 if tcfg.hidden_identity else 0, tied_weights=True,
                                    init_bias_to_zero=False, device="cpu"))
        m.load_state_dict({k: v.clone() for k, v in state.items()})
        m.tie_weights_()
    else:
        from spd.experiments.resid_mlp.configs import ResidMLPModelConfig
        from spd.experiments.resid_mlp.models import ResidMLP

        m = ResidMLP(ResidMLPModelConfig(n_features=tcfg.n_features, d_embed=tcfg.d_embed, d_mlp=tcfg.d_mlp,
                                         n_layers=tcfg.n_layers, act_fn_name="relu", in_bias=False, out_bias=False))
        sd = {k: v.clone() for k, v in state.items()}
        sd["W_U"] = sd["W_E"].t().contiguous()
        m.load_state_dict(sd)
    m.eval()
    m.requires_grad_(False)
    return m


class ReferenceRunner:
    """The reference's training step: its optimize() loop body without evaluation, logging or saving.

    Built the way its optimize() builds it: ComponentModel, weight tying for tied TMS targets, one AdamW over
    components and CI functions, its faithfulness warm-up, its data set and loader.
    """

    def __init__(self, path: str, name: str, icfg: Any, target_state: dict[str, torch.Tensor], seed: int):
        from spd.data import loop_dataloader
        from spd.experiments.resid_mlp.resid_mlp_dataset import ResidMLPDataset
        from spd.models.component_model import ComponentModel
        from spd.run_spd import run_faithfulness_warmup
        from spd.utils.data_utils import DatasetGeneratedDataLoader, SparseFeatureDataset
        from spd.utils.general_utils import set_seed
        from spd.utils.module_utils import expand_module_patterns

        self.config = cfg = _ref_config(path, name, icfg)
        set_seed(seed)
        target = _ref_target(icfg.target, target_state)
        info = expand_module_patterns(target, cfg.all_module_info)
        self.model = ComponentModel(target_model=target, module_path_info=info, ci_fn_type=cfg.ci_fn_type,
                                    ci_fn_hidden_dims=cfg.ci_fn_hidden_dims,
                                    pretrained_model_output_attr=cfg.pretrained_model_output_attr,
                                    sigmoid_type=cfg.sigmoid_type)
        torch.manual_seed(cfg.seed)  # its seed_per_rank on one process
        if icfg.target.kind == "tms":  # its tms_decomposition ties the components of tied targets
            src, tgt = self.model.components["linear1"], self.model.components["linear2"]
            tgt.U.data = src.V.data.T
            tgt.V.data = src.U.data.T
        self.component_params, self.ci_params = [], []
        for n in self.model.target_module_paths:
            self.component_params.extend(self.model.components[n].parameters())
            self.ci_params.extend(self.model.ci_fns[n].parameters())
        self.opt = torch.optim.AdamW(self.component_params + self.ci_params, lr=cfg.lr_schedule.start_val,
                                     weight_decay=0)
        if cfg.faithfulness_warmup_steps > 0:
            import logging

            logging.getLogger("spd").setLevel(logging.WARNING)
            run_faithfulness_warmup(self.model, self.component_params, cfg)
        if icfg.target.kind == "tms":
            ds: Any = SparseFeatureDataset(n_features=icfg.target.n_features, feature_probability=cfg.task_config.feature_probability,
                                           device="cpu", data_generation_type=cfg.task_config.data_generation_type,
                                           value_range=(0.0, 1.0))
        else:
            ds = ResidMLPDataset(n_features=icfg.target.n_features, feature_probability=cfg.task_config.feature_probability,
                                 device="cpu", calc_labels=False, label_type=None, act_fn_name=None, label_fn_seed=None,
                                 label_coeffs=None, data_generation_type=cfg.task_config.data_generation_type)
        self.it = loop_dataloader(DatasetGeneratedDataLoader(ds, batch_size=cfg.batch_size, shuffle=False))
        self.step = 0

    def train_step(self, T: Any) -> None:
        from spd.losses import compute_total_loss
        from spd.utils.component_utils import calc_ci_l_zero
        from spd.utils.general_utils import bf16_autocast, extract_batch_data, get_scheduled_value

        cfg, model = self.config, self.model
        self.opt.zero_grad()
        lr = get_scheduled_value(step=self.step, total_steps=cfg.steps, config=cfg.lr_schedule)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with T("weight_deltas"):
            deltas = model.calc_weight_deltas()
        with T("data"):
            batch = extract_batch_data(next(self.it))
        with bf16_autocast(enabled=cfg.autocast_bf16):
            with T("target"):
                out = model(batch, cache_type="input")
            with T("ci"):
                ci = model.calc_causal_importances(pre_weight_acts=out.cache, detach_inputs=False, sampling=cfg.sampling)
            total = torch.zeros(())
            for lc in cfg.loss_metric_configs:  # its compute_total_loss, one term at a time so each is timed
                with T(lc.classname):
                    t, _ = compute_total_loss(loss_metric_configs=[lc], model=model, batch=batch, ci=ci,
                                              target_out=out.output, weight_deltas=deltas, pre_weight_acts=out.cache,
                                              current_frac_of_training=self.step / cfg.steps, sampling=cfg.sampling,
                                              use_delta_component=cfg.use_delta_component,
                                              n_mask_samples=cfg.n_mask_samples, output_loss_type=cfg.output_loss_type)
                    total = total + t
        with T("backward"):
            total.backward()
        with T("l0"):
            for layer_ci in ci.lower_leaky.values():
                calc_ci_l_zero(layer_ci, cfg.ci_alive_threshold)
        with T("optimizer"):
            if cfg.grad_clip_norm_components is not None:
                torch.nn.utils.clip_grad_norm_(self.component_params, cfg.grad_clip_norm_components)
            if cfg.grad_clip_norm_ci_fns is not None:
                torch.nn.utils.clip_grad_norm_(self.ci_params, cfg.grad_clip_norm_ci_fns)
            self.opt.step()
        self.step += 1

    def as_innards(self, icfg: Any, target: torch.nn.Module, info: dict[str, Any]) -> Any:
        """The reference's trained components and CI MLPs loaded into an innards decomposition (for its metrics)."""
        from spd.models.components import MLPCiFn, VectorSharedMLPCiFn


        cfg = _no_tie(icfg)
        b = build(cfg, target, info)
        t: dict[str, torch.Tensor] = {}
        for i, c in enumerate(b.decomp.components):
            rc = self.model.components[c.name]
            t[f"V.{c.name}"], t[f"U.{c.name}"] = rc.V.detach().clone(), rc.U.detach().clone()
            fn = self.model.ci_fns[c.name]
            if isinstance(fn, MLPCiFn):
                l1, l2 = fn.layers[0], fn.layers[2]
                t[f"ci.w1.{i}"], t[f"ci.b1.{i}"] = l1.W.detach()[:, 0, :].clone(), l1.b.detach().clone()
                t[f"ci.w2.{i}"], t[f"ci.b2.{i}"] = l2.W.detach()[:, :, 0].clone(), l2.b.detach()[:, 0].clone()
            elif isinstance(fn, VectorSharedMLPCiFn):
                lins = [m for m in fn.layers if hasattr(m, "W")]
                for j, lin in enumerate(lins):
                    t[f"ci.mlps.{i}.{2 * j}.weight"] = lin.W.detach().t().clone()
                    t[f"ci.mlps.{i}.{2 * j}.bias"] = lin.b.detach().clone()
        load_decomposition_tensors(b, t, "the reference's trained decomposition")
        return b


def _no_tie(cfg: Any) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, tie=[])


# ------------------------------------------------------------------------------------------- timing
def _phases(timer: Any, steps: int) -> dict[str, dict[str, float]]:
    return {k: {"wall_ms": round(1e3 * timer.wall[k] / steps, 3), "cpu_ms": round(1e3 * timer.cpu[k] / steps, 3)}
            for k in timer.wall}


def _recovery(b: Built) -> dict[str, Any]:
    gt = ground_truth(b)
    keep = ("mmcs", "ml2r", "min_cosine", "max_norm_ratio_error", "components_that_matter", "ci_error",
            "one_component_features", "passed")
    return {k: gt[k] for k in keep if k in gt}


def bench_case(name: str, steps: int, cfg: BenchVPDConfig, ref_ok: bool) -> dict[str, Any]:
    """Time ``steps`` training steps of one shipped config, interleaved with the reference when available."""
    with tempfile.TemporaryDirectory() as tmp:
        over: dict[str, Any] = {"seed": cfg.seed, "out": tmp, "progress": False, **_overrides(cfg.overrides)}
        if cfg.target_steps:
            over.update({"target.steps": cfg.target_steps, "target.retries": 0})
        icfg = load_config(name, over)
        if steps > icfg.steps:
            raise InnardsError(f"{name}: {steps} timed steps exceed the config's {icfg.steps}")
        tr = Trainer(icfg, Path(tmp), progress=False)
        tr.warmup()
        ref = None
        if ref_ok and name in REFERENCE_CONFIGS:
            ref = ReferenceRunner(cfg.reference, name, icfg, dict(tr.b.target.state_dict()), cfg.seed)
        for _ in range(cfg.untimed):
            tr.train_step()
            if ref is not None:
                ref.train_step(PhaseTimer())
        t_in, t_ref = PhaseTimer(), PhaseTimer()
        tr.timer = t_in
        wall = {"innards": 0.0, "reference": 0.0}
        cpu = dict(wall)
        done = 0
        while done < steps:
            n = min(cfg.chunk, steps - done)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                tr.train_step()
            wall["innards"] += time.perf_counter() - w0
            cpu["innards"] += time.process_time() - c0
            if ref is not None:
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    ref.train_step(t_ref)
                wall["reference"] += time.perf_counter() - w0
                cpu["reference"] += time.process_time() - c0
            done += n
        res: dict[str, Any] = {
            "config": name, "objective": icfg.objective, "timed_steps": steps, "of_config_steps": icfg.steps,
            "untimed_steps_first": cfg.untimed, "batch_size": icfg.batch_size, "C": icfg.C,
            "autocast_bf16": icfg.autocast_bf16,
            "innards": {"seconds": round(wall["innards"], 3), "cpu_seconds": round(cpu["innards"], 3),
                        "steps_per_s": round(steps / wall["innards"], 3),
                        "cpu_steps_per_s": round(steps / cpu["innards"], 3), "phases": _phases(t_in, steps)},
        }
        if cfg.recovery and icfg.target.kind != "lm":
            res["innards"]["recovery"] = _recovery(tr.b)
        if ref is not None:
            rc = ref.config
            res["reference"] = {
                "config": REFERENCE_CONFIGS[name] + ("" if icfg.objective == "spd" else " with a VPD-style loss list"),
                "losses": [{k: v for k, v in lc.model_dump().items() if v is not None} for lc in rc.loss_metric_configs],
                "autocast_bf16": rc.autocast_bf16,
                "seconds": round(wall["reference"], 3), "cpu_seconds": round(cpu["reference"], 3),
                "steps_per_s": round(steps / wall["reference"], 3),
                "cpu_steps_per_s": round(steps / cpu["reference"], 3), "phases": _phases(t_ref, steps)}
            if cfg.recovery:
                target, info = load_target(icfg, Path(tmp))
                res["reference"]["recovery"] = _recovery(ref.as_innards(icfg, target, info))
            res["speedup"] = round(wall["reference"] / wall["innards"], 3)
            res["cpu_speedup"] = round(cpu["reference"] / cpu["innards"], 3)
    return res


# ------------------------------------------------------------------------------------------- memory
def bench_memory(cfg: BenchVPDConfig) -> dict[str, Any]:
    """Peak RSS per process of a few demo-lm-config training steps: 1 process vs 2 (replicated, FSDP2, FSDP2+AC)."""
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        words = ("once upon a time there was a little girl who lived in a village near the forest and every day "
                 "she walked to the river to look at the fish").split()
        import random

        rnd = random.Random(0)
        text.write_text("\n\n".join(" ".join(rnd.choice(words) for _ in range(200)) for _ in range(200)))
        for model in cfg.memory_models:
            name = "demo" if model == "demo" else str(random_llama(Path(tmp) / "wide-llama"))
            base = ["vpd", "train", "--config", "demo-lm", "--no-progress", f"target.name={name}", f"text={text}",
                    f"steps={cfg.memory_steps}", "warmup_steps=2", "batch_size=8", "seq_len=64", "eval_batches=1",
                    "eval_batch_size=2", "adversary.eval_steps=1", "checkpoint_every=0", f"log_every={cfg.memory_steps}"]
            if model != "demo":
                base += ["C=384", "C_per_module={}", "ci.d_model=128"]
            rows = {}
            variants = [("1 process", 1, []), ("2 processes, replicated", 2, []),
                        ("2 processes, FSDP2", 2, ["fsdp=true"]),
                        ("2 processes, FSDP2 + activation checkpointing", 2, ["fsdp=true", "activation_checkpointing=true"])]
            for label, world, extra in variants:
                out = Path(tmp) / f"run-{model}-{len(rows)}"
                t0 = time.perf_counter()
                peaks = launch_ranks(world, base + ["--out", str(out)] + extra)
                rows[label] = {"peak_rss_mb_per_process": [p["rss_mb"] for p in peaks],
                               "seconds": round(time.perf_counter() - t0, 1)}

            m = load_model(name)
            n_params = sum(p.numel() for p in m.parameters())
            meta = read_meta(Path(tmp) / f"run-{model}-0")
            n_sub = sum(c["C"] for c in meta["components"])
            uv = sum(c["C"] * (c["d_in"] + c["d_out"]) for c in meta["components"])
            res[model] = {"target": name if model == "demo" else "random Llama d768 x 4 layers, MLP 3072, vocab 4096",
                          "target_params": n_params, "subcomponents": n_sub, "uv_params": uv,
                          "batch": "8 x 64 tokens", "steps": cfg.memory_steps, "runs": rows}
    return res


def bench_vpd(cfg: BenchVPDConfig) -> dict[str, Any]:
    """Run the benchmark and print JSON."""
    torch.set_num_threads(cfg.threads)
    # innards sets this in every run; applied to the reference as well, so that it is not slowed by denormals
    torch.set_flush_denormal(True)
    why = reference_available(cfg.reference) if cfg.reference else "no --reference path given"
    res: dict[str, Any] = {
        "what": "training steps only (no evaluation, logging or checkpoints), after the faithfulness warm-up and "
                f"{cfg.untimed} untimed steps; innards and the reference alternate in chunks of {cfg.chunk} steps "
                "on the same thread; speedup = reference seconds / innards seconds of this run",
        "threads": cfg.threads, "torch": torch.__version__, "flush_denormal": True,
        "cpu": _cpu_name(), "reference": {"path": cfg.reference, "used": why is None, "skipped_because": why},
        "overrides": list(cfg.overrides), "cases": {}}
    if why is None:
        res["reference"]["revision"] = _git_rev(cfg.reference)
    for spec in cfg.cases:
        name, steps = _case(spec, cfg.steps)
        res["cases"][name] = bench_case(name, steps, cfg, why is None)
        print(json.dumps({name: res["cases"][name]}, indent=1), file=sys.stderr, flush=True)
    if cfg.memory:
        res["memory"] = bench_memory(cfg)
    print(json.dumps(res, indent=2))
    if cfg.out:
        write_json(cfg.out, res)
    return res


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_rev(path: str | None) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
