"""Training loop for VPD (stochastic-subset + persistent adversary + importance/frequency + Δ-L2) and SPD."""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from innards.config import load_yaml, to_dict
from innards.errors import InnardsError
from innards.io import read_json, write_json
from innards.runlog import MetricsLog
from innards.run import Run
from innards.runtime import Dist, init_dist, seed_everything
from innards.tensors import load_tensors, save_tensors
from innards.train.checkpoint import commit_checkpoint, current_checkpoint, has_checkpoint, stage_checkpoint
from innards.vpd.adversary import PersistentPGD, adv_loss, fresh_pgd_term
from innards.vpd.config import RESUME_FREE, VPDConfig, config_from_dict, result_settings
from innards.vpd.data import TokenPool, ToyData
from innards.vpd.evaluate import quick_metrics
from innards.vpd.losses import divergence, minimality, p_at
from innards.vpd.masks import SlicedDraws, stochastic_masks, uniform_k_routing
from innards.vpd.run import DECOMP_FILE, META_FILE, Built, build, ci_values, decomposition_tensors, \
    load_decomposition_tensors, load_target, run_meta, save_final, save_target, target_fingerprint
from innards.vpd.shard import gathered, load_shards, shard, shard_tensors
from innards.vpd.toys import train_target

CKPT = "ckpt"


def lr_at(cfg: VPDConfig, step: int) -> float:
    """Main learning rate: cosine from lr to lr·lr_final_frac (reached at the last step), or constant."""
    if cfg.lr_schedule == "constant" or cfg.steps <= 1:
        return cfg.lr
    frac = min(step / (cfg.steps - 1), 1.0)
    lo = cfg.lr * cfg.lr_final_frac
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))


