"""The GLP denoiser: a single-token SwiGLU MLP stack with multiplicative timestep conditioning.

Architecture as published (glp-reference.md §2): input projection d_in -> d_model; n blocks of
pre-LayerNorm SwiGLU of width d_mlp whose gate pre-activation is multiplied by a per-block projection
of the timestep embedding, m = SiLU(g * c) * a; sinusoidal embedding (cosines first) of tau = 1000 t
through Linear-SiLU-Linear; final LayerNorm and output projection predicting the velocity eps - x.
Every Linear has a bias and PyTorch's default initialisation.

Two layouts differ from the reference only in how parameters are stored, not in the function or the
initial distribution: each block's up and gate projections are one Linear(d_model, 2 d_mlp), and the
blocks' time projections are one Linear(d_model, n_blocks d_mlp). Both keep fan_in = d_model, so
PyTorch's default init draws from the same distribution; fusing makes fewer, larger matmuls.

Multi-site variant: the embedding of the site's index i (position in ``meta["sites"]``) is added to
the time embedding, as the reference adds a layer embedding. The reference feeds depth in [0, 1] to
the max-period-10000 sinusoid, whose vectors for 16 layers have cosine similarity > 0.99; here the
sinusoid gets ``site_scale * i`` (100 by default), which keeps every pair of sites at cosine <= 0.44
however many sites there are, so the learned MLP starts from well separated inputs. A multi-layer GLP
of the reference (depth = layer / (n - 1)) is ``site_scale = 1 / (n - 1)`` (see ``glp/reference.py``).

Timesteps and site positions are scaled in float64 and rounded once to float32, so the network input
for a float32 time t is exactly the reference's float32 ``1000 * sigma``, and a float64 t = tau / 1000
gives tau back. ``from_pretrained`` also reads the reference's released layout and hub ids.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from innards import hub
from innards.errors import ChecksumError, InnardsError
from innards.glp import reference as ref
from innards.glp import schedule as sch
from innards.io import read_json, sha256_file, write_json
from innards.tensors import load_tensors, save_tensors

FORMAT = "innards-glp"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SAVE_FORMATS = ("innards", "reference")


class _NoSite:
    """Type of :data:`NO_SITE`."""

    def __repr__(self) -> str:
        return "NO_SITE"


# forward(z, t, site=NO_SITE): the network without any site embedding (the reference's layer_idx=None)
NO_SITE = _NoSite()


@dataclass
class GLPConfig:
    """Architecture of a GLP; widths default to the paper's rule d_model = 2 d_in, d_mlp = 4 d_in."""

    d_in: int
    n_blocks: int = 3
    d_model: int | None = None
    d_mlp: int | None = None
    n_sites: int = 1
    time_scale: float = 1000.0
    site_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.d_model is None:
            self.d_model = 2 * self.d_in
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_in
        for name in ("d_in", "n_blocks", "d_model", "d_mlp", "n_sites"):
            if int(getattr(self, name)) < 1:
                raise InnardsError(f"GLP {name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % 2:
            raise InnardsError(f"GLP d_model must be even (sinusoidal embedding), got {self.d_model}")

    @property
    def multi_site(self) -> bool:
        return self.n_sites > 1


def param_count_formula(d_in: int, n_blocks: int, d_model: int | None = None, d_mlp: int | None = None,
                        multi_site: bool = False) -> int:
    """Parameter count by the reference formula (glp-reference.md §2.3)."""
    dm = d_model or 2 * d_in
    dh = d_mlp or 4 * d_in
    n = 2 * d_in * dm + d_in + dm + 2 * (dm * dm + dm) + 2 * dm
    n += n_blocks * (3 * (dm * dh + dh) + dh * dm + dm + 2 * dm)
    if multi_site:
        n += 2 * (dm * dm + dm)
    return n


def sinusoid(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT-style embedding [cos(x f), sin(x f)] with f_k = exp(-ln(max_period) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    """Pre-LayerNorm SwiGLU block whose gate pre-activation is scaled by the time projection c."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.d_mlp = d_mlp
        self.norm = nn.LayerNorm(d_model)
        self.up_gate = nn.Linear(d_model, 2 * d_mlp)  # [a | g]
        self.down = nn.Linear(d_mlp, d_model)

    def hidden(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The meta-neurons m = SiLU(g * c) * a of this block."""
        a, g = self.up_gate(self.norm(h)).chunk(2, dim=-1)
        return F.silu(g * c) * a

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h + self.down(self.hidden(h, c))


class GLP(nn.Module):
    """Flow-matching meta-model of one (or several) activation sites; predicts the velocity eps - x."""

    def __init__(self, config: GLPConfig, meta: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        c = config
        self.in_proj = nn.Linear(c.d_in, c.d_model)
        self.time_embed = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.SiLU(), nn.Linear(c.d_model, c.d_model))
        self.site_embed = (nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.SiLU(), nn.Linear(c.d_model, c.d_model))
                           if c.multi_site else None)
        self.time_proj = nn.Linear(c.d_model, c.n_blocks * c.d_mlp)  # the blocks' c, fused
        self.blocks = nn.ModuleList(Block(c.d_model, c.d_mlp) for _ in range(c.n_blocks))
        self.out_norm = nn.LayerNorm(c.d_model)
        self.out_proj = nn.Linear(c.d_model, c.d_in)
        # float32 copies for the hot path; the float64 originals live in meta["stats_by_site"]
        self.register_buffer("norm_mean", torch.zeros(c.n_sites, c.d_in), persistent=False)
        self.register_buffer("norm_std", torch.ones(c.n_sites, c.d_in), persistent=False)
        self.meta: dict[str, Any] = {"model": None, "site": None, "sites": [], "d_in": c.d_in, "stats": None,
                                     "stats_by_site": {}, "index_convention": None, "training": {}}
        if meta:
            self.set_meta(meta)

    # ----- metadata and normalisation -------------------------------------------------------------
    def set_meta(self, meta: dict[str, Any]) -> None:
        """Attach provenance and normalisation statistics ({site: store.stats(site)})."""
        m = dict(self.meta)
        m.update({k: v for k, v in meta.items() if k != "stats_by_site"})
        stats = meta.get("stats_by_site") or {}
        sites = list(m.get("sites") or ([m["site"]] if m.get("site") else []))
        if sites and len(sites) != self.config.n_sites:
            raise InnardsError(f"GLP has {self.config.n_sites} site slot(s) but {len(sites)} site name(s) were given")
        m["sites"] = sites
        m["site"] = sites[0] if sites else None
        m["d_in"] = self.config.d_in
        by_site = {}
        for i, s in enumerate(sites):
            if s not in stats:
                continue
            st = _clean_stats(stats[s], self.config.d_in, s)
            by_site[s] = st
            self.norm_mean[i] = st["mean"].to(torch.float32)
            self.norm_std[i] = st["var"].clamp_min(1e-12).sqrt().to(torch.float32)
        if sites and by_site and len(by_site) != len(sites):
            raise InnardsError(f"normalisation statistics missing for site(s) {sorted(set(sites) - set(by_site))}")
        m["stats_by_site"] = by_site
        m["stats"] = by_site.get(sites[0]) if sites else None
        self.meta = m

    def site_index(self, site: int | str | torch.Tensor | None) -> int | torch.Tensor:
        """Index of a site (name or index) in this GLP's site list; None means the only site."""
        if site is None:
            if self.config.multi_site:
                raise InnardsError(f"this GLP models {self.config.n_sites} sites; say which (site=...)")
            return 0
        if isinstance(site, torch.Tensor):
            return site.long()
        if isinstance(site, str):
            if site not in self.meta["sites"]:
                raise InnardsError(f"this GLP was not trained on site '{site}' (it knows {', '.join(self.meta['sites']) or 'none'})")
            return self.meta["sites"].index(site)
        if not 0 <= int(site) < self.config.n_sites:
            raise InnardsError(f"site index {site} out of range for a GLP with {self.config.n_sites} site(s)")
        return int(site)

    def _stat(self, buf: torch.Tensor, site: Any, x: torch.Tensor) -> torch.Tensor:
        i = self.site_index(site)
        if isinstance(i, int):
            return buf[i]
        return buf[i.to(buf.device)].reshape(*x.shape[:-1], buf.shape[-1])

    def normalize(self, x: torch.Tensor, site: Any = None) -> torch.Tensor:
        """Per-dimension z-scoring (x - mean) / std in float32."""
        self._check_width(x)
        return (x.float() - self._stat(self.norm_mean, site, x)) / self._stat(self.norm_std, site, x)

    def denormalize(self, x: torch.Tensor, site: Any = None) -> torch.Tensor:
        """Inverse of :meth:`normalize` (float32)."""
        self._check_width(x)
        return x.float() * self._stat(self.norm_std, site, x) + self._stat(self.norm_mean, site, x)

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.config.d_in:
            raise InnardsError(f"activations have width {x.shape[-1]} but this GLP models width {self.config.d_in}")

    def check_compatible(self, model: Any, site: str, width: int | None = None) -> None:
        """Raise InnardsError unless this GLP was trained on ``model``'s ``site`` with this width."""
        src = self.meta.get("model") or {}
        want = _model_identity(model)
        have = src if isinstance(src, dict) else {"name": str(src)}
        if have.get("sha256") and want.get("sha256"):
            same = have["sha256"] == want["sha256"]
        else:
            names = {n for n in (want.get("name"), want.get("repo_id")) if n}
            same = bool(names & {n for n in (have.get("name"), have.get("path"), have.get("repo_id")) if n})
        if not same:
            raise InnardsError(f"this GLP was trained on model '{have.get('name')}', not '{want.get('name')}'")
        if site not in self.meta["sites"]:
            raise InnardsError(f"this GLP was trained on site {', '.join(self.meta['sites'])}, not '{site}'")
        if width is not None and int(width) != self.config.d_in:
            raise InnardsError(f"this GLP models width {self.config.d_in}, not {width}")

    # ----- the network ----------------------------------------------------------------------------
    def conditioning(self, t: torch.Tensor | float, site: Any = None, device: torch.device | None = None) -> torch.Tensor:
        """Per-block gate multipliers c (rows, n_blocks * d_mlp) from the time (and site) embedding."""
        device = device or self.in_proj.weight.device
        tt = t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)
        e = self.time_embed(sinusoid(_scaled(tt.reshape(-1), self.config.time_scale).to(device), self.config.d_model))
        if self.site_embed is not None and site is not NO_SITE:
            i = torch.as_tensor(self.site_index(site), device=device).reshape(-1)
            e = e + self.site_embed(sinusoid(_scaled(i, self.config.site_scale), self.config.d_model))
        return self.time_proj(e)

    def forward(self, z: torch.Tensor, t: torch.Tensor | float, site: Any = None) -> torch.Tensor:
        """Velocity v(z, t) for normalised noisy activations z (..., d_in); t in [0, 1], scalar or per row."""
        lead = z.shape[:-1]
        z2 = z.reshape(-1, z.shape[-1])
        t = _rows(t, lead, z.device)
        site = _rows(site, lead, z.device) if isinstance(site, torch.Tensor) else site
        cs = self.conditioning(t, site, z.device).chunk(self.config.n_blocks, dim=-1)
        h = self.in_proj(z2)
        for block, c in zip(self.blocks, cs):
            h = block(h, c)
        return self.out_proj(self.out_norm(h)).reshape(*lead, -1)

    def hidden_units(self, z: torch.Tensor, t: torch.Tensor | float, site: Any = None) -> torch.Tensor:
        """Every block's SwiGLU hidden units m on z (rows, n_blocks * d_mlp), one forward pass."""
        z2 = z.reshape(-1, z.shape[-1])
        lead = z2.shape[:-1]
        cs = self.conditioning(_rows(t, lead, z.device), _rows(site, lead, z.device) if isinstance(site, torch.Tensor) else site,
                               z.device).chunk(self.config.n_blocks, dim=-1)
        h = self.in_proj(z2)
        out = []
        for block, c in zip(self.blocks, cs):
            m = block.hidden(h, c)
            out.append(m)
            h = h + block.down(m)
        return torch.cat(out, dim=-1)

    def __repr__(self) -> str:
        """One line: what the GLP models, its size and how far it was trained (not nn.Module's module dump)."""
        src = self.meta.get("model")
        name = src.get("name") if isinstance(src, dict) else src
        c, tr = self.config, self.meta.get("training") or {}
        sites = self.meta.get("sites") or []
        site = sites[0] if len(sites) == 1 else (f"{len(sites)} sites" if sites else None)
        n = self.n_params
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"
        parts = [f"model={name!r}", f"site={site!r}", f"d_in={c.d_in}", f"blocks={c.n_blocks}", f"d_model={c.d_model}",
                 f"d_mlp={c.d_mlp}", f"params={size}"]
        if tr.get("activations") is not None:
            parts.append(f"trained_on={tr['activations']:,}")
        if isinstance(tr.get("val_loss"), (int, float)):
            parts.append(f"val_loss={tr['val_loss']:.4g}")
        return f"GLP({', '.join(parts)})"

    @property
    def source_model(self) -> str | None:
        """The model this GLP was trained on, as recorded: its folder when it still exists, else its name."""
        src = self.meta.get("model")
        if not isinstance(src, dict):
            return src
        path = src.get("path")
        return path if path and Path(path).exists() else src.get("name")

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def count_params(config: GLPConfig) -> int:
        """Parameters of a GLP with this config, counted on the meta device (nothing allocated)."""
        with torch.device("meta"):
            m = GLP(config)
        return sum(p.numel() for p in m.parameters())

    @property
    def device(self) -> torch.device:
        return self.in_proj.weight.device

    # ----- applications ---------------------------------------------------------------------------
    def _gen(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(int(seed))
        return g

    def _randn(self, shape: tuple[int, ...], gen: torch.Generator | None) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32)

    def _given_noise(self, noise: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        if noise is None:
            return None
        if noise.numel() != rows * self.config.d_in:
            raise InnardsError(f"noise has {noise.numel()} values, expected {rows} rows of width {self.config.d_in}")
        return noise.reshape(rows, self.config.d_in).to(device=self.device, dtype=torch.float32)

    def _velocity_fn(self, site: Any) -> sch.Velocity:
        # a scalar t per call: the time MLP runs on one row and broadcasts over the batch
        return lambda z, t: self(z, t, site)

    @torch.no_grad()
    def sample(self, n: int, steps: int = 100, solver: str = "euler", seed: int | None = None, site: Any = None,
               schedule: str = "uniform", batch_size: int = 16384, normalized: bool = False,
               progress: bool = False, noise: torch.Tensor | None = None, shift: float = 3.0) -> torch.Tensor:
        """Draw n activations (n, d_in), denormalised unless ``normalized``, integrating from t = 1 to 0.

        ``solver``: one of :data:`innards.glp.schedule.SOLVERS`; ``schedule``/``shift``: the time grid
        (:func:`innards.glp.schedule.sample_grid`; ``schedule="shift:2"`` is the same as ``shift=2``). A
        distilled student records the settings it was trained for in ``meta["student"]["sample"]``.
        ``noise``: the starting noise (n rows of d_in, any leading shape) instead of drawing it from ``seed``.
        """
        grid = sch.sample_grid(steps, schedule, shift)
        gen = self._gen(seed)
        eps = self._given_noise(noise, n)
        out = []
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            z = self._randn((b, self.config.d_in), gen) if eps is None else eps[i:i + b]
            z = sch.integrate(self._velocity_fn(site), z, grid, solver,
                              progress=f"sample {i + b}/{n}" if progress else None)
            out.append(z if normalized else self.denormalize(z, site))
        return torch.cat(out) if out else torch.empty(0, self.config.d_in, device=self.device)

    @torch.no_grad()
    def project(self, acts: torch.Tensor, t_start: float = 0.5, steps: int = 20, schedule: str = "exact",
                seed: int | None = None, site: Any = None, batch_size: int = 16384, solver: str = "euler",
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """SDEdit onto the learned manifold: normalise, noise to t_start, integrate to 0, denormalise.

        Any leading shape; the dtype and device of ``acts`` are kept. ``schedule="exact"`` follows the
        paper (linspace(t_start, 0, steps): steps - 1 evaluations); ``"grid"`` the reference code
        (t = 0.5, 20 steps -> start at 0.474211, 10 evaluations). ``noise``: the noise to use (one row
        per activation) instead of drawing it from ``seed``.
        """
        grid = sch.sdedit_grid(t_start, steps, schedule)
        if len(grid) < 2:
            return acts.clone()
        self._check_width(acts)
        flat = acts.reshape(-1, acts.shape[-1])
        gen = self._gen(seed)
        eps = self._given_noise(noise, flat.shape[0])
        out = []
        for i in range(0, flat.shape[0], batch_size):
            si = _chunk(site, i, batch_size)
            x = self.normalize(flat[i:i + batch_size].to(self.device), si)
            e = self._randn(tuple(x.shape), gen) if eps is None else eps[i:i + batch_size]
            z, _ = sch.flow_matching_inputs(x, e, grid[0])
            z = sch.integrate(self._velocity_fn(si), z, grid, solver)
            out.append(self.denormalize(z, si))
        y = torch.cat(out) if out else flat.float()
        return y.to(device=acts.device, dtype=acts.dtype).reshape(acts.shape)

    def flow_matching_loss(self, acts: torch.Tensor, t: torch.Tensor | float, eps: torch.Tensor, site: Any = None) -> torch.Tensor:
        """The training objective per row (glp-reference.md §3.1): x = normalise(acts), z_t = (1 - t) x + t eps,
        mean over dims of (v(z_t, t) - (eps - x))^2, in float32 (also under autocast). Differentiable; the
        trainer, its validation loss and :meth:`loss` all call this one function."""
        x = self.normalize(acts, site)
        z, target = sch.flow_matching_inputs(x, eps, t)
        return (self(z, t, site).float() - target).pow(2).mean(-1)

    @torch.no_grad()
    def loss(self, acts: torch.Tensor, t: float | torch.Tensor, seed: int | None = None, site: Any = None,
             batch_size: int = 16384, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample flow-matching loss mean((v(z_t, t) - (eps - x))^2) over dims, shape acts.shape[:-1].

        ``noise``: eps (one row per activation) instead of drawing it from ``seed``.
        """
        self._check_width(acts)
        flat = acts.reshape(-1, acts.shape[-1])
        tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        tt = tt.expand(flat.shape[0]) if tt.numel() == 1 else tt.reshape(-1)
        if tt.numel() != flat.shape[0]:
            raise InnardsError(f"t must be a scalar or one value per activation ({flat.shape[0]}), got {tt.numel()}")
        gen = self._gen(seed)
        given = self._given_noise(noise, flat.shape[0])
        out = []
        for i in range(0, flat.shape[0], batch_size):
            si = _chunk(site, i, batch_size)
            a = flat[i:i + batch_size].to(self.device)
            ti = tt[i:i + batch_size].to(self.device)
            eps = self._randn(tuple(a.shape), gen) if given is None else given[i:i + batch_size]
            out.append(self.flow_matching_loss(a, ti, eps, si))
        y = torch.cat(out) if out else torch.empty(0, device=self.device)
        return y.reshape(acts.shape[:-1])

    @torch.no_grad()
    def typicality(self, acts: torch.Tensor, n_t: int = 10, seed: int = 0, site: Any = None) -> torch.Tensor:
        """Mean denoising loss over the fixed grid t = (k + 1/2) / n_t (seeded): low = typical."""
        total = None
        for k in range(n_t):
            lk = self.loss(acts, (k + 0.5) / n_t, seed=seed + k, site=site)
            total = lk if total is None else total + lk
        return total / n_t

    @torch.no_grad()
    def meta_neurons(self, acts: torch.Tensor, t: float = 0.1, seed: int = 0, site: Any = None,
                     batch_size: int = 4096) -> torch.Tensor:
        """SwiGLU hidden units of every block on the input noised to t: (N, n_blocks * d_mlp)."""
        self._check_width(acts)
        flat = acts.reshape(-1, acts.shape[-1])
        gen = self._gen(seed)
        out = []
        for i in range(0, flat.shape[0], batch_size):
            si = _chunk(site, i, batch_size)
            x = self.normalize(flat[i:i + batch_size].to(self.device), si)
            z = (1.0 - t) * x + t * self._randn(tuple(x.shape), gen)
            out.append(self.hidden_units(z, t, si))
        return torch.cat(out) if out else torch.empty(0, self.config.n_blocks * self.config.d_mlp, device=self.device)

    # ----- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, training: dict[str, Any] | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None, format: str = "innards") -> Path:
        """Write the GLP: innards' layout (model.safetensors with float64 statistics, config.json written
        last), or with ``format="reference"`` the reference's (config.yaml, final.safetensors, rep_statistics.pt)."""
        if format not in SAVE_FORMATS:
            raise InnardsError(f"unknown GLP format '{format}' (choose {', '.join(SAVE_FORMATS)})")
        if format == "reference":
            return ref.write_folder(self, path, state_dict)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu() for k, v in (state_dict or self.state_dict()).items()}
        stats_meta = []
        for s in self.meta["sites"]:
            st = self.meta["stats_by_site"].get(s)
            if st is None:
                continue
            tensors[f"stats.{s}.mean"] = st["mean"].to(torch.float64)
            tensors[f"stats.{s}.var"] = st["var"].to(torch.float64)
            stats_meta.append({"site": s, **{k: v for k, v in st.items() if k not in ("mean", "var")}})
        digest = save_tensors(out / WEIGHTS, tensors, metadata={"format": FORMAT})
        cfg = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "architecture": dataclasses.asdict(self.config),
            "n_params": self.n_params,
            "d_in": self.config.d_in,
            "source_model": self.meta.get("model"),
            "site": self.meta.get("site"), "sites": self.meta["sites"],
            "site_info": self.meta.get("site_info"),
            "index_convention": self.meta.get("index_convention"),
            "stats": stats_meta,
            "training": training if training is not None else self.meta.get("training", {}),
            **({"student": self.meta["student"]} if self.meta.get("student") else {}),
            "files": {WEIGHTS: {"sha256": digest, "bytes": (out / WEIGHTS).stat().st_size}},
        }
        write_json(out / CONFIG, cfg)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, *, revision: str | None = None,
                        checkpoint: str | None = None, cache_dir: str | Path | None = None,
                        restats: str | Path | None = None) -> "GLP":
        """Load a GLP: an innards folder, a folder in the reference's released layout, or a hub id of either.

        ``path``: a folder or ``org/name[@revision]`` (the Hugging Face cache first; downloads only the
        files of the one checkpoint asked for, and nothing when HF_HUB_OFFLINE is set). ``checkpoint``:
        ``final`` (default), a reference ``epoch_XXXX`` or an innards ``step_XXXXXXX``. ``restats``: an
        activation store whose whole-store statistics replace the checkpoint's (see glp/reference.py).
        """
        r = hub.resolve(path, what="GLP", revision=revision, patterns=_hub_patterns(checkpoint), cache=cache_dir,
                        complete=lambda d: _loadable(d, checkpoint))
        p = r.path
        if not p.is_dir():
            raise InnardsError(f"not a GLP folder (not a directory): {p}")
        if (p / CONFIG).is_file():
            model = cls._load_innards(_innards_checkpoint(p, checkpoint))
        elif (p / ref.CONFIG).is_file():
            arch, tensors, meta = ref.load_folder(p, checkpoint)
            model = cls(GLPConfig(**arch))
            try:
                model.load_state_dict(tensors)
            except RuntimeError as e:
                raise InnardsError(f"reference GLP {p}: the checkpoint does not fit config.yaml's architecture "
                                   f"({str(e).splitlines()[-1].strip()[:160]})") from None
            model.set_meta(meta)
            model.eval()
        else:
            raise InnardsError(f"not a GLP folder (no {CONFIG} or {ref.CONFIG}): {p}")
        if r.repo_id:
            model.meta["hub"] = r.source()
        if restats is not None:
            ref.restats(model, restats)
        if device is not None:
            model.to(device)
        return model

    @classmethod
    def _load_innards(cls, p: Path) -> "GLP":
        """Load a folder written by save_pretrained(format="innards"), checksums verified."""
        if not (p / CONFIG).is_file():
            raise InnardsError(f"not a GLP folder (no {CONFIG}): {p}")
        cfg = read_json(p / CONFIG, what="GLP config")
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise InnardsError(f"not a GLP folder ({CONFIG} is not an innards GLP config): {p}")
        if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
            raise InnardsError(f"GLP folder {p} has format version {cfg['format_version']}; this innards reads up to {FORMAT_VERSION}")
        info = (cfg.get("files") or {}).get(WEIGHTS) or {}
        wpath = p / WEIGHTS
        if not wpath.is_file():
            raise InnardsError(f"GLP folder {p} has no {WEIGHTS}")
        if info.get("bytes") is not None and wpath.stat().st_size != info["bytes"]:
            raise ChecksumError(f"GLP checkpoint {wpath} is truncated or corrupted ({wpath.stat().st_size} bytes, expected {info['bytes']})")
        tensors = load_tensors(wpath, sha256=info.get("sha256"), what="GLP checkpoint")
        try:
            arch = GLPConfig(**cfg["architecture"])
        except (TypeError, KeyError) as e:
            raise InnardsError(f"GLP config {p / CONFIG} has a bad architecture entry ({e})") from None
        stats_by_site = {}
        for st in cfg.get("stats") or []:
            s = st["site"]
            try:
                stats_by_site[s] = {**st, "mean": tensors.pop(f"stats.{s}.mean"), "var": tensors.pop(f"stats.{s}.var")}
            except KeyError:
                raise InnardsError(f"GLP checkpoint {wpath} lacks the statistics of site '{s}'") from None
            stats_by_site[s].pop("site", None)
        model = cls(arch)
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError as e:  # a size mismatch: config.json's architecture was edited or belongs to other weights
            raise InnardsError(f"GLP checkpoint {wpath} does not match the architecture in {p / CONFIG} "
                               f"({str(e).splitlines()[-1].strip()[:160]})") from None
        if missing or unexpected:
            raise InnardsError(f"GLP checkpoint {wpath} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.set_meta({"model": cfg.get("source_model"), "sites": cfg.get("sites") or [], "site_info": cfg.get("site_info"),
                        "index_convention": cfg.get("index_convention"), "training": cfg.get("training") or {},
                        "stats_by_site": stats_by_site, **({"student": cfg["student"]} if cfg.get("student") else {})})
        model.eval()
        return model


