"""Training loop for VPD (stochastic-subset + persistent adversary + importance/frequency + Δ-L2) and SPD."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from innards.config import save_config, to_dict, load_yaml
from innards.errors import InnardsError
from innards.io import load_tensors, read_json, save_tensors, write_json
from innards.runlog import MetricsLog
from innards.runtime import Dist, init_dist, seed_everything
from innards.vpd.adversary import PersistentPGD, adv_loss
from innards.vpd.config import VPDConfig, config_from_dict, result_settings
from innards.vpd.data import ToyData, TokenPool
from innards.vpd.losses import divergence, minimality, p_at
from innards.vpd.masks import stochastic_masks, uniform_k_routing
from innards.vpd.run import Built, build, decomposition_tensors, load_decomposition_tensors, load_target, run_meta, \
    save_final, save_target, target_fingerprint
from innards.vpd.sigmoids import lower_leaky, upper_leaky
from innards.vpd.toys import train_target

CKPT = "ckpt"


def lr_at(cfg: VPDConfig, step: int) -> float:
    """Main learning rate: cosine from lr to lr·lr_final_frac (reached at the last step), or constant."""
    if cfg.lr_schedule == "constant" or cfg.steps <= 1:
        return cfg.lr
    frac = min(step / (cfg.steps - 1), 1.0)
    lo = cfg.lr * cfg.lr_final_frac
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))


def ci_values(b: Built, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(g_lower, g_upper) from the CI function on the clean inputs."""
    z = b.ci(inputs, b.decomp, detach=b.cfg.ci.detach_inputs)
    return {n: lower_leaky(v) for n, v in z.items()}, {n: upper_leaky(v) for n, v in z.items()}


def faithfulness_warmup(b: Built, steps: int, lr: float, wd: float) -> float:
    """AdamW on L_Δ over U and V only; the optimiser is discarded afterwards."""
    if steps <= 0:
        return float(b.decomp.delta_l2().detach())
    params = b.decomp.uv_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    for _ in range(steps):
        loss = b.decomp.delta_l2()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(b.decomp.delta_l2().detach())


