"""Benchmark: harvesting against the bare forward pass over the very same batches.

Two sites by default: the middle block, where the harvest stops the forward pass early, and the
last block, where nothing can be skipped but the final norm and the LM head, so its ratio is the
honest overhead of harvesting. Each step runs in one process, batch by batch, rotating which goes
first, so machine noise (other jobs, frequency scaling) hits all alike. The harvest step is
everything ``innards harvest`` does per batch: the forward pass stopped after the last site,
masking out special tokens, float64 moments, the dtype conversion and the shard buffers; full
shards are written by the background writer, and the time to commit the last one is charged to
the harvest. The forward step is ``model(input_ids, attention_mask)`` with logits, as a user would
run it; the body step is the transformer without its LM head (``model.base_model``), which is the
fair baseline at the last layer.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from innards.bench.memory import peak_rss_mb
from innards.config import at_least
from innards.data.harvest import Harvester, HarvestConfig
from innards.data.shards import SHARDS, ShardWriter
from innards.data.text import Batch
from innards.errors import InnardsError
from innards.models.config import ModelConfig
from innards.models.load import load_model
from innards.models.sites import n_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

StoreDtype = Literal["bf16", "fp16", "fp32"]


@dataclass
class BenchHarvestConfig:
    """Harvest and run the bare forward pass over the same batches, interleaved; one JSON object."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the language model"""
    site: list[str] = field(default_factory=list)
    """site(s) to harvest in one run (empty: two runs, resid_post of the middle block and of the last)"""
    text: str = ""
    """text source (empty: random:N, context-long random token sequences)"""
    tokens: int = 40_000
    """tokens harvested in the timed part of each run"""
    context: int | None = None
    """tokens per sequence (None: the model's, at most 1024)"""
    batch_size: int = 16
    """sequences per forward pass"""
    store_dtype: StoreDtype = "bf16"
    """storage dtype of the activations"""
    warmup: int = 2
    """untimed batches first"""
    out: str | None = None
    """folder for the shards written (None: a temporary folder, removed afterwards)"""
    seed: int = 0
    """seed of the generated text"""
    dtype: InitVar[StoreDtype | None] = None
    """old spelling of --store-dtype (kept working; prints a hint)"""

    def __post_init__(self, dtype: StoreDtype | None) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        if dtype is not None:  # innards 0.2 spelling; the CLI prints the hint (old_dtype_hint)
            warnings.warn("BenchHarvestConfig(dtype=) is now store_dtype=", DeprecationWarning, stacklevel=3)
            self.store_dtype = dtype
        at_least(self, 1, "tokens", "batch_size")
        at_least(self, 2, "context")
        at_least(self, 0, "warmup", "seed")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[Batch], object], b: Batch, device: torch.device) -> float:
    t = time.perf_counter()
    fn(b)
    _sync(device)
    return time.perf_counter() - t


def _run(model: PreTrainedModel, cfg: BenchHarvestConfig, sites: list[str], text: str, out: Path) -> dict[str, object]:
    """Time harvest, full forward and body forward steps over the same batches for one choice of sites."""
    hcfg = HarvestConfig(model=cfg.model, site=sites, text=text, tokens=cfg.tokens, out=str(out), context=cfg.context,
                         batch_size=cfg.batch_size, store_dtype=cfg.store_dtype, seed=cfg.seed, order="sequential")
    h = Harvester(hcfg, model=model)
    h.source.prepare()  # sampling a generate:N text is not part of any timing
    work, rows = [], 0
    for b in h.batches():  # tokenising is shared by all steps and excluded from the timings
        work.append(b)
        if len(work) > cfg.warmup:
            rows += b.rows
        if rows >= cfg.tokens:
            break
    if len(work) <= cfg.warmup:
        raise InnardsError(f"the text gives only {len(work)} batch(es); need more than --warmup {cfg.warmup}")
    device = h.device
    writer = ShardWriter(out, h.widths, cfg.store_dtype, hcfg.shard_tokens)
    body = model.base_model

    def harvest_step(b: Batch) -> None:
        writer.add(h.capture(b), b.doc, b.pos, b.tok, b.names)

    def forward_step(b: Batch) -> None:
        model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)

    def body_step(b: Batch) -> None:
        body(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)

    steps = [harvest_step, forward_step, body_step]
    total = [0.0, 0.0, 0.0]
    counted = 0
    with torch.inference_mode():
        for i, b in enumerate(work):
            times = [0.0, 0.0, 0.0]
            for j in range(3):  # rotate who goes first
                k = (i + j) % 3
                times[k] = _timed(steps[k], b, device)
            if i >= cfg.warmup:
                total = [t + x for t, x in zip(total, times)]
                counted += b.rows
        t = time.perf_counter()
        writer.close()
        total[0] += time.perf_counter() - t
    t_h, t_f, t_b = total
    return {"sites": h.names, "tokens": counted, "batches": len(work) - cfg.warmup,
            "context": h.context, "harvest_s": round(t_h, 4), "forward_s": round(t_f, 4), "body_s": round(t_b, 4),
            "harvest_tokens_per_s": round(counted / t_h, 1), "forward_tokens_per_s": round(counted / t_f, 1),
            "ratio": round(t_f / t_h, 4), "ratio_body": round(t_b / t_h, 4),
            "bytes_written": sum(f.stat().st_size for f in (out / SHARDS).glob("*.npy"))}


def bench_harvest(cfg: BenchHarvestConfig) -> dict[str, object]:
    """Time harvest steps and bare forward passes over the same batches; returns the result dict."""
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
    L = n_layers(model)
    runs = {"site": cfg.site} if cfg.site else {"middle": [f"blocks.{L // 2}.resid_post"],
                                               "last": [f"blocks.{L - 1}.resid_post"]}
    ctx = cfg.context or min(getattr(model.config, "max_position_embeddings", 1024) or 1024, 1024)
    # random token ids by default: the cost of a dense forward pass does not depend on the text,
    # and full-length sequences need no sampling first (--text takes any real source)
    text = cfg.text or f"random:{math.ceil((cfg.tokens + (cfg.warmup + 1) * cfg.batch_size * ctx) / max(1, ctx - 1))}"
    tmp = cfg.out is None
    root = Path(tempfile.mkdtemp(prefix="innards-bench-")) if tmp else Path(cfg.out)
    try:
        result: dict[str, object] = {
            "model": cfg.model.name, "n_layers": L, "text": text, "batch_size": cfg.batch_size,
            "dtype": cfg.store_dtype, "model_dtype": cfg.model.dtype, "device": next(model.parameters()).device.type,
            "threads": torch.get_num_threads()}
        for label, sites in runs.items():
            result[label] = _run(model, cfg, sites, text, root / label)
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        return result
    finally:
        if tmp:
            shutil.rmtree(root, ignore_errors=True)


def run(cfg: BenchHarvestConfig) -> int:
    """Print the benchmark's one JSON object."""
    print(json.dumps(bench_harvest(cfg)))
    return 0
