"""Meta-neuron inspection: the top-activating contexts of GLP hidden units over a text corpus.

Protocol after the paper (glp-reference.md §7.5): documents truncated to ``context`` tokens (64), every
non-special token's activation at the GLP's site gets its own meta-neuron pass at time t (0.1, noise
seeded per batch so a rerun reproduces it); each neuron keeps its top documents by the maximum over
tokens, with the per-token activations for highlighting (tokens >= ``highlight`` x the document's
maximum are emphasised).
"""

from __future__ import annotations

import html
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from innards.config import at_least, require, within
from innards.data.text import Document, framing, iter_chunks, iter_documents, make_batch, open_text
from innards.errors import InnardsError
from innards.glp.model import GLP
from innards.io import atomic_write_bytes
from innards.models.config import ModelConfig
from innards.models.hooks import run_with_cache
from innards.models.load import load_model
from innards.models.sites import resolve_site
from innards.run import Run


@dataclass
class NeuronsConfig:
    """``innards glp neurons``: top-activating contexts of (selected) meta-neurons."""

    glp: str = ""
    """GLP folder or hub id"""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    """the language model the GLP was trained on (empty name: the one recorded in the GLP)"""
    site: str | None = None
    """site (None: the GLP's only site)"""
    text: str = ""
    """text source: file, folder, hf:NAME[:SPLIT] (see innards.data.text)"""
    neuron: list[str] = field(default_factory=list)
    """meta-neurons BLOCK:INDEX (repeatable or comma-separated; default: all)"""
    top: int = 20
    """contexts kept per neuron"""
    max_docs: int = 1000
    """documents read from the text source"""
    context: int = 64
    """tokens per document (documents are truncated)"""
    t: float = 0.1
    """noise level of the meta-neuron pass (paper: 0.1)"""
    seed: int = 0
    """seed of the noise (batch i uses seed + i)"""
    batch_size: int = 32
    """documents per forward pass"""
    highlight: float = 0.4
    """emphasise tokens at >= this fraction of the context's maximum"""
    page_top: int = 10
    """contexts per neuron shown on the HTML/Markdown pages (JSON keeps --top)"""
    text_split: Literal["blank", "line", "formfeed", "file"] = "blank"
    """how .txt files split into documents"""
    text_field: str = "text"
    """JSON / dataset field or CSV column holding the text"""
    restats: str | None = None
    """activation store whose whole-store statistics replace the GLP's normalisation (see glp/reference.py)"""
    out: str = "glp-neurons"
    """output folder: neurons.json, neurons.md, neurons.html"""
    overwrite: bool = False
    """replace a neurons run made with other settings"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):  # the flat spelling of innards 0.1
            self.model = ModelConfig(name=self.model)
        at_least(self, 1, "top", "max_docs", "batch_size", "page_top")
        at_least(self, 2, "context")
        within(self, "t", 0.0, 1.0)
        within(self, "highlight", 0.0, 1.0)


def parse_neurons(specs: list[str], n_blocks: int, d_mlp: int) -> list[tuple[int, int]]:
    """'B:I' strings -> (block, index) pairs, validated; empty means every meta-neuron."""
    if not specs:
        return [(b, i) for b in range(n_blocks) for i in range(d_mlp)]
    out = []
    for s in specs:
        b, sep, i = str(s).strip().partition(":")
        if not sep or not b.strip().isdigit() or not i.strip().isdigit():
            raise InnardsError(f"meta-neurons are written BLOCK:INDEX, got '{s}'")
        b, i = int(b), int(i)
        if b >= n_blocks or i >= d_mlp:
            raise InnardsError(f"meta-neuron {s} out of range: the GLP has {n_blocks} blocks of {d_mlp} units")
        out.append((b, i))
    return list(dict.fromkeys(out))


class TopContexts:
    """Streaming per-neuron top-k of contexts by max activation, keeping per-token activations."""

    def __init__(self, n_neurons: int, k: int, context: int):
        self.k, self.context = k, context
        self.vals = torch.full((k, n_neurons), -float("inf"))
        self.ctx = torch.full((k, n_neurons), -1, dtype=torch.long)
        self.tok = torch.zeros((k, n_neurons, context), dtype=torch.float16)

    def update(self, maxes: torch.Tensor, per_token: torch.Tensor, ctx_ids: torch.Tensor) -> None:
        """maxes (B, N), per_token (B, N, context), ctx_ids (B,) global context indices."""
        vals = torch.cat([self.vals, maxes.float()])
        ids = torch.cat([self.ctx, ctx_ids[:, None].expand_as(maxes)])
        toks = torch.cat([self.tok, per_token.to(torch.float16)])
        k = min(self.k, vals.shape[0])
        top, idx = vals.topk(k, dim=0)
        self.vals = top
        self.ctx = ids.gather(0, idx)
        self.tok = toks.gather(0, idx[:, :, None].expand(-1, -1, self.context))


@torch.no_grad()
def top_contexts(glp: GLP, model: PreTrainedModel, site: str, docs: Iterable[Document], neurons: list[tuple[int, int]], top: int = 20,
                 context: int = 64, t: float = 0.1, seed: int = 0, batch_size: int = 32,
                 max_docs: int | None = None) -> dict:
    """Run the corpus through model and GLP; return the per-neuron top contexts and the contexts' tokens."""
    d_mlp = glp.config.d_mlp
    cols = torch.tensor([b * d_mlp + i for b, i in neurons], dtype=torch.long)
    tracker = TopContexts(len(neurons), top, context)
    frame = framing(model.tokenizer)
    device = next(model.parameters()).device
    doc_ids: dict[int, str] = {}

    def numbered() -> Iterator[tuple[int, Document]]:
        for i, d in enumerate(itertools.islice(docs, max_docs)):
            doc_ids[i] = d.id
            yield i, d

    # the paper truncates documents: keep only each document's first chunk
    chunks = (c for c in iter_chunks(numbered(), model.tokenizer, context) if c.start == 0)
    contexts: list[tuple[int, list[int], list[bool]]] = []
    n_tokens = 0
    bar = tqdm(desc="meta-neurons", unit="doc", total=max_docs)
    for bi in itertools.count():
        group = list(itertools.islice(chunks, batch_size))
        if not group:
            break
        batch = make_batch(group, frame.pad)
        acts = run_with_cache(model, batch.input_ids, [site], attention_mask=batch.attention_mask.to(device))[site]
        keep = batch.keep.to(acts.device)
        rows = acts[keep].float()
        mn = glp.meta_neurons(rows, t=t, seed=seed + bi, site=site)[:, cols.to(rows.device)].float().cpu()
        B, T = batch.input_ids.shape
        dense = torch.full((B, T, len(neurons)), -float("inf"))
        dense[batch.keep] = mn
        per_tok = torch.zeros((B, len(neurons), context))
        per_tok[:, :, :T] = dense.permute(0, 2, 1).clamp(min=-1e4).masked_fill(~batch.keep[:, None, :], 0.0)
        maxes = dense.amax(1)
        base = len(contexts)
        for c in group:
            contexts.append((c.doc, c.ids.tolist(), c.keep.tolist()))
        tracker.update(maxes, per_tok, torch.arange(base, base + B))
        n_tokens += rows.shape[0]
        bar.update(B)
    bar.close()
    if not contexts:
        raise InnardsError("the text source produced no tokens")
    return {"tracker": tracker, "contexts": contexts, "doc_ids": doc_ids, "n_tokens": n_tokens,
            "n_contexts": len(contexts)}


