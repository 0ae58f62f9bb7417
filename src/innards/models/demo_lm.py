"""The embedded demo language model: its config, tokenizer, data and training loop in one file.

A small Hugging Face ``LlamaForCausalLM`` (so ``generate()``, the KV cache and
``output_hidden_states`` work as everywhere else) with a byte-level BPE tokenizer trained here
with the ``tokenizers`` library. ``innards demo-lm train`` builds it from public-domain books:

* corpus: files or folders of ``.txt``/``.txt.gz``; a file whose text holds form feeds is a
  collection of books (one per form-feed block), any other file is cut into sections of
  consecutive paragraphs (about 20k characters each). Whole books (sections) are held out for validation, chosen by a hash
  of their title, so the held-out loss measures text the model never saw.
* documents: every paragraph (blank-line separated) becomes ``<|bos|> paragraph <|eos|>``; the
  documents of a book stay in order and are packed into one token stream, so the model still
  learns across paragraphs while every downstream document (a paragraph that starts with BOS)
  looks like its training data.
* training: random ``context``-token windows, AdamW, warm-up + cosine, gradient clipping, bf16
  autocast, a wall-clock and/or token/step budget, held-out loss, checkpoints with exact resume.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from innards.config import save_config, to_dict
from innards.errors import InnardsError
from innards.io import read_json, write_json
from innards.runlog import MetricsLog, read_metrics
from innards.runtime import default_device, parse_dtype, seed_everything

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2
DEMO_DIR = Path(__file__).resolve().parent / "demo"
_SHARED = "../shared/data/corpus"
# these never enter a shipped model: their licence forbids it
_FORBIDDEN = ("simple-stories",)
_SECTION_CHARS = 20_000  # hold-out unit of a file without form feeds
SAMPLE_PROMPTS = ["Once upon a time", "The little girl", "The king said to", "In the morning the", ""]


@dataclass
class DemoLMConfig:
    """Everything that defines a demo-LM training run (CLI flags mirror these fields)."""

    out: str = "runs/demo-lm"
    """run folder (checkpoint, metrics.jsonl, token cache, final/ model folder)"""
    data: list[str] = field(default_factory=lambda: [f"{_SHARED}/children-pd", f"{_SHARED}/stories/tinystories-fragment.txt.gz"])
    """text files or folders (.txt, .txt.gz); repeatable"""
    holdout: float = 0.02
    """fraction of whole books (stories) held out for validation"""
    cache_dir: str | None = None
    """where tokenizer and token arrays are cached (default OUT/cache)"""
    vocab_size: int = 4096
    tokenizer_chars: int = 30_000_000
    """characters of training text used to fit the BPE vocabulary"""
    context: int = 256
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 384
    rope_theta: float = 10000.0
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    steps: int | None = None
    """stop after this many optimizer steps"""
    tokens: int | None = None
    """stop after this many training tokens"""
    minutes: float | None = None
    """wall-clock budget; the learning-rate schedule follows it"""
    stop_at: int | None = None
    """pause at this step with a checkpoint (continue with --resume)"""
    eval_every: int = 200
    eval_seqs: int = 64
    final_eval_seqs: int = 512
    ckpt_every: int = 200
    autocast: Literal["bf16", "fp32"] = "bf16"
    """compute dtype of matmuls (parameters stay fp32)"""
    compile: bool = False
    """torch.compile the training forward/backward (faster steps after a slow first one)"""
    save_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the shipped weights"""
    threads: int = 1
    """torch CPU threads"""
    device: str | None = None
    seed: int = 0
    samples: int = 5
    sample_tokens: int = 60
    resume: bool = False
    overwrite: bool = False
    install: bool = False
    """copy the final model folder into the package (innards/models/demo)"""
    wandb: str | None = None
    """also log to this wandb project"""
    card_note: str | None = None
    """an extra sentence for the model card (e.g. how busy the machine was)"""


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


def _read_text(path: Path) -> str:
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _paragraphs(text: str) -> list[str]:
    out = []
    for p in text.replace("\r\n", "\n").split("\n\n"):
        p = p.strip()
        if p:
            out.append(p)
    return out


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


def _source_files(paths: Iterable[str]) -> list[tuple[Path, str, list[str] | None]]:
    files = []
    for p in paths:
        if any(f in p for f in _FORBIDDEN):
            raise InnardsError(f"refusing to train the demo model on {p}: its licence forbids shipping a model trained on it")
        path = Path(p)
        if path.is_dir():
            titles = _manifest_titles(path)
            found = sorted(q for q in path.iterdir() if q.name.endswith((".txt", ".txt.gz")))
            if not found:
                raise InnardsError(f"no .txt or .txt.gz files in {path}")
            files += [(q, path.name, titles.get(q.name)) for q in found]
        elif path.is_file():
            files.append((path, path.name, None))
        else:
            raise InnardsError(f"text not found: {path}")
    return files


