"""Steered generation: add r*||a||*v at a site (optionally GLP-projected), batched and KV-cached.

Positions (with a KV cache the first forward call covers the prompt, later calls one new token):

* ``generated`` - every generated token's position (calls after the first); the first new token is
  produced unsteered (persona_vectors' "response" mode);
* ``prompt``    - the prompt's text tokens only (first call; BOS/special tokens and padding excluded);
* ``all``       - both of the above;
* ``last``      - the last position of every call: the last prompt token, then every generated token
  (the GLP reference code's behaviour).

With a GLP, every edited activation is projected on its own (the GLP is a single-token model) from
``t_start`` before the forward pass continues.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from innards.errors import InnardsError

POSITIONS = ("generated", "prompt", "all", "last")
Positions = Literal["generated", "prompt", "all", "last"]


@dataclass
class Steering:
    """What to add where: unit vector, absolute scale alpha = r*||a||, positions, optional GLP projection."""

    site: str
    vector: torch.Tensor
    alpha: float
    positions: Positions = "generated"
    glp: Any | None = None
    t_start: float = 0.5
    steps: int = 20
    schedule: Literal["exact", "grid"] = "exact"
    seed: int = 0


class SteeringHook:
    """Stateful edit function for one site: knows whether it sees the prompt or a new token."""

    def __init__(self, steering: Steering):
        if steering.positions not in POSITIONS:
            raise InnardsError(f"positions must be one of {', '.join(POSITIONS)}, got '{steering.positions}'")
        self.s = steering
        self.calls = 0
        self.batch_index = 0
        self.prompt_text_mask: torch.Tensor | None = None
        self.n_edited = 0

    def start_batch(self, text_mask: torch.Tensor | None, batch_index: int = 0) -> None:
        """Reset before each generate() call; ``text_mask`` (B, T) marks the prompt's real text tokens."""
        self.calls = 0
        self.batch_index = batch_index
        self.prompt_text_mask = text_mask

    def _selection(self, act: torch.Tensor, first: bool) -> torch.Tensor | None:
        b, t, _ = act.shape
        mode = self.s.positions
        if first:
            if mode == "generated":
                return None
            if mode == "last":
                sel = torch.zeros(b, t, dtype=torch.bool)
                sel[:, -1] = True
                return sel
            m = self.prompt_text_mask
            if m is None or tuple(m.shape) != (b, t):
                m = torch.ones(b, t, dtype=torch.bool)  # a plain forward outside generate(): every position
            return m.bool()
        if mode == "prompt":
            return None
        return torch.ones(b, t, dtype=torch.bool)

    def __call__(self, act: torch.Tensor) -> torch.Tensor | None:
        first = self.calls == 0
        self.calls += 1
        sel = self._selection(act, first)
        if sel is None or not bool(sel.any()):
            return None
        sel = sel.to(act.device)
        rows = act[sel]
        edited = rows + (self.s.alpha * self.s.vector).to(device=act.device, dtype=act.dtype)
        if self.s.glp is not None:
            # independent, reproducible noise for every (batch, call): same seed -> same generations
            seed = self.s.seed * 1_000_003 + self.batch_index * 10_007 + self.calls
            with torch.no_grad():
                proj = self.s.glp.project(edited.float(), t_start=self.s.t_start, steps=self.s.steps,
                                          schedule=self.s.schedule, seed=seed, site=self.s.site)
            edited = proj.to(device=act.device, dtype=act.dtype)
        self.n_edited += int(rows.shape[0])
        out = act.clone()
        out[sel] = edited
        return out


@contextmanager
def apply_steering(model: Any, steering: Steering) -> Iterator[SteeringHook]:
    """Context manager: every forward pass inside is steered (the first call counts as the prompt)."""
    from innards.models.hooks import edit

    hook = SteeringHook(steering)
    with edit(model, {steering.site: hook}):
        yield hook


