"""Typicality: how likely a meta-model finds each token's activation (the paper's future work, §7).

Two per-token scores, both seeded:

- ``denoise``: the flow-matching (denoising) loss averaged over a fixed grid t_k = (k + 1/2) / n_t,
  the quantity the GLP was trained to make small on its data (low = typical);
- ``loglik``: the log-density log p(x) from the probability-flow ODE. Integrating dz/dt = v(z, t) from
  the activation at t = 0 to t = 1 gives log p_0(x) = log N(z_1; 0, I) + int_0^1 div v(z_t, t) dt
  (FFJORD); the divergence is estimated with Hutchinson's trick, eps^T (dv/dz) eps with fixed
  Rademacher probes eps per row (or computed exactly, ``trace="exact"``, one backward pass per
  dimension). The density is of the raw activation: the normalisation's Jacobian is included.

``innards glp score`` runs a model on text and writes both scores for every token (safetensors +
JSON, by document and position), with the LM's own next-token loss beside them.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from innards.config import at_least, require
from innards.data.text import Batch, Document, framing, iter_chunks, iter_documents, make_batch, open_text
from innards.errors import InnardsError
from innards.glp.gaussian import GaussianFlow
from innards.glp.model import GLP
from innards.tensors import save_tensors
from innards.models.config import ModelConfig
from innards.models.hooks import capture
from innards.models.load import load_model
from innards.models.sites import resolve_site
from innards.run import Run

Flow = GLP | GaussianFlow
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


# ----- the two scores ----------------------------------------------------------------------------------
@torch.no_grad()
def denoising_scores(glp: GLP, acts: torch.Tensor, n_t: int = 10, seed: int = 0, site: str | None = None) -> torch.Tensor:
    """Per-row denoising loss at t_k = (k + 1/2) / n_t: (rows, n_t); the mean over t is :meth:`GLP.typicality`."""
    cols = [glp.loss(acts, (k + 0.5) / n_t, seed=seed + k, site=site).reshape(-1) for k in range(n_t)]
    return torch.stack(cols, dim=-1)


def _parts(flow: Flow, site: str | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], Velocity, float, torch.device,
                                                  torch.dtype]:
    """(normalise, velocity, sum of log std, device, dtype) of a GLP or an exact Gaussian flow."""
    if isinstance(flow, GaussianFlow):
        return flow.normalize, flow.velocity, float(torch.log(flow.norm_std).sum()), torch.device("cpu"), torch.float64
    i = flow.site_index(site)
    log_std = float(torch.log(flow.norm_std[i].double()).sum())
    return (lambda x: flow.normalize(x.to(flow.device), site)), (lambda z, t: flow(z, t, site)), log_std, flow.device, \
        torch.float32


def _divergence(velocity: Velocity, z: torch.Tensor, t: float, probes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """v(z, t) and its divergence per row: Hutchinson with ``probes`` (k, rows, d), or exact when None."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        v = velocity(z, t)
        div = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        if probes is None:
            for j in range(z.shape[1]):
                (g,) = torch.autograd.grad(v[:, j].sum(), z, retain_graph=True)
                div += g[:, j].double()
        else:
            for e in probes:
                (g,) = torch.autograd.grad((v * e).sum(), z, retain_graph=True)
                div += (g * e).sum(-1).double()
            div /= probes.shape[0]
    return v.detach(), div


