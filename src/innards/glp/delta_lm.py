"""Delta LM loss: how much worse the LM predicts held-out text when a site's activations are replaced.

Every non-BOS, non-pad position of the site is replaced by a reconstruction (GLP projection, SAE,
PCA, the mean, ...) and the increase of the mean next-token cross-entropy is reported.  The main
number averages over real (non-pad) next-token predictions only.  The reference code instead
averages each document over its whole padded length (pad positions count as zero loss) and then
over documents; that variant is reported separately under ``*_padded`` so published numbers can be
compared (glp-reference.md §6.2, weakness #8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from innards.errors import InnardsError
from innards.models.hooks import edit

Recon = Callable[[torch.Tensor], torch.Tensor]


def sequences_from_rows(doc_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray, bos_id: int | None,
                        max_len: int = 128, max_docs: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Rebuild documents from per-row (doc, position, token) arrays: BOS + the first content tokens.

    Only the contiguous run of positions from 0 is used, so a document with missing rows is cut
    where the gap starts rather than glued together; documents with fewer than 2 tokens are dropped.
    """
    doc_ids = np.asarray(doc_ids)
    positions = np.asarray(positions).astype(np.int64)
    token_ids = np.asarray(token_ids).astype(np.int64)
    if not (doc_ids.shape == positions.shape == token_ids.shape):
        raise InnardsError("doc_ids, positions and token_ids must have one entry per row")
    content = max_len - (1 if bos_id is not None else 0)
    keep = positions < content
    d, p, t = doc_ids[keep], positions[keep], token_ids[keep]
    order = np.lexsort((p, d))
    d, p, t = d[order], p[order], t[order]
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    ends = np.r_[starts[1:], d.size]
    docs = list(zip(starts, ends))
    if max_docs is not None and len(docs) > max_docs:
        pick = np.sort(np.random.default_rng(seed).choice(len(docs), size=max_docs, replace=False))
        docs = [docs[i] for i in pick]
    out = []
    for s, e in docs:
        pp, tt = p[s:e], t[s:e]
        # drop duplicate positions (a store may hold a document twice) and stop at the first gap
        _, first = np.unique(pp, return_index=True)
        pp, tt = pp[first], tt[first]
        n = int(np.argmax(pp != np.arange(pp.size))) if (pp != np.arange(pp.size)).any() else pp.size
        seq = tt[:n]
        if bos_id is not None:
            seq = np.r_[np.int64(bos_id), seq]
        if seq.size >= 2:
            out.append(seq[:max_len])
    return out


def pad_batch(batch: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask) of token sequences of different lengths."""
    T = max(len(s) for s in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, :len(s)] = torch.as_tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _token_losses(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (B, T-1) in float32; zero where the target is padding."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.reshape(ids.shape[0], -1) * mask[:, 1:].float()


@torch.no_grad()
def delta_lm_loss(model: PreTrainedModel, site: str, sequences: Sequence[np.ndarray], replacements: Mapping[str, Recon],
                  bos_id: int | None = None, pad_id: int = 0, batch_size: int = 16, max_len: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Clean LM loss and, per replacement, the loss increase when the site is replaced at non-BOS, non-pad positions.

    ``replacements`` maps a name to ``fn(acts (M, d)) -> (M, d)`` on raw activations.  Returns
    ``lm_loss_clean``, ``delta_lm_<name>`` (mean over real tokens), ``delta_lm_<name>_se`` (standard
    error, documents as clusters), ``lm_loss_<name>``, the reference-compatible ``*_padded`` values
    (per-document mean over ``max_len - 1`` predictions with pad counted as zero), and counts.
    """
    if not sequences:
        raise InnardsError("no held-out sequences for the delta LM loss")
    device = next(model.parameters()).device
    L = max_len or max(len(s) for s in sequences)
    names = list(replacements)
    # per document: summed loss and number of predictions, clean and for each replacement
    sums = {k: [] for k in ["clean", *names]}
    counts: list[int] = []
    batches = [sequences[i:i + batch_size] for i in range(0, len(sequences), batch_size)]
    for batch in tqdm(batches, desc="delta-lm", unit="batch", disable=not progress):
        ids, mask = pad_batch(batch, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        edit_mask = mask.bool().clone()
        if bos_id is not None:
            edit_mask &= ids != bos_id
        clean = _token_losses(model, ids, mask)
        sums["clean"].append(clean.sum(1).double().cpu())
        counts.extend(mask[:, 1:].sum(1).tolist())
        for name in names:
            fn = replacements[name]

            def replace(act: torch.Tensor, fn: Recon = fn) -> torch.Tensor:
                if act.shape[:2] != edit_mask.shape:
                    raise InnardsError(f"site {site} has shape {tuple(act.shape)}, expected (batch, seq, d)")
                out = act.clone()
                sel = act[edit_mask]
                out[edit_mask] = fn(sel).to(device=act.device, dtype=act.dtype)
                return out

            with edit(model, {site: replace}):
                sums[name].append(_token_losses(model, ids, mask).sum(1).double().cpu())
    n = torch.tensor(counts, dtype=torch.float64)
    total = float(n.sum())
    per = {k: torch.cat(v) for k, v in sums.items()}
    res: dict[str, Any] = {"lm_loss_clean": float(per["clean"].sum() / total),
                           "lm_loss_clean_padded": float((per["clean"] / (L - 1)).mean()),
                           "delta_lm_docs": len(sequences), "delta_lm_tokens": int(total), "delta_lm_max_len": L}
    for name in names:
        diff = per[name] - per["clean"]
        D = float(diff.sum() / total)
        m = diff.numel()
        # cluster (per-document) standard error of a ratio estimator: tokens within a document are correlated
        se = math.sqrt(float(((diff - D * n) ** 2).sum()) * m / max(m - 1, 1)) / total if m > 1 else math.nan
        res[f"lm_loss_{name}"] = float(per[name].sum() / total)
        res[f"delta_lm_{name}"] = D
        res[f"delta_lm_{name}_se"] = se
        res[f"delta_lm_{name}_padded"] = float((diff / (L - 1)).mean())
    return res
