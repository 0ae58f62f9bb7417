"""Read and write activation sites with torch hooks on the real HF modules (no re-implemented models).

* ``with capture(model, ["blocks.2.resid_post"]) as cache: model(ids)`` -> ``cache[name]`` is (B, T, d);
* ``run_with_cache(model, ids, sites)`` -> dict, stopping the forward pass after the last site; ``sites``
  may also be a name filter (a callable on names, as TransformerLens' ``names_filter``), or None for all;
* ``with edit(model, {"blocks.2.resid_post": fn}): ...`` where ``fn(act) -> new act`` (or None to keep);
  a function with a second parameter gets the :class:`~innards.models.sites.Site` too, as TransformerLens
  passes the hook: ``fn(act, hook)``.

Every hook is removed when the context exits, also on exceptions. Edits run before captures at
the same site (they are registered with ``prepend=True``), so a capture always sees edited values
whichever context is outer. Captures are copies, so later in-place operations of the model cannot
change them. Under ``model.generate`` with a KV cache each call sees only the new tokens: (B, T_new, d).
Capturing ``pattern`` runs attention eagerly for the duration (the only implementation that forms
the probabilities); ``pattern`` cannot be edited.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from innards.errors import InnardsError
from innards.models.sites import Site, expand_sites, list_sites, resolve_site

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EditFn = Callable[..., Union[torch.Tensor, None]]  # fn(act) or fn(act, site)
NameFilter = Callable[[str], bool]
Sites = Union[str, Site, Iterable[Union[str, Site]], NameFilter]
Positions = Union[int, Sequence[int], slice, None]


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured; caught by run_with_cache."""


def _site_arg(fn: EditFn) -> Literal["", "positional", "keyword"]:
    """How ``fn`` takes the Site, if at all: as a second positional argument or as ``hook=``."""
    try:
        # a module's __call__ takes *args; what it accepts is its forward's signature
        params = list(inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters.values())
    except (TypeError, ValueError):
        return ""
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params) or (
            len(pos) >= 2 and (pos[1].default is inspect.Parameter.empty or pos[1].name == "hook")):
        return "positional"
    if any(p.kind == p.VAR_KEYWORD or (p.kind == p.KEYWORD_ONLY and p.name == "hook") for p in params):
        return "keyword"
    return ""


