"""Looking at a decomposed language model: top contexts per component, single-component ablation,
and the attribution graph among the components active on a prompt."""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from innards.config import at_least, within
from innards.errors import InnardsError
from innards.io import atomic_write_bytes, write_json
from innards.vpd.components import Mask
from innards.vpd.data import tokenize_source
from innards.vpd.run import Built, ci_values, load_run


def _load_lm_run(run: str, model: str | None, device: str | None) -> Built:
    b = load_run(run, model, device)
    if b.cfg.target.kind != "lm":
        raise InnardsError(f"run {run} decomposes a toy ({b.cfg.target.kind}); this command needs a language model run")
    return b


def _ci(b: Built, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.no_grad():
        clean, inputs = b.decomp.clean(ids)
        g, _ = ci_values(b, inputs)
    return clean, {n: v.detach() for n, v in g.items()}


def encode_prompt(b: Built, prompt: str) -> torch.Tensor:
    """Token ids (1, T) of a prompt with the model's BOS; longer than the context: keep the end, with a warning."""
    tok = b.target.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    n_ctx = int(getattr(b.target.config, "max_position_embeddings", 0) or 0)
    if n_ctx and len(ids) > n_ctx:
        print(f"innards: warning: prompt has {len(ids)} tokens, more than the model's context {n_ctx}; "
              f"keeping the last {n_ctx}", file=sys.stderr)
        ids = ids[-n_ctx:]
    if not ids:
        raise InnardsError("empty prompt")
    return torch.tensor([ids], device=b.cfg.device)


def parse_component(b: Built, spec: str) -> tuple[str, int]:
    """'NAME:IDX' (NAME may be any unique suffix of a decomposed module path) -> (name, idx)."""
    if ":" not in spec:
        raise InnardsError(f"component must be NAME:IDX, got '{spec}'")
    name, idx_s = spec.rsplit(":", 1)
    hits = [n for n in b.decomp.names if n == name] or [n for n in b.decomp.names if n.endswith(name)]
    if len(hits) != 1:
        some = ", ".join(b.decomp.names[:6])
        raise InnardsError(f"component matrix '{name}' matches {len(hits)} decomposed matrices (e.g. {some})")
    try:
        idx = int(idx_s)
    except ValueError:
        raise InnardsError(f"component index must be an integer, got '{idx_s}'") from None
    C = b.decomp.comp(hits[0]).C
    if not 0 <= idx < C:
        raise InnardsError(f"component index {idx} out of range for {hits[0]} (C = {C})")
    return hits[0], idx


# ---------------------------------------------------------------- contexts
@dataclass
class ContextsConfig:
    """innards vpd contexts: top-activating token contexts (by causal importance) per component."""

    run: str = ""
    """run folder of innards vpd train (a language-model run)"""
    text: str = ""
    """text source (file, folder, hf:NAME, generate:N, demo-samples)"""
    out: str | None = None
    """output folder (None: RUN/contexts)"""
    max_tokens: int = 100_000
    """tokens streamed through the model"""
    seq_len: int = 0
    """tokens per sequence (0: the run's seq_len)"""
    batch_size: int = 16
    """sequences per forward pass"""
    top: int = 10
    """examples kept per component"""
    window: int = 12
    """tokens of context before the firing token"""
    threshold: float = 0.1
    """components whose CI never exceeds this are skipped"""
    model: str | None = None
    """load the target from here instead (must be the same model)"""
    device: str | None = None
    """torch device (None: the run's)"""

    def __post_init__(self) -> None:
        at_least(self, 1, "max_tokens", "batch_size", "top")
        at_least(self, 0, "seq_len", "window")
        within(self, "threshold", 0.0, 1.0)


def top_contexts(b: Built, windows: torch.Tensor, top: int = 10, window: int = 12, threshold: float = 0.1,
                 batch_size: int = 16, component: str | None = None, progress: bool = True) -> dict[str, Any]:
    """In memory: each component's top-CI token contexts over ``windows`` (N, T) of token ids, its mean CI
    and firing fraction (``component`` NAME:IDX: that one only)."""
    only = parse_component(b, component) if component else None
    comps = [c for c in b.decomp.components if only is None or c.name == only[0]]
    n_win, T = windows.shape
    K = 4 * top  # extra candidates so the examples can come from distinct windows
    best_v = {c.name: torch.full((K, c.C), -1.0) for c in comps}
    best_i = {c.name: torch.zeros((K, c.C), dtype=torch.long) for c in comps}
    sums = {c.name: torch.zeros(c.C, dtype=torch.float64) for c in comps}
    fires = {c.name: torch.zeros(c.C, dtype=torch.float64) for c in comps}
    for s in tqdm(range(0, n_win, batch_size), desc="vpd contexts", disable=not progress):
        ids = windows[s:s + batch_size].to(b.cfg.device)
        _, g = _ci(b, ids)
        for n in best_v:
            flat = g[n].reshape(-1, g[n].shape[-1]).float().cpu()
            sums[n] += flat.double().sum(0)
            fires[n] += (flat > threshold).double().sum(0)
            v, i = flat.topk(min(K, flat.shape[0]), dim=0)
            allv = torch.cat([best_v[n], v])
            alli = torch.cat([best_i[n], i + s * T])
            best = allv.topk(K, dim=0)
            best_v[n], best_i[n] = best.values, alli.gather(0, best.indices)
    tok = b.target.tokenizer
    flat_tokens = windows.reshape(-1)
    n_pos = n_win * T
    result: dict[str, Any] = {"tokens": n_pos, "threshold": threshold, "components": {}}
    for c in comps:
        for idx in range(c.C):
            if (only is not None and idx != only[1]) or (only is None and best_v[c.name][0, idx] <= threshold):
                continue
            ex = []
            seen: set[int] = set()
            for r in range(K):
                v = float(best_v[c.name][r, idx])
                if v <= threshold or len(ex) >= top:
                    break
                p = int(best_i[c.name][r, idx])
                if p // T in seen:
                    continue
                seen.add(p // T)
                start = max(p - window, (p // T) * T)
                end = min(p + 4, (p // T + 1) * T)
                ex.append({"ci": round(v, 4), "left": tok.decode(flat_tokens[start:p].tolist()),
                           "token": tok.decode([int(flat_tokens[p])]),
                           "right": tok.decode(flat_tokens[p + 1:end].tolist())})
            result["components"][f"{c.name}:{idx}"] = {
                "mean_ci": float(sums[c.name][idx] / n_pos), "firing_frac": float(fires[c.name][idx] / n_pos),
                "examples": ex}
    return result


def text_windows(b: Built, text: str, max_tokens: int, seq_len: int = 0) -> torch.Tensor:
    """Token windows (N, T) of a text source for a decomposed language model (T: the run's seq_len by default)."""
    T = seq_len or b.cfg.seq_len
    tokens = tokenize_source(text, b.target.tokenizer, max_tokens, model=b.target)
    n_win = len(tokens) // T
    if n_win == 0:
        raise InnardsError(f"text source '{text}' gave fewer than {T} tokens")
    return tokens[: n_win * T].view(n_win, T)


def contexts(cfg: ContextsConfig) -> dict[str, Any]:
    """Stream the text through the model; keep the top-CI token positions of every component; write the pages."""
    if not cfg.run or not cfg.text:
        raise InnardsError("--run DIR and --text SRC are required")
    b = _load_lm_run(cfg.run, cfg.model, cfg.device)
    found = top_contexts(b, text_windows(b, cfg.text, cfg.max_tokens, cfg.seq_len), top=cfg.top, window=cfg.window,
                         threshold=cfg.threshold, batch_size=cfg.batch_size)
    result: dict[str, Any] = {"run": cfg.run, "text": cfg.text, **found}
    n_pos = result["tokens"]
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "contexts"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "contexts.json", result)
    atomic_write_bytes(out / "contexts.html", _contexts_html(result).encode())
    atomic_write_bytes(out / "contexts.md", _contexts_md(result).encode())
    atomic_write_bytes(out / "summary.md", contexts_summary_md(result, cfg).encode())
    print(f"{len(result['components'])} components fire above {cfg.threshold} on {n_pos} tokens; wrote {out}/contexts.html")
    return result


def _contexts_html(res: dict[str, Any]) -> str:
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>VPD component contexts</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{padding:2px 6px;font-family:monospace;"
             "white-space:pre-wrap}mark{background:#fc6}h3{margin-bottom:2px}</style>",
             f"<h1>Top contexts by causal importance</h1><p>run {e(res['run'])}, text {e(res['text'])}, "
             f"{res['tokens']} tokens</p>"]
    for key, comp in sorted(res["components"].items(), key=lambda kv: -kv[1]["firing_frac"]):
        parts.append(f"<h3>{e(key)}</h3><p>mean CI {comp['mean_ci']:.4f}, fires on {100 * comp['firing_frac']:.2f}% of tokens</p><table>")
        for ex in comp["examples"]:
            parts.append(f"<tr><td>{ex['ci']:.3f}</td><td>{e(ex['left'])}<mark>{e(ex['token'])}</mark>{e(ex['right'])}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def contexts_summary_md(res: dict[str, Any], cfg: ContextsConfig, lo: float = 0.001, hi: float = 0.02,
                        rows: int = 15, shown: int = 5) -> str:
    """The sparse components (firing on lo–hi of tokens), ranked by how many of their top contexts share one token."""
    from collections import Counter

    scored = []
    for key, comp in res["components"].items():
        if not lo <= comp["firing_frac"] <= hi or not comp["examples"]:
            continue
        tok, n = Counter(ex["token"] for ex in comp["examples"]).most_common(1)[0]
        scored.append((n / len(comp["examples"]), comp["firing_frac"], key, tok))
    scored.sort(key=lambda t: (-t[0], -t[1]))
    lines = ["# Demo LM decomposition: sparse components and their top contexts", "",
             f"From `innards vpd contexts --run {res['run']} --text {res['text']} --max-tokens {cfg.max_tokens}` "
             f"({res['tokens']} tokens; the full page is `contexts.md`). Components that fire (CI > {res['threshold']}) "
             f"on {100 * lo:g}–{100 * hi:g}% of tokens, ranked by how many of their top contexts share one highlighted token.",
             "", "| component | fires on | top-context tokens (most common) | share |", "|---|---|---|---|"]
    for share, frac, key, tok in scored[:rows]:
        lines.append(f"| `{key}` | {100 * frac:.2f}% | `{tok!r}` | {share:.2f} |")
    n80 = sum(1 for sc in scored if sc[0] >= 0.8)
    lines += ["", f"{len(scored)} sparse components; {n80} have >= 80% of their top contexts on one token", ""]
    for share, frac, key, tok in scored[:shown]:
        lines.append(f"{key}:")
        for ex in res["components"][key]["examples"][:3]:
            lines.append(f"  {ex['ci']:.2f}: ...{ex['left']}[[{ex['token']}]]{ex['right']}...")
        lines.append("")
    return "\n".join(lines)


def _contexts_md(res: dict[str, Any]) -> str:
    lines = ["# Top contexts by causal importance", "", f"run `{res['run']}`, text `{res['text']}`, {res['tokens']} tokens", ""]
    for key, comp in sorted(res["components"].items(), key=lambda kv: -kv[1]["firing_frac"]):
        lines += [f"## {key}", "", f"mean CI {comp['mean_ci']:.4f}, fires on {100 * comp['firing_frac']:.2f}% of tokens", ""]
        for ex in comp["examples"]:
            txt = (ex["left"] + "**[" + ex["token"] + "]**" + ex["right"]).replace("\n", "⏎")
            lines.append(f"- {ex['ci']:.3f}: {txt}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- ablate
@dataclass
class AblateConfig:
    """innards vpd ablate: how removing one subcomponent changes the next-token distribution."""

    run: str = ""
    """run folder of innards vpd train (a language-model run)"""
    component: str = ""
    """NAME:IDX (NAME: a unique suffix of the matrix path)"""
    prompt: str = ""
    """text; the next token after it is examined"""
    top: int = 10
    """tokens listed"""
    out: str | None = None
    """also write the result as JSON here"""
    model: str | None = None
    """load the target from here instead (must be the same model)"""
    device: str | None = None
    """torch device (None: the run's)"""

    def __post_init__(self) -> None:
        at_least(self, 1, "top")


def ablate(cfg: AblateConfig) -> dict[str, Any]:
    """Target vs target minus one rank-one subcomponent (at every position), next token after the prompt."""
    if not cfg.run or not cfg.component or not cfg.prompt:
        raise InnardsError("--run DIR, --component NAME:IDX and --prompt TEXT are required")
    b = _load_lm_run(cfg.run, cfg.model, cfg.device)
    name, idx = parse_component(b, cfg.component)
    ids = encode_prompt(b, cfg.prompt)
    clean, g = _ci(b, ids)
    comp = b.decomp.comp(name)
    m = torch.ones(*ids.shape, comp.C, device=ids.device)
    m[..., idx] = 0
    # mask 1 with the Δ-component on reproduces the target exactly, so the difference is this subcomponent alone
    with torch.no_grad():
        out = b.decomp.masked(ids, {name: Mask(m, torch.ones(ids.shape, device=ids.device))})
    tok = b.target.tokenizer
    p0 = clean[0, -1].float().softmax(-1)
    p1 = out[0, -1].float().softmax(-1)
    kl = float((p0 * (p0.clamp_min(1e-30).log() - p1.clamp_min(1e-30).log())).sum())

    def top(p: torch.Tensor) -> list[dict[str, Any]]:
        v, i = p.topk(cfg.top)
        return [{"token": tok.decode([int(t)]), "id": int(t), "p": round(float(x), 5)} for x, t in zip(v, i)]

    diff = p1 - p0
    up, down = diff.topk(cfg.top), (-diff).topk(cfg.top)
    res = {"component": f"{name}:{idx}", "prompt": cfg.prompt, "tokens": [tok.decode([int(t)]) for t in ids[0]],
           "ci_per_position": [round(float(x), 4) for x in g[name][0, :, idx]],
           "kl_target_to_ablated": kl, "top_target": top(p0), "top_ablated": top(p1),
           "most_increased": [{"token": tok.decode([int(t)]), "dp": round(float(v), 5)} for v, t in zip(up.values, up.indices)],
           "most_decreased": [{"token": tok.decode([int(t)]), "dp": round(-float(v), 5)} for v, t in zip(down.values, down.indices)]}
    print(f"component {name}:{idx}; CI on the prompt: " + " ".join(f"{t!r}:{c:.2f}" for t, c in zip(res["tokens"], res["ci_per_position"])))
    print(f"KL(target || ablated) at the next token: {kl:.5f}")
    print(f"{'target':<28}{'ablated':<28}")
    for a, c in zip(res["top_target"], res["top_ablated"]):
        print(f"{a['token']!r:<18}{a['p']:<10.4f}{c['token']!r:<18}{c['p']:<10.4f}")
    if cfg.out:
        write_json(cfg.out, res)
    return res


# ---------------------------------------------------------------- graph
@dataclass
class GraphConfig:
    """innards vpd graph: attribution graph among the components active on a prompt."""

    run: str = ""
    """run folder of innards vpd train (a language-model run)"""
    prompt: str = ""
    """text whose components are graphed"""
    out: str | None = None
    """output folder (None: RUN/graph)"""
    threshold: float = 0.1
    """nodes: subcomponents with causal importance above this"""
    max_nodes: int = 150
    """keep the nodes with the highest causal importance"""
    max_edges: int = 300
    """keep (draw and save) the strongest edges by |attribution|"""
    model: str | None = None
    """load the target from here instead (must be the same model)"""
    device: str | None = None
    """torch device (None: the run's)"""

    def __post_init__(self) -> None:
        at_least(self, 1, "max_nodes", "max_edges")
        within(self, "threshold", 0.0, 1.0)


def graph(cfg: GraphConfig) -> dict[str, Any]:
    """Direct-effect attributions attr(c'→c) = (∂a_c/∂a_c')*·a_c'·g_c' among active subcomponents.

    a_c = ‖U_c‖·(x·V_c); * means every other subcomponent activation is detached, so only the direct path
    through the frozen non-linear parts (attention, norms, MLP activation, residual) counts. Pseudo-nodes:
    `wte` (the embeddings at each position) and `output` (the logit of the top next token).
    """
    if not cfg.run or not cfg.prompt:
        raise InnardsError("--run DIR and --prompt TEXT are required")
    b = _load_lm_run(cfg.run, cfg.model, cfg.device)
    ids = encode_prompt(b, cfg.prompt)
    _, g = _ci(b, ids)
    names = b.decomp.names
    unorm = {c.name: c.U.detach().norm(dim=1) for c in b.decomp.components}
    pre: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}

    def act_fn(name: str, h: torch.Tensor) -> torch.Tensor:
        a = h * unorm[name]
        pre[name] = a
        leaf = a.detach().requires_grad_(True)
        leaves[name] = leaf
        return leaf / unorm[name].clamp_min(1e-30)

    emb = b.target.get_input_embeddings()(ids).detach().requires_grad_(True)
    masks = {n: Mask(torch.ones_like(g[n]), torch.ones(ids.shape, device=ids.device)) for n in names}
    logits = b.decomp.masked(None, masks, act_fn=act_fn, explicit_delta=True, inputs_embeds=emb)
    last = logits[0, -1]
    out_tok = int(last.argmax())
    # nodes: (matrix, position, component) with CI above threshold; keep the max_nodes largest g·|a|
    # (CI alone saturates at 1 for many subcomponents, which would make the choice arbitrary)
    scored = []
    for n in names:
        pos, comp = (g[n][0] > cfg.threshold).nonzero(as_tuple=True)
        score = (g[n][0] * pre[n][0].detach().abs())[pos, comp]
        for t, c, sc in zip(pos.tolist(), comp.tolist(), score.tolist()):
            scored.append((sc, float(g[n][0, t, c]), n, t, c))
    scored.sort(reverse=True)
    cand = [(v, n, t, c) for _, v, n, t, c in scored[: cfg.max_nodes]]
    order = {n: i for i, n in enumerate(names)}
    active = {(n, t, c) for _, n, t, c in cand}
    tok = b.target.tokenizer
    tokens = [tok.decode([int(x)]) for x in ids[0]]
    nodes = [{"id": f"{n}:{t}:{c}", "matrix": n, "pos": t, "component": c, "ci": round(v, 4),
              "act": round(float(pre[n][0, t, c].detach()), 5), "token": tokens[t]} for v, n, t, c in cand]
    nodes += [{"id": f"wte:{t}", "matrix": "wte", "pos": t, "token": tokens[t]} for t in range(len(tokens))]
    nodes.append({"id": f"output:{out_tok}", "matrix": "output", "pos": len(tokens) - 1, "token": tok.decode([out_tok])})
    edges = []
    src_names = [n for n in names if n in leaves]
    targets = [(pre[n][0, t, c], f"{n}:{t}:{c}") for _, n, t, c in sorted(cand, key=lambda x: (order[x[1]], x[2]))]
    targets.append((last[out_tok], f"output:{out_tok}"))
    for value, tid in tqdm(targets, desc="vpd graph", leave=False):
        inputs = [leaves[n] for n in src_names] + [emb]
        grads = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
        for n, gr in zip(src_names, grads[:-1]):
            if gr is None:
                continue
            attr = gr[0] * leaves[n][0].detach() * g[n][0]
            for t, c in (attr.abs() > 0).nonzero().tolist():
                if (n, t, c) in active:
                    edges.append({"source": f"{n}:{t}:{c}", "target": tid, "attr": float(attr[t, c])})
        ge = grads[-1]
        if ge is not None:
            a_emb = (ge[0] * emb[0].detach()).sum(-1)
            for t in (a_emb.abs() > 0).nonzero().flatten().tolist():
                edges.append({"source": f"wte:{t}", "target": tid, "attr": float(a_emb[t])})
    edges.sort(key=lambda e: -abs(e["attr"]))
    edges = edges[: cfg.max_edges]
    res = {"prompt": cfg.prompt, "tokens": tokens, "output_token": tok.decode([out_tok]), "threshold": cfg.threshold,
           "nodes": nodes, "edges": edges}
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "graph"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "graph.json", res)
    forward_order = [n for n, _ in b.target.named_modules() if n in set(names)]
    _graph_png(res, forward_order, out / "graph.png")
    print(f"{len(cand)} active components, {len(edges)} edges; next token {res['output_token']!r}; wrote {out}/graph.json and graph.png")
    return res


def _graph_png(res: dict[str, Any], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"wte": 0, **{n: i + 1 for i, n in enumerate(names)}, "output": len(names) + 1}
    T = len(res["tokens"])
    pos: dict[str, tuple[float, float]] = {}
    per_cell: dict[tuple[int, int], int] = {}
    for nd in res["nodes"]:
        r = rows[nd["matrix"]]
        k = per_cell.get((r, nd["pos"]), 0)
        per_cell[(r, nd["pos"])] = k + 1
        pos[nd["id"]] = (nd["pos"] + 0.12 * (k % 6) - 0.3, r + 0.1 * (k // 6))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * T), max(6, 0.28 * len(rows))))
    mx = max((abs(e["attr"]) for e in res["edges"]), default=1.0) or 1.0
    for e in res["edges"]:
        if e["source"] in pos and e["target"] in pos:
            (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
            ax.plot([x0, x1], [y0, y1], color="tab:blue" if e["attr"] > 0 else "tab:red",
                    alpha=min(1.0, 0.1 + abs(e["attr"]) / mx), lw=0.4 + 2 * abs(e["attr"]) / mx)
    for nd in res["nodes"]:
        x, y = pos[nd["id"]]
        ax.scatter([x], [y], s=12 + 30 * nd.get("ci", 0.5), color="k", zorder=3)
        if isinstance(nd.get("component"), int):  # the subcomponent's index in its matrix (the row names the matrix)
            ax.annotate(str(nd["component"]), (x, y), textcoords="offset points", xytext=(2, 2), fontsize=5, zorder=4)
    ax.set_yticks(list(rows.values()))
    ax.set_yticklabels([n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for n in rows], fontsize=6)
    ax.set_xticks(range(T))
    ax.set_xticklabels([repr(t)[1:-1] for t in res["tokens"]], rotation=60, fontsize=7)
    ax.set_title(f"attribution graph -> {res['output_token']!r} (blue +, red -; numbers: subcomponent index)")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
