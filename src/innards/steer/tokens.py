"""Batch tokenisation for steering: padding side, pad id and which positions are real text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Batch:
    """Token ids, attention mask and a mask of real (non-special, non-pad) tokens, all (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_mask: torch.Tensor


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A usable pad id: the tokenizer's, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], side: str = "right", max_length: int | None = None) -> Batch:
    """Tokenise with the model's own template (BOS etc.), padded on ``side``, truncated on the left."""
    old_pad, old_trunc = tokenizer.padding_side, tokenizer.truncation_side
    had_pad = tokenizer.pad_token is not None
    try:
        tokenizer.padding_side = side
        tokenizer.truncation_side = "left"  # keep the end of a long text: that is where the last token is
        if not had_pad:
            tokenizer.pad_token_id = pad_id(tokenizer)
        enc = tokenizer(list(texts), padding=True, truncation=max_length is not None, max_length=max_length,
                        return_tensors="pt", return_special_tokens_mask=True)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_pad, old_trunc
    mask = enc["attention_mask"].long()
    text = mask.bool() & ~enc["special_tokens_mask"].bool()
    return Batch(enc["input_ids"], mask, text)