def read_units(paths: Iterable[str]) -> list[Unit]:
    """Read books (form-feed blocks) or stories (blank-line blocks) from files and folders."""
    units: list[Unit] = []
    for path, source, titles in tqdm(_source_files(paths), desc="read text", unit="file"):
        text = _read_text(path)
        if "\f" in text:
            blocks = [b for b in text.split("\f") if b.strip()]
            if titles is not None and len(titles) != len(blocks):
                titles = None  # manifest out of step with the file: fall back to the text itself
            for i, b in enumerate(blocks):
                title = titles[i] if titles else f"{path.name}#{i}:{b.strip()[:80]}"
                units.append(Unit(source, title, _paragraphs(b)))
        else:
            # stories and their paragraphs are both blank-line separated: hold out runs of them
            docs, start, size = _paragraphs(text), 0, 0
            for i, d in enumerate(docs):
                size += len(d)
                if size >= _SECTION_CHARS or i == len(docs) - 1:
                    units.append(Unit(source, f"{path.name}#{start}:{docs[start][:80]}", docs[start:i + 1]))
                    start, size = i + 1, 0
    units = [u for u in units if u.docs]
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


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Fit a byte-level BPE ``tokenizers.Tokenizer`` that prepends BOS when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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


def hf_tokenizer(tok, context: int):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

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


