"""Read and write activation sites with torch hooks on the real HF modules (no re-implemented models).

* ``with capture(model, ["blocks.2.resid_post"]) as cache: model(ids)`` -> ``cache[name]`` is (B, T, d);
* ``run_with_cache(model, ids, sites)`` -> dict, stopping the forward pass after the last site;
* ``with edit(model, {"blocks.2.resid_post": fn}): ...`` where ``fn(act) -> new act`` (or None to keep).

Every hook is removed when the context exits, also on exceptions. Edits run before captures at
the same site (they are registered with ``prepend=True``), so a capture always sees edited values
whichever context is outer. Under ``model.generate`` with a KV cache each call sees only the new
tokens: (B, T_new, d).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from innards.errors import InnardsError
from innards.models.sites import KINDS, Site, expand_sites, resolve_site

EditFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured; caught by run_with_cache."""


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _with_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    return new


def _register(model: nn.Module, site: Site, fn: EditFn, prepend: bool = False) -> torch.utils.hooks.RemovableHandle:
    """Hook ``fn`` on the site's module: it receives the activation and may return a replacement."""
    module = model.get_submodule(site.module_path)
    if site.hook == "output":
        def on_output(mod: nn.Module, args: Any, out: Any) -> Any:
            new = fn(_first(out))
            return None if new is None else _with_first(out, new)

        return module.register_forward_hook(on_output, prepend=prepend)

    def on_input(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return module.register_forward_pre_hook(on_input, with_kwargs=True, prepend=prepend)


def _named_sites(model: nn.Module, sites: str | Site | Iterable[str | Site]) -> list[tuple[str, Site]]:
    """(key, Site) pairs: keys are the names as the caller spelled them; patterns expand to canonical names."""
    items = [sites] if isinstance(sites, (str, Site)) else list(sites)
    if not items:
        raise InnardsError("no sites given")
    out: list[tuple[str, Site]] = []
    for item in items:
        if isinstance(item, str) and any(c in item for c in "*?["):
            out.extend((s.name, s) for s in expand_sites(model, item))
        else:
            s = resolve_site(model, item)
            out.append((item if isinstance(item, str) else s.name, s))
    return out


@contextmanager
def _hooks(model: nn.Module, named: list[tuple[str, Site]], cache: dict, detach: bool,
           accumulate: bool, stop_when_full: bool) -> Iterator[dict]:
    handles = []
    wanted = {key for key, _ in named}

    def recorder(key: str) -> EditFn:
        def record(act: torch.Tensor) -> None:
            value = act.detach() if detach else act
            if accumulate:
                cache.setdefault(key, []).append(value)
            else:
                cache[key] = value
            if stop_when_full and wanted.issubset(cache):
                raise _StopForward
        return record

    try:
        for key, site in named:
            handles.append(_register(model, site, recorder(key)))
        yield cache
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model: nn.Module, sites: str | Site | Iterable[str | Site], detach: bool = True,
            accumulate: bool = False) -> Iterator[dict[str, Any]]:
    """Context manager yielding a dict filled by forward passes: site name -> (B, T, d) tensor.

    Several forward calls in the context keep the last value, or a list of all with ``accumulate``.
    Keys are the names as given (fnmatch patterns expand to canonical names).
    """
    named = _named_sites(model, sites)
    with _hooks(model, named, {}, detach, accumulate, stop_when_full=False) as cache:
        yield cache


def _order(site: Site) -> tuple[int, int]:
    return site.layer, KINDS.index(site.kind)


def run_with_cache(model: nn.Module, input_ids: torch.Tensor | Sequence, sites: str | Site | Iterable[str | Site],
                   stop_early: bool = True, **forward_kwargs: Any) -> dict[str, torch.Tensor]:
    """One no-grad forward pass returning {site: (B, T, d)}; with stop_early, stops after the last site."""
    named = _named_sites(model, sites)
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = ids.to(device)
    if getattr(model.config, "is_encoder_decoder", False) is False and hasattr(model.config, "use_cache"):
        forward_kwargs.setdefault("use_cache", False)  # a KV cache would only cost memory here
    cache: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _hooks(model, named, cache, True, False, stop_when_full=stop_early):
        try:
            model(input_ids=ids, **forward_kwargs)
        except _StopForward:
            pass
    missing = [key for key, _ in named if key not in cache]
    if missing:
        raise InnardsError(f"sites not reached by the forward pass: {', '.join(missing)}")
    return cache


@contextmanager
def edit(model: nn.Module, edits: Mapping[str | Site, EditFn]) -> Iterator[None]:
    """Context manager replacing each site's activation by ``fn(act)`` (act is (B, T, d); None keeps it)."""
    named = [(key, s, fn) for key, fn in edits.items() for _, s in _named_sites(model, key)]
    for key, _, fn in named:
        if not callable(fn):
            raise InnardsError(f"edit for site '{key}' is not a function")
    handles = []

    def checked(site: Site, fn: EditFn) -> EditFn:
        def run(act: torch.Tensor) -> torch.Tensor | None:
            new = fn(act)
            if new is not None and (not isinstance(new, torch.Tensor) or new.shape != act.shape):
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise InnardsError(f"edit of {site.name} returned {got}, expected a tensor of shape {tuple(act.shape)}")
            return new
        return run

    try:
        for _, site, fn in named:
            handles.append(_register(model, site, checked(site, fn), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _select(act: torch.Tensor, positions: int | Sequence[int] | slice | None) -> Any:
    """Index of the positions along T; ints outside the current call's length are skipped."""
    if positions is None:
        return slice(None)
    if isinstance(positions, slice):
        return positions
    t = act.shape[1]
    keep = [p for p in ([positions] if isinstance(positions, int) else positions) if -t <= p < t]
    return keep


def add_vector(vec: torch.Tensor, scale: float = 1.0, positions: int | Sequence[int] | slice | None = None) -> EditFn:
    """Edit function adding ``scale * vec`` (shape (d,)) at the given positions of every sequence.

    Positions index the current forward call: under ``generate`` with a KV cache, later calls see
    only new tokens, so ints past their length are skipped (use None to steer every token).
    """
    vec = torch.as_tensor(vec)

    def add(act: torch.Tensor) -> torch.Tensor:
        if vec.shape[-1] != act.shape[-1]:
            raise InnardsError(f"steering vector has width {vec.shape[-1]}, the site has {act.shape[-1]}")
        delta = (scale * vec).to(device=act.device, dtype=act.dtype)
        idx = _select(act, positions)
        if positions is None:
            return act + delta
        out = act.clone()
        out[:, idx] += delta
        return out

    return add


def replace_with(value: torch.Tensor, positions: int | Sequence[int] | slice | None = None) -> EditFn:
    """Edit function replacing the activation by ``value`` (broadcast to (B, T, d)) at the positions."""
    value = torch.as_tensor(value)

    def replace(act: torch.Tensor) -> torch.Tensor:
        idx = _select(act, positions)
        out = act.clone()
        target = out[:, idx]
        try:
            out[:, idx] = torch.broadcast_to(value.to(device=act.device, dtype=act.dtype), target.shape)
        except RuntimeError:
            raise InnardsError(f"replacement of shape {tuple(value.shape)} does not fit activations {tuple(target.shape)}") from None
        return out

    return replace
