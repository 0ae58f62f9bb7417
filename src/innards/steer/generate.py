"""Steered generation: add r*||a||*v at a site (optionally through a GLP), batched and KV-cached.

Positions (with a KV cache the first forward call covers the prompt, later calls one new token):

* ``generated`` - every generated token's position (calls after the first); the first new token is
  produced unsteered (persona_vectors' "response" mode);
* ``prompt``    - the prompt's text tokens only (first call; BOS/special tokens and padding excluded);
* ``all``       - both of the above;
* ``last``      - the last position of every call: the last prompt token, then every generated token
  (the GLP reference code's behaviour).

With a GLP, every edited activation of a forward call is projected in one batch (the GLP is a
single-token model: rows are independent) from ``t_start`` before the forward pass continues
(SDEdit), or moved by prior-guided steps (:mod:`innards.steer.prior`). The hook never waits on the
device: which rows to edit is known on the host before the call, and the offset is moved to the
device once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from tqdm import tqdm

from innards.config import require
from innards.data.store import ActivationStore
from innards.errors import InnardsError
from innards.glp.model import GLP
from innards.glp.projection import ProjectionConfig
from innards.models.hooks import edit
from innards.models.load import load_model
from innards.models.sites import resolve_site
from innards.run import Run
from innards.steer.config import (POSITIONS, STEER_ALIASES, GenerationConfig, Positions, PriorConfig, SteerInputs,
                                  glp_provenance)
from innards.steer.prior import prior_guided
from innards.steer.project import FastGLP
from innards.steer.texts import prompts_path, read_prompts
from innards.steer.tokens import encode, pad_id
from innards.steer.vectors import SteeringVector, check_compatible, load_vector

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GLPUse = Literal["project", "prior"]


@dataclass
class Steering:
    """What to add where: unit vector, absolute scale alpha = r*||a||, positions, and what a GLP does to it."""

    site: str
    vector: torch.Tensor
    alpha: float
    positions: Positions = "generated"
    glp: GLP | None = None
    project: ProjectionConfig = field(default_factory=ProjectionConfig)
    prior: PriorConfig | None = None
    """with a GLP: prior-guided steps instead of the SDEdit projection"""
    seed: int = 0
    compile: bool = False
    """torch.compile the GLP's denoiser step"""
    _fast: FastGLP | None = field(default=None, init=False, repr=False, compare=False)

    def fast_glp(self) -> FastGLP:
        """The GLP's steering path (cached conditioning, compiled step), shared by every hook of this steering."""
        if self._fast is None:
            self._fast = FastGLP(self.glp, self.site, self.compile)
        return self._fast

    @property
    def method(self) -> str:
        """raw, glp (SDEdit projection) or prior (prior-guided)."""
        return "raw" if self.glp is None else ("prior" if self.prior is not None else "glp")


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
        self._offset: torch.Tensor | None = None

    def start_batch(self, text_mask: torch.Tensor | None, batch_index: int = 0) -> None:
        """Reset before each generate() call; ``text_mask`` (B, T) marks the prompt's real text tokens."""
        self.calls = 0
        self.batch_index = batch_index
        self.prompt_text_mask = None if text_mask is None else text_mask.bool().cpu()

    def _rows(self, b: int, t: int, first: bool) -> torch.Tensor | slice | None:
        """The positions to edit: None (none), a slice of positions for every row, or a host (B, T) mask."""
        mode = self.s.positions
        if first:
            if mode == "generated":
                return None
            if mode == "last":
                return slice(t - 1, t)
            m = self.prompt_text_mask
            if m is None or tuple(m.shape) != (b, t):
                return slice(0, t)  # a plain forward outside generate(): every position
            return m
        return None if mode == "prompt" else slice(0, t)

    def offset(self, like: torch.Tensor) -> torch.Tensor:
        """alpha * v on the activations' device and dtype (moved there once)."""
        if self._offset is None or self._offset.device != like.device or self._offset.dtype != like.dtype:
            self._offset = (self.s.alpha * self.s.vector).to(device=like.device, dtype=like.dtype)
        return self._offset

    def edit_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Steer activations (n, d): add the offset, then project or guide with the GLP if there is one."""
        s = self.s
        if s.glp is None:
            return rows + self.offset(rows)
        if s.prior is not None:
            return prior_guided(s.glp, rows, self.offset(rows).float(), s.prior, site=s.site,
                                velocity=s.fast_glp().velocity).to(rows.dtype)
        # independent, reproducible noise for every (batch, call): same seed -> same generations
        seed = s.seed * 1_000_003 + self.batch_index * 10_007 + self.calls
        return s.fast_glp().project((rows + self.offset(rows)).float(), s.project, seed=seed).to(rows.dtype)

    def __call__(self, act: torch.Tensor) -> torch.Tensor | None:
        first = self.calls == 0
        self.calls += 1
        b, t, d = act.shape
        sel = self._rows(b, t, first)
        if sel is None:
            return None
        if isinstance(sel, slice):
            part = act[:, sel]
            self.n_edited += b * part.shape[1]
            edited = self.edit_rows(part.reshape(-1, d)).reshape(part.shape)
            if part.shape[1] == t:
                return edited
            out = act.clone()
            out[:, sel] = edited
            return out
        if not bool(sel.any()):  # a host mask: no device round trip
            return None
        idx = sel.nonzero(as_tuple=True)
        self.n_edited += int(idx[0].numel())
        ib, it = (i.to(act.device) for i in idx)
        out = act.clone()
        out[ib, it] = self.edit_rows(act[ib, it])
        return out


@contextmanager
def apply_steering(model: PreTrainedModel, steering: Steering) -> Iterator[SteeringHook]:
    """Context manager: every forward pass inside is steered (the first call counts as the prompt)."""
    hook = SteeringHook(steering)
    with edit(model, {steering.site: hook}):
        yield hook


def _cut(ids: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for k, tok in enumerate(ids):
        if tok in eos:
            return ids[:k], True
    return ids, False


def eos_ids(model: PreTrainedModel) -> set[int]:
    """Every token id that ends a generation (the generation config's and the tokenizer's EOS)."""
    e = model.generation_config.eos_token_id
    eos = {int(x) for x in ([e] if isinstance(e, int) else (e or []))}
    if model.tokenizer.eos_token_id is not None:
        eos.add(int(model.tokenizer.eos_token_id))
    return eos


def check_can_generate(model: PreTrainedModel) -> None:
    """InnardsError unless the model is a causal LM that can generate."""
    if not (hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()):
        raise InnardsError(f"model {getattr(model, 'innards_source', {}).get('name', '')} cannot generate text "
                           "(an encoder?); steered generation needs a causal LM")


@torch.no_grad()
def generate_steered(model: PreTrainedModel, prompts: list[str], steering: Steering | None = None,
                     gen: GenerationConfig | None = None, progress: bool = True, desc: str = "generate") -> list[dict]:
    """Generate a continuation per prompt (left-padded batches, KV cache), steered when ``steering`` is given.

    Returns one dict per prompt: prompt_index, prompt, prompt_ids, continuation, continuation_ids, stopped.
    Sampling (temperature > 0) is seeded per batch from ``gen.seed``; temperature 0 is greedy.
    """
    gen = gen or GenerationConfig()
    check_can_generate(model)
    tok = model.tokenizer
    device = next(model.parameters()).device
    eos = eos_ids(model)
    hook = SteeringHook(steering) if steering is not None else None
    # max_length=None: a checkpoint's default max_length would only trigger a warning next to max_new_tokens
    kwargs: dict[str, object] = dict(max_new_tokens=gen.max_new_tokens, max_length=None, pad_token_id=pad_id(tok),
                                     use_cache=True, **gen.hf_kwargs())
    if eos:
        kwargs["eos_token_id"] = sorted(eos)
    results: list[dict] = []
    starts = list(range(0, len(prompts), gen.batch_size))
    for bi, start in enumerate(tqdm(starts, desc=desc, disable=not progress)):
        chunk = prompts[start:start + gen.batch_size]
        b = encode(tok, chunk, side="left")
        if b.input_ids.shape[1] == 0:
            raise InnardsError("a prompt tokenises to nothing")
        torch.manual_seed(gen.seed * 1_000_003 + bi)
        ctx = edit(model, {steering.site: hook}) if hook is not None else nullcontext()
        if hook is not None:
            hook.start_batch(b.text_mask, bi)
        with ctx:
            out = model.generate(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), **kwargs)
        new = out[:, b.input_ids.shape[1]:].cpu().tolist()
        for j, text in enumerate(chunk):
            ids, stopped = _cut(new[j], eos)
            p_ids = b.input_ids[j][b.attention_mask[j].bool()].tolist()
            results.append({"prompt_index": start + j, "prompt": text, "prompt_ids": p_ids,
                            "continuation": tok.decode(ids, skip_special_tokens=True), "continuation_ids": ids,
                            "stopped": stopped})
    return results


def resolve_norm(site: str, norm: float | None = None, acts: str | None = None, glp: GLP | None = None,
                 stat: str = "mean_norm", model: PreTrainedModel | None = None) -> tuple[float, str]:
    """||a||, the scale of one unit of strength, and where it came from (--norm, a store, or the GLP's statistics)."""
    if stat not in ("mean_norm", "rms_norm"):
        raise InnardsError(f"norm statistic must be mean_norm or rms_norm, got '{stat}'")
    if norm is not None:
        if not math.isfinite(norm) or norm <= 0:
            raise InnardsError(f"--norm must be a positive number, got {norm}")
        return float(norm), "given"
    if acts:
        store = ActivationStore(acts)
        if model is not None:
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

    model: PreTrainedModel
    site: str
    vector: SteeringVector
    norm: float
    norm_source: str
    glp: GLP | None


def setup_steering(model: PreTrainedModel, cfg: SteerInputs, glp: GLP | None = None,
                   need_norm: bool = True) -> SteerSetup:
    """Resolve the site, load the vector, check it and the GLP against the model/site/width, find ||a||."""
    s = resolve_site(model, cfg.site)
    sv = load_vector(cfg.vector, model=model, site=s.name, width=s.width)
    if glp is not None:
        glp.check_compatible(model, s.name, s.width)
        glp.to(next(model.parameters()).device).eval()
    if need_norm:
        n, src = resolve_norm(s.name, cfg.norm, cfg.acts, glp, cfg.norm_stat, model=model)
    else:
        n, src = (float(cfg.norm), "given") if cfg.norm else (1.0, "unused (strength 0)")
    return SteerSetup(model, s.name, sv, n, src, glp)


@dataclass
class GenerateConfig(SteerInputs):
    """``innards steer generate``: continuations of prompts with a steering vector added at a site."""

    strength: float = 1.0
    """relative strength r: adds r * ||a|| * v (v unit-norm)"""
    glp_use: GLPUse = "project"
    """what the GLP does to each edited activation: project (SDEdit, --project.*) or prior (--prior.*)"""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """prior-guided steering (with --glp-use prior)"""
    out: str = "generations.jsonl"
    """output JSONL file (one generation per line; the run record is written beside it)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(math.isfinite(self.strength), f"--strength must be a finite number, got {self.strength}")
        require(self.glp_use in ("project", "prior"), f"--glp-use must be project or prior, got {self.glp_use!r}")


def steer_generate(cfg: GenerateConfig) -> Path:
    """Load everything named in ``cfg``, generate, and write ``cfg.out`` (JSONL) with its run record."""
    cfg.check_inputs()
    out = Path(cfg.out)
    prompts = read_prompts(cfg.prompts)
    inputs = {"vector": cfg.vector.partition("#")[0] if not cfg.vector.startswith("sae:") else cfg.vector,
              "prompts": str(prompts_path(cfg.prompts)), "glp": cfg.glp.path, "acts": cfg.acts,
              "restats": cfg.glp.restats}
    with Run.open(out, "generation", cfg, inputs=inputs, overwrite=cfg.overwrite, file=True) as run:
        if run.state == "complete":
            run.say_complete()
            return out
        glp = cfg.glp.load()
        model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, revision=cfg.model.revision)
        check_can_generate(model)
        st = setup_steering(model, cfg, glp, need_norm=cfg.strength != 0)
        alpha = cfg.strength * st.norm
        steering = Steering(st.site, st.vector.vector, alpha, cfg.positions, st.glp, cfg.project,
                            cfg.prior if cfg.glp_use == "prior" else None, cfg.generation.seed)
        recs = generate_steered(model, prompts, steering, cfg.generation)
        for r in recs:
            r |= {"method": steering.method, "strength": cfg.strength, "alpha": alpha, "site": st.site,
                  "positions": cfg.positions}
        run.write_jsonl(out.name, recs)
        lengths = [len(r["continuation_ids"]) for r in recs]
        run.complete(headline={"generations": len(recs), "method": steering.method, "strength": cfg.strength,
                               "alpha": round(alpha, 6), "mean_new_tokens": round(sum(lengths) / max(1, len(lengths)), 2),
                               **({"glp": str(glp_provenance(glp, cfg.glp.path))} if glp is not None else {})},
                     outputs=[out.name])
    print(f"wrote {len(recs)} generations to {out} (alpha = {cfg.strength} x {st.norm:.4g} from {st.norm_source})")
    return out

