"""Sharded decomposition: FSDP2 (``fully_shard``) over the target's blocks, the components and the CI function,
activation checkpointing of blocks, per-rank checkpoint shards, and the gather to one full copy at the end.

Every use of U and V goes through a component's own module call and Δ is formed inside each target matrix's
forward (:meth:`Decomposition.delta_l2` with a probe input), so FSDP2's hooks have all-gathered what is used.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from innards.errors import InnardsError
from innards.models.load import load_model
from innards.vpd.components import Decomposition
from innards.vpd.run import Built, build, load_decomposition_tensors, load_target

if TYPE_CHECKING:
    from innards.vpd.train import Trainer

# transformer blocks of HF models (model.layers.3, transformer.h.3, gpt_neox.layers.3) and of the toys
BLOCK = re.compile(r"(^|\.)(layers|h|blocks)\.\d+$")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model that have their own forward (the units to shard and to recompute)."""
    return [m for n, m in model.named_modules() if BLOCK.search(n) and type(m).forward is not nn.Module.forward]


def _checkpointed(decomp: Decomposition | None, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` under non-reentrant activation checkpointing, recomputed with the decomposition state of its call."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        st = decomp._state if decomp is not None else None
        # the Δ probe forward has no output that needs a gradient, so nothing would unshard a recomputation
        if not torch.is_grad_enabled() or (st is not None and st.mode == "delta"):
            return fn(*args, **kwargs)
        perturbed = st.perturbed if st is not None else False

        def run(*a: Any, **k: Any) -> Any:
            if decomp is None:
                return fn(*a, **k)
            prev = decomp._state
            decomp._state = st
            if st is not None:
                st.perturbed = perturbed  # the recomputation must take the same path as the first forward
            try:
                return fn(*a, **k)
            finally:
                decomp._state = prev

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return wrapped


def shard(b: Built, fsdp: bool = True, checkpoint: bool = False) -> None:
    """Apply activation checkpointing and/or FSDP2 in place (needs an initialised process group for fsdp)."""
    tblocks = blocks(b.target)
    cblocks = list(getattr(b.ci, "blocks", []))
    if checkpoint:
        for m in tblocks:
            m.forward = _checkpointed(b.decomp, m.forward)
        for m in cblocks:
            m.forward = _checkpointed(None, m.forward)
    if not fsdp:
        return
    import warnings

    from torch.distributed.fsdp import fully_shard

    # the CI functions return dicts of reshaped outputs, never modified in place afterwards
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    for m in tblocks:
        fully_shard(m)
    fully_shard(b.target)
    for c in b.decomp.components:
        fully_shard(c)
    for m in cblocks:
        fully_shard(m)
    fully_shard(b.ci)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_tensors(tr: Trainer) -> dict[str, torch.Tensor]:
    """This rank's shard of parameters and optimiser state, and its RNG/adversary state, for a checkpoint."""
    params = tr.uv + tr.ci_params
    tensors = {f"p.{i}": _local(p.detach()) for i, p in enumerate(params)}
    for i, st in tr.opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = _local(v) if torch.is_tensor(v) else torch.tensor(v)
    tensors.update({f"rank.{k}": v for k, v in tr._rank_state().items()})
    return tensors


def load_shards(tr: Trainer, d: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`shard_tensors` on the same number of processes."""
    from torch.distributed.tensor import DTensor

    params = tr.uv + tr.ci_params
    try:
        with torch.no_grad():
            for i, p in enumerate(params):
                _local(p).copy_(tensors[f"p.{i}"])
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for i, p in enumerate(params):
            st = {}
            for k, v in tensors.items():
                if k.startswith(f"opt.{i}."):
                    if isinstance(p, DTensor) and v.shape == _local(p).shape:
                        # uneven shards: the global shape cannot be inferred from the local one
                        v = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                    st[k.split(".", 2)[2]] = v
            per_param[i] = st
        tr.load_optimizer(per_param, meta["param_groups"])
        tr.load_rank_state({k[5:]: v for k, v in tensors.items() if k.startswith("rank.")})
    except (KeyError, ValueError, RuntimeError) as e:
        raise InnardsError(f"checkpoint shard in {d} does not load ({type(e).__name__})") from None


def gathered(tr: Trainer) -> Built | None:
    """All ranks gather the full U, V and CI weights; rank 0 gets an unsharded decomposition built from them."""
    b = tr.b
    full = {}
    for c in b.decomp.components:
        full[f"V.{c.name}"] = _full(c.V.detach())
        full[f"U.{c.name}"] = _full(c.U.detach())
    for k, v in b.ci.state_dict().items():
        full[f"ci.{k}"] = _full(v)
    if not tr.dist.main:
        return None
    target, info = load_target(tr.cfg, tr.out)
    nb = build(tr.cfg, target, info)
    load_decomposition_tensors(nb, full, "the gathered shards")
    return nb


# one rank of `innards ...` that prints its peak host memory (and its peak CUDA memory) when it ends
_RANK = ("import resource, sys, torch; from innards.cli import main; rc = main(sys.argv[1:]); "
         "cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0; "
         "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cuda, flush=True); sys.exit(rc)")


def launch_ranks(world: int, args: list[str], env: dict[str, str] | None = None, timeout: int = 3600,
                 backend: str = "gloo") -> list[dict[str, float]]:
    """Run ``innards ARGS`` as ``world`` ranks (the torchrun environment, no agent); each rank's peak memory in MB.

    Returns per rank {"rss_mb": peak resident set size, "cuda_mb": peak CUDA memory allocated (0 on CPU)}.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        e = {**(env if env is not None else os.environ), "OMP_NUM_THREADS": "1"}
        if backend == "gloo":
            e["INNARDS_BACKEND"] = "gloo"
        if world > 1:
            e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, *args], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    failed = None
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        if p.returncode != 0 and failed is None:
            lines = se.strip().splitlines()
            failed = f"rank run failed (exit {p.returncode}): {lines[-1][:300] if lines else ''}"
        peak = [line.split() for line in so.splitlines() if line.startswith("PEAK")]
        if peak:
            out.append({"rss_mb": round(int(peak[-1][1]) / 1024, 1), "cuda_mb": round(int(peak[-1][2]) / 2**20, 1)})
    if failed:
        raise InnardsError(failed)
    return out


def random_llama(folder: Path, hidden: int = 768, layers: int = 4, mlp: int = 3072, heads: int = 6) -> Path:
    """A randomly initialised Llama wider than the demo LM, with the demo LM's tokenizer (memory benchmarks)."""
    import transformers as T


    demo = load_model("demo")
    cfg = T.LlamaConfig(vocab_size=demo.config.vocab_size, hidden_size=hidden, intermediate_size=mlp,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                        head_dim=hidden // heads, max_position_embeddings=256, bos_token_id=demo.config.bos_token_id,
                        eos_token_id=demo.config.eos_token_id, pad_token_id=demo.config.pad_token_id,
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    demo.tokenizer.save_pretrained(folder)
    return folder
