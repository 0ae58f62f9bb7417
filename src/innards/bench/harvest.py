"""Benchmark: harvesting against the bare forward pass over the very same batches.

Both run in one process, batch by batch, alternating which goes first, so machine noise (other
jobs, frequency scaling) hits both alike. The harvest step is everything ``innards harvest`` does
per batch: the forward pass stopped after the last site, masking out special tokens, float64
moments, the dtype conversion and the shard buffers; full shards are written by the background
writer, and the time to commit the last one is charged to the harvest. The forward step is
``model(input_ids, attention_mask)`` with logits, as a user would run it.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from innards.bench.memory import peak_rss_mb
from innards.errors import InnardsError


@dataclass
class BenchHarvestConfig:
    """What to benchmark."""

    model: str = "demo"
    """model name, alias (demo), local directory or hub id"""
    site: list[str] = field(default_factory=list)
    """site(s) to harvest (default: resid_post of the middle block)"""
    text: str = ""
    """text source (default: random:N, context-long random token sequences)"""
    tokens: int = 40_000
    """tokens harvested in the timed part"""
    context: int | None = None
    """tokens per sequence (default: the model's, at most 1024)"""
    batch_size: int = 16
    """sequences per forward pass"""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """storage dtype of activations"""
    warmup: int = 2
    """untimed batches first"""
    out: str | None = None
    """folder for the shards written (default: a temporary folder, removed afterwards)"""
    model_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    """dtype the model runs in"""
    device: str | None = None
    """device of the model"""
    seed: int = 0
    """seed of the generated text"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(p: Any, cfg: BenchHarvestConfig) -> tuple[list, int]:
    """The timed batches (warm-up ones first) and the rows of the timed ones."""
    from innards.data.harvest import batches

    work, rows = [], 0
    for b in batches(p):  # tokenising is shared by both and excluded from both timings
        work.append(b)
        if len(work) > cfg.warmup:
            rows += b.rows
        if rows >= cfg.tokens:
            break
    return work, rows


def bench_harvest(cfg: BenchHarvestConfig) -> dict[str, Any]:
    """Time harvest steps and bare forward passes over the same batches; returns the result dict."""
    from innards.data.harvest import HarvestConfig, ShardWriter, capture_rows, prepare
    from innards.models.load import load_model
    from innards.models.sites import n_layers

    if cfg.tokens <= 0 or cfg.batch_size <= 0:
        raise InnardsError("--tokens and --batch-size must be positive")
    model = load_model(cfg.model, dtype=cfg.model_dtype, device=cfg.device)
    sites = cfg.site or [f"blocks.{n_layers(model) // 2}.resid_post"]
    tmp = cfg.out is None
    out = Path(tempfile.mkdtemp(prefix="innards-bench-")) if tmp else Path(cfg.out)
    try:
        ctx = cfg.context or min(getattr(model.config, "max_position_embeddings", 1024) or 1024, 1024)
        # random token ids by default: the cost of a dense forward pass does not depend on the text,
        # and full-length sequences need no sampling first (--text takes any real source)
        text = cfg.text or f"random:{math.ceil((cfg.tokens + (cfg.warmup + 1) * cfg.batch_size * ctx) / max(1, ctx - 1))}"
        hcfg = HarvestConfig(model=cfg.model, site=sites, text=text, tokens=cfg.tokens, out=str(out),
                             context=cfg.context, batch_size=cfg.batch_size, dtype=cfg.dtype, seed=cfg.seed,
                             model_dtype=cfg.model_dtype, device=cfg.device)
        p = prepare(hcfg, model=model)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        p.source.prepare()  # sampling a generate:N text is not part of either timing
        work, rows = _batches(p, cfg)
        device = next(model.parameters()).device
        if len(work) <= cfg.warmup:
            raise InnardsError(f"the text gives only {len(work)} batch(es); need more than --warmup {cfg.warmup}")
        writer = ShardWriter(out, 0, {s.name: s.width for s in p.sites}, cfg.dtype, hcfg.shard_tokens)
        t_h = t_f = 0.0
        counted = 0

        def harvest_step(b: Any) -> float:
            t = time.perf_counter()
            got = capture_rows(model, p.sites, b)
            writer.add(got, b.doc, b.pos, b.tok)
            _sync(device)
            return time.perf_counter() - t

        def forward_step(b: Any) -> float:
            t = time.perf_counter()
            model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
            _sync(device)
            return time.perf_counter() - t

        with torch.inference_mode():
            for i, b in enumerate(work):
                if i % 2 == 0:
                    h, f = harvest_step(b), forward_step(b)
                else:
                    f, h = forward_step(b), harvest_step(b)
                if i >= cfg.warmup:
                    t_h, t_f, counted = t_h + h, t_f + f, counted + b.rows
            t = time.perf_counter()
            writer.close()
            t_h += time.perf_counter() - t
        written = sum(f.stat().st_size for f in (out / "shards").glob("*.npy"))
        result = {
            "model": cfg.model, "sites": [s.name for s in p.sites], "n_layers": n_layers(model), "text": text,
            "tokens": counted, "batches": len(work) - cfg.warmup, "batch_size": cfg.batch_size, "context": p.context,
            "dtype": cfg.dtype, "device": device.type, "threads": torch.get_num_threads(),
            "harvest_s": round(t_h, 4), "forward_s": round(t_f, 4),
            "harvest_tokens_per_s": round(counted / t_h, 1), "forward_tokens_per_s": round(counted / t_f, 1),
            "ratio": round(t_f / t_h, 4), "peak_rss_mb": round(peak_rss_mb(), 1), "bytes_written": written,
        }
        return result
    finally:
        if tmp:
            shutil.rmtree(out, ignore_errors=True)


def run(cfg: BenchHarvestConfig) -> int:
    """Print the benchmark's one JSON object."""
    print(json.dumps(bench_harvest(cfg)))
    return 0