class Trainer:
    """One decomposition run: state, one training step, checkpoints."""

    def __init__(self, cfg: VPDConfig, out: Path, dist: Dist | None = None, progress: bool = True):
        self.cfg, self.out, self.dist = cfg, out, dist or Dist()
        self.progress = progress and cfg.progress and self.dist.main
        world = self.dist.world
        if cfg.batch_size % world:
            raise InnardsError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
        self.local_batch = cfg.batch_size // world
        seed_everything(cfg.init_seed)
        target, info = self._target()
        self.b = build(cfg, target, info)
        self.kind = cfg.loss_kind
        dev = cfg.device
        if cfg.target.kind == "lm":
            self.data: Any = TokenPool(cfg, target.tokenizer, model=target, device=dev)
        else:
            self.data = ToyData(cfg, dev)
        self.uv = self.b.decomp.uv_parameters()
        self.ci_params = [p for p in self.b.ci.parameters()]
        self.opt = torch.optim.AdamW([{"params": self.uv}, {"params": self.ci_params}], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.adv = None
        if cfg.objective == "vpd" and cfg.adv_coeff > 0:
            shapes = {}
            for c in self.b.decomp.components:
                lead = (self.local_batch,) if cfg.target.kind != "lm" else (self.local_batch, cfg.seq_len)
                shapes[c.name] = (*lead, c.C + 1)
            self.adv = PersistentPGD(shapes, cfg.adversary, self.gen, dev)
        self.step = 0
        self.last: dict[str, float] = {}

    # ----- setup -----
    def _target(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        cfg = self.cfg
        if cfg.target.kind == "lm" or (self.out / "target.safetensors").is_file():
            return load_target(cfg, self.out)
        model, report = train_target(cfg.target, progress=self.progress)
        if self.dist.world > 1:
            import torch.distributed as td

            for t in model.state_dict().values():
                td.broadcast(t, 0)
        info = {"name": cfg.target.kind, "fingerprint": target_fingerprint(model), "training": report}
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_target(model, cfg.target, report, self.out)
            if not report["all_learned"]:
                tqdm.write(f"warning: no seed in {cfg.target.retries + 1} tries learned all features; "
                           f"using seed {report['seed']} ({report['learned_features']}/{report['n_features']})")
        return model, info

    # ----- one step -----
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, b, step = self.cfg, self.b, self.step
        lr = lr_at(cfg, step)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        p = p_at(step, cfg.steps, cfg.p_start, cfg.p_end)
        x = self.data.batch(self.local_batch, self.gen)
        clean, inputs = b.decomp.clean(x)
        g, gu = ci_values(b, inputs)
        vpd = cfg.objective == "vpd"
        use_delta = cfg.use_delta
        logs: dict[str, torch.Tensor] = {}

        adv_lr = 0.0
        adv_route = None
        adv_start = int(cfg.adv_start_frac * cfg.steps)
        adv_on = vpd and self.adv is not None and step >= adv_start
        if adv_on:
            adv_lr = self.adv.lr_at(step - adv_start, cfg.steps)
            if cfg.adversary.routing == "uniform_k":
                prefix = next(iter(g.values())).shape[:-1]
                r = uniform_k_routing(tuple(prefix), len(g), self.gen)
                adv_route = {n: r[..., i] for i, n in enumerate(g)}
            gd = {n: v.detach() for n, v in g.items()}
            for _ in range(max(cfg.adversary.n_steps - 1, 0)):
                leaves = self.adv.leaves()
                la = adv_loss(b.decomp, x, clean, gd, leaves, self.kind, use_delta, adv_route)
                grads = torch.autograd.grad(la, list(leaves.values()))
                self.adv.ascend(dict(zip(leaves, grads)), adv_lr)

        dl2 = b.decomp.delta_l2()
        total = cfg.delta_coeff * dl2
        imp, freq = minimality(gu, p, cfg.eps, self.dist.world)
        total = total + cfg.imp_coeff * imp
        if vpd and cfg.freq_coeff:
            total = total + cfg.freq_coeff * freq
        logs.update(delta_l2=dl2.detach(), importance=imp.detach(), frequency=freq.detach())

        routing = cfg.routing if vpd else "all"
        out = b.decomp.masked(x, stochastic_masks(g, self.gen, use_delta, routing))
        ls = divergence(clean, out, self.kind)
        total = total + cfg.stoch_coeff * ls
        logs["stochastic"] = ls.detach()
        if not vpd and cfg.layerwise_coeff:
            lw = sum(divergence(clean, b.decomp.masked(x, stochastic_masks(g, self.gen, use_delta, "all", only=n)), self.kind)
                     for n in b.decomp.names) / len(b.decomp.names)
            total = total + cfg.layerwise_coeff * lw
            logs["layerwise"] = lw.detach()
        leaves = None
        if adv_on:
            leaves = self.adv.leaves()
            la = adv_loss(b.decomp, x, clean, g, leaves, self.kind, use_delta, adv_route)
            total = total + cfg.adv_coeff * la
            logs["adversarial"] = la.detach()

        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.dist.world > 1:
            self._allreduce_grads()
        if cfg.clip_uv > 0:
            torch.nn.utils.clip_grad_norm_(self.uv, cfg.clip_uv)
        self.opt.step()
        if leaves is not None and cfg.adversary.n_steps >= 1:
            # third ascent: the source gradient of the main graph, without the loss coefficient
            self.adv.ascend({n: t.grad / cfg.adv_coeff for n, t in leaves.items()}, adv_lr)
        logs.update(total=total.detach(), lr=torch.tensor(lr), p=torch.tensor(p))
        for n, gn in g.items():
            logs[f"l0/{n}"] = (gn.detach() > cfg.ci_threshold).float().sum(-1).mean()
        self.step += 1
        return logs

    def _allreduce_grads(self) -> None:
        import torch.distributed as td

        params = [p for p in self.uv + self.ci_params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        td.all_reduce(flat)
        flat /= self.dist.world
        i = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[i:i + n].view_as(p.grad))
            i += n

    # ----- checkpoints -----
    def save_checkpoint(self) -> None:
        d = self.out / CKPT
        d.mkdir(parents=True, exist_ok=True)
        rank_state = {"gen": self.gen.get_state()}
        if self.adv is not None:
            rank_state.update(self.adv.state())
        if self.dist.rank > 0:
            save_tensors(d / f"rank{self.dist.rank}.safetensors", rank_state)
            return
        tensors = decomposition_tensors(self.b)
        opt_state = self.opt.state_dict()
        for i, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors.update({f"rank.{k}": v for k, v in rank_state.items()})
        digest = save_tensors(d / "state.safetensors", tensors)
        groups = [{k: v for k, v in gr.items() if k != "params"} for gr in opt_state["param_groups"]]
        meta = run_meta(self.b, self.step, {"settings": result_settings(self.cfg), "param_groups": groups,
                                            "world": self.dist.world, "last": self.last})
        write_json(d / "state.json", {**meta, "sha256": digest})

    def load_checkpoint(self) -> None:
        d = self.out / CKPT
        meta = read_json(d / "state.json", "checkpoint metadata")
        try:  # settings added to VPDConfig after the checkpoint was written take their defaults
            saved = result_settings(config_from_dict(meta.get("settings") or {}))
        except InnardsError:
            saved = meta.get("settings") or {}
        if not _same_run(saved, result_settings(self.cfg), self.cfg):
            changed = _diff(saved, result_settings(self.cfg))
            raise InnardsError(f"--resume with changed settings ({', '.join(changed[:5])}); use a new --out or the same settings")
        if meta.get("world", 1) != self.dist.world:
            raise InnardsError(f"checkpoint was written by {meta.get('world')} processes, resuming with {self.dist.world}")
        tensors = load_tensors(d / "state.safetensors", meta.get("sha256"), what="checkpoint")
        load_decomposition_tensors(self.b, tensors, str(d))
        try:
            state = {"state": {}, "param_groups": []}
            n_params = len(self.uv) + len(self.ci_params)
            for i in range(n_params):
                st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
                if st:
                    state["state"][i] = st
            idx = 0
            for gr, saved in zip(self.opt.param_groups, meta["param_groups"]):
                state["param_groups"].append({**saved, "params": list(range(idx, idx + len(gr["params"])))})
                idx += len(gr["params"])
            self.opt.load_state_dict(state)
            if self.dist.rank > 0:
                rank_state = load_tensors(d / f"rank{self.dist.rank}.safetensors", what="checkpoint")
            else:
                rank_state = {k[5:]: v for k, v in tensors.items() if k.startswith("rank.")}
            self.gen.set_state(rank_state["gen"])
            if self.adv is not None:
                self.adv.load(rank_state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise InnardsError(f"checkpoint in {d} does not load ({type(e).__name__})") from None
        self.step = int(meta["step"])
        self.last = meta.get("last") or {}


def extendable(cfg: VPDConfig) -> bool:
    """Whether the run's trajectory does not depend on the total step count, so --resume may raise `steps`.

    True for the SPD objective with a constant learning rate and a fixed p (VPD's adversary warm-up and
    any annealing are scheduled over the total).
    """
    return cfg.objective == "spd" and cfg.lr_schedule == "constant" and cfg.p_start == cfg.p_end


def _same_run(saved: dict, new: dict, cfg: VPDConfig) -> bool:
    if saved == new:
        return True
    changed = {k for k in set(saved) | set(new) if saved.get(k) != new.get(k)}
    return changed == {"steps"} and extendable(cfg) and new["steps"] >= saved["steps"]


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, prefix + k + ".")
        elif va != vb:
            out.append(f"{prefix}{k}: {va} -> {vb}")
    return out


def train(cfg: VPDConfig, stop_at: int | None = None, progress: bool = True) -> Path:
    """Run (or resume) a decomposition into cfg.out; returns the run folder.

    ``stop_at`` ends the run early after writing a checkpoint at that step (used to test exact resume).
    """
    dist = init_dist()
    torch.set_flush_denormal(True)  # tiny CI gradients otherwise hit slow denormal arithmetic on CPU
    out = Path(cfg.out)
    ckpt_exists = (out / CKPT / "state.json").is_file()
    if cfg.resume:
        if not ckpt_exists and not (out / "config.yaml").is_file():
            raise InnardsError(f"nothing to resume in {out} (no checkpoint)")
        if (out / "config.yaml").is_file():
            saved = config_from_dict(load_yaml(out / "config.yaml"))
            if not _same_run(result_settings(saved), result_settings(cfg), cfg):
                changed = _diff(result_settings(saved), result_settings(cfg))
                raise InnardsError(f"--resume with changed settings ({', '.join(changed[:5])}); use a new --out or the same settings")
    elif ckpt_exists or (out / "decomposition.safetensors").is_file():
        raise InnardsError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    dist.barrier()
    tr = Trainer(cfg, out, dist, progress)
    if cfg.resume and ckpt_exists:
        tr.load_checkpoint()
    else:
        tr.last["warmup_delta_l2"] = faithfulness_warmup(tr.b, cfg.warmup_steps, cfg.warmup_lr, cfg.warmup_wd)
    log = MetricsLog(out, cfg.wandb_project if dist.main else None, to_dict(cfg), resume_step=tr.step if cfg.resume else None,
                     enabled=dist.main)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = tqdm(total=cfg.steps, initial=tr.step, desc="vpd train", disable=not tr.progress, dynamic_ncols=True)
    t0, s0 = time.time(), tr.step
    try:
        while tr.step < end:
            logs = tr.train_step()
            bar.update(1)
            if tr.step % cfg.log_every == 0 or tr.step == cfg.steps:
                vals = {k: float(v) for k, v in logs.items()}
                vals["steps_per_s"] = (tr.step - s0) / max(time.time() - t0, 1e-9)
                tr.last = {k: v for k, v in vals.items() if not k.startswith("l0/")}
                log.log(tr.step, **vals)
                bar.set_postfix(loss=f"{vals['total']:.3g}", stoch=f"{vals['stochastic']:.3g}")
            if cfg.eval_every and tr.step % cfg.eval_every == 0 and tr.step < cfg.steps and dist.main:
                log.log(tr.step, **_quick_eval(tr))
            if cfg.checkpoint_every and tr.step % cfg.checkpoint_every == 0 and tr.step < end:
                tr.save_checkpoint()
    finally:
        bar.close()
    tr.save_checkpoint()
    if tr.step >= cfg.steps:
        if dist.world > 1:
            _check_replicas(tr)
        if dist.main:
            ev = _quick_eval(tr)
            log.log(tr.step, **ev)
            save_final(tr.b, out, tr.step, {"last": tr.last, "final_eval": ev, "world": dist.world})
    log.close()
    dist.barrier()
    return out


def _check_replicas(tr: Trainer) -> None:
    """Under torchrun every rank must hold identical parameters after the all-reduced updates."""
    import torch.distributed as td

    flat = torch.cat([p.detach().reshape(-1) for p in tr.uv + tr.ci_params])
    ref = flat.clone()
    td.broadcast(ref, 0)
    if not torch.equal(ref, flat):
        raise RuntimeError(f"rank {tr.dist.rank} parameters diverged from rank 0")


def _quick_eval(tr: Trainer) -> dict[str, Any]:
    from innards.vpd.evaluate import quick_metrics

    return quick_metrics(tr.b, tr.data, n_batches=max(1, tr.cfg.eval_batches // 2))
