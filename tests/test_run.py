import dataclasses
import json
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest

from innards.errors import InnardsError
from innards.run import Run, detect_kind, read_run


@dataclasses.dataclass
class C:
    """cfg"""

    steps: int = 3
    """steps"""
    out: str = ""
    """out"""
    progress: bool = True
    """bar"""


def test_lifecycle_new_complete_skip_and_settings_refusal(tmp_path):
    out = tmp_path / "r"
    with Run.open(out, "glp", C(), inputs={"acts": tmp_path}) as run:
        assert run.state == "new"
        rec = read_run(out)
        assert rec["kind"] == "glp" and rec["status"] == "running" and (out / "config.yaml").is_file()
        assert rec["inputs"][0]["role"] == "acts"
        run.save_png("a.png", plt.figure())
        run.write_jsonl("m.jsonl", [{"a": 1}, {"b": 2}])
        run.complete({"val_loss": 0.5}, outputs=["a.png"])
    assert read_run(out)["status"] == "complete" and read_run(out)["headline"] == {"val_loss": 0.5}
    assert (out / "m.jsonl").read_text() == '{"a": 1}\n{"b": 2}\n'
    with Run.open(out, "glp", C(progress=False)) as again:  # only "free" keys differ
        assert again.state == "complete"
    with pytest.raises(InnardsError, match="other settings .steps: 3 -> 4"):
        Run.open(out, "glp", C(steps=4))
    with Run.open(out, "glp", C(steps=4), overwrite=True) as fresh:
        assert fresh.state == "new" and not (out / "a.png").exists()


def test_unfinished_needs_resume_and_resume_needs_a_run(tmp_path):
    out = tmp_path / "r"
    Run.open(out, "vpd", C()).close()
    with pytest.raises(InnardsError, match="unfinished vpd run; use --resume"):
        Run.open(out, "vpd", C())
    with Run.open(out, "vpd", C(), resume=True) as r:
        assert r.state == "resume"
    with Run.open(out, "vpd", C(), always_resume=True) as r:
        assert r.state == "resume"
    with pytest.raises(InnardsError, match="nothing to resume"):
        Run.open(tmp_path / "empty", "vpd", C(), resume=True)


def test_refuses_other_kinds_and_foreign_folders(tmp_path):
    store = tmp_path / "acts"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    assert detect_kind(store) == "store"
    for overwrite in (False, True):
        with pytest.raises(InnardsError, match="holds a store run, not a glp run"):
            Run.open(store, "glp", C(), overwrite=overwrite)
    assert (store / "manifest.json").read_text() == "{}"  # untouched
    other = tmp_path / "stuff"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InnardsError, match="not empty and holds no glp run"):
        Run.open(other, "glp", C())
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(InnardsError, match="is a file, not a folder"):
        Run.open(f / "sub", "glp", C())
    with pytest.raises(InnardsError, match="afile is a file, not a folder"):
        Run.open(f, "glp", C())


def test_file_runs_keep_a_sidecar(tmp_path):
    out = tmp_path / "eval.json"
    with Run.open(out, "eval", C(), file=True) as run:
        run.write_json("eval.json", {"fd": 1.0})
        run.complete({"fd": 1.0}, outputs=["eval.json"])
    assert read_run(out)["kind"] == "eval" and (tmp_path / "eval.json.run.json").is_file()
    assert (tmp_path / "eval.json.config.yaml").is_file()
    with Run.open(out, "eval", C(), file=True) as run:
        assert run.state == "complete"
    (tmp_path / "mine.json").write_text("{}")
    with pytest.raises(InnardsError, match="not written by innards"):
        Run.open(tmp_path / "mine.json", "eval", C(), file=True)


def test_input_change_is_refused(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a")
    out = tmp_path / "r"
    with Run.open(out, "sweep", C(), inputs={"vector": src}) as run:
        run.complete()
    src.write_text("b")
    with pytest.raises(InnardsError, match="input vector changed"):
        Run.open(out, "sweep", C(), inputs={"vector": src})


def test_one_process_at_a_time(tmp_path):
    out = tmp_path / "r"
    code = ("import sys, time; from innards.run import Run; from tests.test_run import C; "
            f"r = Run.open({str(out)!r}, 'store', C(), always_resume=True); print('locked', flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(InnardsError, match="being written by another innards process .pid"):
            Run.open(out, "store", C(), always_resume=True)
    finally:
        p.kill()
        p.wait()
    with Run.open(out, "store", C(), always_resume=True) as r:  # a killed holder leaves no stale lock
        assert r.state == "resume"
    assert json.loads((out / "run.json").read_text())["kind"] == "store"


def test_a_refused_run_leaves_no_trace(tmp_path):
    with pytest.raises(InnardsError, match="nothing to resume"):
        Run.open(tmp_path / "new", "glp", C(), resume=True)
    assert not (tmp_path / "new").exists()
