"""Fluency of continuations: conditional NLL under the unsteered model, and distinct-n."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm


@torch.no_grad()
def continuation_nll(model: torch.nn.Module, prompt_ids: list[list[int]], cont_ids: list[list[int]],
                     batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Mean per-token NLL (nats) of each continuation given its prompt; NaN for an empty continuation.

    Call it with no steering hooks installed: fluency is judged by the unsteered model. Rows are right
    padded so every real token keeps its natural position ids.
    """
    if len(prompt_ids) != len(cont_ids):
        raise ValueError("prompt_ids and cont_ids differ in length")
    device = next(model.parameters()).device
    out = np.full(len(cont_ids), math.nan)
    order = sorted(range(len(cont_ids)), key=lambda i: -(len(prompt_ids[i]) + len(cont_ids[i])))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="fluency NLL", disable=not progress or len(batches) < 2):
        rows = [list(prompt_ids[i]) + list(cont_ids[i]) for i in idx]
        width = max(len(r) for r in rows)
        if width < 2:
            continue
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, :len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for j, i in enumerate(idx):
            # token k of the row is predicted at k-1; a prompt-less row cannot score its first token
            start = max(len(prompt_ids[i]), 1)
            stop = len(prompt_ids[i]) + len(cont_ids[i])
            if stop > start:
                out[i] = float(-tok_lp[j, start - 1:stop - 1].mean())
    return out


def distinct_n(text: str, n: int = 2) -> float:
    """Unique word n-grams / all word n-grams of one text (lower-cased); NaN below n words.

    1.0 means no repeated n-gram; degenerate steered text ("happy happy happy") drives it to 0.
    """
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan
