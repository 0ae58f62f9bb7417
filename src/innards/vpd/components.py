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
    """V (d_in, C) and U (C, d_out) for one matrix; the frozen module is referenced, not owned."""

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

    def delta(self) -> torch.Tensor:
        """Δ = W − (V U)ᵀ, live (differentiable in U and V)."""
        return self.W().to(self.V.dtype) - (self.V @ self.U).t()

    def weights(self) -> torch.Tensor:
        """Per-subcomponent rank-one matrices (C, d_out, d_in)."""
        return torch.einsum("co,ic->coi", self.U, self.V)

    def norms(self) -> torch.Tensor:
        """Frobenius norm of each rank-one subcomponent, ‖U_c‖·‖V_c‖."""
        return self.U.norm(dim=1) * self.V.norm(dim=0)


@dataclass
class Mask:
    """Mask for one matrix: component mask (..., C); Δ mask (...) or None (Δ off); route (...) bool or None (all)."""

    m: torch.Tensor
    delta: torch.Tensor | None = None
    route: torch.Tensor | None = None


@dataclass
class _State:
    mode: str  # "cache" or "mask"
    masks: dict[str, Mask] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    acts: dict[str, torch.Tensor] | None = None  # inner acts x V, recorded when asked
    act_fn: Any = None  # optional fn(name, h) -> h applied to inner acts (attribution graphs)
    explicit_delta: bool = False  # y = (h ⊙ m) U + m_Δ·x Δᵀ + b with a detached Δ, so y depends on h even at m = m_Δ = 1


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
            if st.mode == "cache":
                st.inputs[comp.name] = x
                return None
            spec = st.masks.get(comp.name)
            if spec is None:
                return None  # frozen path: the original W on this matrix's actual input
            h = x @ comp.V
            if st.act_fn is not None:
                h = st.act_fn(comp.name, h)
            if st.acts is not None:
                st.acts[comp.name] = h
            b = comp.bias()
            if st.explicit_delta:
                y = (h * spec.m) @ comp.U
                if spec.delta is not None:
                    y = y + spec.delta.unsqueeze(-1) * (x @ comp.delta().detach().t())
                if b is not None:
                    y = y + b
            elif spec.delta is None:
                y = (h * spec.m) @ comp.U
                if b is not None:
                    y = y + b
            else:
                md = spec.delta.unsqueeze(-1)
                xw = out - b if b is not None else out
                y = out + (h * (spec.m - md)) @ comp.U - (1 - md) * xw
            if spec.route is not None:
                y = torch.where(spec.route.unsqueeze(-1), y, out)
            return y

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
               explicit_delta: bool = False, **kw: Any) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Output with the given masks; matrices absent from ``masks`` use the frozen weight."""
        self._state = _State("mask", masks=masks, acts={} if record else None, act_fn=act_fn,
                             explicit_delta=explicit_delta)
        try:
            out = self.run_target(x, **kw)
            return (out, self._state.acts) if record else out
        finally:
            self._state = None

    def delta_l2(self) -> torch.Tensor:
        """Mean squared entry of Δ over all decomposed matrices."""
        tot = sum((c.delta() ** 2).sum() for c in self.components)
        n = sum(c.d_in * c.d_out for c in self.components)
        return tot / n

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
