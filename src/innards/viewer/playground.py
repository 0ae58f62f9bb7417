"""The steering playground: raw and GLP-projected continuations of a typed prompt, generated live.

One generation at a time (a second request while one runs is refused, not queued), bounded prompt and
continuation lengths, and every number checked before the model sees it: the server stays responsive and
a bad request gets one clear line back.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

from innards.errors import InnardsError
from innards.glp.model import GLP
from innards.glp.projection import ProjectionConfig
from innards.models.load import load_model
from innards.steer.config import POSITIONS, GenerationConfig, SteerInputs
from innards.steer.generate import Steering, generate_steered, setup_steering
from innards.viewer.discover import RunInfo

MAX_PROMPT_CHARS = 400
MAX_PROMPT_TOKENS = 64
MAX_NEW_TOKENS = 48
MAX_STRENGTH = 50.0


class Busy(Exception):
    """Another generation is running."""


def _number(req: dict, key: str, default: float, lo: float, hi: float, integer: bool = False) -> float:
    v = req.get(key, default)
    if v is None or v == "":
        v = default
    if isinstance(v, bool):
        raise InnardsError(f"{key} must be a number")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise InnardsError(f"{key} must be a number, got {str(v)[:40]!r}") from None
    if not math.isfinite(x):
        raise InnardsError(f"{key} must be a finite number")
    if integer and not x.is_integer():
        raise InnardsError(f"{key} must be a whole number, got {x:g}")
    if not lo <= x <= hi:
        raise InnardsError(f"{key} must be between {lo:g} and {hi:g}, got {x:g}")
    return int(x) if integer else x


class Playground:
    """Live steered generation with one model, over the GLPs and steering vectors that were discovered."""

    def __init__(self, model: str, runs: list[RunInfo]):
        self.model_name = model
        self.glps = {r.id: r for r in runs if r.kind == "glp" and r.status != "damaged"}
        self.vectors = {r.id: r for r in runs if r.kind == "vector" and r.status != "damaged"}
        self._model: Any = None
        self._glp_cache: dict[str, GLP] = {}
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self.error: str | None = None
        # the GLP + vector of a sweep are a pair known to fit: offer them first
        self.default: dict[str, str | None] = {"glp": next(iter(self.glps), None), "vector": next(iter(self.vectors), None)}
        for r in runs:
            if r.kind == "sweep":
                g = next((u for u in r.uses if u in self.glps), None)
                v = next((u for u in r.uses if u in self.vectors), None)
                if g and v:
                    self.default = {"glp": g, "vector": v}
                    break

    @property
    def available(self) -> bool:
        return bool(self.glps) and bool(self.vectors)

    def info(self) -> dict[str, Any]:
        """What the playground form offers."""
        why = None
        if not self.glps:
            why = "no GLP found under the folders given"
        elif not self.vectors:
            why = "no steering vector (.safetensors from innards steer vector) found under the folders given"
        return {"available": self.available and self.error is None, "reason": why or self.error, "model": self.model_name,
                "glps": [{"id": r.id, "rel": r.rel, "site": r.headline.get("site")} for r in self.glps.values()],
                "vectors": [{"id": r.id, "rel": r.rel, "site": r.headline.get("site")} for r in self.vectors.values()],
                "default": self.default, "positions": list(POSITIONS),
                "limits": {"prompt_chars": MAX_PROMPT_CHARS, "prompt_tokens": MAX_PROMPT_TOKENS,
                           "max_new_tokens": MAX_NEW_TOKENS, "strength": MAX_STRENGTH}}

    def warm(self) -> None:
        """Load the model now (called in the background when the server starts)."""
        try:
            self.model()
        except InnardsError as e:
            self.error = f"model {self.model_name} does not load: {e}"

    def model(self) -> Any:
        with self._load_lock:
            if self._model is None:
                self._model = load_model(self.model_name)
            return self._model

    def _glp(self, rid: str) -> GLP:
        with self._load_lock:
            if rid not in self._glp_cache:
                self._glp_cache[rid] = GLP.from_pretrained(self.glps[rid].path).eval()
            return self._glp_cache[rid]

    def check(self, req: dict[str, Any]) -> dict[str, Any]:
        """Validated settings of a request; InnardsError (one line) on anything out of bounds."""
        if not isinstance(req, dict):
            raise InnardsError("the request must be a JSON object")
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InnardsError("type a prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InnardsError(f"prompt too long: {len(prompt)} characters (at most {MAX_PROMPT_CHARS})")
        glp, vec = req.get("glp") or self.default["glp"], req.get("vector") or self.default["vector"]
        if glp not in self.glps:
            raise InnardsError("pick a GLP from the list")
        if vec not in self.vectors:
            raise InnardsError("pick a steering vector from the list")
        positions = req.get("positions", "generated")
        if positions not in POSITIONS:
            raise InnardsError(f"positions must be one of {', '.join(POSITIONS)}")
        return {"prompt": prompt, "glp": glp, "vector": vec, "positions": positions,
                "strength": _number(req, "strength", 1.0, -MAX_STRENGTH, MAX_STRENGTH),
                "t_start": _number(req, "t_start", 0.5, 0.0, 1.0),
                "max_new_tokens": _number(req, "max_new_tokens", 24, 1, MAX_NEW_TOKENS, integer=True),
                "steps": _number(req, "steps", 20, 2, 100, integer=True),
                "seed": _number(req, "seed", 0, 0, 2**31 - 1, integer=True)}

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        """Unsteered, raw-steered and GLP-projected continuations of one prompt; Busy while another runs."""
        s = self.check(req)
        if not self._run_lock.acquire(blocking=False):
            raise Busy("busy: one generation at a time, try again when the current one has finished")
        try:
            model = self.model()
            n_tok = len(model.tokenizer(s["prompt"], add_special_tokens=False)["input_ids"])
            if n_tok > MAX_PROMPT_TOKENS:
                raise InnardsError(f"prompt too long: {n_tok} tokens (at most {MAX_PROMPT_TOKENS})")
            glp = self._glp(s["glp"])
            site = glp.meta.get("site") or (glp.meta.get("sites") or [None])[0]
            inputs = SteerInputs(model=self.model_name, site=site, vector=str(Path(self.vectors[s["vector"]].path)),
                                 positions=s["positions"])
            st = setup_steering(model, inputs, glp)  # ||a|| from the GLP's statistics
            alpha = s["strength"] * st.norm
            gen = GenerationConfig(max_new_tokens=s["max_new_tokens"], temperature=0.0, seed=s["seed"], batch_size=1)
            raw = Steering(st.site, st.vector.vector, alpha, s["positions"], None, seed=s["seed"])
            proj = Steering(st.site, st.vector.vector, alpha, s["positions"], st.glp,
                            ProjectionConfig(t_start=s["t_start"], steps=s["steps"]), seed=s["seed"])
            out = {k: generate_steered(model, [s["prompt"]], steering, gen, progress=False)[0]["continuation"]
                   for k, steering in (("unsteered", None), ("raw", raw), ("glp", proj))}
            return {**out, "site": st.site, "alpha": alpha, "norm": st.norm, "norm_source": st.norm_source,
                    "settings": s}
        finally:
            self._run_lock.release()
