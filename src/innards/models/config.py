"""Which language model a command uses and how it runs, declared once for every command that loads one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    """A language model: its name and how it runs."""

    name: str = "demo"
    """model name, alias (demo), local folder or hub id (org/name)"""
    revision: str | None = None
    """hub revision (branch, tag or commit) when name is a hub id"""
    dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    """dtype the model runs in"""
    device: str | None = None
    """device of the model (None: cuda if available, else cpu)"""

    FLAG_PREFIX = "model"


# the flat spellings of innards 0.1, kept working on every command that embeds a ModelConfig as `model`
MODEL_ALIASES = {"--model": "--model.name", "--revision": "--model.revision", "--model-dtype": "--model.dtype",
                 "--device": "--model.device"}
