"""Probing tasks: SAE-Probes-style CSV files (``prompt``, ``target``), their labels and their splits.

A task source is a folder or ``sae-probes`` (the data inside the installed PyPI package). A folder
holding ``probing_datasets_MASTER.csv[.zst]`` is read as the SAE-Probes benchmark: its tasks are the
rows whose ``Data type`` is ``Binary Classification`` (113 tasks), in the master file's order. Any
other folder: every ``*.csv`` / ``*.csv.zst`` in it (or in its ``cleaned_data/``) is one task.

Labels are encoded like scikit-learn's LabelEncoder (sorted distinct values -> 0, 1; numbers sorted
as numbers), and splits follow SAE-Probes ``get_train_test_indices`` exactly (same RNG stream), so
the train/test rows equal the benchmark's and the GLP reference's cached splits.
"""

from __future__ import annotations

import csv
import fnmatch
import importlib.util
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from innards.errors import InnardsError

MASTER = "probing_datasets_MASTER.csv"
BINARY = "Binary Classification"
REQUIRED = ("prompt", "target")


@dataclass
class TaskRef:
    """Where one task lives (before reading it)."""

    name: str
    path: Path | None  # None: listed in the master file but absent on disk


@dataclass
class Task:
    """One task read into memory: prompts, encoded 0/1 labels and the original class values."""

    name: str
    prompts: list[str]
    labels: np.ndarray  # int64, values in 0..n_classes-1
    classes: list[str]  # classes[i] is the raw target value encoded as i
    path: Path


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        raw = open(path, "rb")
        stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _rows(path: Path):
    csv.field_size_limit(1 << 30)  # some prompts are whole documents
    with _open_text(path) as f:
        for row in csv.reader(f):
            if row:  # pandas skips blank lines too
                yield row


def task_name(path: Path) -> str:
    """File name without ``.csv`` / ``.csv.zst``."""
    name = path.name
    for suffix in (".zst", ".csv"):
        name = name.removesuffix(suffix)
    return name


def _sort_key(values: list[str]):
    try:
        nums = {v: float(v) for v in values}
        if not any(math.isnan(x) for x in nums.values()):
            return lambda v: nums[v]
    except ValueError:
        pass
    return None


def encode_labels(targets: list[str]) -> tuple[np.ndarray, list[str]]:
    """Sorted distinct values -> 0..k-1, like LabelEncoder (numbers compare as numbers)."""
    classes = sorted(set(targets), key=_sort_key(list(set(targets))))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[t] for t in targets], dtype=np.int64), classes


def read_task(path: Path, name: str | None = None) -> Task:
    """Read a task file; one-line errors for missing columns and files without rows."""
    path = Path(path)
    if not path.is_file():
        raise InnardsError(f"task file not found: {path}")
    try:
        it = _rows(path)
        header = next(it, [])
        if not header:
            raise InnardsError(f"task file {path} is empty")
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise InnardsError(f"task file {path} lacks column(s) {', '.join(missing)} "
                               f"(has: {', '.join(header[:8])}); tasks need 'prompt' and 'target'")
        ip, it_ = header.index("prompt"), header.index("target")
        prompts, targets = [], []
        for row in it:
            if len(row) <= max(ip, it_):
                raise InnardsError(f"task file {path}: row {len(prompts) + 2} has {len(row)} fields, "
                                   f"expected {len(header)}")
            prompts.append(row[ip])
            targets.append(row[it_].strip())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InnardsError(f"task file {path} does not read as CSV ({type(e).__name__}: {e})") from None
    if not prompts:
        raise InnardsError(f"task file {path} has a header but no rows")
    if any(t == "" for t in targets):
        raise InnardsError(f"task file {path} has rows with an empty target")
    labels, classes = encode_labels(targets)
    return Task(name=name or task_name(path), prompts=prompts, labels=labels, classes=classes, path=path)