def _cut(ids: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for k, tok in enumerate(ids):
        if tok in eos:
            return ids[:k], True
    return ids, False


@torch.no_grad()
def generate_steered(model: Any, prompts: list[str], steering: Steering | None = None, max_new_tokens: int = 30,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                     progress: bool = True, desc: str = "generate") -> list[dict]:
    """Generate a continuation per prompt (left-padded batches, KV cache), steered when ``steering`` is given.

    Returns one dict per prompt: prompt_index, prompt, prompt_ids, continuation, continuation_ids, stopped.
    Sampling (temperature > 0) is seeded per batch from ``seed``; temperature 0 is greedy.
    """
    from innards.models.hooks import edit
    from innards.steer.tokens import encode, pad_id

    if max_new_tokens < 1:
        raise InnardsError("max-new-tokens must be at least 1")
    if temperature < 0:
        raise InnardsError("temperature must be >= 0 (0 is greedy)")
    if batch_size < 1:
        raise InnardsError("batch size must be at least 1")
    if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise InnardsError(f"model {getattr(model, 'innards_source', {}).get('name', '')} cannot generate text "
                           "(an encoder?); steered generation needs a causal LM")
    tok = model.tokenizer
    device = next(model.parameters()).device
    pid = pad_id(tok)
    eos = {int(e) for e in ([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int)
                            else (model.generation_config.eos_token_id or []))}
    if tok.eos_token_id is not None:
        eos.add(int(tok.eos_token_id))
    hook = SteeringHook(steering) if steering is not None else None
    # max_length=None: a checkpoint's default max_length would only trigger a warning next to max_new_tokens
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, max_length=None, pad_token_id=pid, use_cache=True)
    if eos:
        gen_kwargs["eos_token_id"] = sorted(eos)
    if temperature > 0:
        gen_kwargs |= dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs |= dict(do_sample=False)
    results: list[dict] = []
    batches = list(range(0, len(prompts), batch_size))
    for bi, start in enumerate(tqdm(batches, desc=desc, disable=not progress)):
        chunk = prompts[start:start + batch_size]
        b = encode(tok, chunk, side="left")
        if b.input_ids.shape[1] == 0:
            raise InnardsError("a prompt tokenises to nothing")
        torch.manual_seed(seed * 1_000_003 + bi)
        ctx = edit(model, {steering.site: hook}) if hook is not None else nullcontext()
        if hook is not None:
            hook.start_batch(b.text_mask, bi)
        with ctx:
            out = model.generate(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                                 **gen_kwargs)
        new = out[:, b.input_ids.shape[1]:].cpu().tolist()
        for j, text in enumerate(chunk):
            ids, stopped = _cut(new[j], eos)
            p_ids = b.input_ids[j][b.attention_mask[j].bool()].tolist()
            results.append({"prompt_index": start + j, "prompt": text, "prompt_ids": p_ids,
                            "continuation": tok.decode(ids, skip_special_tokens=True), "continuation_ids": ids,
                            "stopped": stopped})
    return results


def resolve_norm(site: str, norm: float | None = None, acts: str | None = None, glp: Any | None = None,
                 stat: str = "mean_norm", model: Any | None = None) -> tuple[float, str]:
    """||a||, the scale of one unit of strength, and where it came from (--norm, a store, or the GLP's statistics)."""
    import math

    if stat not in ("mean_norm", "rms_norm"):
        raise InnardsError(f"norm statistic must be mean_norm or rms_norm, got '{stat}'")
    if norm is not None:
        if not math.isfinite(norm) or norm <= 0:
            raise InnardsError(f"--norm must be a positive number, got {norm}")
        return float(norm), "given"
    if acts:
        from innards.data.store import ActivationStore

        store = ActivationStore(acts)
        if model is not None:
            from innards.steer.vectors import check_compatible

            src = store.manifest.get("model") or {}
            src = src if isinstance(src, dict) else {"name": str(src)}
            check_compatible({"model": src.get("name"), "model_sha256": src.get("sha256"),
                              "model_revision": src.get("revision")}, model, None, None, what=f"activation store {acts}")
        st = store.stats(site)
        return float(st[stat]), f"store {acts} ({stat})"
    if glp is not None:
        st = (glp.meta.get("stats_by_site") or {}).get(site) or glp.meta.get("stats") or {}
        if st.get(stat) is not None:
            return float(st[stat]), f"GLP statistics ({stat})"
    raise InnardsError("the activation norm ||a|| is unknown: give --norm X or --acts STORE")


