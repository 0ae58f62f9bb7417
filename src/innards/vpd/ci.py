"""Causal-importance functions: inputs of the decomposed matrices -> CI logits per subcomponent."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from innards.vpd.components import Decomposition
from innards.vpd.config import CIConfig


class _CompMLP(torch.autograd.Function):
    """Fused per-component MLP z_c = Σ_g w2[c,g]·gelu(h_c·w1[c,g] + b1[c,g]) + b2[c] in a (C, G, N) layout.

    Hand-written backward: autograd's broadcasting version spends most of a TMS step in strided
    elementwise kernels; batched matmuls over the component axis are about twice as fast.
    """

    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2):  # type: ignore[override]
        ht = h.t().contiguous().unsqueeze(1)  # (C, 1, N): the batch axis innermost keeps kernels contiguous
        pre = torch.addcmul(b1.unsqueeze(-1), w1.unsqueeze(-1), ht)  # (C, G, N)
        a = F.gelu(pre)
        z = torch.bmm(w2.unsqueeze(1), a).squeeze(1).t() + b2  # (N, C)
        ctx.save_for_backward(ht, pre, a, w1, w2)
        return z

    @staticmethod
    def backward(ctx, dz):  # type: ignore[override]
        ht, pre, a, w1, w2 = ctx.saved_tensors
        dzt = dz.t().contiguous().unsqueeze(1)  # (C, 1, N)
        dw2 = torch.bmm(a, dzt.transpose(1, 2)).squeeze(-1)
        db2 = dz.sum(0)
        dpre = torch.ops.aten.gelu_backward(w2.unsqueeze(-1) * dzt, pre)
        dh = torch.bmm(w1.unsqueeze(1), dpre).squeeze(1).t()
        dw1 = torch.bmm(dpre, ht.transpose(1, 2)).squeeze(-1)
        db1 = dpre.sum(-1)
        return dh, dw1, db1, dw2, db2


def component_mlp(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Per-component scalar MLPs on h (..., C) -> CI logits (..., C), in fp32 also under autocast.

    The kernel is elementwise-bound (bf16 is not faster there on CPU); h may arrive in bf16 from an autocast x·V.
    """
    lead = h.shape[:-1]
    with torch.autocast(device_type=h.device.type, enabled=False):
        z = _CompMLP.apply(h.float().reshape(-1, h.shape[-1]), w1, b1, w2, b2)
    return z.reshape(*lead, -1)


class PerComponentMLP(nn.Module):
    """One tiny MLP per subcomponent on its scalar inner activation x·V_c (1 -> d_gate -> 1, GELU)."""

    def __init__(self, decomp: Decomposition, d_gate: int, generator: torch.Generator):
        super().__init__()
        self.names = list(decomp.names)
        self.w1 = nn.ParameterList()
        self.b1 = nn.ParameterList()
        self.w2 = nn.ParameterList()
        self.b2 = nn.ParameterList()
        for c in decomp.components:
            # Kaiming-normal: ReLU gain on the hidden layer (fan_in 1), linear gain on the output
            self.w1.append(nn.Parameter(torch.randn(c.C, d_gate, generator=generator) * math.sqrt(2.0)))
            self.b1.append(nn.Parameter(torch.zeros(c.C, d_gate)))
            self.w2.append(nn.Parameter(torch.randn(c.C, d_gate, generator=generator) / math.sqrt(d_gate)))
            self.b2.append(nn.Parameter(torch.zeros(c.C)))

    def forward(self, inputs: dict[str, torch.Tensor], decomp: Decomposition, detach: bool = False,
                h: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if h is None:
            h = decomp.inner(inputs)
        out = {}
        for i, c in enumerate(decomp.components):
            hc = h[c.name].detach() if detach else h[c.name]
            out[c.name] = component_mlp(hc, self.w1[i], self.b1[i], self.w2[i], self.b2[i])
        return out


def _mlp(d_in: int, hidden: list[int], d_out: int, generator: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = [d_in, *hidden]
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b)
        _kaiming(lin, math.sqrt(2.0), generator)
        layers += [lin, nn.GELU()]
    last = nn.Linear(dims[-1], d_out)
    _kaiming(last, 1.0, generator)
    layers.append(last)
    return nn.Sequential(*layers)


def _kaiming(lin: nn.Linear, gain: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * gain / math.sqrt(lin.in_features))
        lin.bias.zero_()


class LayerwiseMLP(nn.Module):
    """One MLP per matrix on the matrix's full input vector: d_in -> hidden -> C."""

    def __init__(self, decomp: Decomposition, hidden: list[int], generator: torch.Generator):
        super().__init__()
        self.mlps = nn.ModuleList([_mlp(c.d_in, hidden, c.C, generator) for c in decomp.components])

    def forward(self, inputs: dict[str, torch.Tensor], decomp: Decomposition, detach: bool = False,
                h: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return {c.name: mlp(inputs[c.name].float()) for c, mlp in zip(decomp.components, self.mlps)}


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMS norm with eps = fp32 machine epsilon."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE on (B, H, T, hd)."""
    T, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    inv = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    ang = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, rope_base: float):
        super().__init__()
        self.heads, self.rope_base = heads, rope_base
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(rms_norm(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, self.rope_base), _rope(k, self.rope_base)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU SDPA in bf16 is several times slower than in fp32; plain matmuls in bf16 are the fastest
            att = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, -1)
            a = att.to(v.dtype) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # bidirectional on purpose
        x = x + self.o(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(rms_norm(x))))


class SharedTransformer(nn.Module):
    """One bidirectional transformer over the RMS-normalised, concatenated inputs of all matrices (sorted)."""

    def __init__(self, decomp: Decomposition, cfg: CIConfig):
        super().__init__()
        self.order = sorted(range(len(decomp.names)), key=lambda i: decomp.names[i])
        D = sum(decomp.components[i].d_in for i in self.order)
        self.sizes = [decomp.components[i].C for i in self.order]
        self.inp = nn.Linear(D, cfg.d_model)
        self.blocks = nn.ModuleList([_Block(cfg.d_model, cfg.n_heads, cfg.d_ffn, cfg.rope_base) for _ in range(cfg.n_layers)])
        self.out = nn.Linear(cfg.d_model, sum(self.sizes))

    def forward(self, inputs: dict[str, torch.Tensor], decomp: Decomposition, detach: bool = False,
                h: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        names = [decomp.names[i] for i in self.order]
        x = torch.cat([rms_norm(inputs[n].float()) for n in names], -1)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
        z = self.out(h)
        if squeeze:
            z = z.squeeze(1)
        return dict(zip(names, z.split(self.sizes, -1)))


def build_ci(decomp: Decomposition, cfg: CIConfig, seed: int = 0) -> nn.Module:
    """The CI function named by the config."""
    gen = torch.Generator().manual_seed(seed + 1)
    if cfg.kind == "mlp":
        ci: nn.Module = PerComponentMLP(decomp, cfg.hidden[0] if cfg.hidden else 16, gen)
    elif cfg.kind == "layerwise_mlp":
        ci = LayerwiseMLP(decomp, list(cfg.hidden), gen)
    else:
        with torch.random.fork_rng():  # default Linear init draws from the global generator
            torch.manual_seed(seed + 1)
            ci = SharedTransformer(decomp, cfg)
    dev = decomp.components[0].V.device
    return ci.to(dev)