def _innards_checkpoint(p: Path, checkpoint: str | None) -> Path:
    """The folder of an innards checkpoint: the GLP itself for final, else checkpoints/<name>."""
    d = _checkpoint_dir(p, checkpoint)
    if d != p and not (d / CONFIG).is_file():
        have = sorted(q.parent.name for q in (p / "checkpoints").glob(f"*/{CONFIG}"))
        raise InnardsError(f"GLP {p} has no checkpoint '{d.name}' (it has: {', '.join(have) or 'none'})")
    return d


def _checkpoint_dir(d: Path, checkpoint: str | None) -> Path:
    if not checkpoint or checkpoint == "final":
        return d
    return d / "checkpoints" / checkpoint.strip().removeprefix("checkpoints/")


def _hub_patterns(checkpoint: str | None) -> list[str]:
    """Files to fetch from a GLP hub repo of either layout, for one checkpoint."""
    c = _checkpoint_dir(Path(), checkpoint)
    mine = [CONFIG, WEIGHTS] if c == Path() else [CONFIG, f"{c.as_posix()}/{CONFIG}", f"{c.as_posix()}/{WEIGHTS}"]
    return mine + ref.hub_patterns(checkpoint)


def _loadable(d: Path, checkpoint: str | None) -> bool:
    """Whether a cached snapshot already holds the files for this checkpoint (either layout)."""
    if (d / CONFIG).is_file():
        c = _checkpoint_dir(d, checkpoint)
        return (c / CONFIG).is_file() and (c / WEIGHTS).is_file()
    return all((d / f).is_file() for f in ref.hub_patterns(checkpoint))


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x * scale rounded once to float32 (a float64 product: exact for float32 x, and tau / 1000 * 1000 = tau)."""
    if x.device.type == "mps":  # no float64 there
        return x.float() * scale
    return (x.double() * scale).float()


def _chunk(site: Any, i: int, n: int) -> Any:
    """The slice of a per-row site tensor that goes with rows i..i+n (a single site passes through)."""
    if isinstance(site, torch.Tensor) and site.numel() > 1:
        return site.reshape(-1)[i:i + n]
    return site


def _rows(v: Any, lead: tuple[int, ...] | torch.Size, device: torch.device) -> Any:
    """A scalar stays one value (broadcast); a tensor with one value per row is flattened to rows."""
    if v is None or isinstance(v, (int, float, str)):
        return v
    v = torch.as_tensor(v, device=device)
    if v.numel() == 1:
        return v.reshape(1)
    n = math.prod(lead)
    if v.numel() != n:
        raise InnardsError(f"expected one value per activation ({n}), got {v.numel()}")
    return v.reshape(n)


def _clean_stats(st: dict[str, Any], d: int, site: str) -> dict[str, Any]:
    mean = torch.as_tensor(st["mean"], dtype=torch.float64).reshape(-1)
    var = torch.as_tensor(st["var"], dtype=torch.float64).reshape(-1)
    if mean.numel() != d or var.numel() != d:
        raise InnardsError(f"statistics of site '{site}' have width {mean.numel()}, the GLP models {d}")
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise InnardsError(f"statistics of site '{site}' are not finite (NaN or inf activations in the data?)")
    out = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in st.items() if k not in ("mean", "var")}
    out["mean"], out["var"] = mean, var
    out.setdefault("rms_norm", float(torch.sqrt((mean ** 2 + var).sum())))
    return out


def _model_identity(model: Any) -> dict[str, Any]:
    if isinstance(model, dict):
        return model
    if isinstance(model, (str, Path)):
        return {"name": str(model)}
    src = getattr(model, "innards_source", None)
    if isinstance(src, dict):
        return src
    return {"name": getattr(getattr(model, "config", None), "_name_or_path", None)}


def file_sha256(path: str | Path, checkpoint: str | None = None, revision: str | None = None) -> str:
    """SHA-256 of a GLP's weights file, for a folder of either layout or a hub id (for provenance records)."""
    d = hub.resolve(path, what="GLP", revision=revision, patterns=_hub_patterns(checkpoint),
                    complete=lambda x: _loadable(x, checkpoint)).path
    if (d / CONFIG).is_file():
        return sha256_file(_innards_checkpoint(d, checkpoint) / WEIGHTS)
    w = d / f"{ref.checkpoint_name(checkpoint)}.safetensors"
    if not w.is_file():
        raise InnardsError(f"no GLP weights at {w}")
    return sha256_file(w)
