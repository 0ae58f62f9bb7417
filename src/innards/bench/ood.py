"""Benchmark: a GLP's typicality as an out-of-distribution detector, against the detectors a user tries first.

In-distribution documents (the validation documents of the GLP's store, or ``--text``) are compared
with shifted ones: the same documents with their words shuffled, uniformly random tokens, prompts of
the probing tasks (SAE-Probes), and any text given with ``--shift NAME=SRC`` (other authors, genres).
Every document is cut to its first ``context`` tokens and run through the LM; each detector scores
every token and a document's score is the mean over its tokens (higher = more out of distribution):

- ``glp_denoise``: the GLP's denoising loss over a fixed t grid; ``glp_nll``: minus its ODE log-likelihood;
- ``mahalanobis``: minus the log-density of a Gaussian with the store's mean and covariance;
- ``sae_error``: the SAE's relative reconstruction error ||x - SAE(x)||^2 / ||x||^2;
- ``knn``: distance to the k-th nearest training activation (z-scored per dimension);
- ``lm_nll``: the LM's own next-token loss.

The table is the ROC-AUC of each detector for each shift (0.5 = chance), with a percentile bootstrap
CI that resamples both sets of documents, with the same resamples for every detector (paired).

Why a bench and not a ``glp`` command: the probing tasks' prompts come from ``innards.probe``, which
sits above the meta-model in the layer order; the detectors compared are not all GLP methods.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel

from innards.config import at_least, require
from innards.data.shared import shared_data_dir
from innards.data.store import ActivationStore
from innards.data.text import Document, iter_documents, open_text
from innards.errors import InnardsError
from innards.io import read_json
from innards.glp.delta_lm import sequences_from_rows
from innards.glp.evaluate import EvalConfig, check_store, quick_sae
from innards.glp.gaussian import GaussianFlow
from innards.glp.model import GLP
from innards.glp.score import ScoreConfig, TokenScores, read_tokens, score_tokens
from innards.models.config import ModelConfig
from innards.models.load import load_model
from innards.models.sites import resolve_site
from innards.probe.tasks import list_tasks, read_task
from innards.run import Run
from innards.sae.load import load_sae
from innards.sae.model import SparseAutoencoder

DETECTORS = ("glp_denoise", "glp_nll", "mahalanobis", "sae_error", "knn", "lm_nll")


@dataclass
class BenchOODConfig:
    """``innards bench ood``: AUROC of GLP typicality and baselines for in-distribution vs shifted text."""

    glp: str = ""
    """GLP folder or hub id"""
    acts: str | None = None
    """activation store of the in-distribution data (None: the store the GLP was trained on)"""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    """the language model (empty name: the one recorded in the GLP)"""
    text: str | None = None
    """in-distribution text (None: the validation documents of --acts, which the GLP never saw; generate:N draws new samples)"""
    shift: list[str] = field(default_factory=list)
    """shifted text as NAME=SRC[#SPLIT] (repeatable; SPLIT: how a .txt splits into documents, blank by default), e.g. rt=../shared/data/sentiment/rt-polarity.pos.txt#line"""
    shuffled: bool = True
    """add the in-distribution documents with their words shuffled"""
    random_tokens: bool = True
    """add documents of uniformly random tokens (same lengths)"""
    probe_tasks: str | None = None
    """an SAE-Probes folder whose task prompts are a shift (None: ../shared/data/sae_probes when present; 'none' = off)"""
    docs: int = 200
    """documents per condition"""
    context: int = 64
    """tokens per document, special tokens included (documents are truncated)"""
    min_tokens: int = 8
    """documents with fewer scored tokens are dropped"""
    batch_size: int = 16
    """documents per forward pass of the LM"""
    sae: str | None = None
    """SAE folder or hub id for sae_error (None: train a TopK SAE on --acts)"""
    train_sae: bool = True
    """train a TopK SAE when --sae is not given (otherwise sae_error is skipped)"""
    sae_k: int = 32
    """active latents of the SAE trained here"""
    sae_latents: str = "8*d"
    """latents of the SAE trained here"""
    sae_tokens: int | None = None
    """activations for the SAE trained here (None: one pass, at most 4M)"""
    knn_k: int = 10
    """the k of the k-NN distance"""
    ref_rows: int = 20000
    """training activations for the Gaussian and the k-NN reference set"""
    n_t: int = 10
    """times of the GLP's denoising score"""
    likelihood: bool = True
    """also score with the GLP's ODE likelihood (glp_nll)"""
    ode_steps: int = 16
    """steps of the likelihood ODE"""
    solver: Literal["euler", "heun"] = "heun"
    """solver of the likelihood ODE"""
    probes: int = 1
    """Hutchinson probes per token"""
    n_boot: int = 2000
    """bootstrap resamples of each AUROC's CI"""
    seed: int = 0
    """seed of the document choice, the shifts, the scores' noise and the bootstrap"""
    out: str = "ood.json"
    """output JSON file (its run record is written beside it)"""
    overwrite: bool = False
    """replace a result made with other settings"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        at_least(self, 1, "docs", "min_tokens", "batch_size", "sae_k", "knn_k", "ref_rows", "n_t", "ode_steps", "probes",
                 "n_boot", "sae_tokens")
        at_least(self, 2, "context")
        for s in self.shift:
            require(bool(re.fullmatch(r"[\w.-]+=[^#]+(#(blank|line|formfeed|file))?", s)), f"--shift is NAME=SRC[#SPLIT], got '{s}'")


# ----- the shifted documents ---------------------------------------------------------------------------
def in_distribution_docs(store: ActivationStore, model: PreTrainedModel, cfg: BenchOODConfig) -> list[Document]:
    """The store's validation documents (or --text), cut to what the benchmark reads."""
    if cfg.text:  # generate:N draws fresh samples (another seed than a store harvested from generate:N)
        return _take(iter_documents(open_text(cfg.text, model=model, seed=cfg.seed + 100, order="shuffled")), cfg.docs * 2)
    rows = store.split_rows("val")
    seqs = sequences_from_rows(store.doc_ids[rows], store.positions[rows], store.token_ids[rows], bos_id=None,
                               max_len=cfg.context, max_docs=cfg.docs * 2, seed=cfg.seed)
    return [Document(id=f"val:{i}", tokens=tuple(int(t) for t in s)) for i, s in enumerate(seqs)]


def _take(docs: Iterable[Document], n: int) -> list[Document]:
    return list(itertools.islice(docs, n))


def _text(doc: Document, model: PreTrainedModel) -> str:
    return doc.text if doc.text is not None else model.tokenizer.decode(list(doc.tokens or ()))


def shuffled_words(docs: list[Document], model: PreTrainedModel, seed: int) -> list[Document]:
    """The same documents with their (whitespace-separated) words in a random order."""
    rng = random.Random(seed)
    out = []
    for d in docs:
        words = _text(d, model).split()
        rng.shuffle(words)
        out.append(Document(id=f"shuffled:{d.id}", text=" ".join(words)))
    return out


def random_token_docs(docs: list[Document], model: PreTrainedModel, seed: int) -> list[Document]:
    """Documents of uniformly random non-special tokens, as long as the given ones."""
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    vocab = np.array([i for i in range(len(tok)) if i not in special])
    rng = np.random.default_rng(seed)
    lengths = [len(d.tokens) if d.tokens is not None else len(tok(_text(d, model), add_special_tokens=False)["input_ids"])
               for d in docs]
    return [Document(id=f"random:{i}", tokens=tuple(int(t) for t in rng.choice(vocab, size=max(1, n))))
            for i, n in enumerate(lengths)]


def probe_prompt_docs(folder: str | Path, n: int, seed: int) -> list[Document]:
    """Prompts of the probing tasks, drawn evenly over the tasks (seeded)."""
    refs = [r for r in list_tasks(folder) if r.path is not None]
    if not refs:
        raise InnardsError(f"no probing tasks in {folder}")
    rng = random.Random(seed)
    rng.shuffle(refs)
    per = max(1, math.ceil(n / len(refs)))
    out: list[Document] = []
    for r in refs:
        prompts = read_task(r.path).prompts  # type: ignore[arg-type]
        for j in rng.sample(range(len(prompts)), min(per, len(prompts))):
            out.append(Document(id=f"{r.name}:{j}", text=prompts[j]))
        if len(out) >= n * 2:
            break
    return out


# ----- detectors and AUROC -----------------------------------------------------------------------------
def knn_distance(x: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance of each row of ``x`` to its k-th nearest row of ``ref``."""
    k = min(k, ref.shape[0])
    out = [torch.cdist(x[i:i + 2048].float(), ref.float()).topk(k, dim=-1, largest=False).values[:, -1]
           for i in range(0, x.shape[0], 2048)]
    return torch.cat(out) if out else torch.empty(0)


def auroc_ci(neg: np.ndarray, pos: np.ndarray, n_resamples: int, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """ROC-AUC of ``pos`` (shifted) vs ``neg`` (in distribution) and its two-sample percentile bootstrap CI.

    AUROC is the mean over (neg, pos) pairs of [pos > neg] (ties 1/2), so a resample's AUROC is a
    weighted mean of one pair matrix by the resample counts of each side, computed for all resamples
    at once. The indices depend only on the seed and the two sizes: detectors scored on the same
    documents are resampled jointly.
    """
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    n0, n1 = len(neg), len(pos)
    if n0 == 0 or n1 == 0:
        raise InnardsError("an AUROC needs scores on both sides")
    twice = 2.0 * (pos[None, :] > neg[:, None]) + (pos[None, :] == neg[:, None])  # 2 x [pos > neg], ties 1
    auc = float(twice.sum() / (2.0 * n0 * n1))
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // (n0 + n1))
    for b in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - b)
        w = np.stack([np.bincount(rng.integers(0, n0, n0), minlength=n0) for _ in range(m)]).astype(np.float64)
        v = np.stack([np.bincount(rng.integers(0, n1, n1), minlength=n1) for _ in range(m)]).astype(np.float64)
        boot[b:b + m] = ((w @ twice) * v).sum(-1) / (2.0 * n0 * n1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail])
    return auc, float(lo), float(hi)


class Detectors:
    """Per-token OOD scores (higher = less typical) of every detector, fitted on training activations."""

    def __init__(self, glp: GLP, site: str, ref: torch.Tensor, sae: SparseAutoencoder | None, cfg: BenchOODConfig):
        self.glp, self.site, self.sae, self.cfg = glp, site, sae, cfg
        self.gauss = GaussianFlow.fit(ref, glp, site)
        self.ref_z = glp.normalize(ref.to(glp.device), site).cpu()
        self.score_cfg = ScoreConfig(n_t=cfg.n_t, likelihood=cfg.likelihood, ode_steps=cfg.ode_steps, solver=cfg.solver,
                                     probes=cfg.probes, seed=cfg.seed)

    @torch.no_grad()
    def __call__(self, toks: TokenScores) -> dict[str, torch.Tensor]:
        x = toks.acts
        sc = score_tokens(self.glp, x, self.site, self.score_cfg)
        out = {"glp_denoise": sc["denoise"].double(), "mahalanobis": -self.gauss.log_prob(x),
               "knn": knn_distance(self.glp.normalize(x.to(self.glp.device), self.site).cpu(), self.ref_z, self.cfg.knn_k).double(),
               "lm_nll": toks.lm_nll.double()}
        if "loglik" in sc:
            out["glp_nll"] = -sc["loglik"].double()
        if self.sae is not None:
            r = torch.cat([self.sae.reconstruct(x[i:i + 4096]) for i in range(0, x.shape[0], 4096)])
            out["sae_error"] = ((r - x).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)).double()
        return out


def select(toks: TokenScores, min_tokens: int, limit: int) -> TokenScores:
    """The tokens of the first ``limit`` documents with at least ``min_tokens`` scored tokens."""
    docs, counts = np.unique(toks.doc, return_counts=True)
    keep = docs[counts >= min_tokens][:limit]
    m = np.isin(toks.doc, keep)
    mt = torch.from_numpy(m)
    return TokenScores(toks.doc[m], toks.pos[m], toks.tok[m], toks.acts[mt], toks.lm_nll[mt], toks.names)


def per_document(toks: TokenScores, scores: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Mean token score of each document, per detector."""
    docs, inv = np.unique(toks.doc, return_inverse=True)
    out = {}
    for name, v in scores.items():
        a = v.numpy().astype(np.float64)
        ok = ~np.isnan(a)
        out[name] = np.bincount(inv[ok], weights=a[ok], minlength=len(docs)) / np.maximum(
            np.bincount(inv[ok], minlength=len(docs)), 1)
    return out


# ----- the benchmark -----------------------------------------------------------------------------------
def _store_of(glp: GLP, acts: str | None) -> str:
    if acts:
        return acts
    data = (glp.meta.get("training") or {}).get("data") or {}
    path = data.get("store") if isinstance(data, dict) else None
    if not path or not Path(path).exists():
        raise InnardsError("give --acts DIR (the GLP does not record a store that exists here)")
    return str(path)


def bench_ood(cfg: BenchOODConfig) -> dict:
    """Run the benchmark; writes ``cfg.out`` (JSON) and returns the result."""
    require(bool(cfg.glp), "give --glp DIR (a GLP folder or hub id)")
    out = Path(cfg.out)
    require(out.suffix == ".json", f"--out must name a .json file, got {out.name}")
    glp = GLP.from_pretrained(cfg.glp)
    acts = _store_of(glp, cfg.acts)
    store = ActivationStore(acts)
    name = cfg.model.name or glp.source_model
    if not name:
        raise InnardsError("the GLP does not record its model: pass --model")
    model = load_model(name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
    s = resolve_site(model, glp.meta.get("site") or "")
    site = s.name
    glp.check_compatible(model, site, s.width)
    check_store(glp, store, site, "--acts")
    glp.to(next(model.parameters()).device).eval()
    probe_dir = _probe_dir(cfg.probe_tasks)
    shifts = [tuple(x.split("=", 1)) for x in cfg.shift]
    with Run.open(out, "bench", cfg, file=True, overwrite=cfg.overwrite, free={"progress"},
                  inputs={"glp": cfg.glp, "acts": acts, "model": name, "sae": cfg.sae, "text": cfg.text,
                          "probe_tasks": probe_dir, **{f"shift:{k}": v.partition("#")[0] for k, v in shifts}}) as run:
        if run.state == "complete":
            run.say_complete()
            return read_json(out, what="OOD benchmark")
        notes: list[str] = []
        rng = np.random.default_rng(cfg.seed)
        train = store.split_rows("train")
        ref = store.rows(np.sort(rng.choice(train, size=min(cfg.ref_rows, train.size), replace=False)), site=site).float()
        sae = None
        if cfg.sae or cfg.train_sae:
            sae_dir = cfg.sae or str(quick_sae(EvalConfig(glp=cfg.glp, acts=acts, sae_k=cfg.sae_k, sae_latents=cfg.sae_latents,
                                                           sae_tokens=cfg.sae_tokens, seed=cfg.seed, progress=cfg.progress),
                                                site, store, out))
            sae = load_sae(sae_dir)
        else:
            notes.append("sae_error: no SAE given and --no-train-sae")
        detect = Detectors(glp, site, ref, sae, cfg)
        base = in_distribution_docs(store, model, cfg)
        conditions: dict[str, list[Document]] = {"in_distribution": base}
        if cfg.shuffled:
            conditions["shuffled_words"] = shuffled_words(base, model, cfg.seed + 1)
        if cfg.random_tokens:
            conditions["random_tokens"] = random_token_docs(base, model, cfg.seed + 2)
        if probe_dir:
            conditions["probe_prompts"] = probe_prompt_docs(probe_dir, cfg.docs, cfg.seed + 3)
        for k, spec in shifts:
            src, _, split = spec.partition("#")
            conditions[k] = _take(iter_documents(open_text(src, model=model, seed=cfg.seed + 4, order="shuffled",
                                                           split=split or "blank")), cfg.docs * 2)
        doc_scores: dict[str, dict[str, np.ndarray]] = {}
        for cond, docs in conditions.items():
            toks = select(read_tokens(model, site, docs, cfg.context, cfg.batch_size, progress=cfg.progress),
                          cfg.min_tokens, cfg.docs)
            doc_scores[cond] = per_document(toks, detect(toks))
            n = len(next(iter(doc_scores[cond].values())))
            if n < 10:
                raise InnardsError(f"condition '{cond}' has only {n} documents with >= {cfg.min_tokens} tokens")
            if n < cfg.docs:
                notes.append(f"{cond}: {n} documents (asked for {cfg.docs})")
        res = _table(doc_scores, cfg)
        res.update({"glp": cfg.glp, "acts": acts, "model": name, "site": site, "context": cfg.context,
                    "detectors": {"glp_denoise": f"GLP denoising loss, mean over t = (k + 1/2) / {cfg.n_t}",
                                  "glp_nll": f"minus the GLP's ODE log-likelihood ({cfg.ode_steps} {cfg.solver} steps, "
                                             f"{cfg.probes} Hutchinson probe(s))",
                                  "mahalanobis": "minus the log-density of a Gaussian with the training mean and covariance",
                                  "sae_error": "SAE relative reconstruction error", "knn": f"distance to the {cfg.knn_k}-th "
                                  f"nearest of {ref.shape[0]} training activations (z-scored)", "lm_nll": "the LM's loss"},
                    "notes": notes})
        run.write_json(out.name, res)
        run.complete(headline={f"auroc_glp_nll_{k}": v["glp_nll"]["auroc"] for k, v in res["auroc"].items() if "glp_nll" in v},
                     outputs=[out.name])
        print(format_table(res))
        return res


def _probe_dir(spec: str | None) -> str | None:
    if spec is not None:
        return None if spec.lower() == "none" else spec
    d = shared_data_dir() / "sae_probes"
    return str(d) if d.is_dir() else None


def _table(doc_scores: dict[str, dict[str, np.ndarray]], cfg: BenchOODConfig) -> dict:
    ind = doc_scores["in_distribution"]
    auroc: dict[str, dict[str, dict[str, float]]] = {}
    for cond, sc in doc_scores.items():
        if cond == "in_distribution":
            continue
        auroc[cond] = {}
        for det in DETECTORS:
            if det in sc and det in ind:
                a, lo, hi = auroc_ci(ind[det], sc[det], cfg.n_boot, cfg.seed)
                auroc[cond][det] = {"auroc": a, "lo": lo, "hi": hi}
    means = {cond: {det: float(np.mean(v)) for det, v in sc.items()} for cond, sc in doc_scores.items()}
    return {"auroc": auroc, "n_docs": {c: len(next(iter(s.values()))) for c, s in doc_scores.items()},
            "mean_document_score": means}


def format_table(res: dict) -> str:
    """AUROC [95% CI] per shift (rows) and detector (columns)."""
    dets = [d for d in DETECTORS if any(d in v for v in res["auroc"].values())]
    lines = ["OOD detection: document ROC-AUC vs in-distribution (0.5 = chance), [95% bootstrap CI]", "",
             f"{'shift':<18}" + "".join(f"{d:>22}" for d in dets)]
    for cond, v in res["auroc"].items():
        cells = [f"{v[d]['auroc']:.3f} [{v[d]['lo']:.2f},{v[d]['hi']:.2f}]" if d in v else "-" for d in dets]
        lines.append(f"{cond:<18}" + "".join(f"{c:>22}" for c in cells))
    lines.append("")
    lines.append("documents: " + ", ".join(f"{k} {n}" for k, n in res["n_docs"].items()))
    return "\n".join(lines + [f"note: {n}" for n in res.get("notes", [])])