def _with_site(fn: EditFn, site: Site) -> Callable[[torch.Tensor], torch.Tensor | None]:
    how = _site_arg(fn)
    if how == "positional":
        return lambda act: fn(act, site)
    if how == "keyword":
        return lambda act: fn(act, hook=site)
    return fn


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _register(model: PreTrainedModel, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None],
              prepend: bool = False) -> list[RemovableHandle]:
    """Hook ``fn`` on the site: it receives the site's tensor and may return a replacement (None keeps it)."""
    module = model.get_submodule(site.module_path)
    handles: list[RemovableHandle] = []
    lead: list[torch.Size] = []  # (B, T) of the block's input, for modules that see (B*T, F)
    if site.flat:
        def remember(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            lead[:] = [_hidden(args, kwargs).shape[:-1]]

        handles.append(model.get_submodule(site.block).register_forward_pre_hook(remember, with_kwargs=True, prepend=True))

    def through(x: torch.Tensor) -> torch.Tensor | None:
        act = site.split.read(x) if site.split is not None else x
        if site.flat:
            act = act.reshape(*lead[0], *act.shape[1:])
        if site.scale is not None:
            act = act * site.scale
        new = fn(act)
        if new is None:
            return None
        if site.scale is not None:
            new = new / site.scale
        if site.flat:
            new = new.reshape(x.shape[0], *new.shape[len(lead[0]):])
        return site.split.write(x, new) if site.split is not None else new

    if site.hook == "output":
        def on_output(mod: nn.Module, args: tuple, out: object) -> object:
            tup = isinstance(out, (tuple, list))
            x = out[site.item] if tup else out
            if not isinstance(x, torch.Tensor):
                raise InnardsError(f"{site.module_path} did not return the tensor of {site.name} "
                                   f"(got {type(x).__name__}); this attention implementation does not form it")
            new = through(x)
            if new is None:
                return None
            if not tup:
                return new
            items = list(out)
            items[site.item] = new
            return type(out)(items) if isinstance(out, list) else tuple(items)

        handles.append(module.register_forward_hook(on_output, prepend=prepend))
        return handles

    def on_input(mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if args:
            new = through(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = through(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True, prepend=prepend))
    return handles


def _named_sites(model: PreTrainedModel, sites: Sites | None) -> list[tuple[str, Site]]:
    """(key, Site) pairs: keys are the names as the caller spelled them; patterns expand to canonical names.

    A callable selects every site whose canonical or TransformerLens name it accepts (keyed by that name).
    """
    if sites is None:
        return [(s.name, s) for s in list_sites(model)]
    if callable(sites) and not isinstance(sites, Site):
        out = []
        for s in list_sites(model):
            key = s.name if sites(s.name) else s.tl_name if sites(s.tl_name) else None
            if key is not None:
                out.append((key, s))
        if not out:
            raise InnardsError("the name filter selects no site")
        return out
    items = [sites] if isinstance(sites, (str, Site)) else list(sites)
    if not items:
        raise InnardsError("no sites given")
    named: list[tuple[str, Site]] = []
    for item in items:
        if isinstance(item, str) and any(c in item for c in "*?["):
            named.extend((s.name, s) for s in expand_sites(model, item))
        else:
            s = resolve_site(model, item)
            named.append((item if isinstance(item, str) else s.name, s))
    return named


@contextmanager
def _attention_weights(model: PreTrainedModel, sites: Iterable[Site]) -> Iterator[None]:
    """Make attention modules return their probabilities while a ``pattern`` site is hooked."""
    patterns = [s for s in sites if s.kind == "pattern"]
    if not patterns:
        yield
        return
    def ask(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = inspect.signature(mod.forward).bind(*args, **kwargs)
        bound.arguments["output_attentions"] = True
        return bound.args, bound.kwargs

    handles = []
    for s in patterns:
        module = model.get_submodule(s.module_path)
        if "output_attentions" in inspect.signature(module.forward).parameters:  # older attention code asks for a flag
            handles.append(module.register_forward_pre_hook(ask, with_kwargs=True))
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = "eager"  # shared by every attention module and the mask builder
    try:
        yield
    finally:
        config._attn_implementation = old
        for h in handles:
            h.remove()


@contextmanager
def _hooks(model: PreTrainedModel, named: list[tuple[str, Site]], cache: dict, detach: bool,
           accumulate: bool, stop_when_full: bool) -> Iterator[dict]:
    handles: list[RemovableHandle] = []
    wanted = {key for key, _ in named}

    def recorder(key: str) -> Callable[[torch.Tensor], None]:
        def record(act: torch.Tensor) -> None:
            # a copy: some blocks add into a sub-layer's output in place (Falcon's parallel MLP)
            value = act.detach().clone() if detach else act.clone()
            if accumulate:
                cache.setdefault(key, []).append(value)
            else:
                cache[key] = value
            if stop_when_full and wanted.issubset(cache):
                raise _StopForward
        return record

    try:
        for key, site in named:
            handles += _register(model, site, recorder(key))
        with _attention_weights(model, [s for _, s in named]):
            yield cache
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model: PreTrainedModel, sites: Sites | None, detach: bool = True,
            accumulate: bool = False) -> Iterator[dict[str, torch.Tensor | list[torch.Tensor]]]:
    """Context manager yielding a dict filled by forward passes: site name -> (B, T, d) tensor.

    Several forward calls in the context keep the last value, or a list of all with ``accumulate``.
    Keys are the names as given (fnmatch patterns expand to canonical names).
    """
    named = _named_sites(model, sites)
    with _hooks(model, named, {}, detach, accumulate, stop_when_full=False) as cache:
        yield cache


def run_with_cache(model: PreTrainedModel, input_ids: torch.Tensor | Sequence, sites: Sites | None = None,
                   stop_early: bool = True, *, names_filter: Sites | None = None,
                   **forward_kwargs: object) -> dict[str, torch.Tensor]:
    """One no-grad forward pass returning {site: tensor}; with stop_early, stops after the last site.

    ``sites`` (or TransformerLens' ``names_filter``): names, patterns, a callable on names, or None for all.
    """
    if names_filter is not None:
        if sites is not None:
            raise InnardsError("give sites or names_filter, not both")
        sites = names_filter
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


def _checked(site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def run(act: torch.Tensor) -> torch.Tensor | None:
        new = fn(act)
        if new is not None and (not isinstance(new, torch.Tensor) or new.shape != act.shape):
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise InnardsError(f"edit of {site.name} returned {got}, expected a tensor of shape {tuple(act.shape)}")
        return new
    return run


def _register_edit(model: PreTrainedModel, site: Site, fn: EditFn) -> list[RemovableHandle]:
    run = _checked(site, _with_site(fn, site))
    if site.edit != "delta":
        return _register(model, site, run, prepend=True)
    # the block keeps resid_mid = resid_pre + attn_out in a variable, so edit it through attn_out
    pre = resolve_site(model, f"blocks.{site.layer}.resid_pre")
    attn = resolve_site(model, f"blocks.{site.layer}.attn_out")
    seen: list[torch.Tensor] = []

    def remember(act: torch.Tensor) -> None:
        seen[:] = [act]

    def through_attn(a: torch.Tensor) -> torch.Tensor | None:
        new = run(seen[0] + a)
        return None if new is None else new - seen[0]

    # appended, not prepended: it must see resid_pre after any edit of it
    return _register(model, pre, remember) + _register(model, attn, through_attn, prepend=True)


@contextmanager
def edit(model: PreTrainedModel, edits: Mapping[str | Site, EditFn]) -> Iterator[None]:
    """Context manager replacing each site's activation by ``fn(act)`` (or ``fn(act, site)``; None keeps it)."""
    named = [(key, s, fn) for key, fn in edits.items() for _, s in _named_sites(model, key)]
    for key, s, fn in named:
        if not callable(fn):
            raise InnardsError(f"edit for site '{key}' is not a function")
        if s.edit == "none":
            raise InnardsError(f"{s.name} can be read but not edited: the attention probabilities are formed "
                               "inside the attention function (edit q, k or z instead)")
    handles: list[RemovableHandle] = []
    try:
        for _, site, fn in named:
            handles += _register_edit(model, site, fn)
        yield
    finally:
        for h in handles:
            h.remove()


def _select(act: torch.Tensor, positions: Positions) -> slice | list[int]:
    """Index of the positions along T; ints outside the current call's length are skipped."""
    if positions is None:
        return slice(None)
    if isinstance(positions, slice):
        return positions
    t = act.shape[1]
    return [p for p in ([positions] if isinstance(positions, int) else positions) if -t <= p < t]


def add_vector(vec: torch.Tensor, scale: float = 1.0, positions: Positions = None) -> EditFn:
    """Edit function adding ``scale * vec`` (shape (d,)) at the given positions of every sequence.

    Positions index the current forward call: under ``generate`` with a KV cache, later calls see
    only new tokens, so ints past their length are skipped (use None to steer every token).
    """
    vec = torch.as_tensor(vec)

    def add(act: torch.Tensor) -> torch.Tensor:
        if vec.shape[-1] != act.shape[-1]:
            raise InnardsError(f"steering vector has width {vec.shape[-1]}, the site has {act.shape[-1]}")
        delta = (scale * vec).to(device=act.device, dtype=act.dtype)
        if positions is None:
            return act + delta
        out = act.clone()
        out[:, _select(act, positions)] += delta
        return out

    return add


def replace_with(value: torch.Tensor, positions: Positions = None) -> EditFn:
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
