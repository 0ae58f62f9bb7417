"""VPD subcomponents as probing features: parameter-space units on the same benchmark as activation units.

For a decomposition (``innards vpd train``) of the probed model, every rank-one subcomponent c of a
decomposed matrix W ~ sum_c U_c V_c^T gives two numbers at the benchmark token: its causal importance
(the decomposition's CI function on the matrices' clean inputs, the quantity VPD trains to be sparse)
and its component activation x . V_c (how strongly the token's input to the matrix reads the
subcomponent's input direction). Only matrices in blocks up to the probed site's block are used, so
the parameter units see the same part of the network as the activations they are compared with.

The CI function may be a bidirectional transformer over positions, so prompts are run unpadded:
batches hold prompts of one token length only. The benchmark token is the one the activation
extraction probes (:func:`innards.probe.extract.tokenize`). Features are cached per task under
``CACHE/<model tag>/vpd-<fingerprint>/``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open

from innards.errors import InnardsError
from innards.io import sha256_file
from innards.models.sites import Site
from innards.probe.extract import context_length, model_tag, prompts_digest, token_policy, tokenize
from innards.tensors import load_tensors, save_tensors
from innards.vpd.run import DECOMP_FILE, ci_values, load_run, target_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VPD_PARTS = ("both", "ci", "act")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def matrix_layer(name: str) -> int | None:
    """The block index in a decomposed matrix's module path (model.layers.3.mlp.up_proj -> 3), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class VPDFeatures:
    """The subcomponents of one VPD run as a feature set of a probed model and site."""

    def __init__(self, run: str | Path, model: PreTrainedModel, site: Site, part: str = "both",
                 cache_dir: str | Path | None = None, token: str = "last", context: int | None = None,
                 batch_size: int = 32):
        if part not in VPD_PARTS:
            raise InnardsError(f"vpd part must be one of {', '.join(VPD_PARTS)}, got '{part}'")
        self.run = Path(run)
        device = next(model.parameters()).device
        self.b = load_run(self.run, device=str(device))
        if self.b.cfg.target.kind != "lm":
            raise InnardsError(f"vpd:{run}: the run decomposes a toy ({self.b.cfg.target.kind}), not a language model")
        if self.b.target_info.get("fingerprint") != target_fingerprint(model):
            raise InnardsError(f"vpd:{run}: the run decomposes model '{self.b.target_info.get('name')}', "
                               f"not the probed model '{(getattr(model, 'innards_source', {}) or {}).get('name')}'")
        self.b.ci.eval()
        self.model = model
        self.part = part
        self.token = token_policy(model, token)
        self.context = context_length(model, context)
        self.batch_size = batch_size
        names = self.b.decomp.names
        keep = [n for n in names if (matrix_layer(n) is None or matrix_layer(n) <= site.layer)]
        if not keep:
            raise InnardsError(f"vpd:{run}: no decomposed matrix sits in blocks 0..{site.layer} "
                               f"(it decomposes {', '.join(names[:4])}...)")
        self.matrices = keep
        self.sizes = [self.b.decomp.comp(n).C for n in keep]
        done = self.run / DECOMP_FILE
        weights = done if done.is_file() else self.run / "ckpt" / "state.safetensors"
        self.fingerprint = sha256_file(weights)[:16]
        self.cache = (Path(cache_dir) / model_tag(model) / f"vpd-{self.fingerprint}") if cache_dir else None
        # column layout: for each kept matrix, [ci of its C subcomponents] then [x.V of them] (as asked)
        self._cols: list[tuple[str, int, str]] = []
        for n, c in zip(keep, self.sizes):
            for what in ("ci", "act"):
                if part in ("both", what):
                    self._cols.extend((n, j, what) for j in range(c))

    @property
    def n_features(self) -> int:
        """Columns of the feature matrix."""
        return len(self._cols)

    @property
    def n_groups(self) -> int:
        """Column groups for dense probing: one per (matrix, ci/act) block."""
        return len(self.matrices) * (2 if self.part == "both" else 1)

    def locate(self, index: int) -> dict[str, int | str]:
        """{'index', 'matrix', 'component', 'value': ci|act} of a column."""
        name, j, what = self._cols[int(index)]
        return {"index": int(index), "matrix": name, "component": int(j), "value": what}

    @torch.no_grad()
    def compute(self, prompts: list[str]) -> torch.Tensor:
        """(N, n_features) float32: CI and/or x.V of every kept subcomponent at each prompt's benchmark token."""
        ids, pos = tokenize(self.model, prompts, self.context, self.token)
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, row in enumerate(ids):
            by_len[len(row)].append(i)
        device = next(self.model.parameters()).device
        out = torch.empty((len(prompts), self.n_features), dtype=torch.float32)
        for _, rows in sorted(by_len.items()):
            for s in range(0, len(rows), self.batch_size):
                chunk = rows[s:s + self.batch_size]
                x = torch.tensor([ids[i] for i in chunk], device=device)
                _, inputs = self.b.decomp.clean(x)
                g, _ = ci_values(self.b, inputs)
                h = self.b.decomp.inner({n: inputs[n] for n in self.matrices})
                at = torch.as_tensor(pos[chunk], device=device)
                r = torch.arange(len(chunk), device=device)
                parts = []
                for n in self.matrices:
                    if self.part in ("both", "ci"):
                        parts.append(g[n][r, at].float())
                    if self.part in ("both", "act"):
                        parts.append(h[n][r, at].float())
                out[torch.as_tensor(chunk)] = torch.cat(parts, dim=-1).cpu()
        return out

    def features(self, task: str, prompts: list[str]) -> torch.Tensor:
        """:meth:`compute` for a task's prompts, cached per task when a cache folder is set."""
        meta = {"prompts_sha256": prompts_digest(prompts), "n": str(len(prompts)), "token": self.token,
                "context": str(self.context), "part": self.part, "matrices": ",".join(self.matrices)}
        path = self.cache / f"{task}.safetensors" if self.cache else None
        if path is not None and path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    same = (f.metadata() or {}) == meta
                if same:
                    return load_tensors(path, what="VPD feature cache")["features"]
            except Exception:
                pass  # unreadable: compute again, the rewrite is atomic
        feats = self.compute(prompts)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, {"features": feats}, metadata=meta)
        return feats
