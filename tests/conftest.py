"""Shared fixtures. Parts add their own fixtures in their own test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir("llama"|"gpt2"|"gpt_neox"|"bert", **config_overrides) -> Path``.

    Each tiny random model (+ byte-level BPE tokenizer, vocab 300) is built offline once per session
    and saved with save_pretrained, so ``innards.load_model(path)`` loads it. The llama one adds BOS.
    """
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return lambda arch="llama", **overrides: make_tiny_model(arch, root, **overrides)