def pack(tok, units: list[Unit], desc: str, batch: int = 4096) -> np.ndarray:
    """``<|bos|> doc <|eos|>`` for every document, concatenated into one uint16 stream."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    docs = [d for u in units for d in u.docs]
    parts: list[np.ndarray] = []
    for i in tqdm(range(0, len(docs), batch), desc=f"tokenise {desc}", unit="batch"):
        # the post-processor already prepends BOS
        for enc in tok.encode_batch(docs[i:i + batch]):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
    arr = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    assert arr.size == 0 or arr[0] == bos
    return arr


def _fingerprint(cfg: DemoLMConfig, files: list[tuple[Path, str, list[str] | None]]) -> str:
    st = [(str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)) for p, _, _ in files]
    key = json.dumps([st, cfg.holdout, cfg.vocab_size, cfg.tokenizer_chars, 2])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare_data(cfg: DemoLMConfig, out: Path) -> tuple[Any, np.ndarray, np.ndarray, dict]:
    """Tokenizer + train/val token streams, cached under the cache folder (never re-tokenised)."""
    from tokenizers import Tokenizer

    files = _source_files(cfg.data)
    fp = _fingerprint(cfg, files)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    cdir = cache / fp
    meta_path = cdir / "data.json"
    if meta_path.is_file():
        meta = read_json(meta_path, "token cache")
        tok = Tokenizer.from_file(str(cdir / "tokenizer.json"))
        return tok, np.load(cdir / "train.npy", mmap_mode="r"), np.load(cdir / "val.npy", mmap_mode="r"), meta
    units = read_units(cfg.data)
    train, val = split_units(units, cfg.holdout)
    t0 = time.time()
    tok = train_tokenizer(_sample_texts(train, cfg.tokenizer_chars), cfg.vocab_size)
    tok_s = time.time() - t0
    tr, va = pack(tok, train, "train"), pack(tok, val, "val")
    if len(tr) < cfg.context + 2 or len(va) < cfg.context + 1:
        raise InnardsError(f"too little text for context {cfg.context}: {len(tr)} train and {len(va)} held-out tokens")
    cdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(cdir / "tokenizer.json"))
    for name, arr in (("train", tr), ("val", va)):
        tmp = cdir / f".{name}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, cdir / f"{name}.npy")
    n_books = {s: sum(u.source == s for u in units) for s in dict.fromkeys(u.source for u in units)}
    meta = {
        "fingerprint": fp, "sources": [str(p) for p in cfg.data], "units_per_source": n_books,
        "train_units": len(train), "val_units": len(val), "val_titles": [f"[{u.source}] {u.title}" for u in val],
        "train_docs": sum(len(u.docs) for u in train), "val_docs": sum(len(u.docs) for u in val),
        "train_chars": sum(len(d) for u in train for d in u.docs), "val_chars": sum(len(d) for u in val for d in u.docs),
        "train_tokens": int(len(tr)), "val_tokens": int(len(va)), "tokenizer_seconds": round(tok_s, 1),
    }
    write_json(meta_path, meta)  # written last: its presence marks a complete cache
    return tok, tr, va, meta


# ---------------------------------------------------------------- model


def llama_config(cfg: DemoLMConfig):
    """The ``transformers.LlamaConfig`` of the demo model."""
    from transformers import LlamaConfig

    if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise InnardsError("d_model must be a multiple of n_heads, and n_heads of n_kv_heads")
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.context, rope_theta=cfg.rope_theta, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.02,
    )


def build_model(cfg: DemoLMConfig) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (seeded by ``cfg.seed``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg))
    return model


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- training


def lr_at(cfg: DemoLMConfig, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine decay to ``min_lr_ratio`` over ``progress`` in [0, 1]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _batch(arr: np.ndarray, ctx: int, bs: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # the offsets depend only on (seed, step): a resumed run draws exactly the same batches
    rng = np.random.default_rng([seed, step])
    offs = rng.integers(0, len(arr) - ctx - 1, size=bs)
    w = np.stack([np.asarray(arr[o:o + ctx + 1], dtype=np.int64) for o in offs])
    return torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:].copy())


def _loss(model, x: torch.Tensor, y: torch.Tensor, amp: bool, device: torch.device) -> torch.Tensor:
    y = y.masked_fill(y == 0, -100)  # predicting BOS after EOS is free: keep it out of the loss
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=x.to(device), use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, val: np.ndarray, ctx: int, n_seqs: int, bs: int, amp: bool, device: torch.device) -> float:
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
        tot += float(_loss(model, x, y, amp, device)) * n
        cnt += n
    model.train(was)
    return tot / max(cnt, 1)


_BUDGET_KEYS = {"out", "compile", "steps", "tokens", "minutes", "stop_at", "resume", "overwrite", "install", "eval_every", "eval_seqs",
                "final_eval_seqs", "ckpt_every", "samples", "sample_tokens", "wandb", "threads", "device", "cache_dir"}


def _save_ckpt(path: Path, model, opt, state: dict, cfg: DemoLMConfig) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "config": to_dict(cfg)}, tmp)
    os.replace(tmp, path)


def _cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def train_demo_lm(cfg: DemoLMConfig) -> Path:
    """Train the demo LM; returns the final Hugging Face model folder (``OUT/final``)."""
    if not (cfg.steps or cfg.tokens or cfg.minutes):
        raise InnardsError("give a budget: --minutes, --tokens or --steps")
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not (cfg.resume or cfg.overwrite):
        raise InnardsError(f"{out} already holds a run: pass --resume to continue it or --overwrite to start again")
    if cfg.resume and not ckpt_path.exists():
        raise InnardsError(f"nothing to resume in {out} (no checkpoint.pt)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(max(1, cfg.threads))
    device = default_device(cfg.device)
    amp = cfg.autocast == "bf16"
    seed_everything(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)

    tok, train, val, meta = prepare_data(cfg, out)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise InnardsError(f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size {cfg.vocab_size}")
    model = build_model(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=False)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if cfg.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        old = {k: v for k, v in ck["config"].items() if k not in _BUDGET_KEYS}
        new = {k: v for k, v in to_dict(cfg).items() if k not in _BUDGET_KEYS}
        diff = sorted(k for k in new if old.get(k) != new[k])
        if diff:
            raise InnardsError(f"cannot resume {out}: settings differ from the checkpoint ({', '.join(diff)})")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
    save_config(cfg, out)
    log = MetricsLog(out, wandb_project=cfg.wandb, config=to_dict(cfg), resume_step=state["step"] if cfg.resume else None)

    per_step = cfg.batch_size * cfg.context
    total_steps = None
    if cfg.steps or cfg.tokens:
        total_steps = min(s for s in (cfg.steps, math.ceil(cfg.tokens / per_step) if cfg.tokens else None) if s)
    budget_s = cfg.minutes * 60 if cfg.minutes else None

    def progress() -> float:
        ps = [state["step"] / total_steps] if total_steps else []
        if budget_s:
            ps.append(state["elapsed"] / budget_s)
        return max(ps)

    params = n_params(model)
    print(f"demo-lm: {params:,} parameters, {meta['train_tokens']:,} train / {meta['val_tokens']:,} held-out tokens, "
          f"{torch.get_num_threads()} thread(s) on {device}", flush=True)
    model.train()
    fwd = torch.compile(model) if cfg.compile else model
    t_last = time.time()
    bar = tqdm(total=total_steps, initial=state["step"], desc="demo-lm", unit="step", dynamic_ncols=True)
    stopping = {"flag": False}
    old_term = signal.getsignal(signal.SIGTERM)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: stopping.update(flag=True))
    window_tok, window_t = 0, time.time()
    try:
        while progress() < 1.0 and not stopping["flag"]:
            if cfg.stop_at is not None and state["step"] >= cfg.stop_at:
                break
            step = state["step"]
            lr = lr_at(cfg, step, progress())
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = _batch(train, cfg.context, cfg.batch_size, cfg.seed, step)
            loss = _loss(fwd, x, y, amp, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            now = time.time()
            state["elapsed"] += now - t_last
            t_last = now
            state["step"] += 1
            state["tokens"] += per_step
            window_tok += per_step
            loss = loss.detach()
            rec: dict[str, Any] = {"loss": round(float(loss), 5), "lr": lr, "grad_norm": round(float(gnorm), 4),
                                   "tokens": state["tokens"], "elapsed_s": round(state["elapsed"], 2)}
            if state["step"] % 10 == 0:
                rec["tokens_per_s"] = round(window_tok / max(now - window_t, 1e-9), 1)
                window_tok, window_t = 0, now
            if state["step"] % cfg.eval_every == 0:
                rec["val_loss"] = round(evaluate(model, val, cfg.context, cfg.eval_seqs, cfg.batch_size, amp, device), 5)
                t_last = time.time()
            log.log(state["step"], **rec)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.1e}", tok=f"{state['tokens'] / 1e6:.2f}M",
                            min=f"{state['elapsed'] / 60:.1f}", **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
            if state["step"] % cfg.ckpt_every == 0:
                _save_ckpt(ckpt_path, model, opt, state, cfg)
                t_last = time.time()
    except KeyboardInterrupt:
        _save_ckpt(ckpt_path, model, opt, state, cfg)
        raise
    finally:
        bar.close()
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, old_term)
    _save_ckpt(ckpt_path, model, opt, state, cfg)
    if stopping["flag"] or (cfg.stop_at is not None and progress() < 1.0):
        print(f"demo-lm: paused at step {state['step']}; continue with --resume", flush=True)
        log.close()
        return out

    val_loss = evaluate(model, val, cfg.context, cfg.final_eval_seqs, cfg.batch_size, amp, device)
    log.log(state["step"], final_val_loss=round(val_loss, 5), final_val_ppl=round(math.exp(val_loss), 3))
    log.close()
    final = write_final(cfg, model, tok, state, meta, val_loss, device)
    print(f"demo-lm: step {state['step']}, {state['tokens']:,} tokens, held-out loss {val_loss:.4f} "
          f"(ppl {math.exp(val_loss):.2f}); model in {final}", flush=True)
    if cfg.install:
        install(final)
    return final


# ---------------------------------------------------------------- output


def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
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


def write_final(cfg: DemoLMConfig, model, tok, state: dict, meta: dict, val_loss: float, device: torch.device) -> Path:
    """Write ``OUT/final`` (HF model + tokenizer + card + config + metrics), atomically."""
    from transformers import GenerationConfig

    out = Path(cfg.out)
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = hf_tokenizer(tok, cfg.context)
    prompts = (SAMPLE_PROMPTS * (cfg.samples // len(SAMPLE_PROMPTS) + 1))[:cfg.samples]
    samples = generate_samples(model, tokenizer, prompts, cfg.sample_tokens, cfg.seed)
    model = model.to("cpu").to(parse_dtype(cfg.save_dtype)).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_config(cfg, tmp, name="train_config.yaml")
    summary = {
        "parameters": n_params(model), "steps": state["step"], "tokens_seen": state["tokens"],
        "wall_time_s": round(state["elapsed"], 1), "tokens_per_s": round(state["tokens"] / max(state["elapsed"], 1e-9)),
        "threads": cfg.threads, "device": str(device),
        "trained_on": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "held_out_loss": round(val_loss, 4), "held_out_ppl": round(math.exp(val_loss), 3),
        "held_out_eval_tokens": int(min(cfg.final_eval_seqs, (meta["val_tokens"] - 1) // cfg.context) * cfg.context),
        "val_curve": [[r["step"], r["val_loss"]] for r in read_metrics(out) if "val_loss" in r],
        "data": meta, "samples": [{"prompt": p, "text": s} for p, s in zip(prompts, samples)],
        "torch": torch.__version__, "git": _git_rev(), "date": time.strftime("%Y-%m-%d"),
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
    d = s["data"]
    books = d["units_per_source"]
    src = ", ".join(f"`{k}` ({v} {'books' if 'children' in k else 'sections'})" for k, v in books.items())
    epochs = s["tokens_seen"] / max(d["train_tokens"], 1)
    val_titles = "\n".join(f"  - {t}" for t in d["val_titles"][:40])
    more = f"\n  - ... and {len(d['val_titles']) - 40} more" if len(d["val_titles"]) > 40 else ""
    limit = ("- The compute budget, not the data, limits this model: it saw less than one epoch, and a longer run (same\n"
             "  command, larger `--minutes`, or a GPU) gives a lower loss." if epochs < 1 else "")
    note = f"\n- {cfg.card_note}" if cfg.card_note else ""
    samples = "\n\n".join(f"**Prompt** `{x['prompt'] or '(BOS only)'}`\n\n> " + x["text"].replace("\n", "\n> ") for x in s["samples"])
    return f"""# innards demo LM

