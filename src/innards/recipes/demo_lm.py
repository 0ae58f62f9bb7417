"""The embedded demo language model: its data, tokenizer, model and training (``innards demo-lm train``).

A small Hugging Face ``LlamaForCausalLM`` (so ``generate()``, the KV cache and
``output_hidden_states`` work as everywhere else) with a byte-level BPE tokenizer trained here
with the ``tokenizers`` library, built from public-domain books:

* corpus: text sources read by :mod:`innards.data.text` (files or folders of ``.txt``/``.txt.gz``, ...);
  a file whose text holds form feeds is a collection of books (one per form-feed block), any other
  file is cut into sections of consecutive paragraphs (about 20k characters each). Whole books
  (sections) are held out for validation, chosen by a hash of their title, so the held-out loss
  measures text the model never saw.
* documents: every paragraph (blank-line separated) becomes ``<|bos|> paragraph <|eos|>``; the
  documents of a book stay in order and are packed into one token stream, so the model still
  learns across paragraphs while every downstream document (a paragraph that starts with BOS)
  looks like its training data.
* training: random ``context``-token windows drawn from (seed, step) alone, AdamW with the shared
  schedule (:mod:`innards.train.optim`: warm-up + cosine over the step or wall-clock budget),
  gradient clipping, bf16 autocast, held-out loss, and checkpoints with exact resume
  (:mod:`innards.train.checkpoint`: safetensors + JSON, committed atomically) in a run folder
  (:class:`innards.run.Run`, kind ``demo-lm``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from innards.config import at_least, positive, require, save_config, to_dict, within
from innards.data.text import open_text
from innards.errors import InnardsError
from innards.io import read_json, remove_orphans, write_json
from innards.models.load import DEMO_DIR
from innards.provenance import git_revision
from innards.run import Run
from innards.runlog import MetricsLog, read_metrics
from innards.runtime import default_device, parse_dtype, seed_everything
from innards.train.checkpoint import flatten_optimizer, has_checkpoint, load_checkpoint, save_checkpoint, unflatten_optimizer
from innards.train.optim import OptimConfig, adamw, clip_grads, lr_factor, set_lr
from innards.train.precision import autocast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2
_SHARED = "../shared/data/corpus"
# these never enter a shipped model: their licence forbids it
_FORBIDDEN = ("simple-stories",)
_SECTION_CHARS = 20_000  # hold-out unit of a file without form feeds
SAMPLE_PROMPTS = ["Once upon a time", "The little girl", "The king said to", "In the morning the", ""]
RESUME_DIR = "resume"
_WALL_CLOCK_STEPS = 1_000_000  # resolution of the schedule when it follows a wall-clock budget


# ---------------------------------------------------------------- config


@dataclass
class DemoDataConfig:
    """The training text and its tokenizer."""

    text: list[str] = field(default_factory=lambda: [f"{_SHARED}/children-pd", f"{_SHARED}/stories/tinystories-fragment.txt.gz"])
    """text files or folders (.txt, .txt.gz, .jsonl); repeatable"""
    holdout: float = 0.02
    """fraction of whole books (stories) held out for validation, per source"""
    cache_dir: str | None = None
    """where tokenizer and token arrays are cached (None: OUT/cache)"""
    vocab_size: int = 4096
    """BPE vocabulary size (special tokens included)"""
    tokenizer_chars: int = 30_000_000
    """characters of training text used to fit the BPE vocabulary"""

    FLAG_PREFIX = "data"

    def __post_init__(self) -> None:
        require(bool(self.text), "--data.text needs at least one file or folder")
        within(self, "holdout", 0.0, 1.0, open_lo=True, open_hi=True)
        at_least(self, 259, "vocab_size")  # 256 byte tokens and the 3 special tokens
        at_least(self, 1, "tokenizer_chars")


@dataclass
class DemoModelConfig:
    """The Llama architecture of the demo model."""

    context: int = 256
    """context length in tokens (training windows and max_position_embeddings)"""
    d_model: int = 128
    """residual stream width"""
    n_layers: int = 6
    """transformer blocks"""
    n_heads: int = 4
    """attention heads"""
    n_kv_heads: int = 4
    """key/value heads (grouped-query attention when fewer than n_heads)"""
    d_ff: int = 384
    """SwiGLU MLP width"""
    rope_theta: float = 10000.0
    """RoPE base"""

    FLAG_PREFIX = "model"

    def __post_init__(self) -> None:
        at_least(self, 2, "context")
        at_least(self, 1, "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
        positive(self, "rope_theta")
        require(self.d_model % self.n_heads == 0 and self.n_heads % self.n_kv_heads == 0,
                f"--model.d-model ({self.d_model}) must be a multiple of --model.n-heads ({self.n_heads}), "
                f"and --model.n-heads of --model.n-kv-heads ({self.n_kv_heads})")


@dataclass
class DemoTrainConfig:
    """Batches, budget, evaluation, checkpoints and where the training runs."""

    batch_size: int = 16
    """sequences per optimiser step"""
    steps: int | None = None
    """stop after this many optimiser steps"""
    tokens: int | None = None
    """stop after this many training tokens"""
    minutes: float | None = None
    """wall-clock budget; the learning-rate schedule follows it"""
    stop_at: int | None = None
    """pause at this step with a checkpoint (continue with --resume)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    eval_every: int = 200
    """steps between held-out evaluations"""
    eval_seqs: int = 64
    """held-out windows per periodic evaluation"""
    final_eval_seqs: int = 512
    """held-out windows of the final evaluation"""
    ckpt_every: int = 200
    """steps between resume checkpoints"""
    autocast: Literal["bf16", "fp32"] = "bf16"
    """compute dtype of matmuls (parameters stay fp32)"""
    compile: bool = False
    """torch.compile the training forward/backward (faster steps after a slow first one)"""
    threads: int = 1
    """torch CPU threads"""
    device: str | None = None
    """device (None: cuda if available, else cpu)"""
    seed: int = 0
    """seed of the initial weights and of every batch"""

    FLAG_PREFIX = "train"

    def __post_init__(self) -> None:
        at_least(self, 1, "batch_size", "steps", "tokens", "stop_at", "eval_every", "eval_seqs", "final_eval_seqs",
                 "ckpt_every", "threads")
        positive(self, "minutes")
        within(self, "beta1", 0.0, 1.0, open_hi=True)
        within(self, "beta2", 0.0, 1.0, open_hi=True)
        at_least(self, 0, "seed")


