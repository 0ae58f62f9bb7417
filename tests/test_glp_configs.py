"""Every field of every GLP command's config has its help (the attribute docstring tyro shows) and a valid default."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from innards.bench.glp import BenchGLPConfig
from innards.bench.ood import BenchOODConfig
from innards.glp.evaluate import EvalConfig
from innards.glp.neurons import NeuronsConfig
from innards.glp.sample import GLPSampleConfig
from innards.glp.scale import ScaleConfig
from innards.glp.score import ScoreConfig
from innards.glp.train import GLPOptimConfig, GLPTrainConfig

CONFIGS = [GLPTrainConfig, GLPOptimConfig, EvalConfig, GLPSampleConfig, ScaleConfig, NeuronsConfig, ScoreConfig,
           BenchOODConfig, BenchGLPConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_help(cls):
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    documented = {stmt.target.id for stmt, nxt in zip(body, body[1:])
                  if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                  and str(nxt.value.value).strip()}
    own = {stmt.target.id for stmt in body if isinstance(stmt, ast.AnnAssign)}
    assert own == documented, f"fields without help: {sorted(own - documented)}"
    cls()  # the defaults pass the range checks
    assert all(f.name for f in dataclasses.fields(cls))
