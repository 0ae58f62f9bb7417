"""Typed configs: dataclasses loadable from YAML, every field overridable from the command line.

Precedence: dataclass defaults < ``--config FILE.yaml`` < ``--field value`` flags < trailing
``key=value`` overrides (dotted keys reach nested dataclasses). The resolved config is saved
next to every output with :func:`save_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from innards.errors import InnardsError

T = TypeVar("T")
_UNSET = object()


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, with a one-line error."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise InnardsError(f"config field '{name}' may not be empty")
    origin = typing.get_origin(tp)
    try:
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise InnardsError(f"config field '{name}' must be a mapping")
            return from_dict(tp, value, prefix=f"{name}.")
        if origin in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            out = [_coerce(v, inner, name) for v in value]
            return out if origin is list else tuple(out)
        if origin is dict:
            if not isinstance(value, dict):
                raise InnardsError(f"config field '{name}' must be a mapping")
            return dict(value)
        if origin is typing.Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                raise InnardsError(f"config field '{name}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(float(value)) if ("e" in value.lower() and float(value).is_integer()) else int(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if tp is Any:
            return value
        return tp(value)
    except InnardsError:
        raise
    except (TypeError, ValueError):
        raise InnardsError(f"config field '{name}': cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a dataclass from a (possibly partial) dict, refusing unknown keys."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InnardsError(
            f"unknown config key '{prefix}{unknown[0]}' (valid: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def apply_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with dotted-key overrides applied (``a.b=1``)."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise InnardsError(f"unknown config key '{key}'")
            node = node[p]
        if parts[-1] not in node:
            raise InnardsError(f"unknown config key '{key}' (valid: {', '.join(sorted(node))})")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise InnardsError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InnardsError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InnardsError(f"config file {p} must hold a mapping")
    return data


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, list[str]] | None = None) -> None:
    """Add one ``--flag`` per dataclass field (defaults left to the dataclass)."""
    aliases = aliases or {}
    hints = _field_types(cls)
    helps = getattr(cls, "__field_help__", {})
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            continue  # nested configs are reached with key=value overrides
        flags = [_flag(f.name), *aliases.get(f.name, [])]
        kw: dict[str, Any] = dict(dest=f.name, default=_UNSET, help=helps.get(f.name))
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            kw["action"] = "append"  # repeatable; comma lists also accepted
            kw["default"] = None
            kw["metavar"] = f.name.upper()
        elif origin is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
        else:
            kw["metavar"] = f.name.upper()
        parser.add_argument(*flags, **kw)


def resolve(cls: type[T], ns: argparse.Namespace, overrides: list[str] | None = None, base: T | None = None) -> T:
    """Merge defaults, an optional YAML file, explicit flags and ``key=value`` overrides."""
    data: dict[str, Any] = to_dict(base) if base is not None else {}
    cfg_file = getattr(ns, "config", None)
    if cfg_file:
        data.update(load_yaml(cfg_file))
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, _UNSET)
        if v is _UNSET or v is None:
            continue
        tp, _ = _strip_optional(hints[f.name])
        if typing.get_origin(tp) in (list, tuple):
            v = [item for chunk in v for item in str(chunk).split(",") if item != ""]
        data[f.name] = v
    cfg = from_dict(cls, data)
    kv = {}
    for item in overrides or []:
        if "=" not in item:
            raise InnardsError(f"unexpected argument '{item}' (overrides are key=value)")
        k, v = item.split("=", 1)
        kv[k] = yaml.safe_load(v) if v else ""
    return apply_overrides(cfg, kv) if kv else cfg


def command(
    cls: type[T],
    fn: Callable[[T], Any],
    argv: list[str] | None,
    prog: str,
    description: str,
    aliases: dict[str, list[str]] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Run ``fn(config)`` from the command line; InnardsError and OSError become exit 2."""
    from innards.cli import run_guarded

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file with config values (flags override it)")
    add_arguments(parser, cls, aliases)
    if extra:
        extra(parser)

    def go() -> Any:
        ns, rest = parser.parse_known_args(argv)
        bad = [r for r in rest if r.startswith("-")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        cfg = resolve(cls, ns, rest)
        return fn(cfg)

    return run_guarded(go)