@dataclass
class DemoOutputConfig:
    """What the finished run writes besides the weights."""

    samples: int = 5
    """sampled continuations in the model card"""
    sample_tokens: int = 60
    """new tokens per sample"""
    save_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the shipped weights"""
    install: bool = False
    """copy the final model folder into the package (innards/models/demo)"""
    wandb: str | None = None
    """also log to this wandb project"""
    card_note: str | None = None
    """an extra sentence for the model card (e.g. how busy the machine was)"""

    FLAG_PREFIX = "output"

    def __post_init__(self) -> None:
        at_least(self, 0, "samples")
        at_least(self, 1, "sample_tokens")


def _demo_optim() -> OptimConfig:
    return OptimConfig(lr=2e-3, weight_decay=0.1, clip=1.0, schedule="cosine", warmup=0.04, final_lr_frac=0.1)


@dataclass
class DemoLMConfig:
    """Train the small Llama demo LM on public-domain books (held-out books for validation)."""

    out: str = "runs/demo-lm"
    """run folder (run.json, config.yaml, metrics.jsonl, resume/, token cache, final/ model folder)"""
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    """training text and tokenizer"""
    model: DemoModelConfig = field(default_factory=DemoModelConfig)
    """architecture"""
    optim: OptimConfig = field(default_factory=_demo_optim)
    """AdamW and its schedule (weight decay applies to matrices only)"""
    train: DemoTrainConfig = field(default_factory=DemoTrainConfig)
    """batches, budget, evaluation and checkpoints"""
    output: DemoOutputConfig = field(default_factory=DemoOutputConfig)
    """samples, shipped dtype, install"""
    resume: bool = False
    """continue the unfinished run in --out exactly where its last checkpoint left it"""
    overwrite: bool = False
    """replace a demo-lm run already in --out"""


# the flat spellings of innards 0.1
ALIASES = {
    "--data": "--data.text", "--holdout": "--data.holdout", "--cache-dir": "--data.cache-dir",
    "--vocab-size": "--data.vocab-size", "--tokenizer-chars": "--data.tokenizer-chars",
    **{f"--{k}": f"--model.{k}" for k in ("context", "d-model", "n-layers", "n-heads", "n-kv-heads", "d-ff", "rope-theta")},
    "--lr": "--optim.lr", "--min-lr-ratio": "--optim.final-lr-frac", "--weight-decay": "--optim.weight-decay",
    "--grad-clip": "--optim.clip",
    **{f"--{k}": f"--train.{k}" for k in ("batch-size", "steps", "tokens", "minutes", "stop-at", "beta1", "beta2",
                                          "eval-every", "eval-seqs", "final-eval-seqs", "ckpt-every", "autocast",
                                          "compile", "threads", "device", "seed")},
    **{f"--{k}": f"--output.{k}" for k in ("samples", "sample-tokens", "save-dtype", "install", "wandb", "card-note")},
}

# settings a resumed run may change: the budget, bookkeeping and where it runs
RESUME_FREE = {"data.cache_dir", "train.steps", "train.tokens", "train.minutes", "train.stop_at", "train.eval_every",
               "train.eval_seqs", "train.final_eval_seqs", "train.ckpt_every", "train.compile", "train.threads",
               "train.device", "output.samples", "output.sample_tokens", "output.install", "output.wandb",
               "output.card_note", "output.save_dtype"}


# ---------------------------------------------------------------- data


@dataclass
class Unit:
    """One book (or story): the hold-out unit."""

    source: str
    title: str
    docs: list[str]

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.source}\x00{self.title}".encode()).hexdigest()


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _manifest_titles(folder: Path) -> dict[str, list[str]]:
    """shard file name -> book titles, in order, from a MANIFEST.tsv when the folder has one."""
    m = folder / "MANIFEST.tsv"
    if not m.is_file():
        return {}
    titles: dict[str, list[str]] = {}
    lines = m.read_text().splitlines()
    head = lines[0].split("\t")
    for ln in lines[1:]:
        row = dict(zip(head, ln.split("\t")))
        if "shard" in row and "title" in row:
            titles.setdefault(row["shard"], []).append(f"{row.get('author', '')}: {row['title']}".strip(": "))
    return titles


def _check_licence(paths: Iterable[str]) -> None:
    for p in paths:
        if any(f in p for f in _FORBIDDEN):
            raise InnardsError(f"refusing to train the demo model on {p}: its licence forbids shipping a model trained on it")


def _blocks_by_file(spec: str) -> Iterator[tuple[str, list[str]]]:
    """(file name relative to the source, its form-feed blocks) for every file of a text source, in order."""
    current, blocks = None, []
    for doc in open_text(spec, split="formfeed"):
        rel = doc.id.rsplit(":", 1)[0]
        if rel != current:
            if current is not None:
                yield current, blocks
            current, blocks = rel, []
        if doc.text:
            blocks.append(doc.text)
    if current is not None:
        yield current, blocks


def _units_of(spec: str) -> list[Unit]:
    path = Path(spec)
    source = path.name
    titles = _manifest_titles(path) if path.is_dir() else {}
    units = []
    for rel, blocks in _blocks_by_file(spec):
        name = Path(rel).name
        if len(blocks) > 1:  # a collection of books, one per form-feed block
            known = titles.get(rel)
            if known is not None and len(known) != len(blocks):
                known = None  # manifest out of step with the file: fall back to the text itself
            for i, b in enumerate(blocks):
                units.append(Unit(source, known[i] if known else f"{name}#{i}:{b[:80]}", _paragraphs(b)))
            continue
        # stories and their paragraphs are both blank-line separated: hold out runs of them
        docs, start, size = _paragraphs(blocks[0]) if blocks else [], 0, 0
        for i, d in enumerate(docs):
            size += len(d)
            if size >= _SECTION_CHARS or i == len(docs) - 1:
                units.append(Unit(source, f"{name}#{start}:{docs[start][:80]}", docs[start:i + 1]))
                start, size = i + 1, 0
    return units


def read_units(paths: Iterable[str]) -> list[Unit]:
    """Read books (form-feed blocks) or sections of stories (blank-line blocks) from text sources."""
    paths = list(paths)
    _check_licence(paths)
    units = [u for p in tqdm(paths, desc="read text", unit="source") for u in _units_of(p) if u.docs]
    if not units:
        raise InnardsError("the training text is empty")
    return units


def split_units(units: list[Unit], holdout: float) -> tuple[list[Unit], list[Unit]]:
    """Hold out whole units, per source, chosen by the hash of their title (deterministic)."""
    if not 0 < holdout < 1:
        raise InnardsError(f"holdout must be between 0 and 1, got {holdout}")
    held: set[int] = set()
    by_source: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        by_source.setdefault(u.source, []).append(i)
    for idx in by_source.values():
        n = len(idx)
        k = 0 if n < 2 else max(1, round(holdout * n))
        held.update(sorted(idx, key=lambda i: units[i].key)[:k])
    if not held:
        raise InnardsError("need at least two books (or stories) to hold one out for validation")
    train = [u for i, u in enumerate(units) if i not in held]
    val = [u for i, u in enumerate(units) if i in held]
    return train, val


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Fit a byte-level BPE ``tokenizers.Tokenizer`` that prepends BOS when encoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]),
    ])
    return tok


def hf_tokenizer(tok: Tokenizer, context: int) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` as a transformers ``PreTrainedTokenizerFast``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=context, clean_up_tokenization_spaces=False,
    )


def _sample_texts(units: list[Unit], max_chars: int) -> list[str]:
    """Paragraphs spread evenly over the corpus, about ``max_chars`` characters in all."""
    docs = [d for u in units for d in u.docs]
    total = sum(map(len, docs))
    stride = max(1, math.ceil(total / max(1, max_chars)))
    return docs[::stride]


def pack(tok: Tokenizer, units: list[Unit], desc: str, batch: int = 4096) -> np.ndarray:
    """``<|bos|> doc <|eos|>`` for every document, concatenated into one uint16 stream."""
    eos = tok.token_to_id(EOS)
    docs = [d for u in units for d in u.docs]
    parts: list[np.ndarray] = []
    for i in tqdm(range(0, len(docs), batch), desc=f"tokenise {desc}", unit="batch"):
        # the post-processor already prepends BOS
        for enc in tok.encode_batch(docs[i:i + batch]):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def _fingerprint(d: DemoDataConfig) -> str:
    sources = [open_text(p, split="formfeed").fingerprint for p in d.text]
    return hashlib.sha256(json.dumps([sources, d.holdout, d.vocab_size, d.tokenizer_chars, 3]).encode()).hexdigest()[:16]


def prepare_data(cfg: DemoLMConfig) -> tuple[Tokenizer, np.ndarray, np.ndarray, dict]:
    """Tokenizer + train/val token streams, cached under the cache folder (never re-tokenised)."""
    _check_licence(cfg.data.text)
    fp = _fingerprint(cfg.data)
    cdir = Path(cfg.data.cache_dir or Path(cfg.out) / "cache") / fp
    meta_path = cdir / "data.json"
    if meta_path.is_file():
        meta = read_json(meta_path, "token cache")
        tok = Tokenizer.from_file(str(cdir / "tokenizer.json"))
        return tok, np.load(cdir / "train.npy", mmap_mode="r"), np.load(cdir / "val.npy", mmap_mode="r"), meta
    units = read_units(cfg.data.text)
    train, val = split_units(units, cfg.data.holdout)
    t0 = time.time()
    tok = train_tokenizer(_sample_texts(train, cfg.data.tokenizer_chars), cfg.data.vocab_size)
    tok_s = time.time() - t0
    tr, va = pack(tok, train, "train"), pack(tok, val, "val")
    ctx = cfg.model.context
    if len(tr) < ctx + 2 or len(va) < ctx + 1:
        raise InnardsError(f"too little text for context {ctx}: {len(tr)} train and {len(va)} held-out tokens")
    cdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(cdir / "tokenizer.json"))
    for name, arr in (("train", tr), ("val", va)):
        tmp = cdir / f".{name}.tmp{os.getpid()}.npy"
        np.save(tmp, arr)
        os.replace(tmp, cdir / f"{name}.npy")
    n_books = {s: sum(u.source == s for u in units) for s in dict.fromkeys(u.source for u in units)}
    meta = {
        "fingerprint": fp, "sources": list(cfg.data.text), "units_per_source": n_books,
        "train_units": len(train), "val_units": len(val), "val_titles": [f"[{u.source}] {u.title}" for u in val],
        "train_docs": sum(len(u.docs) for u in train), "val_docs": sum(len(u.docs) for u in val),
        "train_chars": sum(len(d) for u in train for d in u.docs), "val_chars": sum(len(d) for u in val for d in u.docs),
        "train_tokens": int(len(tr)), "val_tokens": int(len(va)), "tokenizer_seconds": round(tok_s, 1),
    }
    write_json(meta_path, meta)  # written last: its presence marks a complete cache
    return tok, tr, va, meta


# ---------------------------------------------------------------- model


def llama_config(cfg: DemoLMConfig) -> LlamaConfig:
    """The ``transformers.LlamaConfig`` of the demo model."""
    m = cfg.model
    return LlamaConfig(
        vocab_size=cfg.data.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        max_position_embeddings=m.context, rope_theta=m.rope_theta, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.02,
    )


def build_model(cfg: DemoLMConfig) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` (seeded by ``cfg.train.seed``)."""
    torch.manual_seed(cfg.train.seed)
    return LlamaForCausalLM(llama_config(cfg))


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- training


