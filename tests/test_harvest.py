import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from innards.cli import main as cli
from innards.data.harvest import HarvestConfig, harvest
from innards.data.shards import ShardWriter
from innards.data.store import ActivationStore
from innards.errors import InnardsError
from tiny_models import SENTENCES, make_tiny_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def write_text(path, n_docs=200, words=40, seed=0):
    rng = np.random.default_rng(seed)
    vocab = " ".join(SENTENCES).split()
    path.write_text("\n\n".join(" ".join(rng.choice(vocab, words)) for _ in range(n_docs)) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("harvest")
    return {"root": root, "model": str(make_tiny_model("llama", root)), "text": str(write_text(root / "text.txt"))}


def args(env, out, *extra, tokens=300):
    return ["harvest", "--model", env["model"], "--site", "blocks.1.resid_post", "--text", env["text"],
            "--tokens", str(tokens), "--context", "32", "--batch-size", "4", "--shard-tokens", "100", "--out", str(out),
            *extra]


def one_line_error(capsys, argv, match):
    assert cli(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("innards: error")]
    assert len(err) == 1 and match in err[0], err
    return err[0]


def test_bad_input_exits_2_with_one_line(env, capsys, tmp_path):
    out = tmp_path / "st"
    one_line_error(capsys, ["harvest", "--model", str(tmp_path / "nope"), "--site", "blocks.0.resid_post",
                            "--text", env["text"], "--out", str(out)], "nope")
    line = one_line_error(capsys, [*args(env, out)[:3], "--site", "blocks.0.resid_middle", *args(env, out)[5:]], "unknown site")
    assert "resid_post" in line  # the message lists the valid forms
    one_line_error(capsys, [*args(env, out)[:3], "--site", "blocks.7.resid_post", *args(env, out)[5:]], "out of range")
    for per_head in ("blocks.0.attn.hook_q", "blocks.0.pattern"):  # not one vector per token: refused, not crashed
        one_line_error(capsys, [*args(env, out)[:3], "--site", per_head, *args(env, out)[5:]], "per-head")
    (tmp_path / "empty.txt").write_text("\n\n")
    one_line_error(capsys, [*args(env, out)[:5], "--text", str(tmp_path / "empty.txt"), *args(env, out)[7:]], "no documents")
    one_line_error(capsys, [*args(env, out)[:5], "--text", str(tmp_path / "missing.txt"), *args(env, out)[7:]], "not found")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    one_line_error(capsys, args(env, tmp_path / "other"), "not empty")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    assert not out.exists()  # nothing was written by any refusal


def test_rerun_noop_other_settings_refused_overwrite(env, capsys, tmp_path):
    out = tmp_path / "st"
    assert cli(args(env, out)) == 0
    err = capsys.readouterr().err
    assert "on disk" in err and "KB" in err  # the disk estimate comes first
    before = _mtimes(out)
    assert cli(args(env, out)) == 0
    assert "already complete" in capsys.readouterr().err
    assert _mtimes(out) == before
    line = one_line_error(capsys, [*args(env, out)[:3], "--site", "blocks.2.resid_post", *args(env, out)[5:]], "other settings")
    assert "blocks.2.resid_post" in line
    one_line_error(capsys, args(env, out, "--store-dtype", "fp16"), "other settings")
    one_line_error(capsys, args(env, out, tokens=301), "other settings")
    one_line_error(capsys, args(env, out, "--order", "sequential"), "text.order")
    assert _mtimes(out) == before  # refused runs touch nothing
    assert cli([*args(env, out)[:3], "--site", "blocks.2.resid_post", *args(env, out)[5:], "--overwrite"]) == 0
    store = ActivationStore(out)
    assert store.sites == ["blocks.2.resid_post"] and len(store) == 300 and store.verify()["ok"]
    assert not list((out / "shards").glob("*blocks.1.resid_post*"))


def _mtimes(out: Path) -> dict:
    """Modification times of a store's files (the folder lock is bookkeeping of every run, not data)."""
    return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".innards.lock"}


