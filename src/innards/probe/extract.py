"""Activations at the benchmark token of every prompt, batched by length and cached per (model, site, task).

Token (SAE-Probes convention): the prompt's last token. Prompts are tokenised with the tokenizer's
own special tokens (as SAE-Probes does), truncated from the left to the context (the model's
maximum positions, capped at SAE-Probes' 1024) and right-padded, so the last token is the last
non-pad position.

Encoders (BERT-style, e.g. all-MiniLM-L6-v2): the last *real* token, i.e. the one just before the
final [SEP]. Why: (1) it is the same text position the benchmark reads in a decoder, and in a
bidirectional encoder it attends to the whole prompt; (2) it is an ordinary token, so a meta-model
(GLP) or SAE trained on per-token activations of running text sees an in-distribution input, while a
mean-pooled vector has a shrunken norm and is off the activation manifold, and [CLS]/[SEP] states are
outliers (attention sinks in middle layers, Clark et al. 2019) rarely present in harvested text;
(3) it needs no pooling choice. ``token="last"`` forces the last non-pad token ([SEP]) instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from innards.errors import InnardsError
from innards.tensors import load_tensors, save_tensors
from innards.models.hooks import run_with_cache
from innards.models.load import ENCODER_TYPES

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SAE_PROBES_MAX_LENGTH = 1024


def is_encoder(model: PreTrainedModel) -> bool:
    """True for bidirectional encoders (BERT family), loaded without a causal LM head."""
    cfg = model.config
    return cfg.model_type in ENCODER_TYPES and not getattr(cfg, "is_decoder", False)


def token_policy(model: PreTrainedModel, token: str = "auto") -> str:
    """'last' (last non-pad token) or 'last_real' (last non-special token); 'auto' picks by architecture."""
    if token not in ("auto", "last", "last_real"):
        raise InnardsError(f"unknown token policy '{token}' (choose auto, last or last_real)")
    if token != "auto":
        return token
    return "last_real" if is_encoder(model) else "last"


TOKEN_RULES = {
    "last": "last non-pad token of the prompt (SAE-Probes: right padding, left truncation)",
    "last_real": "last non-special token of the prompt, just before [SEP] (encoder: an ordinary token, "
                 "in-distribution for a GLP/SAE trained on running text; see innards.probe.extract)",
}


def context_length(model: PreTrainedModel, context: int | None = None) -> int:
    """Longest prompt kept: ``context`` or the model's positions capped at 1024 (SAE-Probes)."""
    cfg = model.config
    ctx = next((int(getattr(cfg, k)) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(getattr(cfg, k, None), int)), None)
    tok_max = getattr(model.tokenizer, "model_max_length", None)
    if ctx is None and isinstance(tok_max, int) and tok_max < 1_000_000:
        ctx = tok_max
    ctx = min(ctx or SAE_PROBES_MAX_LENGTH, SAE_PROBES_MAX_LENGTH)
    if context is not None:
        if context < 1:
            raise InnardsError(f"--context must be positive, got {context}")
        ctx = min(ctx, context) if ctx else context
    return ctx


@contextmanager
def _sides(tok: PreTrainedTokenizerBase) -> Iterator[PreTrainedTokenizerBase]:
    """Left truncation and right padding for the duration, restoring the tokenizer's own settings."""
    old = (tok.truncation_side, tok.padding_side)
    tok.truncation_side, tok.padding_side = "left", "right"
    try:
        yield tok
    finally:
        tok.truncation_side, tok.padding_side = old


def tokenize(model: PreTrainedModel, prompts: list[str], context: int, token: str) -> tuple[list[list[int]], np.ndarray]:
    """Token ids per prompt (left-truncated) and the index of the probed token in each."""
    tok = model.tokenizer
    with _sides(tok):
        enc = tok(list(prompts), truncation=True, max_length=context, return_special_tokens_mask=True,
                  add_special_tokens=True)
    ids = [list(x) for x in enc["input_ids"]]
    fill = next((t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None), 0)
    pos = np.empty(len(ids), dtype=np.int64)
    for i, (row, special) in enumerate(zip(ids, enc["special_tokens_mask"])):
        if not row:  # an empty prompt without special tokens: probe a lone BOS/EOS instead
            ids[i] = row = [fill]
            special = [1]
        pos[i] = len(row) - 1
        if token == "last_real":
            real = [j for j, s in enumerate(special) if not s]
            if real:
                pos[i] = real[-1]
    return ids, pos