def _batch(arr: np.ndarray, ctx: int, bs: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # the offsets depend only on (seed, step): a resumed run draws exactly the same batches
    rng = np.random.default_rng([seed, step])
    offs = rng.integers(0, len(arr) - ctx - 1, size=bs)
    w = np.stack([np.asarray(arr[o:o + ctx + 1], dtype=np.int64) for o in offs])
    return torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:].copy())


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    y = y.masked_fill(y == 0, -100)  # predicting BOS after EOS is free: keep it out of the loss
    with autocast(device, precision):
        logits = model(input_ids=x.to(device), use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: np.ndarray, ctx: int, n_seqs: int, bs: int, precision: str,
             device: torch.device) -> float:
    """Mean next-token loss on ``n_seqs`` fixed windows spread over the held-out stream."""
    n_chunks = (len(val) - 1) // ctx
    idx = np.unique(np.linspace(0, n_chunks - 1, min(n_seqs, n_chunks)).astype(np.int64))
    was = model.training
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, len(idx), bs):
        w = np.stack([np.asarray(val[j * ctx:j * ctx + ctx + 1], dtype=np.int64) for j in idx[i:i + bs]])
        x, y = torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:].copy())
        n = int((y != 0).sum())
        tot += float(_loss(model, x, y, precision, device)) * n
        cnt += n
    model.train(was)
    return tot / max(cnt, 1)


class _Budget:
    """How far the run is (steps and/or wall clock) and the learning rate there."""

    def __init__(self, cfg: DemoLMConfig):
        t = cfg.train
        per_step = t.batch_size * cfg.model.context
        ends = [s for s in (t.steps, math.ceil(t.tokens / per_step) if t.tokens else None) if s]
        self.total_steps = min(ends) if ends else None
        self.seconds = t.minutes * 60 if t.minutes else None
        self.optim = cfg.optim

    def progress(self, step: int, elapsed: float) -> float:
        ps = [step / self.total_steps] if self.total_steps else []
        if self.seconds:
            ps.append(elapsed / self.seconds)
        return max(ps)

    def lr(self, step: int, elapsed: float) -> float:
        if self.seconds is None:
            return self.optim.lr * lr_factor(step, self.total_steps, self.optim)
        # a wall-clock budget: the schedule runs over the fraction done
        p = min(1.0, self.progress(step, elapsed))
        return self.optim.lr * lr_factor(int(p * _WALL_CLOCK_STEPS), _WALL_CLOCK_STEPS, self.optim)


def _optimizer(model: torch.nn.Module, cfg: DemoLMConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, cfg.optim, device, betas=(cfg.train.beta1, cfg.train.beta2))  # type: ignore[arg-type]


