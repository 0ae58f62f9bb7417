"""Rank-one subcomponents (V, U) and the Δ-component for chosen Linear / HF Conv1D weights of a model.

W (d_out × d_in) ≈ (V U)ᵀ with V ∈ R^{d_in×C} (read directions) and U ∈ R^{C×d_out} (write directions).
A masked layer computes ((x V) ⊙ m) U + m_Δ · x Δᵀ + b with Δ = W − (V U)ᵀ. Because x Δᵀ = x Wᵀ − (x V) U,
the hook reuses the frozen module's own output x Wᵀ + b instead of forming Δ: mathematically and in
gradients identical to the live Δ, with one fewer (d_in × d_out) product per forward.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from innards.errors import InnardsError


def is_decomposable(module: nn.Module) -> bool:
    """True for nn.Linear and Hugging Face Conv1D (GPT-2 style, weight stored d_in × d_out)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def match_modules(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    """Decomposable modules whose path matches any fnmatch pattern, sorted by path; every pattern must match."""
    candidates = [(n, m) for n, m in model.named_modules() if n and is_decomposable(m)]
    chosen: dict[str, nn.Module] = {}
    for pat in patterns:
        hits = [(n, m) for n, m in candidates if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            names = ", ".join(n for n, _ in candidates[:40]) + (" ..." if len(candidates) > 40 else "")
            raise InnardsError(f"module pattern '{pat}' matches no Linear/Conv1D weight (weights: {names})")
        chosen.update(hits)
    return sorted(chosen.items())


def frozen_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (d_out, d_in)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


class Component(nn.Module):
    """V (d_in, C) and U (C, d_out) for one matrix; the frozen module is referenced, not owned.

    Every use of V and U in training goes through ``forward`` (``op`` names the computation), so that under
    FSDP2 the module call all-gathers them first.
    """

    def __init__(self, name: str, module: nn.Module, C: int, generator: torch.Generator | None = None):
        super().__init__()
        W = frozen_weight(module)
        d_out, d_in = W.shape
        self.name, self.C, self.d_in, self.d_out = name, C, d_in, d_out
        self._module = [module]  # a list so the frozen module is not registered as a child
        dev, dt = W.device, torch.float32
        self.V = nn.Parameter(torch.randn(d_in, C, generator=generator).to(dev, dt) / math.sqrt(d_in))
        self.U = nn.Parameter(torch.randn(C, d_out, generator=generator).to(dev, dt) / math.sqrt(C))

    @property
    def module(self) -> nn.Module:
        return self._module[0]

    def W(self) -> torch.Tensor:
        return frozen_weight(self.module).detach()

    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return None if b is None else b.detach()

    def delta(self, W: torch.Tensor | None = None) -> torch.Tensor:
        """Δ = W − (V U)ᵀ, live (differentiable in U and V)."""
        W = self.W() if W is None else W.detach()
        return W.to(self.V.dtype) - (self.V @ self.U).t()

    def weights(self) -> torch.Tensor:
        """Per-subcomponent rank-one matrices (C, d_out, d_in)."""
        return torch.einsum("co,ic->coi", self.U, self.V)

    def norms(self) -> torch.Tensor:
        """Frobenius norm of each rank-one subcomponent, ‖U_c‖·‖V_c‖."""
        return self.U.norm(dim=1) * self.V.norm(dim=0)

    def forward(self, op: str, x: torch.Tensor | None = None, out: torch.Tensor | None = None,
                h: torch.Tensor | None = None, spec: "Mask | None" = None, W: torch.Tensor | None = None,
                explicit_delta: bool = False) -> torch.Tensor:
        """``inner``: x V; ``delta_sq``: ‖W − (V U)ᵀ‖²; ``masked``: the masked layer output from h = x V."""
        if op == "inner":
            return x @ self.V
        if op == "delta_sq":
            # Δ is a small difference of large numbers: always fp32, also under autocast (as the reference)
            with torch.autocast(device_type=self.V.device.type, enabled=False):
                return (self.delta(W) ** 2).sum()
        return self._masked(x, out, h, spec, W, explicit_delta)

    def _masked(self, x: torch.Tensor, out: torch.Tensor, h: torch.Tensor, spec: "Mask", W: torch.Tensor | None,
                explicit_delta: bool) -> torch.Tensor:
        b = self.bias()
        if explicit_delta:
            y = (h * spec.m) @ self.U
            if spec.delta is not None:
                y = y + spec.delta.unsqueeze(-1) * (x @ self.delta(W).detach().t())
            if b is not None:
                y = y + b
        elif spec.delta is None:
            y = (h * spec.m) @ self.U
            if b is not None:
                y = y + b
        else:
            # x Δᵀ = x Wᵀ − (x V) U with the frozen module's own output x Wᵀ + b
            md = spec.delta.unsqueeze(-1)
            xw = out - b if b is not None else out
            y = out + (h * (spec.m - md)) @ self.U - (1 - md) * xw
        if spec.route is not None:
            y = torch.where(spec.route.unsqueeze(-1), y, out)
        return y


@dataclass
class Mask:
    """Mask for one matrix: component mask (..., C); Δ mask (...) or None (Δ off); route (...) bool or None (all)."""

    m: torch.Tensor
    delta: torch.Tensor | None = None
    route: torch.Tensor | None = None


@dataclass
class _State:
    mode: str  # "cache", "mask" or "delta"
    masks: dict[str, Mask] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    acts: dict[str, torch.Tensor] | None = None  # inner acts x V, recorded when asked
    act_fn: Any = None  # optional fn(name, h) -> h applied to inner acts (attribution graphs)
    explicit_delta: bool = False  # y = (h ⊙ m) U + m_Δ·x Δᵀ + b with a detached Δ, so y depends on h even at m = m_Δ = 1
    pre: dict[str, torch.Tensor] | None = None  # x V on the clean inputs, reused while no earlier matrix was masked
    perturbed: bool = False  # some matrix's output has been replaced in this forward
    delta_sq: list[torch.Tensor] | None = None  # collects ‖Δ‖² per matrix during a forward (sharded training)


class Decomposition(nn.Module):
    """A frozen target plus components for the matched matrices, run through forward hooks."""

    def __init__(self, target: nn.Module, patterns: list[str], C: int, C_per_module: dict[str, int] | None = None,
                 seed: int = 0):
        super().__init__()
        self.target = target
        for p in target.parameters():
            p.requires_grad_(False)
        target.eval()
        matched = match_modules(target, patterns)
        gen = torch.Generator().manual_seed(seed)
        comps = []
        for name, mod in matched:
            c = C
            for pat, val in (C_per_module or {}).items():
                if fnmatch.fnmatchcase(name, pat):
                    c = int(val)
                    break
            comps.append(Component(name, mod, c, gen))
        self.components = nn.ModuleList(comps)
        self.names = [c.name for c in comps]
        self._state: _State | None = None
        self._handles = [c.module.register_forward_hook(self._make_hook(c)) for c in comps]

    def comp(self, name: str) -> Component:
        return self.components[self.names.index(name)]

    def uv_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.components for p in (c.V, c.U)]

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, comp: Component):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            st = self._state
            if st is None:
                return None
            x = args[0]
            if st.delta_sq is not None:
                # inside the module's own call its weight is complete even when the target is sharded
                st.delta_sq.append(comp("delta_sq", W=frozen_weight(module)))
            if st.mode == "cache":
                st.inputs[comp.name] = x
                return None
            spec = st.masks.get(comp.name)
            if spec is None:
                return None  # frozen path: the original W on this matrix's actual input
            # no matrix before this one was masked, so its input is the clean input and x V is already known
            h = st.pre.get(comp.name) if st.pre is not None and not st.perturbed else None
            if h is None:
                h = comp("inner", x)
            if st.act_fn is not None:
                h = st.act_fn(comp.name, h)
            if st.acts is not None:
                st.acts[comp.name] = h
            st.perturbed = True
            W = frozen_weight(module) if st.explicit_delta else None
            return comp("masked", x, out, h, spec, W, st.explicit_delta)

        return hook

    def run_target(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        if hasattr(self.target, "config") and getattr(self.target.config, "use_cache", None) is not None:
            kw.setdefault("use_cache", False)  # HF language models: no KV cache during decomposition
        out = self.target(x, **kw)
        return out.logits if hasattr(out, "logits") else out

    @torch.no_grad()
    def clean(self, x: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The frozen target's output and the input of every decomposed matrix."""
        self._state = _State("cache")
        try:
            out = self.run_target(x, **kw)
            return out, self._state.inputs
        finally:
            self._state = None

    def masked(self, x: torch.Tensor, masks: dict[str, Mask], record: bool = False, act_fn: Any = None,
               explicit_delta: bool = False, pre: dict[str, torch.Tensor] | None = None,
               **kw: Any) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Output with the given masks; matrices absent from ``masks`` use the frozen weight.

        ``pre``: x V of each matrix on the clean inputs (from :meth:`inner`); used for the matrices reached
        before any masked one, whose inputs are then the clean ones.
        """
        self._state = _State("mask", masks=masks, acts={} if record else None, act_fn=act_fn,
                             explicit_delta=explicit_delta, pre=pre)
        try:
            out = self.run_target(x, **kw)
            return (out, self._state.acts) if record else out
        finally:
            self._state = None

    def inner(self, inputs: dict[str, torch.Tensor], detach: bool = False) -> dict[str, torch.Tensor]:
        """x V for every matrix's (clean) input; with ``detach`` V gets no gradient from it."""
        out = {}
        for c in self.components:
            if c.name not in inputs:
                continue
            h = c("inner", inputs[c.name])
            out[c.name] = h.detach() if detach else h
        return out

    def delta_l2(self, probe: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """Mean squared entry of Δ over all decomposed matrices.

        With ``probe`` (a small input batch) Δ is formed inside each matrix's own forward call, where a
        sharded target holds its weight in full.
        """
        if probe is None:
            tot = sum(c("delta_sq", W=c.W()) for c in self.components)
        else:
            self._state = _State("delta", delta_sq=[])
            try:
                with torch.enable_grad():
                    self.run_target(probe, **kw)
                tot = sum(self._state.delta_sq)
            finally:
                self._state = None
        n = sum(c.d_in * c.d_out for c in self.components)
        return tot / n

    def tie(self, pairs: list[list[str]]) -> None:
        """For each [a, b] with W_b = W_aᵀ: b's U and V become views of a's Vᵀ and Uᵀ (shared storage).

        Both stay separate parameters, so the optimiser keeps one state for each and both updates land on the
        shared storage, as the reference's tied TMS decompositions do.
        """
        for pair in pairs:
            if len(pair) != 2 or pair[0] not in self.names or pair[1] not in self.names:
                raise InnardsError(f"tie needs pairs of decomposed matrices, got {pair} (matrices: {', '.join(self.names)})")
            a, b = self.comp(pair[0]), self.comp(pair[1])
            if (a.d_in, a.d_out, a.C) != (b.d_out, b.d_in, b.C):
                raise InnardsError(f"cannot tie {a.name} and {b.name}: shapes or C differ")
            if not torch.allclose(a.W(), b.W().t()):
                raise InnardsError(f"cannot tie {a.name} and {b.name}: the target weights are not transposes")
            b.U = nn.Parameter(a.V.data.t())
            b.V = nn.Parameter(a.U.data.t())

    def component_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for c in self.components:
            out[f"V.{c.name}"] = c.V.detach()
            out[f"U.{c.name}"] = c.U.detach()
        return out

    def load_component_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for c in self.components:
            for key, p in ((f"V.{c.name}", c.V), (f"U.{c.name}", c.U)):
                if key not in tensors or tensors[key].shape != p.shape:
                    raise InnardsError(f"checkpoint does not match this decomposition (tensor {key})")
                with torch.no_grad():
                    p.copy_(tensors[key])
