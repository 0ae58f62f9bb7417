"""Tiny REAL runs of every kind the viewer shows, built once per session with innards' Python API.

Every construction of a run for the viewer tests lives here (the APIs' config classes are being reshaped:
when one breaks, adapt it here only). ``build_runs(root)`` is also used by hand to make screenshots.
The corpus deliberately holds markup (``<script>``, ``onerror=``) so that contexts, samples and
continuations carry XSS payloads into the pages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import types
import typing
from pathlib import Path

import pytest

SITE = "blocks.3.resid_post"
XSS_SCRIPT = "<script>window.__xss=1</script>"
XSS_IMG = '<img src=x onerror="window.__xss=2">'
POS = ["what a wonderful happy day", "i love this lovely story", "a delightful and joyful tale",
       "great fun, a real pleasure", "she smiled with joy and delight", "the best and brightest morning",
       "so good, warm and kind", "beautiful, charming and sweet", "a happy ending full of love"]
NEG = ["what a terrible awful day", "i hate this dull story", "a dreadful and miserable tale",
       "bad, a real waste of time", "she cried with grief and pain", "the worst and darkest night",
       "so bad, cold and cruel", "ugly, dull and bitter", "a sad ending full of hate"]
_STORY = ("Once upon a time a little {a} lived near the {b}. Every morning the {a} walked to the {b} "
          "and sang a song to the old {c}. One day the {c} said: you are my friend, little {a}.")
_A = ["fox", "rabbit", "girl", "boy", "bear", "mouse", "duck", "king"]
_B = ["river", "wood", "hill", "castle", "garden", "sea"]
_C = ["tree", "owl", "queen", "miller", "frog"]

_CACHE: dict[str, dict[str, Path]] = {}


def corpus(path: Path, n: int = 48) -> Path:
    """Short stories, one per paragraph, two of them carrying markup."""
    docs = [_STORY.format(a=_A[i % len(_A)], b=_B[i % len(_B)], c=_C[i % len(_C)]) for i in range(n)]
    docs[3] = f"The fox wrote {XSS_SCRIPT} on the wall and ran to the river."
    docs[7] = f"The owl drew {XSS_IMG} in the sand of the garden."
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _task(path: Path, n: int, seed: int) -> Path:
    """A binary probing task (SAE-Probes CSV layout) the demo LM can separate a bit."""
    import random

    rnd = random.Random(seed)
    rows = ["prompt,target"]
    for i in range(n):
        y = i % 2
        word = rnd.choice(POS if y else NEG)
        rows.append(f"\"{word} {rnd.choice(_A)}\",{y}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _strip(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _find(cls, key: str, depth: int = 2) -> list[str] | None:
    """Dotted path of a field named ``key`` inside ``cls`` or its nested configs (shallowest first)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if key in {f.name for f in fields}:
        return [key]
    if depth:
        for f in fields:
            tp = _strip(hints[f.name])
            if dataclasses.is_dataclass(tp):
                sub = _find(tp, key, depth - 1)
                if sub:
                    return [f.name, *sub]
    return None


def cfg(cls, **kw):
    """``cls(**kw)``, with every key that moved into a nested config (lr -> optim.lr) put where it now lives.

    The commands' configs are being reshaped into nested pieces; the runs below name their settings flat.
    """
    tree: dict = {}
    for k, v in kw.items():
        path = k.split(".") if "." in k else _find(cls, k)
        if path is None:
            raise TypeError(f"{cls.__name__} has no setting '{k}' (adapt tests/viewer_runs.py)")
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v

    def value(tp, v):
        tp = _strip(tp)
        if not dataclasses.is_dataclass(tp):
            return v
        if isinstance(v, dict):
            return build(tp, v)
        if isinstance(v, str):  # a model name or GLP folder given where a small config now sits
            return tp(**{dataclasses.fields(tp)[0].name: v})
        return v

    def build(c, t):
        hints = typing.get_type_hints(c)
        return c(**{k: value(hints[k], v) for k, v in t.items()})

    return build(cls, tree)