def _token_strings(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def build_report(found: dict, neurons: list[tuple[int, int]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[dict], dict[str, dict]]:
    """(neurons, contexts): per neuron its examples in descending order; each context's tokens stored once."""
    tr: TopContexts = found["tracker"]
    out = []
    contexts: dict[str, dict] = {}
    for j, (b, i) in enumerate(neurons):
        examples = []
        for r in range(tr.vals.shape[0]):
            cid = int(tr.ctx[r, j])
            v = float(tr.vals[r, j])
            if cid < 0 or v == -float("inf"):
                continue
            doc, ids, keep = found["contexts"][cid]
            if str(cid) not in contexts:
                contexts[str(cid)] = {"doc": doc, "doc_id": found["doc_ids"].get(doc),
                                      "tokens": _token_strings(tokenizer, ids), "special": [not k for k in keep]}
            acts = tr.tok[r, j, :len(ids)].float().tolist()
            kept = [k for k in range(len(ids)) if keep[k]]
            arg = max(kept, key=lambda k: acts[k]) if kept else 0
            examples.append({"context": cid, "max": v, "max_position": arg, "acts": [float(f"{a:.4g}") for a in acts]})
        out.append({"neuron": f"{b}:{i}", "block": b, "index": i,
                    "max": examples[0]["max"] if examples else None, "examples": examples})
    return out, contexts


def _emphasis(acts: list[float], special: list[bool], frac: float, mx: float) -> list[bool]:
    return [(not s) and mx > 0 and a >= frac * mx for a, s in zip(acts, special)]


def _window(n: int, centre: int, half: int) -> tuple[int, int]:
    return max(0, centre - half), min(n, centre + half + 1)


def render_markdown(report: list[dict], contexts: dict[str, dict], header: dict, highlight: float, page_top: int,
                    window: int = 12) -> str:
    """Readable Markdown: per neuron, a window around each context's max token, strong tokens in bold."""
    lines = ["# Meta-neuron top contexts", "",
             f"GLP `{header['glp']}` on `{header['model']}` at `{header['site']}`, t = {header['t']}, "
             f"{header['n_contexts']} contexts ({header['n_tokens']} tokens). Bold: tokens at >= {highlight:g} x "
             f"the context's maximum; [[brackets]]: the maximum.", ""]
    for n in report:
        lines.append(f"## {n['neuron']}  (max {n['max']:.3f})" if n["max"] is not None else f"## {n['neuron']}")
        lines.append("")
        for ex in n["examples"][:page_top]:
            ctx = contexts[str(ex["context"])]
            mp = ex["max_position"]
            lo, hi = _window(len(ctx["tokens"]), mp, window)
            emph = _emphasis(ex["acts"], ctx["special"], highlight, ex["max"])
            parts = []
            for k in range(lo, hi):
                if ctx["special"][k]:
                    continue
                tok = ctx["tokens"][k].replace("\n", "⏎").replace("|", "\\|").replace("*", "\\*").replace("`", "'")
                core = tok.strip()
                lead = " " if tok[:1].isspace() else ""
                if not core and k != mp and not emph[k]:
                    parts.append(" ")  # a bare whitespace token
                    continue
                core = core or "·"
                if k == mp:
                    core = f"[[**{core}**]]"
                elif emph[k]:
                    core = f"**{core}**"
                parts.append(lead + core)
            lines.append(f"- {ex['max']:.3f} `{ctx['doc_id']}`: " + ("… " if lo > 1 else "") + "".join(parts).strip()
                         + (" …" if hi < len(ctx["tokens"]) else ""))
        lines.append("")
    return "\n".join(lines)


def render_html(report: list[dict], contexts: dict[str, dict], header: dict, highlight: float, page_top: int,
                window: int = 24) -> str:
    """Self-contained HTML: token backgrounds shaded by activation, the maximum outlined."""
    esc = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Meta-neuron top contexts</title><style>",
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           ".c{font-family:monospace;white-space:pre-wrap;line-height:1.7;margin:.2em 0 .8em}"
           ".m{outline:2px solid #c00}.b{font-weight:bold}.v{color:#666;font-size:.85em}"
           "h2{font-size:1.05em;border-top:1px solid #ddd;padding-top:.6em}</style></head><body>",
           f"<h1>Meta-neuron top contexts</h1><p>GLP <code>{esc(str(header['glp']))}</code> on "
           f"<code>{esc(str(header['model']))}</code> at <code>{esc(str(header['site']))}</code>, t = {header['t']}; "
           f"{header['n_contexts']} contexts, {header['n_tokens']} tokens. Shading: activation / context maximum; "
           f"bold: &ge; {highlight:g}&times; the maximum; outlined: the maximum. Hover a shaded token for its value.</p>"]
    for n in report:
        mx = f" &mdash; max {n['max']:.3f}" if n["max"] is not None else ""
        out.append(f"<h2 id='n{esc(n['neuron'])}'>neuron {esc(n['neuron'])}{mx}</h2>")
        for ex in n["examples"][:page_top]:
            ctx = contexts[str(ex["context"])]
            emph = _emphasis(ex["acts"], ctx["special"], highlight, ex["max"])
            lo, hi = _window(len(ctx["tokens"]), ex["max_position"], window)
            spans = ["&hellip;" if lo > 1 else ""]
            for k in range(lo, hi):
                if ctx["special"][k]:
                    continue
                tok, a = ctx["tokens"][k], ex["acts"][k]
                alpha = max(0.0, min(1.0, a / ex["max"])) if ex["max"] > 0 else 0.0
                is_max = k == ex["max_position"]
                if alpha < 0.05 and not is_max:
                    spans.append(esc(tok))  # unshaded tokens stay plain text: keeps big pages small
                    continue
                cls = " ".join(c for c, on in (("m", is_max), ("b", emph[k])) if on)
                spans.append(f"<span{f' class={chr(39)}{cls}{chr(39)}' if cls else ''} title='{a:.3g}' "
                             f"style='background:rgba(255,140,0,{alpha:.2f})'>{esc(tok)}</span>")
            spans.append("&hellip;" if hi < len(ctx["tokens"]) else "")
            out.append(f"<div class='v'>{ex['max']:.3f} &middot; {esc(str(ctx['doc_id']))}</div>"
                       f"<div class='c'>{''.join(spans)}</div>")
    out.append("</body></html>")
    return "\n".join(out)


def glp_neurons(cfg: NeuronsConfig) -> Path:
    """Load GLP and model, find every selected meta-neuron's top contexts, write JSON, HTML and Markdown."""
    require(bool(cfg.glp), "--glp is required")
    require(bool(cfg.text), "--text is required")
    glp = GLP.from_pretrained(cfg.glp, restats=cfg.restats)
    neurons = parse_neurons(cfg.neuron, glp.config.n_blocks, glp.config.d_mlp)
    model_name = cfg.model.name or glp.source_model
    if not model_name:
        raise InnardsError("the GLP does not record its model: pass --model")
    site_name = cfg.site or glp.meta.get("site")
    if not site_name:
        raise InnardsError("the GLP does not record its site: pass --site")
    model = load_model(model_name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
    s = resolve_site(model, site_name)
    site = s.name
    glp.check_compatible(model, site, s.width)
    glp.to(next(model.parameters()).device).eval()
    with Run.open(cfg.out, "neurons", cfg, overwrite=cfg.overwrite, free={"page_top", "highlight"},
                  inputs={"glp": cfg.glp, "model": model_name, "text": cfg.text, "restats": cfg.restats}) as run:
        if run.state == "complete":
            run.say_complete()
            return run.path
        source = open_text(cfg.text, text_field=cfg.text_field, split=cfg.text_split)
        t0 = time.perf_counter()
        found = top_contexts(glp, model, site, iter_documents(source), neurons, cfg.top, cfg.context, cfg.t, cfg.seed,
                             cfg.batch_size, cfg.max_docs)
        report, contexts = build_report(found, neurons, model.tokenizer)
        header = {"glp": str(Path(cfg.glp).resolve()) if Path(cfg.glp).exists() else cfg.glp, "model": model_name,
                  "site": site, "t": cfg.t, "seed": cfg.seed, "context": cfg.context, "top": cfg.top,
                  "highlight": cfg.highlight, "text": cfg.text, "n_contexts": found["n_contexts"],
                  "n_tokens": found["n_tokens"], "n_neurons": len(neurons), "d_mlp": glp.config.d_mlp,
                  "n_blocks": glp.config.n_blocks, "restats": cfg.restats, "seconds": round(time.perf_counter() - t0, 2)}
        run.write_json("neurons.json", {**header, "neurons": report, "contexts": contexts}, indent=None)
        atomic_write_bytes(run.root / "neurons.md", render_markdown(report, contexts, header, cfg.highlight, cfg.page_top).encode())
        atomic_write_bytes(run.root / "neurons.html", render_html(report, contexts, header, cfg.highlight, cfg.page_top).encode())
        run.complete(headline={"neurons": len(neurons), "contexts": found["n_contexts"], "tokens": found["n_tokens"]},
                     outputs=["neurons.json", "neurons.md", "neurons.html"])
        print(f"wrote top contexts of {len(neurons)} meta-neurons over {found['n_contexts']} contexts to {run.path}")
        return run.path