@dataclass
class SteerSetup:
    """A loaded model with its resolved site, unit vector, norm and optional GLP, all checked compatible."""

    model: Any
    site: str
    vector: Any
    norm: float
    norm_source: str
    glp: Any | None


def setup_steering(model: Any, site: str, vector: str, glp: str | Any | None = None, norm: float | None = None,
                   acts: str | None = None, norm_stat: str = "mean_norm", need_norm: bool = True) -> SteerSetup:
    """Resolve the site, load the vector and GLP, check both against the model/site/width, find ||a||."""
    from innards.models.sites import resolve_site
    from innards.steer.vectors import load_vector

    if not site:
        raise InnardsError("--site is required")
    if not vector:
        raise InnardsError("--vector is required")
    s = resolve_site(model, site)
    sv = load_vector(vector, model=model, site=s.name, width=s.width)
    g = None
    if glp is not None and glp != "":
        from innards.glp.model import GLP

        g = GLP.from_pretrained(glp) if isinstance(glp, (str, Path)) else glp
        g.check_compatible(model, s.name, s.width)
        g.to(next(model.parameters()).device).eval()
    if need_norm:
        n, src = resolve_norm(s.name, norm, acts, g, norm_stat, model=model)
    else:
        n, src = (float(norm), "given") if norm else (1.0, "unused (strength 0)")
    return SteerSetup(model, s.name, sv, n, src, g)


@dataclass
class GenerateConfig:
    """``innards steer generate``: continuations of prompts with a steering vector added at a site."""

    model: str = "demo"
    site: str = ""
    vector: str = ""
    """steering vector: .safetensors / .pt / .npy file (FILE#ROW for a row) or sae:DIR:IDX"""
    strength: float = 1.0
    """relative strength r: adds r * ||a|| * v (v unit-norm)"""
    norm: float | None = None
    """||a||, the mean activation norm at the site (else from --acts or the GLP's statistics)"""
    acts: str | None = None
    """activation store whose statistics give ||a||"""
    norm_stat: Literal["mean_norm", "rms_norm"] = "mean_norm"
    glp: str | None = None
    """GLP folder: project every edited activation onto the learned manifold"""
    t_start: float = 0.5
    """GLP projection start time (0 = identity, 1 = resample)"""
    steps: int = 20
    schedule: Literal["exact", "grid"] = "exact"
    """exact: paper (steps-1 evaluations); grid: reference code (20-point grid)"""
    positions: Positions = "generated"
    """generated | prompt | all | last (see innards.steer.generate)"""
    prompts: str = "stories"
    """file of prompts, one per line ('stories' = the packaged story openings)"""
    max_new_tokens: int = 30
    temperature: float = 0.0
    """0 = greedy"""
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    dtype: str = "fp32"
    device: str | None = None
    out: str = "generations.jsonl"


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Atomically write records as JSON lines."""
    import json

    from innards.io import atomic_write_bytes

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def steer_generate(cfg: GenerateConfig) -> Path:
    """Load everything named in ``cfg``, generate, and write ``cfg.out`` (JSONL) plus the resolved config."""
    from innards.config import save_config
    from innards.models.load import load_model
    from innards.steer.texts import read_prompts

    prompts = read_prompts(cfg.prompts)
    out = Path(cfg.out)
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    st = setup_steering(model, cfg.site, cfg.vector, cfg.glp, cfg.norm, cfg.acts, cfg.norm_stat,
                        need_norm=cfg.strength != 0)
    alpha = cfg.strength * st.norm
    steering = Steering(st.site, st.vector.vector, alpha, cfg.positions, st.glp, cfg.t_start, cfg.steps,
                        cfg.schedule, cfg.seed)
    recs = generate_steered(model, prompts, steering, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                            cfg.batch_size)
    method = "glp" if st.glp is not None else "raw"
    for r in recs:
        r |= {"method": method, "strength": cfg.strength, "alpha": alpha, "site": st.site, "positions": cfg.positions}
    write_jsonl(out, recs)
    save_config(cfg, out.parent, name=out.stem + ".config.yaml")
    print(f"wrote {len(recs)} generations to {out} (alpha = {cfg.strength} x {st.norm:.4g} from {st.norm_source})")
    return out