def build_runs(root: Path, log: bool = False) -> dict[str, Path]:
    """Make every tiny run under ``root``; returns name -> path (folders, or files for file-runs)."""
    from innards.data.harvest import HarvestConfig, harvest
    from innards.glp.evaluate import EvalConfig, evaluate_glp
    from innards.glp.neurons import NeuronsConfig, glp_neurons
    from innards.sae.train import SAETrainConfig, train_sae
    from innards.glp.scale import ScaleConfig, scale
    from innards.glp.train import GLPTrainConfig, train_glp
    from innards.probe.run import ProbeConfig, run_probe
    from innards.steer.sweep import SweepConfig, run_sweep
    from innards.steer.vectors import VectorConfig, build_vector
    from innards.vpd.analysis import AblateConfig, ContextsConfig, GraphConfig, ablate, contexts, graph
    from innards.vpd.config import load_config
    from innards.vpd.evaluate import EvalConfig as VPDEvalConfig
    from innards.vpd.evaluate import evaluate as vpd_evaluate
    from innards.vpd.train import train as vpd_train

    root.mkdir(parents=True, exist_ok=True)
    inputs = root / "inputs"
    inputs.mkdir(exist_ok=True)
    text = corpus(inputs / "stories.txt")
    pos, neg = _lines(inputs / "pos.txt", POS), _lines(inputs / "neg.txt", NEG)
    prompts = _lines(inputs / "prompts.txt", ["Once upon a time", "The little fox", "One day the king"])
    tasks = inputs / "tasks"
    tasks.mkdir(exist_ok=True)
    _task(tasks / "1_joy.csv", 140, 0)
    _task(tasks / "2_joy_again.csv", 130, 1)
    r: dict[str, Path] = {}
    clock = time.perf_counter()

    def done(name: str, path: Path) -> None:
        nonlocal clock
        r[name] = path
        if log:
            print(f"  {name}: {time.perf_counter() - clock:.1f}s", flush=True)
        clock = time.perf_counter()

    res = root / "res"
    acts = res / "acts"
    harvest(cfg(HarvestConfig, model="demo", site=[SITE], text=str(text), tokens=2500, out=str(acts), context=64,
                          shard_tokens=1024, val_fraction=0.2, seed=0))
    done("store", acts)
    glp = res / "glp"
    train_glp(cfg(GLPTrainConfig, acts=str(acts), out=str(glp), depth=2, d_model=64, d_mlp=48, steps=24, batch_size=128,
                             lr=1e-3, val_rows=256, log_every=4, checkpoints=3, save_every=1000, buckets=4,
                             progress=False, precision="fp32"))
    done("glp", glp)
    sae = res / "sae"
    train_sae(cfg(SAETrainConfig, acts=str(acts), out=str(sae), k=8, latents="2*d", tokens=2048, batch_size=256,
                             val_rows=256, progress=False))
    done("sae", sae)
    ev = res / "eval.json"
    evaluate_glp(cfg(EvalConfig, glp=str(glp), acts=str(acts), out=str(ev), model="demo", n=300, steps=6, sae=str(sae),
                            pca_k=8, **{"project.steps": 4}, lm_docs=6, context=32, lm_batch_size=6, progress=False))
    done("eval", ev)
    neurons = res / "neurons"
    glp_neurons(cfg(NeuronsConfig, glp=str(glp), text=str(text), top=5, max_docs=48, context=40, batch_size=16,
                              out=str(neurons)))
    done("neurons", neurons)
    vec = res / "vectors" / "joy.safetensors"
    vec.parent.mkdir(parents=True, exist_ok=True)
    build_vector(cfg(VectorConfig, model="demo", site=SITE, pos=str(pos), neg=str(neg), out=str(vec)))
    done("vector", vec)
    sweep = res / "steer"
    run_sweep(cfg(SweepConfig, model="demo", site=SITE, vector=str(vec), glp=str(glp), acts=str(acts), strengths=[0.0, 1.0],
                          prompts=str(prompts), concept="joy", concept_pos=str(pos), concept_neg=str(neg),
                          max_new_tokens=6, n_boot=200, batch_size=3, out=str(sweep), **{"project.steps": 4}))
    done("sweep", sweep)
    probe = res / "probe"
    run_probe(cfg(ProbeConfig, model="demo", site=SITE, tasks=str(tasks), features=["raw", f"glp:{glp}"], out=str(probe),
                          max_train=80, min_test=40, n_folds=2, cs=[1.0], top_k=16, n_boot=200, plot=True))
    done("probe", probe)
    sc = res / "scale"
    scale(cfg(ScaleConfig, acts=str(acts), out=str(sc), depths=[1, 2], tokens=2048, batch_size=256, lr=1e-3, d_model=32,
                      d_mlp=32, checkpoints=4, val_rows=256, downstream=False, progress=False, precision="fp32"))
    done("scale", sc)

    vpd = root / "vpd" / "lm"
    lm_cfg = load_config("demo-lm", {"out": str(vpd), "steps": 2, "warmup_steps": 2, "batch_size": 2, "seq_len": 16,
                                  "text": str(text), "max_tokens": 2000, "progress": False, "eval_batches": 1,
                                  "eval_batch_size": 2, "adversary.eval_steps": 1,
                                  "modules": ["model.layers.0.mlp.*", "model.layers.1.mlp.down_proj"],
                                  "C": 16, "C_per_module": {}, "ci.d_model": 32, "ci.n_layers": 1, "ci.d_ffn": 64,
                                  "ci.n_heads": 2, "log_every": 1})
    vpd_train(lm_cfg)
    vpd_evaluate(cfg(VPDEvalConfig, run=str(vpd), batches=1, batch_size=2, pgd_steps=1))
    done("vpd", vpd)
    contexts(cfg(ContextsConfig, run=str(vpd), text=str(text), max_tokens=600, top=3, threshold=0.0))
    done("vpd-contexts", vpd / "contexts")
    ablate(cfg(AblateConfig, run=str(vpd), component="layers.1.mlp.down_proj:3", prompt="Once upon a time a little",
                        top=5, out=str(vpd / "ablate_down3.json")))
    done("vpd-ablate", vpd / "ablate_down3.json")
    graph(cfg(GraphConfig, run=str(vpd), prompt="a little fox ran", max_nodes=24, max_edges=60))
    done("vpd-graph", vpd / "graph")
    toy = root / "vpd" / "tms"
    vpd_train(load_config("tms-5-2", {"out": str(toy), "steps": 2, "warmup_steps": 1, "target.steps": 50,
                                      "batch_size": 16, "progress": False, "eval_batches": 1,
                                      "adversary.eval_steps": 1}))
    vpd_evaluate(cfg(VPDEvalConfig, run=str(toy), batches=1, batch_size=64, pgd_steps=1))
    done("vpd-toy", toy)
    (root / "runs.json").write_text(json.dumps({k: str(v) for k, v in r.items()}, indent=1))
    return r


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """Debian's chromium (or $INNARDS_CHROMIUM); Playwright's own browser downloads are never used."""
    for cand in (os.environ.get("INNARDS_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if cand and Path(cand).is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def browser(request):
    """A headless Chromium driven by Playwright, shared by every viewer test; skips when none can be had."""
    if "browser" in _CACHE:
        return _CACHE["browser"]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium for the browser tests (apt-get install -y chromium chromium-driver)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
    except Exception as e:  # any launch failure: the machine cannot run a browser
        pw.stop()
        pytest.skip(f"Chromium does not start: {str(e).strip().splitlines()[0][:200]}")

    def close() -> None:
        b.close()
        pw.stop()

    request.addfinalizer(close)
    _CACHE["browser"] = b
    return b


class Tab:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser, width: int = 1280, height: int = 900):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="session")
def viewer_runs(tmp_path_factory) -> dict[str, Path]:
    """The tiny runs (built once per process, even when several test modules ask for them).

    $INNARDS_VIEWER_RUNS=DIR reuses runs built by ``python tests/viewer_runs.py DIR`` (faster iteration).
    """
    prebuilt = os.environ.get("INNARDS_VIEWER_RUNS")
    if "runs" not in _CACHE and prebuilt and (Path(prebuilt) / "runs.json").is_file():
        _CACHE["runs"] = {k: Path(v) for k, v in json.loads((Path(prebuilt) / "runs.json").read_text()).items()}
    # the viewer's disk cache of big-file scans goes to the session's temporary folder, not ~/.cache
    os.environ.setdefault("INNARDS_VIEWER_CACHE", str(tmp_path_factory.mktemp("viewer_cache")))
    if "runs" not in _CACHE:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        _CACHE["runs"] = build_runs(tmp_path_factory.mktemp("viewer_runs"))
    return _CACHE["runs"]


if __name__ == "__main__":  # python tests/viewer_runs.py OUT: build the runs by hand (screenshots, debugging)
    import sys

    print(build_runs(Path(sys.argv[1]), log=True))