def sae_probes_package_dir() -> Path:
    """The data folder of the installed ``sae-probes`` package (without importing it)."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise InnardsError("--tasks sae-probes needs the PyPI package 'sae-probes' (pip install sae-probes), "
                           "or give the folder holding its CSVs (e.g. ../shared/data/sae_probes)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not d.is_dir():
        raise InnardsError(f"the installed sae-probes package has no data folder ({d})")
    return d


def _find_file(root: Path, rel: str) -> Path | None:
    rel_p = Path(rel)
    for base in (root / rel_p, root / "cleaned_data" / rel_p.name, root / rel_p.name):
        for cand in (base, base.with_name(base.name + ".zst")):
            if cand.is_file():
                return cand
    return None


def _master_refs(root: Path, master: Path) -> list[TaskRef]:
    rows = _rows(master)
    header = next(rows, [])
    for col in ("Data type", "Dataset save name"):
        if col not in header:
            raise InnardsError(f"{master} lacks the column '{col}'")
    it, isave = header.index("Data type"), header.index("Dataset save name")
    refs = []
    for row in rows:
        if len(row) > max(it, isave) and row[it].strip() == BINARY and row[isave].strip():
            save = row[isave].strip()
            refs.append(TaskRef(task_name(Path(save)), _find_file(root, save)))
    return refs


def list_tasks(source: str | Path) -> list[TaskRef]:
    """Task references of a folder or of ``sae-probes`` (the installed package), in benchmark order."""
    root = sae_probes_package_dir() if str(source) == "sae-probes" else Path(source).expanduser()
    if not root.exists():
        raise InnardsError(f"task folder not found: {root}")
    if root.is_file():
        return [TaskRef(task_name(root), root)]
    for m in (root / MASTER, root / (MASTER + ".zst")):
        if m.is_file():
            return _master_refs(root, m)
    for d in (root, root / "cleaned_data"):
        files = sorted([*d.glob("*.csv"), *d.glob("*.csv.zst")], key=_natural)
        if files:
            return [TaskRef(task_name(f), f) for f in files]
    raise InnardsError(f"no task files (*.csv, *.csv.zst) in {root}")


def _natural(p: Path) -> tuple:
    head = task_name(p).split("_", 1)[0]
    return (0, int(head), p.name) if head.isdigit() else (1, 0, p.name)


def select_tasks(refs: list[TaskRef], patterns: list[str] | None = None, max_tasks: int | None = None) -> list[TaskRef]:
    """Keep tasks whose name matches any glob (all when none given), then the first ``max_tasks``."""
    pats = [p.strip() for p in (patterns or []) if p.strip()]
    if pats:
        refs = [r for r in refs if any(fnmatch.fnmatchcase(r.name, p) for p in pats)]
        if not refs:
            raise InnardsError(f"--tasks-filter {','.join(pats)} matches no task")
    if max_tasks is not None and max_tasks > 0:
        refs = refs[:max_tasks]
    return refs


@dataclass
class Split:
    """Row indices of the train and test sets."""

    train: np.ndarray
    test: np.ndarray


def split_sizes(n: int, max_train: int = 1024, min_test: int = 100) -> tuple[int, int]:
    """SAE-Probes sizes: train = min(max_train, N - min_test), test = N - train - 1."""
    n_train = min(max_train, n - min_test)
    return n_train, n - n_train - 1


def balanced_split(labels: np.ndarray, n_train: int, n_test: int, seed: int = 42, pos_ratio: float = 0.5) -> Split:
    """SAE-Probes' class-balanced split (``get_train_test_indices``), same RNG calls, same rows.

    When a class is too small for its share of the test set (never on the benchmark, which is
    exactly balanced), the test set keeps what remains of that class.
    """
    y = np.asarray(labels)
    rng = np.random.RandomState(seed)  # the legacy stream np.random.seed(seed) gives the reference
    pos, neg = np.where(y == 1)[0], np.where(y == 0)[0]
    pos_train = int(np.ceil(pos_ratio * n_train))
    neg_train = n_train - pos_train
    pos_test = int(np.ceil(pos_ratio * n_test))
    neg_test = n_test - pos_test
    if pos_train > len(pos) or neg_train > len(neg):
        raise ValueError(f"a balanced train set of {n_train} needs {pos_train} and {neg_train} rows per class; "
                         f"the task has {len(pos)} and {len(neg)}")
    train_pos = rng.choice(pos, size=pos_train, replace=False)
    train_neg = rng.choice(neg, size=neg_train, replace=False)
    rest_pos = np.setdiff1d(pos, train_pos)
    rest_neg = np.setdiff1d(neg, train_neg)
    test_pos = rng.choice(rest_pos, size=min(pos_test, len(rest_pos)), replace=False)
    test_neg = rng.choice(rest_neg, size=min(neg_test, len(rest_neg)), replace=False)
    train = rng.permutation(np.concatenate([train_pos, train_neg]))
    test = rng.permutation(np.concatenate([test_pos, test_neg]))
    return Split(train=train.astype(np.int64), test=test.astype(np.int64))


def make_split(task: Task, seed: int = 42, max_train: int = 1024, min_test: int = 100,
               n_folds: int = 5) -> tuple[Split | None, str | None]:
    """(split, None) or (None, why the task cannot be probed): one class, too few rows, not binary."""
    n_classes = len(task.classes)
    if n_classes == 1:
        return None, f"one class ({task.classes[0]!r})"
    if n_classes > 2:
        return None, f"{n_classes} classes, not a binary task"
    n = len(task.labels)
    n_train, n_test = split_sizes(n, max_train, min_test)
    if n_train < 2 * n_folds or n_test < 2:
        return None, f"too few rows ({n}; needs at least {2 * n_folds + min_test + 1})"
    try:
        split = balanced_split(task.labels, n_train, n_test, seed=seed)
    except ValueError as e:
        return None, f"too few rows of one class: {e}"
    ytr, yte = task.labels[split.train], task.labels[split.test]
    if min(np.bincount(ytr, minlength=2)) < n_folds:
        return None, f"fewer than {n_folds} train rows of one class"
    if len(np.unique(yte)) < 2:
        return None, "the test set holds one class"
    return split, None
