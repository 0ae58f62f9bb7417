"""Task discovery, reading, label encoding and the SAE-Probes split."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from innards.errors import InnardsError
from innards.probe.tasks import (balanced_split, encode_labels, list_tasks, make_split, read_task, select_tasks,
                                 split_sizes)


def _write(path, rows, header=("prompt", "target")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def _reference_split(y, num_train, num_test, pos_ratio=0.5, seed=42):
    """SAE-Probes' get_train_test_indices, written out with the legacy global RNG it uses."""
    np.random.seed(seed)
    pos, neg = np.where(y == 1)[0], np.where(y == 0)[0]
    ptr = int(np.ceil(pos_ratio * num_train))
    pte = int(np.ceil(pos_ratio * num_test))
    a = np.random.choice(pos, size=ptr, replace=False)
    b = np.random.choice(neg, size=num_train - ptr, replace=False)
    c = np.random.choice(np.setdiff1d(pos, a), size=pte, replace=False)
    d = np.random.choice(np.setdiff1d(neg, b), size=num_test - pte, replace=False)
    return np.random.permutation(np.concatenate([a, b])), np.random.permutation(np.concatenate([c, d]))


def test_label_encoding_like_label_encoder():
    assert encode_labels(["yes", "no", "yes"])[0].tolist() == [1, 0, 1]
    assert encode_labels(["True", "False"])[1] == ["False", "True"]
    labels, classes = encode_labels(["10", "9", "10"])  # numbers compare as numbers
    assert classes == ["9", "10"] and labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("n", [140, 1000, 1494, 5000])
def test_split_is_the_sae_probes_split(n):
    y = np.tile([0, 1], n // 2)
    np.random.default_rng(n).shuffle(y)
    ntr, nte = split_sizes(n)
    assert ntr == min(1024, n - 100) and nte == n - ntr - 1
    s = balanced_split(y, ntr, nte, seed=42)
    a, b = _reference_split(y, ntr, nte)
    assert np.array_equal(s.train, a) and np.array_equal(s.test, b)
    assert not set(s.train) & set(s.test)
    assert abs(int(y[s.train].sum()) - ntr / 2) <= 1


def test_folder_filter_and_zst(tmp_path):
    import zstandard

    _write(tmp_path / "2_b.csv", [["x", "a"], ["y", "b"]])
    raw = _write(tmp_path / "10_c.tmp", [["p1", "1"], ["p,2\nline", "0"]], header=("prompt", "prompt_len", "target")[::2])
    (tmp_path / "10_c.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(raw.read_bytes()))
    refs = list_tasks(tmp_path)
    assert [r.name for r in refs] == ["2_b", "10_c"]  # numeric order, like the benchmark's names
    t = read_task(refs[1].path)
    assert t.prompts == ["p1", "p,2\nline"] and t.labels.tolist() == [1, 0]
    assert [r.name for r in select_tasks(refs, ["1*"])] == ["10_c"]
    assert len(select_tasks(refs, None, max_tasks=1)) == 1
    with pytest.raises(InnardsError, match="matches no task"):
        select_tasks(refs, ["zzz*"])


def test_master_layout_lists_binary_tasks_only(tmp_path):
    (tmp_path / "cleaned_data").mkdir()
    _write(tmp_path / "cleaned_data" / "1_a.csv", [["x", "0"], ["y", "1"]])
    _write(tmp_path / "probing_datasets_MASTER.csv",
           [["cleaned_data/1_a.csv", "Binary Classification"], ["cleaned_data/2_b.csv", "Continuous Data"],
            ["cleaned_data/3_gone.csv", "Binary Classification"]], header=("Dataset save name", "Data type"))
    refs = list_tasks(tmp_path)
    assert [(r.name, r.path is not None) for r in refs] == [("1_a", True), ("3_gone", False)]


def test_bad_task_files(tmp_path):
    with pytest.raises(InnardsError, match="lacks column"):
        read_task(_write(tmp_path / "a.csv", [["x", "1"]], header=("text", "label")))
    with pytest.raises(InnardsError, match="no rows"):
        read_task(_write(tmp_path / "b.csv", []))
    (tmp_path / "c.csv").write_text("")
    with pytest.raises(InnardsError, match="empty"):
        read_task(tmp_path / "c.csv")
    with pytest.raises(InnardsError, match="not found"):
        list_tasks(tmp_path / "nowhere")
    with pytest.raises(InnardsError, match="no task files"):
        list_tasks((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_unprobeable_tasks_are_skipped_with_a_reason(tmp_path):
    one = read_task(_write(tmp_path / "one.csv", [[f"p{i}", "1"] for i in range(300)]))
    three = read_task(_write(tmp_path / "three.csv", [[f"p{i}", str(i % 3)] for i in range(300)]))
    few = read_task(_write(tmp_path / "few.csv", [[f"p{i}", str(i % 2)] for i in range(50)]))
    assert "one class" in make_split(one)[1]
    assert "3 classes" in make_split(three)[1]
    assert "too few rows" in make_split(few)[1]
    split, why = make_split(few, min_test=20)
    assert why is None and len(split.train) == 30 and len(split.test) == 19


def test_the_benchmark_has_113_binary_tasks(shared_data):
    refs = list_tasks(shared_data / "sae_probes")
    assert len(refs) == 113 and all(r.path is not None for r in refs)
    t = read_task(refs[0].path)
    assert t.name == "5_hist_fig_ismale" and len(t.prompts) == 5000 and t.labels.sum() == 2500