def faithfulness_warmup(b: Built, steps: int, lr: float, wd: float, probe: torch.Tensor | None = None) -> float:
    """AdamW on L_Δ over U and V only; the optimiser is discarded afterwards (``probe``: sharded training)."""
    if steps <= 0:
        return float(b.decomp.delta_l2(probe).detach())
    params = b.decomp.uv_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    for _ in range(steps):
        loss = b.decomp.delta_l2(probe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(b.decomp.delta_l2(probe).detach())


class PhaseTimer:
    """Wall and CPU seconds spent in each named phase of the training steps (for ``innards bench vpd``)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - w0
            self.cpu[name] += time.process_time() - c0


def _no_timer(name: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


class Trainer:
    """One decomposition run: state, one training step, checkpoints."""

    def __init__(self, cfg: VPDConfig, out: Path, dist: Dist | None = None, progress: bool = True,
                 global_draws: bool = False):
        self.cfg, self.out, self.dist = cfg, out, dist or Dist()
        self.progress = progress and cfg.progress and self.dist.main
        world = self.dist.world
        if cfg.batch_size % world:
            raise InnardsError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
        self.local_batch = cfg.batch_size // world
        # every process draws for the whole batch and keeps its rows: the result does not depend on the world size
        self.global_draws = global_draws and world > 1
        seed_everything(cfg.init_seed)
        target, info = self._target()
        if cfg.autocast_bf16 and torch.device(cfg.device).type == "cpu" and hasattr(target, "set_attn_implementation"):
            # CPU SDPA in bf16 is several times slower than in fp32; HF's eager attention (softmax in fp32) is not
            target.set_attn_implementation("eager")
        self.b = build(cfg, target, info)
        self.kind = cfg.loss_kind
        dev = cfg.device
        if cfg.target.kind == "lm":
            self.data: ToyData | TokenPool = TokenPool(cfg, target.tokenizer, model=target, device=dev)
        else:
            self.data = ToyData(cfg, dev)
        self.sharded = bool(cfg.fsdp and world > 1)
        if cfg.fsdp and cfg.tie:
            raise InnardsError("fsdp does not support tied matrices (tie); use one process or drop tie")
        if self.sharded or cfg.activation_checkpointing:
            shard(self.b, fsdp=self.sharded, checkpoint=cfg.activation_checkpointing)
        self.uv = self.b.decomp.uv_parameters()
        self.ci_params = [p for p in self.b.ci.parameters()]
        # the fused kernel: one call per parameter instead of ~10 (the toys' steps are dominated by small ops);
        # not for FSDP2's DTensor parameters, nor for tied parameters (two views of one storage: the fused
        # kernel's result then depends on how it splits the work, measured: resumed runs diverge)
        self.opt = torch.optim.AdamW([{"params": self.uv}, {"params": self.ci_params}], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, fused=not self.sharded and not cfg.tie)
        seed = cfg.seed * 1000 + (0 if self.global_draws else self.dist.rank)
        self.gen = torch.Generator().manual_seed(seed)
        self.draws: Any = SlicedDraws(self.gen, self.dist.rank, world) if self.global_draws else self.gen
        # a fixed small input on which a sharded target forms Δ inside its own forward calls
        self.probe = self.data.batch(1, torch.Generator().manual_seed(12345)) if self.sharded else None
        self.adv = None
        if cfg.objective == "vpd" and cfg.adv_coeff > 0:
            shapes = {}
            rows = cfg.batch_size if self.global_draws else self.local_batch
            for c in self.b.decomp.components:
                lead = (rows,) if cfg.target.kind != "lm" else (rows, cfg.seq_len)
                shapes[c.name] = (*lead, c.C + 1)
            self.adv = PersistentPGD(shapes, cfg.adversary, self.gen, dev)
            if self.global_draws:
                lo = self.dist.rank * self.local_batch
                self.adv.sources = {n: s[lo:lo + self.local_batch].clone() for n, s in self.adv.sources.items()}
                self.adv.m = {n: torch.zeros_like(s) for n, s in self.adv.sources.items()}
                self.adv.v = {n: torch.zeros_like(s) for n, s in self.adv.sources.items()}
        self.timer: Any = _no_timer
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

    def warmup(self) -> float:
        """The faithfulness warm-up of this run."""
        cfg = self.cfg
        return faithfulness_warmup(self.b, cfg.warmup_steps, cfg.warmup_lr, cfg.warmup_wd, self.probe)

    def _batch(self) -> torch.Tensor:
        if self.global_draws:
            x = self.data.batch(self.cfg.batch_size, self.gen)
            lo = self.dist.rank * self.local_batch
            return x[lo:lo + self.local_batch]
        return self.data.batch(self.local_batch, self.gen)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.cfg.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.cfg.device).type, dtype=torch.bfloat16)

    def _active_rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Toys: indices of the rows where some decomposed matrix sees a non-zero input (None: use all rows).

        On the other rows every decomposed matrix gets x = 0, so the masked model gives the frozen output
        whatever the masks ((0·V ⊙ m) U + m_Δ·0·Δᵀ + b = b), and the per-row CI is that of a zero input: the
        reconstruction losses and their gradients are the same without those rows.
        """
        if not self.cfg.skip_inert_rows or self.cfg.target.kind == "lm" or self.global_draws:
            return None
        active = torch.stack([v.reshape(v.shape[0], -1).ne(0).any(-1) for v in inputs.values()]).any(0)
        n = int(active.sum())
        if n == 0 or n == active.numel():
            return None
        return active.nonzero().squeeze(1)

    def _reused(self, inputs: dict[str, torch.Tensor]) -> list[str]:
        """Matrices whose x V is computed once per step and reused by every forward reaching them unmasked.

        The per-subcomponent CI needs x V of every matrix anyway. Otherwise only matrices reached before any
        masked one gain: the first one executed, and under the SPD layerwise term each matrix in its own forward.
        """
        if self.cfg.ci.kind == "mlp" or (self.cfg.objective == "spd" and self.cfg.layerwise_coeff):
            return list(inputs)
        return list(inputs)[:1]

    # ----- one step -----
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, b, step, T = self.cfg, self.b, self.step, self.timer
        lr = lr_at(cfg, step)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        p = p_at(step, cfg.steps, cfg.p_start, cfg.p_end, cfg.p_end_frac)
        vpd = cfg.objective == "vpd"
        use_delta = cfg.use_delta
        kind, draws, world = self.kind, self.draws, self.dist.world
        logs: dict[str, torch.Tensor] = {}
        with T("data"):
            x = self._batch()
        with self._autocast():
            with T("target"):
                clean, inputs = b.decomp.clean(x)
                rows = self._active_rows(inputs)
                n_all = x.shape[0]
                if rows is not None:
                    x, clean, inputs = x[rows], clean[rows], {n: v[rows] for n, v in inputs.items()}
            # a reconstruction loss over the active rows, as a mean over the whole batch (inert rows add 0)
            scale = x.shape[0] / n_all
            with T("ci"):
                reuse = self._reused(inputs)
                h = b.decomp.inner({n: inputs[n] for n in reuse})
                g, gu = ci_values(b, inputs, h if cfg.ci.kind == "mlp" else None)
                weights = None
                if rows is not None:
                    # every inert row has the same CI: that of a zero input, computed once and counted n_inert times
                    zero = {n: v[:1] * 0 for n, v in inputs.items()}
                    g0, gu0 = ci_values(b, zero, b.decomp.inner({n: zero[n] for n in reuse}) if cfg.ci.kind == "mlp" else None)
                    gu = {n: torch.cat([gu[n], gu0[n]]) for n in gu}
                    weights = torch.ones(x.shape[0] + 1, device=x.device)
                    weights[-1] = n_all - x.shape[0]
            h_d = {n: v.detach() for n, v in h.items()}

            adv_lr = 0.0
            adv_route = None
            adv_start = int(cfg.adv_start_frac * cfg.steps)
            adv_on = vpd and self.adv is not None and step >= adv_start
            if adv_on:
                with T("adversary"):
                    adv_lr = self.adv.lr_at(step - adv_start, cfg.steps)
                    if cfg.adversary.routing == "uniform_k":
                        prefix = next(iter(g.values())).shape[:-1]
                        r = uniform_k_routing(tuple(prefix), len(g), draws, x.device)
                        adv_route = {n: r[..., i] for i, n in enumerate(g)}
                    gd = {n: v.detach() for n, v in g.items()}
                    for _ in range(max(cfg.adversary.n_steps - 1, 0)):
                        leaves = self.adv.leaves()
                        # inert rows' sources get a zero gradient and still move by Adam's momentum, as in a full pass
                        src = leaves if rows is None else {n: t[rows] for n, t in leaves.items()}
                        la = adv_loss(b.decomp, x, clean, gd, src, kind, use_delta, adv_route, pre=h_d) * scale
                        grads = torch.autograd.grad(la, list(leaves.values()))
                        self.adv.ascend(dict(zip(leaves, grads)), adv_lr)

            total = torch.zeros((), device=x.device)
            with T("delta_l2"):
                if cfg.delta_coeff:
                    dl2 = b.decomp.delta_l2(self.probe)
                    total = total + cfg.delta_coeff * dl2
                else:
                    with torch.no_grad():
                        dl2 = b.decomp.delta_l2(self.probe)
            with T("minimality"):
                imp, freq = minimality(gu, p, cfg.eps, world, weights)
                total = total + cfg.imp_coeff * imp
                if vpd and cfg.freq_coeff:
                    total = total + cfg.freq_coeff * freq
            logs.update(delta_l2=dl2.detach(), importance=imp.detach(), frequency=freq.detach())

            with T("stochastic"):
                routing = cfg.routing if vpd else cfg.spd_routing
                out = b.decomp.masked(x, stochastic_masks(g, draws, use_delta, routing), pre=h)
                ls = divergence(clean, out, kind) * scale
                total = total + cfg.stoch_coeff * ls
                logs["stochastic"] = ls.detach()
            if not vpd and cfg.layerwise_coeff:
                with T("layerwise"):
                    # one draw for all matrices, each masked alone in its own forward (as the reference)
                    ms = stochastic_masks(g, draws, use_delta, "all")
                    lw = sum(divergence(clean, b.decomp.masked(x, {n: ms[n]}, pre=h), kind) for n in b.decomp.names)
                    lw = lw / len(b.decomp.names) * scale
                    total = total + cfg.layerwise_coeff * lw
                    logs["layerwise"] = lw.detach()
            if not vpd and cfg.train_pgd.coeff:
                with T("pgd"):
                    lp = fresh_pgd_term(b.decomp, x, clean, g, kind, cfg.train_pgd, use_delta, draws, world, pre=h) * scale
                    total = total + cfg.train_pgd.coeff * lp
                    logs["pgd"] = lp.detach()
            leaves = None
            if adv_on:
                with T("adversarial"):
                    leaves = self.adv.leaves()
                    src = leaves if rows is None else {n: t[rows] for n, t in leaves.items()}
                    la = adv_loss(b.decomp, x, clean, g, src, kind, use_delta, adv_route, pre=h) * scale
                    total = total + cfg.adv_coeff * la
                    logs["adversarial"] = la.detach()
            for n, gn in g.items():
                fires = (gn.detach() > cfg.ci_threshold).float().sum(-1)
                if rows is not None:
                    fires = torch.cat([fires, (g0[n].detach() > cfg.ci_threshold).float().sum(-1).expand(n_all - x.shape[0])])
                logs[f"l0/{n}"] = fires.mean()

        with T("backward"):
            self.opt.zero_grad(set_to_none=True)
            total.backward()
        with T("optimizer"):
            if world > 1 and not self.sharded:
                self._allreduce_grads()
            if cfg.clip_uv > 0:
                torch.nn.utils.clip_grad_norm_(self.uv, cfg.clip_uv)
            self.opt.step()
        if leaves is not None and cfg.adversary.n_steps >= 1:
            with T("adversary"):
                # third ascent: the source gradient of the main graph, without the loss coefficient
                self.adv.ascend({n: t.grad / cfg.adv_coeff for n, t in leaves.items()}, adv_lr)
        logs.update(total=total.detach(), lr=torch.tensor(lr), p=torch.tensor(p))
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
    def _rank_state(self) -> dict[str, torch.Tensor]:
        rank_state = {"gen": self.gen.get_state()}
        if self.adv is not None:
            rank_state.update(self.adv.state())
        return rank_state

    def _checkpoint_files(self) -> tuple[str, dict[str, torch.Tensor]]:
        """This process's file of a checkpoint: the whole state (rank 0), its RNG/adversary state, or its shard."""
        if self.sharded:
            return f"shard{self.dist.rank}.safetensors", shard_tensors(self)
        rank_state = self._rank_state()
        if self.dist.rank > 0:
            return f"rank{self.dist.rank}.safetensors", rank_state
        tensors = decomposition_tensors(self.b)
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors.update({f"rank.{k}": v for k, v in rank_state.items()})
        return "state.safetensors", tensors

    def save_checkpoint(self) -> None:
        """Every process writes its file into one staged folder; rank 0 commits it (train/checkpoint.py)."""
        root = self.out / CKPT
        tmp = stage_checkpoint(root, self.step, create=self.dist.main)
        self.dist.barrier()
        fname, tensors = self._checkpoint_files()
        digests = [(fname, save_tensors(tmp / fname, tensors))]
        if self.dist.world > 1:
            every: list[list[tuple[str, str]] | None] = [None] * self.dist.world
            torch.distributed.all_gather_object(every, digests)
            digests = [d for part in every for d in (part or [])]
        if self.dist.main:
            groups = [{k: v for k, v in gr.items() if k != "params"} for gr in self.opt.state_dict()["param_groups"]]
            meta = run_meta(self.b, self.step, {"settings": result_settings(self.cfg), "param_groups": groups,
                                                "world": self.dist.world, "sharded": self.sharded, "last": self.last})
            commit_checkpoint(root, tmp, self.step, meta, dict(digests))
        self.dist.barrier()

    def load_checkpoint(self) -> None:
        root = self.out / CKPT
        d = current_checkpoint(root)
        if d is None:
            raise InnardsError(f"nothing to resume: {root} holds no checkpoint")
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
        if bool(meta.get("sharded")) != self.sharded:
            raise InnardsError(f"checkpoint in {d} was written {'with' if meta.get('sharded') else 'without'} fsdp")
        fname = (f"shard{self.dist.rank}.safetensors" if self.sharded else
                 "state.safetensors" if self.dist.main else f"rank{self.dist.rank}.safetensors")
        digest = (meta.get("files") or {}).get(fname, meta.get("sha256") if fname == "state.safetensors" else None)
        tensors = load_tensors(d / fname, digest, what="checkpoint")
        if self.sharded:
            load_shards(self, d, meta, tensors)
        else:
            self._load_state(d, meta, tensors)
        self.step = int(meta["step"])
        self.last = meta.get("last") or {}

    def _load_state(self, d: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Decomposition, optimiser and RNG/adversary state of an unsharded checkpoint (rank 0's file holds them all)."""
        if self.dist.main:
            load_decomposition_tensors(self.b, tensors, str(d))
            own = {k[5:]: v for k, v in tensors.items() if k.startswith("rank.")}
        else:  # rank 0's full state (the replicas are identical), then this rank's own draws
            main = load_tensors(d / "state.safetensors", (meta.get("files") or {}).get("state.safetensors",
                                                                                       meta.get("sha256")),
                                what="checkpoint")
            load_decomposition_tensors(self.b, main, str(d))
            own, tensors = tensors, main
        try:
            per_param = {i: {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
                         for i in range(len(self.uv) + len(self.ci_params))}
            self.load_optimizer(per_param, meta["param_groups"])
            self.load_rank_state(own)
        except (KeyError, ValueError, RuntimeError) as e:
            raise InnardsError(f"checkpoint in {d} does not load ({type(e).__name__})") from None

    def load_optimizer(self, per_param: dict[int, dict[str, torch.Tensor]], groups: list[dict[str, Any]]) -> None:
        """AdamW state from each parameter's saved tensors and the saved param-group settings."""
        state: dict[str, Any] = {"state": {i: st for i, st in per_param.items() if st}, "param_groups": []}
        idx = 0
        for gr, saved in zip(self.opt.param_groups, groups):
            state["param_groups"].append({**saved, "params": list(range(idx, idx + len(gr["params"])))})
            idx += len(gr["params"])
        self.opt.load_state_dict(state)

    def load_rank_state(self, rank_state: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(rank_state["gen"])
        if self.adv is not None:
            self.adv.load(rank_state)


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


def train(cfg: VPDConfig, stop_at: int | None = None, progress: bool = True, global_draws: bool = False) -> Path:
    """Run (or resume) a decomposition into cfg.out; returns the run folder.

    ``stop_at`` ends the run early after writing a checkpoint at that step (used to test exact resume).
    ``global_draws``: under torchrun every process draws data and masks for the whole batch and keeps its
    rows, so that the result equals the single-process one (testing).
    """
    dist = init_dist()
    torch.set_flush_denormal(True)  # tiny CI gradients otherwise hit slow denormal arithmetic on CPU
    out = Path(cfg.out)
    free = set(RESUME_FREE)
    saved = config_from_dict(load_yaml(out / "config.yaml")) if cfg.resume and (out / "config.yaml").is_file() else None
    extending = saved is not None and saved.steps < cfg.steps and _same_run(result_settings(saved), result_settings(cfg), cfg)
    if extending:
        free.add("steps")  # an extendable run may continue past its old end
    run = Run.open(out, "vpd", cfg, resume=cfg.resume, overwrite=cfg.overwrite, free=free, main=dist.main,
                   inputs={"text": cfg.text} if cfg.target.kind == "lm" and Path(cfg.text).exists() else {})
    try:
        state = dist.from_main(run.state)
        if state == "complete" and not extending:
            if dist.main:
                run.say_complete()
            return out
        if dist.main and state == "complete":  # extended: its config now holds the new step count
            run.reopen(cfg)
        _train(cfg, out, dist, run, progress, stop_at, global_draws, resumed=state != "new")
    finally:
        run.close()
    return out


def _train(cfg: VPDConfig, out: Path, dist: Dist, run: Run, progress: bool, stop_at: int | None, global_draws: bool,
           resumed: bool) -> None:
    """The training loop of :func:`train` inside its open run folder."""
    ckpt_exists = has_checkpoint(out / CKPT)
    dist.barrier()
    tr = Trainer(cfg, out, dist, progress, global_draws=global_draws)
    if resumed and ckpt_exists:
        tr.load_checkpoint()
    else:
        tr.last["warmup_delta_l2"] = tr.warmup()
    log = MetricsLog(out, cfg.wandb_project if dist.main else None, to_dict(cfg), resume_step=tr.step if resumed else None,
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
            if cfg.eval_every and tr.step % cfg.eval_every == 0 and tr.step < cfg.steps and dist.main and not tr.sharded:
                log.log(tr.step, **_quick_eval(tr))
            if cfg.checkpoint_every and tr.step % cfg.checkpoint_every == 0 and tr.step < end:
                tr.save_checkpoint()
    finally:
        bar.close()
    tr.save_checkpoint()
    if tr.step >= cfg.steps:
        if tr.sharded:
            full = gathered(tr)  # every rank takes part in the gather; rank 0 keeps an unsharded copy
        elif dist.world > 1:
            _check_replicas(tr)
            full = tr.b
        else:
            full = tr.b
        if dist.main:
            ev = _quick_eval(tr, full)
            log.log(tr.step, **ev)
            save_final(full, out, tr.step, {"last": tr.last, "final_eval": ev, "world": dist.world,
                                            "sharded": tr.sharded})
            run.complete(headline={k: v for k, v in ev.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                         outputs=[DECOMP_FILE, META_FILE, "metrics.jsonl"])
            print(f"vpd train: {out}: {tr.step:,} steps; " + ", ".join(
                f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, float)))
    log.close()
    dist.barrier()


def _check_replicas(tr: Trainer) -> None:
    """Under torchrun every rank must hold identical parameters after the all-reduced updates."""
    import torch.distributed as td

    flat = torch.cat([p.detach().reshape(-1) for p in tr.uv + tr.ci_params])
    ref = flat.clone()
    td.broadcast(ref, 0)
    if not torch.equal(ref, flat):
        raise RuntimeError(f"rank {tr.dist.rank} parameters diverged from rank 0")


def _quick_eval(tr: Trainer, b: Built | None = None) -> dict[str, Any]:
    return quick_metrics(b or tr.b, tr.data, n_batches=max(1, tr.cfg.eval_batches // 2))