def log_likelihood(flow: Flow, acts: torch.Tensor, site: str | None = None, steps: int = 32,
                   solver: Literal["euler", "heun"] = "heun", probes: int = 1, trace: Literal["hutchinson", "exact"] = "hutchinson",
                   seed: int = 0, batch_size: int = 4096) -> torch.Tensor:
    """log p(x) in nats of raw activations (one per row) under ``flow``, from the probability-flow ODE."""
    if steps < 1 or probes < 1:
        raise InnardsError("the likelihood needs at least one ODE step and one probe")
    if solver not in ("euler", "heun") or trace not in ("hutchinson", "exact"):
        raise InnardsError(f"unknown solver '{solver}' or trace '{trace}'")
    normalize, velocity, log_std, device, dtype = _parts(flow, site)
    flat = acts.reshape(-1, acts.shape[-1])
    d = flat.shape[-1]
    gen = torch.Generator().manual_seed(int(seed))
    grid = [i / steps for i in range(steps + 1)]
    out = []
    for i in range(0, flat.shape[0], batch_size):
        z = normalize(flat[i:i + batch_size]).to(device=device, dtype=dtype)
        n = z.shape[0]
        eps = None
        if trace == "hutchinson":  # Rademacher probes, fixed along the trajectory
            eps = (torch.randint(0, 2, (probes, n, d), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
        integral = torch.zeros(n, dtype=torch.float64, device=device)
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h = t1 - t0
            v0, d0 = _divergence(velocity, z, t0, eps)
            if solver == "euler":
                z = z + h * v0
                integral += h * d0
            else:
                v1, d1 = _divergence(velocity, z + h * v0, t1, eps)
                z = z + (0.5 * h) * (v0 + v1)
                integral += (0.5 * h) * (d0 + d1)
        log_p1 = -0.5 * (z.double() ** 2).sum(-1) - 0.5 * d * math.log(2 * math.pi)
        out.append((log_p1 + integral - log_std).cpu())
    y = torch.cat(out) if out else torch.empty(0, dtype=torch.float64)
    return y.reshape(acts.shape[:-1])


# ----- a model on text ---------------------------------------------------------------------------------
@dataclass
class TokenScores:
    """Scores of every harvested (non-special) token of a set of documents, in row order."""

    doc: np.ndarray  # int64 stream index of the document
    pos: np.ndarray  # int32 position in the document
    tok: np.ndarray  # int32 token id
    acts: torch.Tensor  # float32 (rows, d) activations at the site
    lm_nll: torch.Tensor  # float32 (rows,) the LM's loss predicting this token (from BOS for the first; NaN without BOS)
    names: dict[int, str] = field(default_factory=dict)


@torch.no_grad()
def lm_pass(model: PreTrainedModel, site: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the site's activations (B, T, d) and each token's next-token NLL under the LM (B, T)."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    with capture(model, [site]) as cache:
        logits = model(input_ids=ids, attention_mask=mask).logits
    nll = torch.full(ids.shape, float("nan"), device=device)
    nll[:, 1:] = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return cache[site], nll


def read_tokens(model: PreTrainedModel, site: str, docs: Iterable[Document], context: int = 64, batch_size: int = 16,
                max_docs: int | None = None, progress: bool = False) -> TokenScores:
    """Run ``model`` on each document's first ``context`` tokens; activations and LM loss of every non-special token."""
    frame = framing(model.tokenizer)
    names: dict[int, str] = {}

    def numbered() -> Iterator[tuple[int, Document]]:
        for i, d in enumerate(itertools.islice(docs, max_docs)):
            names[i] = d.id
            yield i, d

    chunks = (c for c in iter_chunks(numbered(), model.tokenizer, context) if c.start == 0)
    parts: dict[str, list] = {"doc": [], "pos": [], "tok": [], "acts": [], "nll": []}
    bar = tqdm(desc="score", unit="doc", total=max_docs, disable=not progress)
    while True:
        group = list(itertools.islice(chunks, batch_size))
        if not group:
            break
        batch = make_batch(group, frame.pad)
        acts, nll = lm_pass(model, site, batch)
        keep = batch.keep.to(acts.device)
        parts["acts"].append(acts[keep].float().cpu())
        parts["nll"].append(nll[keep].float().cpu())
        parts["doc"].append(batch.doc)
        parts["pos"].append(batch.pos)
        parts["tok"].append(batch.tok)
        bar.update(len(group))
    bar.close()
    if not parts["acts"]:
        raise InnardsError("the text source produced no tokens")
    return TokenScores(np.concatenate(parts["doc"]), np.concatenate(parts["pos"]), np.concatenate(parts["tok"]),
                       torch.cat(parts["acts"]), torch.cat(parts["nll"]), names)


@dataclass
class ScoreConfig:
    """``innards glp score``: per-token typicality of a text under a GLP (denoising loss and ODE likelihood)."""

    glp: str = ""
    """GLP folder or hub id"""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    """the language model (empty name: the one recorded in the GLP)"""
    text: str = ""
    """text source: file, folder, hf:NAME[:SPLIT], generate:N, random:N (see innards harvest)"""
    out: str = "glp-score"
    """output folder: scores.safetensors (per token), scores.json (per document and position)"""
    site: str | None = None
    """site (None: the GLP's only site)"""
    max_docs: int = 200
    """documents read from the text source"""
    context: int = 64
    """tokens per document, special tokens included (documents are truncated)"""
    batch_size: int = 16
    """documents per forward pass of the model"""
    n_t: int = 10
    """times of the denoising score: t_k = (k + 1/2) / n_t"""
    likelihood: bool = True
    """also estimate log p(x) with the probability-flow ODE"""
    ode_steps: int = 32
    """steps of the likelihood ODE from t = 0 to 1"""
    solver: Literal["euler", "heun"] = "heun"
    """ODE solver of the likelihood (Heun: two evaluations per step)"""
    probes: int = 1
    """Hutchinson probes per token (more: lower variance)"""
    trace: Literal["hutchinson", "exact"] = "hutchinson"
    """divergence estimator: hutchinson (one backward pass per probe) or exact (one per dimension)"""
    seed: int = 0
    """seed of the denoising noise and of the probes"""
    restats: str | None = None
    """activation store whose whole-store statistics replace the GLP's normalisation (see glp/reference.py)"""
    text_field: str = "text"
    """JSON / dataset field or CSV column holding the text"""
    text_split: Literal["blank", "line", "formfeed", "file"] = "blank"
    """how .txt files split into documents"""
    overwrite: bool = False
    """replace a score run made with other settings"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        at_least(self, 1, "max_docs", "batch_size", "n_t", "ode_steps", "probes")
        at_least(self, 2, "context")


def score_tokens(glp: GLP, acts: torch.Tensor, site: str | None, cfg: ScoreConfig) -> dict[str, torch.Tensor]:
    """The per-token scores of ``cfg`` for rows of activations: denoise (mean), denoise_t, and loglik when asked."""
    dn = denoising_scores(glp, acts, cfg.n_t, cfg.seed, site).float().cpu()
    res = {"denoise": dn.mean(-1), "denoise_t": dn}
    if cfg.likelihood:
        res["loglik"] = log_likelihood(glp, acts, site, cfg.ode_steps, cfg.solver, cfg.probes, cfg.trace, cfg.seed + 7).float()
    return res


def score_text(cfg: ScoreConfig) -> Path:
    """Score every token of a text under a GLP; writes scores.safetensors and scores.json to ``cfg.out``."""
    require(bool(cfg.glp), "give --glp DIR (a GLP folder or hub id)")
    require(bool(cfg.text), "give --text SRC")
    glp = GLP.from_pretrained(cfg.glp, restats=cfg.restats)
    name = cfg.model.name or glp.source_model
    if not name:
        raise InnardsError("the GLP does not record its model: pass --model")
    with Run.open(cfg.out, "score", cfg, inputs={"glp": cfg.glp, "model": name, "text": cfg.text, "restats": cfg.restats},
                  overwrite=cfg.overwrite, free={"progress"}) as run:
        if run.state == "complete":
            run.say_complete()
            return run.path
        model = load_model(name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
        s = resolve_site(model, cfg.site or glp.meta.get("site") or "")
        glp.check_compatible(model, s.name, s.width)
        glp.to(next(model.parameters()).device).eval()
        t0 = time.perf_counter()
        toks = read_tokens(model, s.name, iter_documents(open_text(cfg.text, text_field=cfg.text_field, split=cfg.text_split,
                                                                   model=model)),
                           cfg.context, cfg.batch_size, cfg.max_docs, cfg.progress)
        sc = score_tokens(glp, toks.acts, s.name, cfg)
        tensors = {"doc": torch.from_numpy(toks.doc), "position": torch.from_numpy(toks.pos.astype(np.int64)),
                   "token_id": torch.from_numpy(toks.tok.astype(np.int64)), "lm_nll": toks.lm_nll, **sc}
        save_tensors(run.root / "scores.safetensors", tensors, metadata={"site": s.name, "glp": str(cfg.glp)})
        docs = _by_document(toks, sc, model)
        summary = {k: float(v.mean()) for k, v in sc.items() if v.ndim == 1}
        run.write_json("scores.json", {"glp": str(cfg.glp), "model": name, "site": s.name, "text": cfg.text,
                                       "n_docs": len(docs), "n_tokens": int(toks.doc.size), "mean": summary,
                                       "seconds": round(time.perf_counter() - t0, 2),
                                       "scores": {"denoise": f"mean flow-matching loss over t = (k + 1/2) / {cfg.n_t} (low = typical)",
                                                  "loglik": "log p(x) in nats from the probability-flow ODE (high = typical)",
                                                  "lm_nll": "the LM's next-token loss of this token"},
                                       "documents": docs}, indent=None)
        run.complete(headline={f"mean_{k}": v for k, v in summary.items()} | {"tokens": int(toks.doc.size)},
                     outputs=["scores.safetensors", "scores.json"])
        print(f"scored {toks.doc.size} tokens of {len(docs)} documents -> {run.path}")
        return run.path


def _by_document(toks: TokenScores, sc: dict[str, torch.Tensor], model: PreTrainedModel) -> list[dict]:
    keys = [k for k, v in sc.items() if v.ndim == 1]
    out = []
    for d in np.unique(toks.doc):
        i = np.flatnonzero(toks.doc == d)
        rec = {"doc": int(d), "id": toks.names.get(int(d), ""), "positions": toks.pos[i].tolist(),
               "tokens": [model.tokenizer.decode([int(t)]) for t in toks.tok[i]],
               "lm_nll": [None if math.isnan(v) else round(v, 5) for v in toks.lm_nll[i].tolist()]}
        rec.update({k: [round(v, 5) for v in sc[k][i].tolist()] for k in keys})
        out.append(rec)
    return out