def test_read_only_output_folder(env, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not make a folder read-only")
        one_line_error(capsys, args(env, ro / "st"), "not writable")
    finally:
        ro.chmod(0o700)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_full_output_folder(env, capsys, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        # the estimate does not fit: refused before anything is written
        one_line_error(capsys, args(env, disk / "st", tokens=100_000), "not enough disk space")
        assert not (disk / "st").exists()
        # a write that hits ENOSPC mid-shard: an OSError (the CLI's exit 2), no half-written file left
        (disk / "filler").write_bytes(b"\0" * 40_000)
        (disk / "w" / "shards").mkdir(parents=True)
        import torch

        w = ShardWriter(disk / "w", {"s": 64}, "fp32", 200)
        with pytest.raises(OSError) as e:
            w.add({"s": torch.randn(200, 64)}, np.zeros(200, np.int64), np.zeros(200, np.int32), np.zeros(200, np.int32))
            w.close()
        assert e.value.errno == 28
        assert not [p for p in (disk / "w" / "shards").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_invalid_utf8_is_counted(env, capsys, tmp_path):
    t = tmp_path / "bad.txt"
    t.write_bytes(b"Once upon a time \xff\xfe there was a fox.\n\nThe fox ran.\n")
    assert cli([*args(env, tmp_path / "st")[:5], "--text", str(t), *args(env, tmp_path / "st")[7:]]) == 0
    err = capsys.readouterr().err
    assert err.count("replaced 2 invalid UTF-8 byte(s)") == 1 and "text ran out" in err
    assert ActivationStore(tmp_path / "st").manifest["text"]["invalid_utf8_bytes"] == 2


def test_generate_source_harvest(env, tmp_path):
    from innards.models.load import load_model

    model = load_model(env["model"])
    cfg = HarvestConfig(model=env["model"], site=["blocks.0.mlp_out"], text="generate:6", tokens=80, out=str(tmp_path / "g"),
                        context=24, batch_size=4, shard_tokens=50, seed=1)
    harvest(cfg, model=model)
    store = ActivationStore(tmp_path / "g")
    assert len(store) == 80 and store.doc_table[0] == "gen:1:0"
    assert (tmp_path / "g" / "generated" / "block-000000.jsonl").is_file()
    before = (tmp_path / "g" / "manifest.json").stat().st_mtime_ns
    harvest(cfg, model=model)
    assert (tmp_path / "g" / "manifest.json").stat().st_mtime_ns == before


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_memory_stays_flat(env, tmp_path):
    from innards.models.load import load_model

    model = load_model(env["model"])
    text = write_text(tmp_path / "big.txt", n_docs=1500, words=60, seed=1)

    def cfg(n, out):
        return HarvestConfig(model=env["model"], site=["blocks.*.resid_post", "blocks.*.mlp_hidden"], text=str(text),
                             tokens=n, out=str(tmp_path / out), context=128, batch_size=8, store_dtype="fp32",
                             shard_tokens=4096)

    harvest(cfg(4000, "warm"), model=model)
    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        harvest(cfg(60_000, "big"), model=model)
    finally:
        stop.set()
        t.join()
    held = 60_000 * 3 * (32 + 48) * 4 / 2**20  # what keeping every activation would cost: ~55 MB
    assert len(ActivationStore(tmp_path / "big")) == 60_000
    assert peak[0] - base < held / 3, (base, peak[0], held)


def _store_fingerprint(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {"shards": [(s["name"], s["rows"], {k: f["sha256"] for k, f in s["files"].items()}) for s in m["shards"]],
            "stats": (out / "stats.safetensors").read_bytes(), "docs": (out / "docs.json").read_bytes(),
            "tokens": m["tokens"], "summary": m["stats"]["summary"]}


def _records(out: Path) -> int:
    return len(list((out / "shards").glob("r000-*.json"))) if (out / "shards").is_dir() else 0


def _run_and_kill(argv, out, after_records, timeout=120):
    """Start a harvest, SIGKILL it once ``after_records`` shard records exist; True if it was killed mid-run."""
    proc = subprocess.Popen([sys.executable, "-m", "innards", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if _records(out) >= after_records:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return not (out / "manifest.json").exists()
            time.sleep(0.002)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_corpus(folder: Path, n_files: int, n_docs: int, words: int = 50, seed: int = 0) -> Path:
    """A folder of text files (one gzipped), documents tagged with their file."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    vocab = " ".join(SENTENCES).split()
    rng = np.random.default_rng(seed)
    for f in range(n_files):
        body = ("\n\n".join(f"doc{f} " + " ".join(rng.choice(vocab, words)) for _ in range(n_docs)) + "\n").encode()
        if f == 1:
            (folder / f"f{f:02d}.txt.gz").write_bytes(gzip.compress(body))
        else:
            (folder / f"f{f:02d}.txt").write_bytes(body)
    return folder


def test_kill9_resume_equals_uninterrupted(env, tmp_path):
    """Killed twice (the second time while resuming), then finished: the store is byte-identical (shuffled order)."""
    from innards.models.load import load_model

    text = write_corpus(tmp_path / "corpus", n_files=6, n_docs=130)
    argv = lambda out: ["harvest", "--model", env["model"], "--site", "blocks.1.resid_post", "--site", "blocks.0.mlp_hidden",
                        "--text", str(text), "--tokens", "24000", "--context", "48", "--batch-size", "4",
                        "--shard-tokens", "300", "--store-dtype", "bf16", "--out", str(out)]
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    cfg = HarvestConfig(model=env["model"], site=["blocks.1.resid_post", "blocks.0.mlp_hidden"], text=str(text), tokens=24000,
                        context=48, batch_size=4, shard_tokens=300, store_dtype="bf16", out=str(ref))
    harvest(cfg, model=load_model(env["model"]))
    assert ActivationStore(ref).manifest["text"]["order"] == "shuffled"
    killed = _run_and_kill(argv(out), out, after_records=3)
    assert killed, "the harvest finished before it could be killed; the test did not exercise resume"
    # a committed shard damaged after the crash is detected by its size and recomputed
    rec = json.loads(sorted((out / "shards").glob("r000-*.json"))[-1].read_text())
    last = out / rec["files"]["blocks.1.resid_post"]["path"]
    last.write_bytes(last.read_bytes()[:-7])
    assert _run_and_kill(argv(out), out, after_records=_records(out) + 3), "the resumed harvest was not killed"
    harvest(HarvestConfig(**{**cfg.__dict__, "out": str(out)}))  # the same command again
    a, b = _store_fingerprint(ref), _store_fingerprint(out)
    assert a == b
    sa, sb = ActivationStore(ref), ActivationStore(out)
    assert np.array_equal(sa.doc_ids, sb.doc_ids) and np.array_equal(sa.positions, sb.positions)
    assert sb.verify()["ok"] and not list((out / "shards").glob(".*tmp*"))


def test_torchrun_two_processes(env, tmp_path):
    out = tmp_path / "dist"
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "innards", "harvest",
            "--model", env["model"], "--site", "blocks.2.resid_post", "--text", env["text"], "--tokens", "901",
            "--context", "32", "--batch-size", "4", "--shard-tokens", "200", "--store-dtype", "fp32", "--out", str(out)]
    r = subprocess.run([sys.executable, *argv], env={**ENV, "INNARDS_BACKEND": "gloo"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    store = ActivationStore(out)
    m = store.manifest
    assert len(store) == 901 and m["settings"]["world_size"] == 2
    assert [s["rank"] for s in m["shards"]] == [0, 0, 0, 1, 1, 1]
    assert [s["rows"] for s in m["shards"]] == [200, 200, 51, 200, 200, 50]
    docs = store.doc_ids
    assert set(docs[:451] % 2) == {0} and set(docs[451:] % 2) == {1}  # each rank took its own documents
    # the stream is the shuffled one: documents of the file come out of order, each once
    k = [int(store.doc_table[d].rsplit(":", 1)[1]) for d in np.unique(docs)]
    assert m["text"]["order"] == "shuffled" and sorted(k) != k and len(set(k)) == len(k)
    x = store.rows(np.arange(len(store))).double().numpy()
    np.testing.assert_allclose(store.stats()["mean"], x.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(store.stats()["var"], x.var(0), rtol=1e-6, atol=1e-9)


def test_api_config_errors():
    with pytest.raises(InnardsError, match="no site"):
        harvest(HarvestConfig(text="x", out="y"))
    with pytest.raises(InnardsError, match="tokens"):
        harvest(HarvestConfig(site=["blocks.0.resid_post"], text="x", out="y", tokens=0))


def test_bench_harvest_prints_one_json_object(env, capsys):
    assert cli(["bench", "harvest", "--model", env["model"], "--text", env["text"], "--tokens", "600", "--context", "32",
                "--batch-size", "4", "--warmup", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    res = json.loads(out[0])
    # the middle block (the harvest stops early) and the last one (nothing to skip but the head), reported apart
    assert res["middle"]["sites"] == ["blocks.1.resid_post"] and res["last"]["sites"] == ["blocks.2.resid_post"]
    for run in (res["middle"], res["last"]):
        assert run["tokens"] >= 600
        for key in ("harvest_tokens_per_s", "forward_tokens_per_s", "ratio", "ratio_body"):
            assert run[key] > 0
    assert res["peak_rss_mb"] > 0


def _files_of(store: ActivationStore) -> list[str]:
    table = store.doc_table
    return [table[d].split(":")[0] for d in np.unique(store.doc_ids)]


def test_small_budget_over_many_files_draws_from_all(env, tmp_path, capsys):
    """The default shuffled order samples every file of the input; --order sequential reads the first ones only."""
    text = write_corpus(tmp_path / "many", n_files=12, n_docs=100, words=4)
    base = ["harvest", "--model", env["model"], "--site", "blocks.0.resid_post", "--text", str(text), "--tokens", "2500",
            "--context", "32", "--batch-size", "4"]
    assert cli([*base, "--out", str(tmp_path / "shuf")]) == 0
    assert cli([*base, "--out", str(tmp_path / "seq"), "--order", "sequential"]) == 0
    shuf, seq = ActivationStore(tmp_path / "shuf"), ActivationStore(tmp_path / "seq")
    assert len(shuf) == len(seq) == 2500  # about 1/8 of the corpus
    assert set(_files_of(shuf)) == {f"f{f:02d}.txt" + (".gz" if f == 1 else "") for f in range(12)}
    assert set(_files_of(seq)) <= {"f00.txt", "f01.txt.gz"}
    assert shuf.manifest["text"]["order"] == "shuffled" and seq.manifest["text"]["order"] == "sequential"
    assert shuf.manifest["plan"]["text"]["order"] == "shuffled"
    # the same seed gives the same stream, another seed another one
    assert cli([*base, "--out", str(tmp_path / "shuf2"), "--seed", "1"]) == 0
    assert ActivationStore(tmp_path / "shuf2").doc_table[:20] != shuf.doc_table[:20]


def test_dtype_alias_prints_a_hint(env, tmp_path, capsys):
    assert cli(args(env, tmp_path / "st", "--dtype", "fp16")) == 0
    err = capsys.readouterr().err
    assert sum("--dtype" in ln and "--store-dtype" in ln for ln in err.splitlines()) == 1
    assert ActivationStore(tmp_path / "st").dtype == "fp16"
    import yaml

    saved = yaml.safe_load((tmp_path / "st" / "config.yaml").read_text())
    assert saved["store_dtype"] == "fp16" and saved["model"]["dtype"] == "fp32" and "dtype" not in saved
    # the flat model flags of innards 0.1/0.2 keep working
    assert cli(args(env, tmp_path / "st2", "--model-dtype", "bf16", "--device", "cpu")) == 0
    saved = yaml.safe_load((tmp_path / "st2" / "config.yaml").read_text())
    assert saved["model"] == {"name": env["model"], "revision": None, "dtype": "bf16", "device": "cpu"}
    assert ActivationStore(tmp_path / "st2").manifest["settings"]["model_dtype"] == "bf16"


@pytest.mark.parametrize("flags, match", [
    (["--tokens", "0"], "--tokens must be at least 1"), (["--tokens", "-5"], "--tokens"),
    (["--batch-size", "0"], "--batch-size"), (["--shard-tokens", "0"], "--shard-tokens"),
    (["--context", "1"], "--context must be at least 2"), (["--val-fraction", "1"], "--val-fraction"),
    (["--val-fraction", "-0.1"], "--val-fraction"), (["--seed", "-1"], "--seed"), (["--tokens", "1.5"], "tokens"),
    (["--order", "random"], "order"), (["--store-dtype", "fp64"], "store-dtype"),
])
def test_bad_numbers_fail_before_the_model_loads(capsys, tmp_path, flags, match):
    argv = ["harvest", "--model", str(tmp_path / "no-model"), "--site", "blocks.0.resid_post", "--text", "x",
            "--out", str(tmp_path / "st"), *flags]
    line = one_line_error(capsys, argv, match)
    assert "no-model" not in line and not (tmp_path / "st").exists()


def test_bench_harvest_checks_its_numbers(capsys):
    one_line_error(capsys, ["bench", "harvest", "--tokens", "0"], "--tokens must be at least 1")
    one_line_error(capsys, ["bench", "harvest", "--warmup", "-1"], "--warmup")


def test_output_in_the_way_and_other_artifacts(env, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, args(env, tmp_path / "afile"), "not a folder")
    one_line_error(capsys, args(env, tmp_path / "afile" / "st"), "is a file")
    glp = tmp_path / "glp"
    glp.mkdir()
    (glp / "run.json").write_text(json.dumps({"format": "innards.run", "format_version": 1, "kind": "glp", "status": "complete"}))
    one_line_error(capsys, [*args(env, glp), "--overwrite"], "holds a glp run")
    assert sorted(p.name for p in glp.iterdir() if p.name != ".innards.lock") == ["run.json"]


def test_a_second_harvest_is_locked_out(env, capsys, tmp_path):
    import fcntl

    out = tmp_path / "st"
    assert cli(args(env, out)) == 0
    before = _mtimes(out)
    fd = os.open(out / ".innards.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running harvest holds it
        one_line_error(capsys, [*args(env, out), "--overwrite"], "being written by another innards process")
    finally:
        os.close(fd)
    assert _mtimes(out) == before and ActivationStore(out).verify()["ok"]
    assert json.loads((out / "run.json").read_text())["kind"] == "store"