def _batches(lengths: np.ndarray, batch_size: int, max_tokens: int) -> list[np.ndarray]:
    order = np.argsort(-lengths, kind="stable")  # longest first: padding waste stays small, OOM shows early
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1 > batch_size or (len(cur) + 1) * lengths[cur[0]] > max_tokens):
            out.append(np.array(cur))
            cur = []
        cur.append(i)
    if cur:
        out.append(np.array(cur))
    return out


@torch.no_grad()
def extract(model: PreTrainedModel, prompts: list[str], sites: list[str], token: str = "auto", context: int | None = None,
            batch_size: int = 32, max_tokens: int = 16384, desc: str | None = None) -> dict[str, torch.Tensor]:
    """{site: float32 (N, width)}: each prompt's activation at the benchmark token, in prompt order."""
    policy = token_policy(model, token)
    ids, pos = tokenize(model, prompts, context_length(model, context), policy)
    lengths = np.array([len(x) for x in ids])
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: dict[str, torch.Tensor] = {}
    for rows in tqdm(_batches(lengths, batch_size, max_tokens), desc=desc or "extract", leave=False):
        T = int(lengths[rows].max())
        batch = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for j, r in enumerate(rows):
            batch[j, : lengths[r]] = torch.tensor(ids[r])
            mask[j, : lengths[r]] = 1
        cache = run_with_cache(model, batch.to(device), sites, attention_mask=mask.to(device))
        at = torch.as_tensor(pos[rows], device=device)
        for s in sites:
            act = cache[s]
            picked = act[torch.arange(len(rows), device=device), at].float().cpu()
            if s not in out:
                out[s] = torch.empty((len(prompts), picked.shape[-1]), dtype=torch.float32)
            out[s][torch.as_tensor(rows)] = picked
    return out


def model_tag(model: PreTrainedModel) -> str:
    """Folder name for a model's cache: a readable stem plus a hash of its weights and dtype."""
    src = dict(getattr(model, "innards_source", {}) or {})
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(src.get("name", "model"))).name)[:40] or "model"
    ident = {k: src.get(k) for k in ("sha256", "revision", "dtype")}
    if not ident.get("sha256") and not ident.get("revision"):
        ident["path"] = src.get("path")
    return f"{stem}-{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]}"


def prompts_digest(prompts: list[str]) -> str:
    """SHA-256 of the prompts (order included): the cache is valid only for the same rows."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


class ActivationCache:
    """Per-(model, site, task) safetensors of benchmark-token activations under ``root``."""

    def __init__(self, root: str | Path, model: PreTrainedModel, token: str = "auto", context: int | None = None,
                 batch_size: int = 32, max_tokens: int = 16384):
        self.model = model
        self.token = token_policy(model, token)
        self.context = context_length(model, context)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.root = Path(root) / model_tag(model)

    def path(self, site: str, task: str) -> Path:
        """Where one (site, task) is cached."""
        return self.root / site / f"{task}.safetensors"

    def _meta(self, site: str, prompts: list[str]) -> dict[str, str]:
        return {"site": site, "token": self.token, "max_length": str(self.context), "n": str(len(prompts)),
                "prompts_sha256": prompts_digest(prompts), "model": json.dumps(getattr(self.model, "innards_source", {}))}

    def _load(self, site: str, task: str, meta: dict[str, str]) -> torch.Tensor | None:
        p = self.path(site, task)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), "pt") as f:
                got = f.metadata() or {}
        except Exception:
            return None  # unreadable: extract again, the rewrite is atomic
        keys = ("token", "max_length", "n", "prompts_sha256")
        if any(got.get(k) != meta[k] for k in keys):
            return None
        return load_tensors(p, what="activation cache")["acts"]

    def get(self, task: str, prompts: list[str], sites: list[str]) -> dict[str, torch.Tensor]:
        """Activations of ``sites`` for a task's prompts: cached ones loaded, the rest extracted in one pass."""
        metas = {s: self._meta(s, prompts) for s in sites}
        out = {s: a for s in sites if (a := self._load(s, task, metas[s])) is not None}
        missing = [s for s in sites if s not in out]
        if missing:
            new = extract(self.model, prompts, missing, token=self.token, context=self.context,
                          batch_size=self.batch_size, max_tokens=self.max_tokens, desc=f"extract {task}")
            for s in missing:
                self.path(s, task).parent.mkdir(parents=True, exist_ok=True)
                save_tensors(self.path(s, task), {"acts": new[s]}, metadata=metas[s])
                out[s] = new[s]
        return out
