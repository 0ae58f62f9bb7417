"""Feature sets for probing, built from benchmark-token activations of one site.

* ``raw``     - the site itself (e.g. ``blocks.3.resid_post``);
* ``mlp``     - the same layer's MLP neurons (``blocks.L.mlp_hidden``);
* ``glp:X``   - GLP meta-neurons: every block's SwiGLU hidden units on the site's activation noised
  to t (default 0.1, seeded), one forward pass (``GLP.meta_neurons``), concatenated over blocks;
  X is a folder or a hub id;
* ``sae:X``   - SAE latents, ``load_sae(X).encode`` of the site's activation (X: a folder, a hub id
  or a SAELens ``release/sae_id``);
* ``pca:K``   - the first K principal components of the site, fitted on each task's train rows only;
* ``vpd:RUN`` - VPD subcomponents of the decomposed matrices up to the site's layer: each one's causal
  importance and its component activation x.V at the benchmark token (``vpd:RUN#ci`` or ``#act`` for
  one of the two); see :mod:`innards.probe.vpd`.

Meta-neurons use the rows of a task in file order with one seeded noise draw, so they do not depend
on the split and repeat exactly across runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from innards.errors import InnardsError
from innards.glp.model import GLP, file_sha256
from innards.hub import is_hub_id
from innards.models.load import resolve_model_dir
from innards.models.sites import Site, resolve_site
from innards.probe.vpd import VPD_PARTS, VPDFeatures
from innards.sae.load import load_sae
from innards.sae.model import SparseAutoencoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

KINDS = ("raw", "mlp", "glp", "sae", "pca", "vpd")
USAGE = "raw, mlp, glp:X, sae:X, pca:K or vpd:RUN (X: a folder or hub id)"


@dataclass(frozen=True)
class FeatureSpec:
    """One requested feature set: kind and argument (folder, hub id, run or K), and for vpd which part."""

    kind: str
    arg: str | None = None
    depth: int = 1  # path components of a folder shown in the label
    part: str = "both"  # vpd: ci, act or both

    @property
    def local(self) -> bool:
        """The argument is a local folder (not a hub id or registry name)."""
        return self.arg is not None and Path(self.arg).expanduser().exists()

    @property
    def name(self) -> str:
        """Label in tables and JSON: 'raw', 'mlp', 'glp:<folder name>', 'sae:<hub id>', 'pca:K', 'vpd:<run>#ci'."""
        if self.kind in ("glp", "sae", "vpd"):
            label = "/".join(Path(self.arg).resolve().parts[-self.depth:]) if self.local else self.arg
            return f"{self.kind}:{label}" + (f"#{self.part}" if self.part != "both" else "")
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


MEANING = {"raw": "residual dims", "mlp": "MLP neurons", "glp": "GLP meta-neurons", "sae": "SAE latents",
           "pca": "PCA components", "vpd": "VPD components"}


def meaning(name: str) -> str:
    """What a feature-set label means, for plots and summaries: 'glp:glp' -> 'GLP meta-neurons (glp)'."""
    kind, _, arg = name.partition(":")
    what = MEANING.get(kind)
    if what is None:
        return name
    if kind == "pca" and arg:
        return f"top {arg} {what}"
    return f"{what} ({arg})" if arg else what


def parse_features(items: list[str]) -> list[FeatureSpec]:
    """Parse ``raw,mlp,glp:X,sae:X,pca:K,vpd:RUN`` entries; one-line errors for anything else."""
    if not items:
        raise InnardsError(f"no feature sets given (choose from {USAGE})")
    specs: list[FeatureSpec] = []
    for item in items:
        text = item.strip()
        kind, sep, arg = text.partition(":")
        kind, arg = kind.strip().lower(), arg.strip()
        if kind in ("raw", "mlp") and not sep:
            spec = FeatureSpec(kind)
        elif kind in ("glp", "sae") and arg:
            p = Path(arg).expanduser()
            if not p.is_dir() and not is_hub_id(arg):
                raise InnardsError(f"feature set '{text}': {kind.upper()} folder not found (and not a hub id): {p}")
            spec = FeatureSpec(kind, str(p) if p.is_dir() else arg)
        elif kind == "vpd" and arg:
            run, _, part = arg.partition("#")
            part = part or "both"
            if part not in VPD_PARTS:
                raise InnardsError(f"feature set '{text}': vpd:RUN takes #ci or #act (or nothing for both), not #{part}")
            p = Path(run).expanduser()
            if not p.is_dir():
                raise InnardsError(f"feature set '{text}': VPD run folder not found: {p}")
            spec = FeatureSpec("vpd", str(p), part=part)
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
        specs = [FeatureSpec(s.kind, s.arg, s.depth + 1, s.part) if s.name in clash and s.local and
                 len(Path(s.arg).resolve().parts) > s.depth else s for s in specs]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InnardsError(f"feature set '{dup}' is given twice")
    return specs


def mlp_site(site: Site) -> str:
    """The MLP-neuron site of the same layer as ``site``."""
    return f"blocks.{site.layer}.mlp_hidden"


def needed_sites(specs: list[FeatureSpec], site: Site) -> list[str]:
    """Sites to extract for these feature sets (the probed site, and the MLP site for ``mlp``; vpd needs none)."""
    out = []
    for s in specs:
        if s.kind == "vpd":
            continue
        want = mlp_site(site) if s.kind == "mlp" else site.name
        if want not in out:
            out.append(want)
    return out


def _model_matches(model: PreTrainedModel, name: str | None, sha: str | None) -> bool:
    src = getattr(model, "innards_source", {}) or {}
    if sha and src.get("sha256"):
        return sha == src["sha256"]
    if not name:
        return True  # nothing recorded to compare with
    if name in (src.get("name"), src.get("path")):
        return True
    try:
        d, _ = resolve_model_dir(name, need_weights=False)
    except InnardsError:
        return False
    return src.get("path") is not None and Path(d).resolve() == Path(src["path"]).resolve()


def _tensors_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


FeatureSource = GLP | SparseAutoencoder | VPDFeatures


class FeatureBuilder:
    """Loads the GLPs, SAEs and VPD runs of the requested sets once, checks they fit the model and site, builds features."""

    def __init__(self, specs: list[FeatureSpec], model: PreTrainedModel, site: Site, t: float = 0.1, seed: int = 42,
                 device: str | torch.device | None = None, glp_revision: str | None = None,
                 glp_checkpoint: str | None = None, restats: str | None = None, cache_dir: str | Path | None = None,
                 token: str = "last", context: int | None = None, batch_size: int = 32):
        self.specs = specs
        self.model = model
        self.site = site
        self.t = float(t)
        self.seed = int(seed)
        if not 0.0 <= self.t <= 1.0:
            raise InnardsError(f"--t must be in [0, 1], got {t}")
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.glp_kwargs = {"revision": glp_revision, "checkpoint": glp_checkpoint, "restats": restats}
        self.objects: dict[str, FeatureSource] = {}
        self.sources: dict[str, dict[str, str] | None] = {}
        for s in specs:
            if s.kind == "glp":
                glp = self._load_glp(s.arg)
                self.objects[s.name] = glp
                self.sources[s.name] = {"path": _where(s), "fingerprint": self._glp_fingerprint(s.arg),
                                        **({"hub": glp.meta["hub"]} if glp.meta.get("hub") else {})}
            elif s.kind == "sae":
                sae = self._load_sae(s.arg)
                self.objects[s.name] = sae
                self.sources[s.name] = {"path": _where(s), "fingerprint": _tensors_digest(sae)}
            elif s.kind == "vpd":
                v = VPDFeatures(s.arg, model, site, part=s.part, cache_dir=cache_dir, token=token, context=context,
                                batch_size=batch_size)
                self.objects[s.name] = v
                self.sources[s.name] = {"path": _where(s), "fingerprint": v.fingerprint}
            else:
                self.sources[s.name] = None

    def _glp_fingerprint(self, path: str) -> str:
        k = self.glp_kwargs
        h = hashlib.sha256(file_sha256(path, checkpoint=k["checkpoint"], revision=k["revision"]).encode())
        if k["restats"]:
            h.update(str(Path(k["restats"]).resolve()).encode())
        return h.hexdigest()[:16]

    def _load_glp(self, path: str) -> GLP:
        glp = GLP.from_pretrained(path, device=self.device, **self.glp_kwargs)
        try:
            glp.check_compatible(self.model, self.site.name, self.site.width)
        except InnardsError as e:
            raise InnardsError(f"glp:{path}: {e}") from None
        return glp

    def _load_sae(self, path: str) -> SparseAutoencoder:
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
        """Column groups of a set (GLP blocks, VPD matrices; 1 otherwise)."""
        obj = self.objects.get(spec.name)
        if isinstance(obj, GLP):
            return int(obj.config.n_blocks)
        if isinstance(obj, VPDFeatures):
            return obj.n_groups
        return 1

    def locate(self, spec: FeatureSpec, index: int) -> dict[str, int | str]:
        """Where a column comes from: {'block', 'neuron'} for meta-neurons, the matrix and component for VPD."""
        obj = self.objects.get(spec.name)
        if isinstance(obj, GLP):
            d_mlp = int(obj.config.d_mlp)
            return {"index": int(index), "block": int(index) // d_mlp, "neuron": int(index) % d_mlp}
        if isinstance(obj, VPDFeatures):
            return obj.locate(index)
        return {"index": int(index)}

    @torch.no_grad()
    def build(self, spec: FeatureSpec, acts: dict[str, torch.Tensor], train_rows: np.ndarray,
              task: str | None = None, prompts: list[str] | None = None) -> np.ndarray:
        """Feature matrix (N, F) float32 for every row of a task (PCA fitted on ``train_rows`` only)."""
        obj = self.objects.get(spec.name)
        if spec.kind == "vpd":
            if task is None or prompts is None:
                raise InnardsError("vpd features need the task's prompts")
            out = obj.features(task, prompts)
        else:
            x = acts[self.site.name]
            if spec.kind == "raw":
                out = x
            elif spec.kind == "mlp":
                out = acts[mlp_site(self.site)]
            elif spec.kind == "glp":
                out = obj.meta_neurons(x.to(self.device), t=self.t, seed=self.seed, site=self.site.name)
            elif spec.kind == "sae":
                out = obj.encode(x.to(self.device))
            elif spec.kind == "pca":
                out = torch.as_tensor(pca_features(x.numpy(), train_rows, int(spec.arg)))
            else:  # parse_features admits nothing else
                raise InnardsError(f"unknown feature set '{spec.name}'")
        out = out.float().cpu().numpy()
        if not np.isfinite(out).all():
            raise InnardsError(f"feature set '{spec.name}' has non-finite values (NaN or inf activations)")
        return out


def _where(spec: FeatureSpec) -> str:
    """A folder's resolved path; a hub id or registry name as given (it is not a path)."""
    return str(Path(spec.arg).resolve()) if spec.local else str(spec.arg)


def pca_features(x: np.ndarray, train_rows: np.ndarray, k: int) -> np.ndarray:
    """Scores on the top-k principal directions of the train rows (centred on the train mean)."""
    xtr = np.asarray(x[train_rows], dtype=np.float64)
    mean = xtr.mean(axis=0)
    k = min(k, xtr.shape[0], xtr.shape[1])
    _, _, vt = np.linalg.svd(xtr - mean, full_matrices=False)
    return ((np.asarray(x, dtype=np.float64) - mean) @ vt[:k].T).astype(np.float32)
