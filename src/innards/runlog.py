"""Run logging: ``metrics.jsonl`` always (append-only, resumable), wandb only when asked."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append one JSON object per line to ``DIR/metrics.jsonl``; mirrors to wandb if enabled."""

    def __init__(self, out_dir: str | Path, wandb_project: str | None = None, config: dict | None = None,
                 resume_step: int | None = None, enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # drop lines written after the checkpoint we resume from, so the log matches the run
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", -1) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if wandb_project:
            import wandb  # optional dependency: pip install innards[wandb]

            self._wandb = wandb.init(project=wandb_project, config=config, resume="allow")

    def log(self, step: int, **values: Any) -> None:
        """Record metrics for one step."""
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k not in ("step", "time")}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl."""
    p = Path(out_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
