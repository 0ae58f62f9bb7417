"""Every code block of the README runs as written (bash blocks in a shell, each Python block in a fresh interpreter).

The blocks run in order in one scratch folder, so later blocks use what earlier ones wrote, as a reader
following the README would. `make demo` and `make test` are dry-run (`make -n`): running the test suite
from inside the test suite, or the four-minute demo, is not what this test is for. `innards view` is
started on a free port, asked for its index page, and stopped with Ctrl-C (SIGINT), as a reader would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash/python block of README.md, in order."""
    text = (ROOT / "README.md").read_text()
    return [(lang, code) for lang, code in FENCE.findall(text) if lang in ("bash", "python")]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cache = ROOT.parent / "shared" / "fixtures" / "hf-cache"
    if cache.is_dir():
        env["HF_HUB_CACHE"] = str(cache)  # the fake hub cache holds the README's tiny published GLP
    return env


def test_readme_has_code():
    langs = [lang for lang, _ in blocks()]
    assert "bash" in langs and "python" in langs


VIEW = re.compile(r"^innards view (.*)$", re.M)
# the index page, fetched from the URL the server printed
FETCH = ("import re, urllib.request; url = re.search(r'http://\\S+', open('view.log').read()).group(0); "
         "assert b'<html' in urllib.request.urlopen(url, timeout=20).read().lower()")


def _view(m: re.Match) -> str:
    """Start the server on a free port, wait for its URL, fetch the index, then Ctrl-C it (its exit status counts)."""
    # set -m: a background job of a script would otherwise ignore SIGINT
    return (f"set -m; innards view {m.group(1)} --port 0 > view.log 2>&1 & pid=$!; set +m; "
            "for _ in $(seq 200); do grep -q http:// view.log && break; sleep 0.1; done; "
            f'python -c "{FETCH}"; kill -INT $pid; wait $pid')


def command(lang: str, code: str) -> list[str]:
    """The process that runs one README block as the test does."""
    if lang == "python":
        return [sys.executable, "-c", code]
    code = re.sub(r"^make (demo|test)\b", rf"make -n -C {ROOT} \1", code, flags=re.M)
    code = VIEW.sub(_view, code)
    return ["bash", "-euo", "pipefail", "-c", code]


def test_every_readme_block_runs(tmp_path):
    if not (ROOT.parent / "shared" / "fixtures" / "hf-cache").is_dir():
        pytest.skip("../shared/fixtures/hf-cache is absent: the README's hub example needs it offline")
    env = _env()
    for i, (lang, code) in enumerate(blocks()):
        r = subprocess.run(command(lang, code), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README block {i} ({lang}) failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, f"README block {i} printed a traceback:\n{r.stderr[-3000:]}"