def _save(out: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    opt_t, opt_plain = flatten_optimizer(opt)
    # named_parameters lists the tied embedding once; safetensors refuses shared storage
    weights = {n: p.detach() for n, p in model.named_parameters()}
    save_checkpoint(out / RESUME_DIR, step, {"model.safetensors": weights, "optimizer.safetensors": opt_t},
                    {**state, "optimizer": opt_plain})


def _load(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, data_fingerprint: str) -> dict:
    state, files = load_checkpoint(out / RESUME_DIR)
    if state.get("data") != data_fingerprint:
        raise InnardsError(f"cannot resume {out}: the training text changed since its checkpoint")
    weights = files["model.safetensors"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    opt.load_state_dict(unflatten_optimizer(files["optimizer.safetensors"], state["optimizer"]))
    return {"step": int(state["step"]), "tokens": int(state["tokens"]), "elapsed": float(state["elapsed"])}


def train_demo_lm(cfg: DemoLMConfig) -> Path:
    """Train the demo LM; returns the final Hugging Face model folder (``OUT/final``)."""
    t = cfg.train
    if not (t.steps or t.tokens or t.minutes):
        raise InnardsError("give a budget: --train.minutes, --train.tokens or --train.steps")
    _check_licence(cfg.data.text)
    for p in cfg.data.text:
        open_text(p)  # a missing or unreadable source fails before the run folder is touched
    out = Path(cfg.out)
    run = Run.open(out, "demo-lm", cfg, inputs={f"text{i}": p for i, p in enumerate(cfg.data.text)},
                   resume=cfg.resume, overwrite=cfg.overwrite, free=RESUME_FREE)
    try:
        if run.state == "complete":
            run.say_complete()
            return out / "final"
        return _train(cfg, run, resumed=run.state == "resume" and has_checkpoint(out / RESUME_DIR))
    finally:
        run.close()


def _train(cfg: DemoLMConfig, run: Run, resumed: bool) -> Path:
    t, out = cfg.train, run.root
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(max(1, t.threads))
    device = default_device(t.device)
    seed_everything(t.seed)
    tok, train, val, meta = prepare_data(cfg)
    if tok.get_vocab_size() > cfg.data.vocab_size:
        raise InnardsError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size {cfg.data.vocab_size}")
    model = build_model(cfg).to(device)
    opt = _optimizer(model, cfg, device)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if resumed:
        state = _load(out, model, opt, meta["fingerprint"])
        remove_orphans(out)
    log = MetricsLog(out, wandb_project=cfg.output.wandb, config=to_dict(cfg), resume_step=state["step"] if resumed else None)
    budget = _Budget(cfg)
    per_step, ctx = t.batch_size * cfg.model.context, cfg.model.context

    saved = {"step": state["step"] if resumed else -1}

    def checkpoint() -> None:
        if saved["step"] == state["step"]:
            return  # already committed (a pause right after a periodic checkpoint)
        _save(out, state["step"], model, opt, {"tokens": state["tokens"], "elapsed": state["elapsed"],
                                              "data": meta["fingerprint"]})
        saved["step"] = state["step"]

    print(f"demo-lm: {n_params(model):,} parameters, {meta['train_tokens']:,} train / {meta['val_tokens']:,} held-out "
          f"tokens, {torch.get_num_threads()} thread(s) on {device}", flush=True)
    model.train()
    fwd = torch.compile(model) if t.compile else model
    t_last = time.time()
    bar = tqdm(total=budget.total_steps, initial=state["step"], desc="demo-lm", unit="step", dynamic_ncols=True)
    stopping = {"flag": False}
    # SIGTERM pauses with a checkpoint (signal handlers can only be set from the main thread)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, lambda *_: stopping.update(flag=True)) if main_thread else None
    window_tok, window_t = 0, time.time()
    try:
        while budget.progress(state["step"], state["elapsed"]) < 1.0 and not stopping["flag"]:
            if t.stop_at is not None and state["step"] >= t.stop_at:
                break
            step = state["step"]
            lr = budget.lr(step, state["elapsed"])
            set_lr(opt, lr)
            x, y = _batch(train, ctx, t.batch_size, t.seed, step)
            loss = _loss(fwd, x, y, t.autocast, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = clip_grads(model.parameters(), cfg.optim.clip)
            opt.step()
            now = time.time()
            state["elapsed"] += now - t_last
            t_last = now
            state["step"] += 1
            state["tokens"] += per_step
            window_tok += per_step
            rec: dict[str, float | int] = {"loss": round(float(loss.detach()), 5), "lr": lr, "grad_norm": round(gnorm, 4),
                                           "tokens": state["tokens"], "elapsed_s": round(state["elapsed"], 2)}
            if state["step"] % 10 == 0:
                rec["tokens_per_s"] = round(window_tok / max(now - window_t, 1e-9), 1)
                window_tok, window_t = 0, now
            if state["step"] % t.eval_every == 0:
                rec["val_loss"] = round(evaluate(model, val, ctx, t.eval_seqs, t.batch_size, t.autocast, device), 5)
                t_last = time.time()
            log.log(state["step"], **rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.1e}", tok=f"{state['tokens'] / 1e6:.2f}M",
                            min=f"{state['elapsed'] / 60:.1f}", **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
            if state["step"] % t.ckpt_every == 0:
                checkpoint()
                t_last = time.time()
    except KeyboardInterrupt:
        checkpoint()
        raise
    finally:
        bar.close()
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    checkpoint()
    if stopping["flag"] or budget.progress(state["step"], state["elapsed"]) < 1.0:
        print(f"demo-lm: paused at step {state['step']}; continue with --resume", flush=True)
        log.close()
        return out
    val_loss = evaluate(model, val, ctx, t.final_eval_seqs, t.batch_size, t.autocast, device)
    log.log(state["step"], final_val_loss=round(val_loss, 5), final_val_ppl=round(math.exp(val_loss), 3))
    log.close()
    final = write_final(cfg, model, tok, state, meta, val_loss, device)
    run.complete(headline={"held_out_loss": round(val_loss, 4), "held_out_ppl": round(math.exp(val_loss), 3),
                           "steps": state["step"], "tokens": state["tokens"], "parameters": n_params(model)},
                 outputs=["final/model.safetensors", "final/MODEL_CARD.md", "metrics.jsonl"])
    print(f"demo-lm: step {state['step']}, {state['tokens']:,} tokens, held-out loss {val_loss:.4f} "
          f"(ppl {math.exp(val_loss):.2f}); model in {final}", flush=True)
    if cfg.output.install:
        install(final)
    return final


# ---------------------------------------------------------------- output


def generate_samples(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[str],
                     max_new_tokens: int, seed: int) -> list[str]:
    """Seeded sampled continuations (temperature 0.8, top-k 40) of each prompt."""
    outs = []
    model.eval()
    for i, p in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = tokenizer(p, return_tensors="pt")["input_ids"].to(model.device)
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outs.append(tokenizer.decode(g[0], skip_special_tokens=True))
    return outs


def _cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_final(cfg: DemoLMConfig, model: LlamaForCausalLM, tok: Tokenizer, state: dict, meta: dict, val_loss: float,
                device: torch.device) -> Path:
    """Write ``OUT/final`` (HF model + tokenizer + card + config + metrics), atomically."""
    out, o = Path(cfg.out), cfg.output
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = hf_tokenizer(tok, cfg.model.context)
    prompts = (SAMPLE_PROMPTS * (o.samples // len(SAMPLE_PROMPTS) + 1))[:o.samples]
    samples = generate_samples(model, tokenizer, prompts, o.sample_tokens, cfg.train.seed)
    model = model.to("cpu").to(parse_dtype(o.save_dtype)).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_config(cfg, tmp, name="train_config.yaml")
    t = cfg.train
    summary = {
        "parameters": n_params(model), "steps": state["step"], "tokens_seen": state["tokens"],
        "wall_time_s": round(state["elapsed"], 1), "tokens_per_s": round(state["tokens"] / max(state["elapsed"], 1e-9)),
        "threads": t.threads, "device": str(device),
        "trained_on": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "held_out_loss": round(val_loss, 4), "held_out_ppl": round(math.exp(val_loss), 3),
        "held_out_eval_tokens": int(min(t.final_eval_seqs, (meta["val_tokens"] - 1) // cfg.model.context) * cfg.model.context),
        "val_curve": [[r["step"], r["val_loss"]] for r in read_metrics(out) if "val_loss" in r],
        "data": meta, "samples": [{"prompt": p, "text": s} for p, s in zip(prompts, samples)],
        "torch": torch.__version__, "git": (git_revision() or "")[:7] or None, "date": time.strftime("%Y-%m-%d"),
    }
    write_json(tmp / "metrics_summary.json", summary)
    (tmp / "MODEL_CARD.md").write_text(model_card(cfg, summary))
    old = out / ".final.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def model_card(cfg: DemoLMConfig, s: dict) -> str:
    """The Markdown model card written next to the weights."""
    d, m, t, op = s["data"], cfg.model, cfg.train, cfg.optim
    books = d["units_per_source"]
    src = ", ".join(f"`{k}` ({v} {'books' if 'children' in k else 'sections'})" for k, v in books.items())
    epochs = s["tokens_seen"] / max(d["train_tokens"], 1)
    val_titles = "\n".join(f"  - {x}" for x in d["val_titles"][:40])
    more = f"\n  - ... and {len(d['val_titles']) - 40} more" if len(d["val_titles"]) > 40 else ""
    limit = ("- The compute budget, not the data, limits this model: it saw less than one epoch, and a longer run (same\n"
             "  command, larger `--train.minutes`, or a GPU) gives a lower loss." if epochs < 1 else "")
    note = f"\n- {cfg.output.card_note}" if cfg.output.card_note else ""
    samples = "\n\n".join(f"**Prompt** `{x['prompt'] or '(BOS only)'}`\n\n> " + x["text"].replace("\n", "\n> ") for x in s["samples"])
    return f"""# innards demo LM

A small Llama-architecture causal language model shipped inside the `innards` package so that every
machine has a real model to look inside, offline. Load it with `innards.load_model("demo")` or with
plain `transformers.AutoModelForCausalLM.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)`.
It writes short, old-fashioned children's-book English; it is a toy for interpretability tooling,
not a useful language model.

## Architecture
- `LlamaForCausalLM`: {m.n_layers} layers, width {m.d_model}, {m.n_heads} heads ({m.n_kv_heads} key/value heads),
  MLP width {m.d_ff} (SwiGLU), RoPE (theta {m.rope_theta:g}), RMSNorm, tied input/output embeddings.
- **{s['parameters']:,} parameters** (embedding counted once), context {m.context} tokens, weights stored as {cfg.output.save_dtype}.
- Tokenizer: byte-level BPE, {cfg.data.vocab_size} tokens, trained with `tokenizers` on {cfg.data.tokenizer_chars / 1e6:g}M characters of the training books.
  Special tokens: `<|bos|>` (0), `<|eos|>` (1), `<|pad|>` (2). **The tokenizer prepends `<|bos|>` when encoding**
  (`tokenizer("text")` gives `[0, ...]`); pass `add_special_tokens=False` to leave it out.

## Data
- Sources: {src}. Text: {d['train_chars'] / 1e6:.1f}M characters for training, {d['val_chars'] / 1e6:.2f}M held out.
- Hold-out: **whole books** (for a file without book breaks: whole sections of ~20k characters), {cfg.data.holdout:.0%} per source, chosen by the SHA-256 of the title
  ({d['val_units']} units held out, {d['train_units']} used for training). Held-out books:
{val_titles}{more}
- Documents: every paragraph is `<|bos|> paragraph <|eos|>`; a book's paragraphs stay in order and are packed
  into {m.context}-token windows drawn at random offsets. Training stream: {d['train_tokens']:,} tokens; held-out stream: {d['val_tokens']:,} tokens.
- Never trained on `simple-stories` (its licence forbids shipping a model trained on it).

## Training
- Command: `innards demo-lm train` (config in `train_config.yaml`): AdamW (lr {op.lr:g}, betas {t.beta1}/{t.beta2},
  weight decay {op.weight_decay} on matrices), {op.warmup:.0%} of the run warming up, then {op.schedule} decay to {op.final_lr_frac:g}x,
  gradient clipping {op.clip}, batch {t.batch_size} x {m.context} tokens, {t.autocast} autocast.{note}
- **{s['steps']:,} steps, {s['tokens_seen']:,} tokens seen** ({epochs:.2f} epochs of the training stream),
  **wall time {s['wall_time_s'] / 60:.1f} min** (the training loop; periodic evaluation not counted) on {s['device']} ({s['trained_on']}, {s['threads']} thread(s), {s.get('tokens_per_s', 0):,} tokens/s on average), torch {s['torch']}, {s['date']}.

## Results
- **Held-out loss {s['held_out_loss']:.4f} nats/token (perplexity {s['held_out_ppl']:.2f})** on {s['held_out_eval_tokens']:,} tokens of the
  held-out books (BOS targets excluded). Training curve: `metrics.jsonl` of the run; summary in `metrics_summary.json`.
{limit}

## Samples
Seeded (`seed={t.seed}+i`), temperature 0.8, top-k 40, {cfg.output.sample_tokens} new tokens:

{samples}

## Licence
Weights: MIT, like the code. Training text: public-domain (US) books from Project Gutenberg
{'and a fragment of TinyStories V2 (CDLA-Sharing-1.0)' if any('tinystories' in k for k in books) else ''}.
"""


def install(final: Path, dest: Path = DEMO_DIR) -> Path:
    """Copy a final model folder into the package data folder, replacing it atomically."""
    final = Path(final)
    if not (final / "model.safetensors").is_file():
        raise InnardsError(f"{final} is not a finished demo-LM folder")
    tmp, old = dest.with_name(".demo.tmp"), dest.with_name(".demo.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(final, tmp)
    if dest.exists():
        dest.rename(old)
    for f in tmp.iterdir():
        f.chmod(0o644)  # package data must be readable by every user of an installed copy
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(f"demo-lm: installed into {dest} ({size / 1e6:.2f} MB)", flush=True)
    return dest