A small Llama-architecture causal language model shipped inside the `innards` package so that every
machine has a real model to look inside, offline. Load it with `innards.load_model("demo")` or with
plain `transformers.AutoModelForCausalLM.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)`.
It writes short, old-fashioned children's-book English; it is a toy for interpretability tooling,
not a useful language model.

## Architecture
- `LlamaForCausalLM`: {cfg.n_layers} layers, width {cfg.d_model}, {cfg.n_heads} heads ({cfg.n_kv_heads} key/value heads),
  MLP width {cfg.d_ff} (SwiGLU), RoPE (theta {cfg.rope_theta:g}), RMSNorm, tied input/output embeddings.
- **{s['parameters']:,} parameters** (embedding counted once), context {cfg.context} tokens, weights stored as {cfg.save_dtype}.
- Tokenizer: byte-level BPE, {cfg.vocab_size} tokens, trained with `tokenizers` on {cfg.tokenizer_chars / 1e6:g}M characters of the training books.
  Special tokens: `<|bos|>` (0), `<|eos|>` (1), `<|pad|>` (2). **The tokenizer prepends `<|bos|>` when encoding**
  (`tokenizer("text")` gives `[0, ...]`); pass `add_special_tokens=False` to leave it out.

## Data
- Sources: {src}. Text: {d['train_chars'] / 1e6:.1f}M characters for training, {d['val_chars'] / 1e6:.2f}M held out.
- Hold-out: **whole books** (for a file without book breaks: whole sections of ~20k characters), {cfg.holdout:.0%} per source, chosen by the SHA-256 of the title
  ({d['val_units']} units held out, {d['train_units']} used for training). Held-out books:
{val_titles}{more}
- Documents: every paragraph is `<|bos|> paragraph <|eos|>`; a book's paragraphs stay in order and are packed
  into {cfg.context}-token windows drawn at random offsets. Training stream: {d['train_tokens']:,} tokens; held-out stream: {d['val_tokens']:,} tokens.
