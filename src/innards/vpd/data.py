"""Batches for a decomposition: sparse feature vectors for toys, token windows for language models."""

from __future__ import annotations

from typing import Any

import torch

from innards.data import text as textmod
from innards.errors import InnardsError
from innards.vpd.config import VPDConfig
from innards.vpd.toys import sample_features


class ToyData:
    """Fresh sparse feature vectors every call (drawn from the trainer's generator)."""

    def __init__(self, cfg: VPDConfig, device: Any = "cpu"):
        self.cfg, self.device = cfg, device

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return sample_features(self.cfg.target, n, generator).to(self.device)

    def eval_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.batch(n, generator)


class TokenPool:
    """A fixed pool of tokens from a text source; batches are random windows (train: first 90%, eval: last 10%)."""

    def __init__(self, cfg: VPDConfig, tokenizer: Any, model: Any = None, device: Any = "cpu"):
        self.cfg, self.device = cfg, device
        self.tokens = tokenize_source(cfg.text, tokenizer, cfg.max_tokens, model=model)
        need = 2 * (cfg.seq_len + 1)
        if len(self.tokens) < 10 * need:
            raise InnardsError(f"text source '{cfg.text}' gave only {len(self.tokens)} tokens; need at least {10 * need}")
        self.split = int(len(self.tokens) * 0.9)

    def _windows(self, n: int, lo: int, hi: int, generator: torch.Generator) -> torch.Tensor:
        T = self.cfg.seq_len
        starts = torch.randint(lo, hi - T, (n,), generator=generator)
        idx = starts[:, None] + torch.arange(T)[None]
        return self.tokens[idx].to(self.device)

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._windows(n, 0, self.split, generator)

    def eval_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._windows(n, self.split, len(self.tokens), generator)


def tokenize_source(spec: str, tokenizer: Any, max_tokens: int, model: Any = None) -> torch.Tensor:
    """Documents of an innards.data.text source, tokenised and joined by EOS, up to max_tokens."""
    docs = textmod.iter_documents(spec, model=model) if model is not None else textmod.iter_documents(spec)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    out: list[int] = []
    for doc in docs:
        t = doc.text if hasattr(doc, "text") else str(doc)
        ids = tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]  # long documents are chunked later
        if sep is not None:
            out.append(sep)
        out.extend(ids)
        if len(out) >= max_tokens:
            break
    return torch.tensor(out[:max_tokens], dtype=torch.long)
