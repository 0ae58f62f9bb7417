"""Feature sets for probing, built from benchmark-token activations of one site.

* ``raw``     - the site itself (e.g. ``blocks.3.resid_post``);
* ``mlp``     - the same layer's MLP neurons (``blocks.L.mlp_hidden``);
* ``glp:DIR`` - GLP meta-neurons: every block's SwiGLU hidden units on the site's activation noised
  to t (default 0.1, seeded), one forward pass (``GLP.meta_neurons``), concatenated over blocks;
* ``sae:DIR`` - SAE latents, ``load_sae(DIR).encode`` of the site's activation;
* ``pca:K``   - the first K principal components of the site, fitted on each task's train rows only.

Meta-neurons use the rows of a task in file order with one seeded noise draw, so they do not depend
on the split and repeat exactly across runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from innards.errors import InnardsError
from innards.hub import is_hub_id

KINDS = ("raw", "mlp", "glp", "sae", "pca")
USAGE = "raw, mlp, glp:DIR, sae:DIR or pca:K"


@dataclass(frozen=True)
class FeatureSpec:
    """One requested feature set: kind and argument (folder or K)."""

    kind: str
    arg: str | None = None
    depth: int = 1  # path components of a GLP/SAE folder shown in the label

    @property
    def name(self) -> str:
        """Label in tables and JSON: 'raw', 'mlp', 'glp:<folder name>', 'sae:<folder name>', 'pca:K'."""
        if self.kind in ("glp", "sae"):
            parts = Path(self.arg).resolve().parts
            return f"{self.kind}:{'/'.join(parts[-self.depth:])}"
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


def parse_features(items: list[str]) -> list[FeatureSpec]:
    """Parse ``raw,mlp,glp:DIR,sae:DIR,pca:K`` entries; one-line errors for anything else."""
    if not items:
        raise InnardsError(f"no feature sets given (choose from {USAGE})")
    specs: list[FeatureSpec] = []
    for item in items:
        text = item.strip()
        kind, sep, arg = text.partition(":")
        kind = kind.strip().lower()
        if kind in ("raw", "mlp") and not sep:
            spec = FeatureSpec(kind)
        elif kind in ("glp", "sae") and arg.strip():
            p = Path(arg.strip()).expanduser()
            if not p.is_dir() and not is_hub_id(arg.strip()):
                raise InnardsError(f"feature set '{text}': {kind.upper()} folder not found: {p}")
            spec = FeatureSpec(kind, str(p) if p.is_dir() else arg.strip())
        elif kind == "pca":
            try:
                k = int(arg)
            except ValueError:
                raise InnardsError(f"feature set '{text}': pca needs a number of components, e.g. pca:64") from None
            if k < 1:
                raise InnardsError(f"feature set '{text}': pca needs at least 1 component")
            spec = FeatureSpec("pca", str(k))
        else:
            raise InnardsError(f"unknown feature set '{text}' (choose from {USAGE})")
        specs.append(spec)
    # two folders with the same name (runs/a/final, runs/b/final): label them with more of their path
    for _ in range(8):
        names = [s.name for s in specs]
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            break
        specs = [FeatureSpec(s.kind, s.arg, s.depth + 1) if s.name in clash and s.arg and
                 len(Path(s.arg).resolve().parts) > s.depth else s for s in specs]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InnardsError(f"feature set '{dup}' is given twice")
    return specs


def mlp_site(site: Any) -> str:
    """The MLP-neuron site of the same layer as ``site``."""
    return f"blocks.{site.layer}.mlp_hidden"


def needed_sites(specs: list[FeatureSpec], site: Any) -> list[str]:
    """Sites to extract for these feature sets (the probed site, and the MLP site for ``mlp``)."""
    out = []
    for s in specs:
        want = mlp_site(site) if s.kind == "mlp" else site.name
        if want not in out:
            out.append(want)
    return out


def _model_matches(model: Any, name: str | None, sha: str | None) -> bool:
    src = getattr(model, "innards_source", {}) or {}
    if sha and src.get("sha256"):
        return sha == src["sha256"]
    if not name:
        return True  # nothing recorded to compare with
    if name in (src.get("name"), src.get("path")):
        return True
    from innards.models.load import resolve_model_dir

    try:
        d, _ = resolve_model_dir(name, need_weights=False)
    except InnardsError:
        return False
    return src.get("path") is not None and Path(d).resolve() == Path(src["path"]).resolve()


class FeatureBuilder:
    """Loads the GLPs and SAEs of the requested sets once, checks they fit the model and site, builds features."""

    def __init__(self, specs: list[FeatureSpec], model: Any, site: Any, t: float = 0.1, seed: int = 42,
                 device: str | torch.device | None = None):
        self.specs = specs
        self.model = model
        self.site = site
        self.t = float(t)
        self.seed = int(seed)
        if not 0.0 <= self.t <= 1.0:
            raise InnardsError(f"--t must be in [0, 1], got {t}")
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.objects: dict[str, Any] = {}
        self.info: dict[str, dict] = {}
        for s in specs:
            if s.kind == "glp":
                self.objects[s.name] = self._load_glp(s.arg)
            elif s.kind == "sae":
                self.objects[s.name] = self._load_sae(s.arg)

    def _load_glp(self, path: str) -> Any:
        from innards.glp.model import GLP

        glp = GLP.from_pretrained(path, device=self.device)
        try:
            glp.check_compatible(self.model, self.site.name, self.site.width)
        except InnardsError as e:
            raise InnardsError(f"glp:{path}: {e}") from None
        return glp

    def _load_sae(self, path: str) -> Any:
        from innards.sae.load import load_sae
        from innards.models.sites import resolve_site

        sae = load_sae(path, device=self.device)
        if sae.d_in != self.site.width:
            raise InnardsError(f"sae:{path}: the SAE reads width {sae.d_in}, site {self.site.name} has width {self.site.width}")
        hook = sae.hook_name
        if hook:
            try:
                same = resolve_site(self.model, hook).name == self.site.name
            except InnardsError:
                same = False
            if not same:
                raise InnardsError(f"sae:{path}: the SAE was trained on site '{hook}', not '{self.site.name}'")
        meta = sae.cfg.get("metadata") or {}
        model_meta = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        sha = meta.get("model_sha256") or model_meta.get("sha256")
        if not _model_matches(self.model, sae.model_name, sha):
            raise InnardsError(f"sae:{path}: the SAE was trained on model '{sae.model_name}', not "
                               f"'{(getattr(self.model, 'innards_source', {}) or {}).get('name')}'")
        return sae

    def n_blocks(self, spec: FeatureSpec) -> int:
        """Column groups of a set (GLP blocks; 1 otherwise)."""
        return int(self.objects[spec.name].config.n_blocks) if spec.kind == "glp" else 1

    def locate(self, spec: FeatureSpec, index: int) -> dict[str, int]:
        """Where a column comes from: {'block', 'neuron'} for GLP meta-neurons, {'index'} otherwise."""
        if spec.kind == "glp":
            d_mlp = int(self.objects[spec.name].config.d_mlp)
            return {"index": int(index), "block": int(index) // d_mlp, "neuron": int(index) % d_mlp}
        return {"index": int(index)}

    @torch.no_grad()
    def build(self, spec: FeatureSpec, acts: dict[str, torch.Tensor], train_rows: np.ndarray) -> np.ndarray:
        """Feature matrix (N, F) float32 for every row of a task (PCA fitted on ``train_rows`` only)."""
        x = acts[self.site.name]
        if spec.kind == "raw":
            out = x
        elif spec.kind == "mlp":
            out = acts[mlp_site(self.site)]
        elif spec.kind == "glp":
            out = self.objects[spec.name].meta_neurons(x.to(self.device), t=self.t, seed=self.seed,
                                                       site=self.site.name)
        elif spec.kind == "sae":
            out = self.objects[spec.name].encode(x.to(self.device))
        elif spec.kind == "pca":
            out = torch.as_tensor(pca_features(x.numpy(), train_rows, int(spec.arg)))
        else:  # parse_features admits nothing else
            raise InnardsError(f"unknown feature set '{spec.name}'")
        out = out.float().cpu().numpy()
        if not np.isfinite(out).all():
            raise InnardsError(f"feature set '{spec.name}' has non-finite values (NaN or inf activations)")
        return out


def pca_features(x: np.ndarray, train_rows: np.ndarray, k: int) -> np.ndarray:
    """Scores on the top-k principal directions of the train rows (centred on the train mean)."""
    xtr = np.asarray(x[train_rows], dtype=np.float64)
    mean = xtr.mean(axis=0)
    k = min(k, xtr.shape[0], xtr.shape[1])
    _, _, vt = np.linalg.svd(xtr - mean, full_matrices=False)
    return ((np.asarray(x, dtype=np.float64) - mean) @ vt[:k].T).astype(np.float32)