- Never trained on `simple-stories` (its licence forbids shipping a model trained on it).

## Training
- Command: `innards demo-lm train` (config in `train_config.yaml`): AdamW (lr {cfg.lr:g}, betas {cfg.beta1}/{cfg.beta2},
  weight decay {cfg.weight_decay}), {cfg.warmup_steps} warm-up steps then cosine decay to {cfg.min_lr_ratio:g}x, gradient clipping {cfg.grad_clip},
  batch {cfg.batch_size} x {cfg.context} tokens, {cfg.autocast} autocast.{note}
- **{s['steps']:,} steps, {s['tokens_seen']:,} tokens seen** ({epochs:.2f} epochs of the training stream),
  **wall time {s['wall_time_s'] / 60:.1f} min** (the training loop; periodic evaluation not counted) on {s['device']} ({s['trained_on']}, {s['threads']} thread(s), {s.get('tokens_per_s', 0):,} tokens/s on average), torch {s['torch']}, {s['date']}.

## Results
- **Held-out loss {s['held_out_loss']:.4f} nats/token (perplexity {s['held_out_ppl']:.2f})** on {s['held_out_eval_tokens']:,} tokens of the
  held-out books (BOS targets excluded). Training curve: `metrics.jsonl` of the run; summary in `metrics_summary.json`.
{limit}

## Samples
Seeded (`seed={cfg.seed}+i`), temperature 0.8, top-k 40, {cfg.sample_tokens} new tokens:

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
