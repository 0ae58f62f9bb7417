"""Offline steering evaluation: bootstrap CIs, fluency metrics, the concept evaluator, text files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_steer_helpers import NEG, POS, write_lines

from innards.errors import InnardsError
from innards.bootstrap import bootstrap_ci
from innards.steer.fluency import continuation_nll, distinct_n
from innards.steer.texts import check_balanced, read_lines


def test_bootstrap_ci_covers_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, size=50)
    m, lo, hi = bootstrap_ci(x, 2000, seed=0)
    assert m == pytest.approx(x.mean()) and lo < m < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * x.std() / math.sqrt(50), rel=0.25)
    assert bootstrap_ci(x, 2000, seed=0) == (m, lo, hi)
    assert bootstrap_ci([3.0], 100) == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap_ci([], 100))
    m2, lo2, hi2 = bootstrap_ci([1.0, float("nan"), 3.0, 2.0], 500, seed=0)
    assert m2 == pytest.approx(2.0) and 1.0 <= lo2 <= 2.0 <= hi2 <= 3.0


def test_bootstrap_coverage_rate():
    rng = np.random.default_rng(0)
    hits = sum(lo <= 0.0 <= hi for lo, hi in (bootstrap_ci(rng.normal(0, 1, 40), 500, seed=i)[1:] for i in range(100)))
    assert hits >= 85  # nominal 95%; percentile bootstrap at n = 40 is slightly liberal


def test_distinct_n():
    assert distinct_n("the cat sat on the mat", 2) == 1.0
    assert distinct_n("happy happy happy happy", 2) == pytest.approx(1 / 3)
    assert math.isnan(distinct_n("one", 2))
    assert distinct_n("A b a B", 2) == pytest.approx(2 / 3)  # case-insensitive


def test_continuation_nll_matches_manual_and_ignores_padding(tiny_model_dir):
    from innards.models.load import load_model

    model = load_model(str(tiny_model_dir("llama")))
    tok = model.tokenizer
    prompts = [tok("Once upon a time")["input_ids"], tok("The fox")["input_ids"], tok("One")["input_ids"]]
    conts = [tok(" there was a fox", add_special_tokens=False)["input_ids"],
             tok(" liked to run and jump", add_special_tokens=False)["input_ids"], []]
    got = continuation_nll(model, prompts, conts, batch_size=3, progress=False)
    for i in range(2):
        ids = torch.tensor([prompts[i] + conts[i]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        n = len(prompts[i])
        want = -logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].mean().item()
        assert got[i] == pytest.approx(want, abs=1e-4)
    assert math.isnan(got[2])
    one = continuation_nll(model, prompts[1:2], conts[1:2], batch_size=1, progress=False)
    assert one[0] == pytest.approx(got[1], abs=1e-4)


def test_read_lines_replaces_bad_bytes(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"caf\xe9 ok\n\n  second line  \n\xff\xfe\n")
    lines = read_lines(p)
    assert lines[0] == "caf\ufffd ok" and lines[1] == "second line" and len(lines) == 3


def test_check_balanced():
    check_balanced(10, 1)
    with pytest.raises(InnardsError, match="unbalanced"):
        check_balanced(11, 1)
    with pytest.raises(InnardsError, match="no sentences"):
        check_balanced(0, 5)


@pytest.fixture(scope="module")
def concept_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concept")
    return write_lines(tmp / "pos.txt", POS), write_lines(tmp / "neg.txt", NEG), tmp


def test_evaluator_trains_scores_and_caches(concept_files):
    from innards.steer.evaluator import load_or_train_evaluator

    pos, neg, tmp = concept_files
    ev = load_or_train_evaluator("joy", pos, neg, cache_dir=tmp / "cache")
    assert 0.0 <= ev.accuracy <= 1.0 and ev.n_test >= 2 and ev.n_train + ev.n_test == 24
    p = ev.score(["a wonderful, lovely, happy day full of joy", "a terrible, miserable day full of pain"])
    assert p[0] > p[1]
    files = list((tmp / "cache").glob("joy-*.json"))
    assert len(files) == 1
    again = load_or_train_evaluator("joy", pos, neg, cache_dir=tmp / "cache")
    assert np.array_equal(again.coef, ev.coef) and again.accuracy == ev.accuracy


def test_concept_without_data_is_an_error(concept_files, tmp_path):
    from innards.steer.evaluator import load_or_train_evaluator

    pos, _, _ = concept_files
    with pytest.raises(InnardsError, match="no evaluator data"):
        load_or_train_evaluator("happiness", data_dir=tmp_path)
    with pytest.raises(InnardsError, match="no evaluator data"):
        load_or_train_evaluator("sentiment", data_dir=tmp_path)
    with pytest.raises(InnardsError, match="both"):
        load_or_train_evaluator("joy", pos=pos)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InnardsError, match="no sentences"):
        load_or_train_evaluator("joy", pos, empty)


def test_builtin_sentiment_evaluator(shared_data, tmp_path):
    from innards.steer.evaluator import load_or_train_evaluator

    ev = load_or_train_evaluator("sentiment", data_dir=shared_data, cache_dir=tmp_path, max_per_class=100)
    assert ev.accuracy > 0.6
    assert ev.provenance["n_pos"] == 5331
    p = ev.score(["a moving, beautifully acted and wonderful film", "a dull, lifeless and tedious mess"])
    assert p[0] > 0.5 > p[1]
