"""Typed configs: nested dataclasses, loadable from YAML, every field a command-line flag.

Precedence: dataclass defaults < ``--config FILE.yaml`` < ``--flag value`` < trailing ``key=value``
overrides (dotted keys reach nested dataclasses: ``optim.lr=1e-3``). The flags, their help (the
attribute docstring under each field) and their defaults come from the dataclass through `tyro`,
which builds nested flags (``--optim.lr``) and shows every default in ``--help``. Ranges are checked
in each config's ``__post_init__``, so a bad value fails before any model is loaded. The resolved
config is saved next to every output with :func:`save_config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import tyro
import yaml

from innards.errors import InnardsError, guarded
from innards.io import atomic_write_bytes

T = TypeVar("T")


# ----- dataclass <-> dict ---------------------------------------------------------------------------
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
            elif not isinstance(value, (list, tuple)):
                value = [value]
            out = [_coerce(v, inner, name) for v in value]
            return out if origin is list else tuple(out)
        if origin is dict:
            if not isinstance(value, dict):
                raise InnardsError(f"config field '{name}' must be a mapping")
            k_tp, v_tp = typing.get_args(tp) or (str, Any)
            return {_coerce(k, k_tp, name): _coerce(v, v_tp, name) for k, v in value.items()}
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
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            if isinstance(value, str) and "e" in value.lower():
                f = float(value)
                if not f.is_integer():
                    raise ValueError(value)
                return int(f)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
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
    """Build a dataclass from a (possibly partial) dict, refusing unknown keys.

    A config class may define ``upgrade(data) -> data`` (a staticmethod) to read the layout older versions saved.
    """
    upgrade = getattr(cls, "upgrade", None)
    if callable(upgrade):
        data = upgrade(dict(data))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InnardsError(f"unknown config key '{prefix}{unknown[0]}' (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: object) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def apply_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with dotted-key overrides applied (``a.b=1``)."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.replace("-", "_").split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise InnardsError(f"unknown config key '{key}'")
            node = node[p]
        if parts[-1] not in node:
            raise InnardsError(f"unknown config key '{key}' (valid: {', '.join(sorted(node))})")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (values read as YAML scalars)."""
    kv: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InnardsError(f"unexpected argument '{item}' (overrides are key=value)")
        k, v = item.split("=", 1)
        try:
            kv[k] = yaml.safe_load(v) if v else ""
        except yaml.YAMLError:
            kv[k] = v
    return kv


