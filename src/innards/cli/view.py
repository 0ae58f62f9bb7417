"""``innards view DIR [DIR ...]``: a local web app over every innards run found under the folders."""

from __future__ import annotations

import os
import sys
import threading

from innards.config import command
from innards.viewer.server import ViewConfig, view


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards view`."""
    rc = command(ViewConfig, view, argv, prog="innards view", positional="dirs",
                 description="Discover every innards run (stores, GLPs, evals, SAEs, sweeps, probes, meta-neurons, "
                             "VPD runs and analyses, scaling sweeps) under the folders and serve them at a local URL; "
                             "with --model, also a live steering playground. Ctrl-C stops.")
    if any(t.name == "innards-view-warm" and t.is_alive() for t in threading.enumerate()):
        # Ctrl-C during the warm-up: it may be importing torch, and a normal exit would wait for that import
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc
