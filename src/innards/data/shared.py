"""Where the shared data folder (corpora, sentiment, SAE-Probes) lives on this machine."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "INNARDS_DATA_DIR"


def shared_data_dir() -> Path | None:
    """$INNARDS_DATA_DIR, else ../shared/data beside the source checkout or the working folder; None if absent."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    parents = Path(__file__).resolve().parents
    # an editable checkout: src/innards/data/shared.py -> the project root's sibling shared/data
    candidates = [parents[4] / "shared" / "data"] if len(parents) > 4 else []
    candidates += [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)
