import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from innards.config import add_arguments, apply_overrides, from_dict, resolve
from innards.errors import InnardsError


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3


@dataclasses.dataclass
class Cfg:
    name: str = "a"
    steps: int = 10
    sites: list[str] = dataclasses.field(default_factory=list)
    dtype: Literal["bf16", "fp32"] = "fp32"
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)


def parse(argv, tmp_path=None):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_arguments(p, Cfg)
    ns, rest = p.parse_known_args(argv)
    return resolve(Cfg, ns, rest)


def test_precedence_yaml_flags_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("name: fromyaml\nsteps: 5\ninner: {lr: 0.5}\n")
    cfg = parse(["--config", str(y), "--steps", "7", "--sites", "a,b", "--sites", "c", "--flag", "inner.lr=2e-4"])
    assert cfg.name == "fromyaml" and cfg.steps == 7 and cfg.flag
    assert cfg.sites == ["a", "b", "c"]
    assert cfg.inner.lr == pytest.approx(2e-4)


def test_unknown_key_and_bad_type_are_one_line_errors():
    with pytest.raises(InnardsError, match="unknown config key 'nope'"):
        from_dict(Cfg, {"nope": 1})
    with pytest.raises(InnardsError, match="steps"):
        from_dict(Cfg, {"steps": "many"})
    with pytest.raises(InnardsError):
        apply_overrides(Cfg(), {"inner.zz": 1})


def test_cli_unknown_command_exits_2():
    r = subprocess.run([sys.executable, "-m", "innards", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = subprocess.run([sys.executable, "-m", "innards", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "harvest" in r.stdout
