import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from innards.config import apply_overrides, at_least, command, diff, from_dict, parse, within
from innards.errors import InnardsError


@dataclasses.dataclass
class Inner:
    """The inner piece."""

    lr: float = 1e-3
    """peak learning rate"""

    FLAG_PREFIX = "inner"

    def __post_init__(self) -> None:
        within(self, "lr", 0.0, 1.0, open_lo=True)


@dataclasses.dataclass
class Cfg:
    """A test command."""

    name: str = "a"
    """a name"""
    steps: int = 10
    """optimiser steps"""
    sites: list[str] = dataclasses.field(default_factory=list)
    """sites to use"""
    dtype: Literal["bf16", "fp32"] = "fp32"
    """numeric type"""
    flag: bool = False
    """a switch"""
    n: int | None = None
    """a count or none"""
    inner: Inner = dataclasses.field(default_factory=Inner)
    """the inner piece"""

    def __post_init__(self) -> None:
        at_least(self, 1, "steps")


def p(argv, **kw):
    return parse(Cfg, argv, prog="t", **kw)


def test_precedence_yaml_flags_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("name: fromyaml\nsteps: 5\ninner: {lr: 0.5}\n")
    cfg = p(["--config", str(y), "--steps", "7", "--sites", "a,b", "--sites", "c", "--flag", "inner.lr=2e-4"])
    assert cfg.name == "fromyaml" and cfg.steps == 7 and cfg.flag
    assert cfg.sites == ["a", "b", "c"]
    assert cfg.inner.lr == pytest.approx(2e-4)
    assert p(["--config", str(y)]).inner.lr == 0.5  # YAML values become the defaults
    assert p(["--inner.lr", "0.25", "--no-flag", "--n", "3"]).inner.lr == 0.25
    assert p(["--sites", "x", "y"]).sites == ["x", "y"]
    assert p(["--n", "None"]).n is None


def test_aliases_and_positional():
    cfg = p(["--lr", "0.1", "-s", "4"], aliases={"--lr": "--inner.lr", "-s": "--steps"})
    assert cfg.inner.lr == 0.1 and cfg.steps == 4
    assert p(["u", "v", "--steps", "2"], positional="sites").sites == ["u", "v"]
    assert p(["zed"], positional="name").name == "zed"


@pytest.mark.parametrize("argv,match", [
    (["--steps", "many"], "steps"),
    (["--bogus", "1"], "bogus"),
    (["--dtype", "fp64"], "fp64"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--inner.lr", "0"], r"--inner.lr must be in \(0.0, 1.0\]"),
    (["inner.lr=7"], "--inner.lr must be in"),
    (["steps=1.5"], "steps"),
    (["nope=1"], "unknown config key .nope."),
    (["--config", "/nonexistent.yaml"], "config file not found"),
])
def test_bad_input_is_one_line(argv, match):
    with pytest.raises(InnardsError, match=match) as e:
        p(argv)
    assert "\n" not in str(e.value)


def test_unknown_key_and_bad_type_are_one_line_errors():
    with pytest.raises(InnardsError, match="unknown config key 'nope'"):
        from_dict(Cfg, {"nope": 1})
    with pytest.raises(InnardsError, match="steps"):
        from_dict(Cfg, {"steps": "many"})
    with pytest.raises(InnardsError):
        apply_overrides(Cfg(), {"inner.zz": 1})


def test_diff_is_dotted():
    a, b = dataclasses.asdict(Cfg()), dataclasses.asdict(Cfg(steps=3, inner=Inner(lr=0.5)))
    assert diff(a, b) == ["inner.lr: 0.001 -> 0.5", "steps: 10 -> 3"]
    assert diff(a, b, ignore=["steps", "inner.lr"]) == []


def test_command_exit_codes_and_help(capsys):
    assert command(Cfg, lambda c: 0, ["--steps", "-1"], prog="t") == 2
    assert "innards: error: --steps must be at least 1" in capsys.readouterr().err
    assert command(Cfg, lambda c: 0, ["--help"], prog="t") == 0
    out = capsys.readouterr().out
    for text in ("optimiser steps", "default: 10", "--inner.lr", "peak learning rate", "default: 0.001"):
        assert text in out


def test_cli_unknown_command_exits_2():
    r = subprocess.run([sys.executable, "-m", "innards", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = subprocess.run([sys.executable, "-m", "innards", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "harvest" in r.stdout


def test_help_into_a_closed_pipe_is_quiet():
    r = subprocess.run(f"{sys.executable} -m innards --help | head -1", shell=True, capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr and r.stderr == ""