def diff(saved: dict[str, Any], now: dict[str, Any], ignore: Iterable[str] = (), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``"key: old -> new"`` lines."""
    skip = set(ignore)
    out = []
    for k in sorted(set(saved) | set(now)):
        key = prefix + k
        if key in skip or k in skip:
            continue
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, skip, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise InnardsError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InnardsError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise InnardsError(f"config file {p} is not text") from None
    if not isinstance(data, dict):
        raise InnardsError(f"config file {p} must hold a mapping")
    return data


def save_config(cfg: object, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    atomic_write_bytes(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return path


# ----- range checks (called from each config's __post_init__) --------------------------------------
def _flag(cfg: object, name: str) -> str:
    prefix = getattr(type(cfg), "FLAG_PREFIX", "")
    return "--" + (f"{prefix}." if prefix else "") + name.replace("_", "-")


def at_least(cfg: object, minimum: float, *names: str) -> None:
    """Refuse any of the named fields below ``minimum`` (None means unset and passes)."""
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v < minimum:
            raise InnardsError(f"{_flag(cfg, n)} must be at least {minimum}, got {v}")


def positive(cfg: object, *names: str) -> None:
    """Refuse any of the named fields that is zero or negative (None passes)."""
    for n in names:
        v = getattr(cfg, n)
        if v is not None and not v > 0:
            raise InnardsError(f"{_flag(cfg, n)} must be positive, got {v}")


def within(cfg: object, name: str, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> None:
    """Refuse a field outside [lo, hi] (or the open ends asked for); None passes."""
    v = getattr(cfg, name)
    if v is None:
        return
    bad = v < lo or v > hi or (open_lo and v == lo) or (open_hi and v == hi)
    if bad or v != v:  # v != v: NaN
        raise InnardsError(f"{_flag(cfg, name)} must be in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}, got {v}")


def require(ok: bool, message: str) -> None:
    """Raise a one-line InnardsError unless ``ok``."""
    if not ok:
        raise InnardsError(message)


# ----- the command line -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Field:
    path: str  # dotted python names, e.g. "optim.lr"
    tp: Any
    is_list: bool
    is_bool: bool


def _fields(cls: type, prefix: str = "") -> dict[str, _Field]:
    """Every leaf field of a (nested) config, keyed by its flag spelling ``--a.b-c``."""
    out: dict[str, _Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        path = prefix + f.name
        if dataclasses.is_dataclass(tp):
            out.update(_fields(tp, path + "."))
            continue
        flag = "--" + path.replace("_", "-")
        out[flag] = _Field(path, tp, typing.get_origin(tp) in (list, tuple), tp is bool)
    return out


def _canonical(flag: str) -> str:
    return flag.replace("_", "-")


def _normalise_argv(cls: type, argv: list[str], aliases: dict[str, str], positional: str | None
                    ) -> tuple[list[str], str | None, dict[str, Any]]:
    """Return (argv for tyro, --config file, key=value overrides).

    Repeated list flags and comma-separated values are merged into one occurrence (``--site a --site b,c``
    -> ``--site a b c``), aliases are renamed, leading bare words fill the positional field.
    """
    fields = _fields(cls)
    by_path = {f.path: f for f in fields.values()}
    out: list[str] = []
    lists: dict[str, list[str]] = {}
    config_file = None
    overrides: list[str] = []
    i = 0
    bare_ok = positional is not None
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok in ("-h", "--help"):
            out.append(tok)
            continue
        if tok == "--":
            out.extend(argv[i:])
            break
        if tok.startswith("-") and not _is_number(tok):
            bare_ok = False
            flag, eq, val = tok.partition("=")
            flag = aliases.get(flag, aliases.get(_canonical(flag), flag))
            flag = _canonical(flag) if flag.startswith("--") else flag
            if flag == "--config":
                if not eq:
                    if i >= len(argv):
                        raise InnardsError("--config needs a YAML file")
                    val, i = argv[i], i + 1
                config_file = val
                continue
            f = fields.get(flag)
            if f is not None and f.is_list:
                vals = [val] if eq else []
                while not eq and i < len(argv) and not (argv[i].startswith("-") and not _is_number(argv[i])) \
                        and not _is_override(argv[i], by_path):
                    vals.append(argv[i])
                    i += 1
                items = [v for chunk in vals for v in chunk.split(",") if v != ""]
                if flag not in lists:
                    lists[flag] = []
                    out.append(flag)
                    out.append(_LIST_SLOT + flag)
                lists[flag].extend(items)
                continue
            out.append(flag + (eq + val if eq else ""))
            continue
        if _is_override(tok, by_path):
            bare_ok = False
            overrides.append(tok)
            continue
        if "=" in tok and re.fullmatch(r"[A-Za-z_][\w.-]*=.*", tok) and not (bare_ok and positional):
            raise InnardsError(f"unknown config key '{tok.split('=', 1)[0]}' in '{tok}'")
        if bare_ok and positional is not None:
            pf = fields["--" + positional.replace("_", "-")]
            flag = "--" + positional.replace("_", "-")
            if pf.is_list:
                if flag not in lists:
                    lists[flag] = []
                    out.extend([flag, _LIST_SLOT + flag])
                lists[flag].extend(v for v in tok.split(",") if v)
            else:
                out.extend([flag, tok])
                bare_ok = False
            continue
        out.append(tok)
    final: list[str] = []
    for tok in out:
        if tok.startswith(_LIST_SLOT):
            vals = lists[tok[len(_LIST_SLOT):]]
            if not vals:
                raise InnardsError(f"{tok[len(_LIST_SLOT):]} needs at least one value")
            final.extend(vals)
        else:
            final.append(tok)
    return final, config_file, parse_overrides(overrides)


_LIST_SLOT = "\0list:"


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _is_override(tok: str, by_path: dict[str, _Field]) -> bool:
    if "=" not in tok or tok.startswith("-"):
        return False
    key = tok.split("=", 1)[0].replace("-", "_")
    return key in by_path or any(p.startswith(key + ".") for p in by_path)


_BOX = re.compile(r"^[\s│┃|╭╮╰╯─━\-+]*|[\s│┃|╭╮╰╯─━\-+]*$")


def _one_line(text: str) -> str:
    """tyro's boxed parse error -> 'title: message' on one line."""
    lines = [_BOX.sub("", ln) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    keep = []
    for ln in lines:
        if ln.startswith(("Argument helptext", "For full helptext", "usage:")):
            break
        keep.append(ln)
    if not keep:
        return "could not parse the command line"
    title, rest = keep[0], " ".join(keep[1:])
    if not rest or rest.lower().startswith(title.lower()):
        return rest or title
    return f"{title.lower()}: {rest}"


def parse(cls: type[T], argv: list[str] | None, *, prog: str, description: str | None = None,
          aliases: dict[str, str] | None = None, positional: str | None = None,
          named_configs: dict[str, Path] | None = None) -> T:
    """Parse a config from the command line (YAML, flags, key=value); InnardsError on any bad input.

    ``--config`` takes a YAML file or, when ``named_configs`` is given, one of its names.
    ``--help`` prints the help and raises SystemExit(0).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    args, config_file, overrides = _normalise_argv(cls, args, aliases or {}, positional)
    if config_file and named_configs and config_file in named_configs:
        config_file = str(named_configs[config_file])
    elif config_file and named_configs and not Path(config_file).is_file():
        raise InnardsError(f"no config named '{config_file}' (shipped: {', '.join(named_configs)}; or give a YAML file)")
    base = from_dict(cls, load_yaml(config_file)) if config_file else cls()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg = tyro.cli(cls, args=args, default=base, prog=prog, description=description)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise InnardsError(_one_line(err.getvalue())) from None
    return apply_overrides(cfg, overrides) if overrides else cfg


def command(cls: type[T], fn: Callable[[T], object], argv: list[str] | None, prog: str, description: str | None = None,
            aliases: dict[str, str] | None = None, positional: str | None = None,
            named_configs: dict[str, Path] | None = None) -> int:
    """Run ``fn(config)`` from the command line; bad input (the parser's too) is one line and exit 2.

    ``aliases`` maps old flag spellings to their current ones (``{"--t-start": "--project.t-start"}``);
    ``positional`` names the field that leading bare words fill (``innards view DIR DIR``).
    """

    def go() -> object:
        try:
            cfg = parse(cls, argv, prog=prog, description=description, aliases=aliases, positional=positional,
                        named_configs=named_configs)
        except SystemExit:  # --help
            return 0
        return fn(cfg)

    return guarded(go)
