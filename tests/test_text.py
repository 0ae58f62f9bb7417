import gzip
import json

import numpy as np
import pytest

from innards.data.text import (Document, chunk_tokens, framing, iter_batches, iter_chunks, iter_documents,
                               open_text)
from innards.errors import InnardsError
from tiny_models import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from innards.models.load import load_model

    return load_model(make_tiny_model("llama", tmp_path_factory.mktemp("m")))


def _corpus(root):
    root.mkdir()
    (root / "b.txt").write_bytes(b"first doc\nsame doc\n\n\n  \nsecond \xff doc\n\x0c\nthird")
    with gzip.open(root / "a.txt.gz", "wb") as f:
        f.write(b"gz one\n\ngz two\n")
    (root / "sub").mkdir()
    (root / "sub" / "c.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": " "}) + "\n"
                                          + json.dumps({"text": "json three"}) + "\n")
    (root / "d.csv").write_text('prompt,target\n"two\nlines",1\nplain,0\n')
    (root / "notes.md").write_text("ignored")
    return root


def test_folder_order_ids_and_invalid_utf8(tmp_path, capsys):
    src = _corpus(tmp_path / "c")
    docs = list(iter_documents(str(src)))
    assert [d.id for d in docs] == ["a.txt.gz:0", "a.txt.gz:1", "b.txt:0", "b.txt:1", "b.txt:2", "d.csv:0", "d.csv:1",
                                    "sub/c.jsonl:0", "sub/c.jsonl:2"]
    assert docs[2].text == "first doc\nsame doc"
    assert docs[3].text == "second \ufffd doc"
    assert docs[5].text == "two\nlines"
    err = capsys.readouterr().err
    assert "b.txt: replaced 1 invalid UTF-8 byte(s)" in err
    # ids and order are stable across runs
    assert [d.id for d in iter_documents(str(src))] == [d.id for d in docs]


def test_doc_splits_and_single_files(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("a\nb\n\nc\x0cd\n")
    assert [d.text for d in iter_documents(str(f))] == ["a\nb", "c\x0cd"]
    assert [d.text for d in iter_documents(str(f), split="line")] == ["a", "b", "c\x0cd"]
    assert [d.text for d in iter_documents(str(f), split="formfeed")] == ["a\nb\n\nc", "d"]
    assert [d.text for d in iter_documents(str(f), split="file")] == ["a\nb\n\nc\x0cd"]


def test_csv_zst_like_sae_probes(tmp_path):
    import zstandard

    p = tmp_path / "t.csv.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(b"prompt,prompt_len,target\nhello there,2,yes\nbye,1,no\n"))
    assert [(d.id, d.text) for d in iter_documents(str(p))] == [("t.csv.zst:0", "hello there"), ("t.csv.zst:1", "bye")]


def test_sae_probes_file(shared_data):
    p = sorted((shared_data / "sae_probes" / "cleaned_data").glob("*.csv.zst"))[0]
    docs = []
    for d in iter_documents(str(p)):
        docs.append(d)
        if len(docs) == 5:
            break
    assert len(docs) == 5 and all(d.text for d in docs)


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InnardsError, match="no documents"):
        list(iter_documents(str(tmp_path / "empty.txt")))
    with pytest.raises(InnardsError, match="not found"):
        open_text(str(tmp_path / "nope.txt"))
    (tmp_path / "x.pdf").write_text("x")
    with pytest.raises(InnardsError, match="unsupported"):
        open_text(str(tmp_path / "x.pdf"))
    (tmp_path / "d").mkdir()
    with pytest.raises(InnardsError, match="no text files"):
        open_text(str(tmp_path / "d"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(InnardsError, match="bad.jsonl:2: not valid JSON"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InnardsError, match="no 'text' field"):
        list(iter_documents(str(tmp_path / "nofield.jsonl")))
    (tmp_path / "trunc.txt.gz").write_bytes(gzip.compress(b"hello\n" * 1000)[:30])
    with pytest.raises(InnardsError, match="cannot read text file"):
        list(iter_documents(str(tmp_path / "trunc.txt.gz")))
    with pytest.raises(InnardsError, match="cannot load dataset"):
        list(iter_documents("hf:no-such-user/no-such-dataset:train"))
    for bad in ("", "generate:x", "generate:0", "hf:"):
        with pytest.raises(InnardsError):
            open_text(bad)


def test_fingerprint_tracks_content(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("one\n\ntwo\n")
    a = open_text(str(f)).fingerprint
    assert open_text(str(f)).fingerprint == a
    f.write_text("one\n\ntwo!\n")
    assert open_text(str(f)).fingerprint != a
    assert open_text(str(f), text_field="body").fingerprint != open_text(str(f)).fingerprint


def test_hf_datasets_local(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", "", "gamma"], "label": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "saved"))
    docs = list(iter_documents(str(tmp_path / "saved")))
    assert [(d.id.rsplit(":", 1)[1], d.text) for d in docs] == [("0", "alpha"), ("2", "gamma")]
    datasets.DatasetDict({"train": ds, "validation": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in iter_documents(f"hf:{tmp_path / 'dd'}:validation")] == ["gamma"]
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8]]}).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    docs = list(iter_documents(str(tmp_path / "pq")))
    assert [d.tokens for d in docs] == [(5, 6, 7), (8,)]
    assert open_text(str(tmp_path / "saved")).fingerprint == open_text(str(tmp_path / "saved")).fingerprint


def test_chunks_keep_doc_positions_and_exclude_specials(tok):
    frame = framing(tok)
    assert frame.prefix == (tok.bos_token_id,)
    ids = np.arange(10, 30, dtype=np.int64)
    ids[5] = tok.eos_token_id  # a special token inside the text is never harvested
    chunks = list(chunk_tokens(7, ids, context=8, frame=frame))
    assert [c.start for c in chunks] == [0, 7, 14]
    assert all(c.doc == 7 and c.ids[0] == tok.bos_token_id and not c.keep[0] for c in chunks)
    assert sum(int(c.keep.sum()) for c in chunks) == 19
    kept = np.concatenate([c.positions[c.keep] for c in chunks])
    assert kept.tolist() == [i for i in range(20) if i != 5]
    assert len(chunks[-1].ids) == 7
    with pytest.raises(InnardsError):
        list(chunk_tokens(0, ids, context=1, frame=frame))


def test_batches_pad_and_index(tok):
    docs = [(0, Document("a", "Once upon a time there was a little fox")), (3, Document("b", "hello")),
            (4, Document("c", tokens=(40, 41)))]
    chunks = list(iter_chunks(docs, tok, context=6))
    b = next(iter_batches(chunks, 16, framing(tok).pad))
    assert b.input_ids.shape[0] == len(chunks) and b.input_ids.shape[1] <= 6
    assert b.rows == int(b.keep.sum()) == len(b.doc) == len(b.pos) == len(b.tok)
    assert (b.attention_mask.bool() | ~b.keep).all()
    assert set(b.doc.tolist()) == {0, 3, 4}
    assert b.tok[b.doc == 4].tolist() == [40, 41]
    assert b.input_ids[b.keep].tolist() == b.tok.tolist()


def test_generate_is_seeded_and_cached(tiny_llama, tmp_path):
    a = open_text("generate:5", model=tiny_llama, seed=3, max_tokens=10, cache_dir=tmp_path / "g1")
    a.prepare()
    docs = list(a)
    assert [d.id for d in docs] == [f"gen:3:{i}" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "g1").iterdir()) == ["block-000000.jsonl"]
    b = open_text("generate:5", model=tiny_llama, seed=3, max_tokens=10)
    assert [d.text for d in b] == [d.text for d in docs]
    c = open_text("generate:5", model=tiny_llama, seed=4, max_tokens=10)
    assert [d.text for d in c] != [d.text for d in docs]
    assert a.fingerprint == b.fingerprint != c.fingerprint
    with pytest.raises(InnardsError, match="model"):
        open_text("generate:3")


def test_random_tokens_source(tiny_llama):
    docs = list(open_text("random:3", model=tiny_llama, seed=2, max_tokens=10))
    assert [d.id for d in docs] == ["random:2:0", "random:2:1", "random:2:2"]
    assert all(len(d.tokens) == 9 and not set(d.tokens) & set(tiny_llama.tokenizer.all_special_ids) for d in docs)
    assert [d.tokens for d in open_text("random:3", model=tiny_llama, seed=2, max_tokens=10)] == [d.tokens for d in docs]
    with pytest.raises(InnardsError):
        open_text("random:3")


def test_generate_needs_causal_lm(tmp_path):
    from innards.models.load import load_model

    bert = load_model(make_tiny_model("bert", tmp_path))
    with pytest.raises(InnardsError, match="generate"):
        open_text("generate:2", model=bert)


# ---------------------------------------------------------------- shuffled order


def _mixed_corpus(root):
    """Files of every kind, several restart points each (small segments), a gzip file of two members."""
    import zstandard

    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["fox", "ran", "the", "a", "hill", "über", "rain"]

    def para(tag, i):
        return f"{tag} {i} " + " ".join(rng.choice(words, int(rng.integers(3, 40))))

    (root / "a.txt").write_text("\n\n".join(para("a", i) for i in range(300)) + "\n")
    half = [para("g", i) for i in range(200)]
    (root / "g.txt.gz").write_bytes(gzip.compress(("\n\n".join(half[:90]) + "\n\n").encode())
                                    + gzip.compress(("\n\n".join(half[90:]) + "\n").encode()))
    lines = [json.dumps({"text": para("j", i) if i % 7 else " "}) for i in range(250)]
    (root / "j.jsonl").write_text("\n".join(lines) + "\n")
    (root / "c.csv").write_text("prompt,label\n" + "".join(f'"{para("c", i)}",{i}\n' for i in range(40)))
    (root / "z.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(
        ("prompt\n" + "".join(para("z", i) + "\n" for i in range(30))).encode()))
    return root


def test_shuffled_order_reads_every_document_once(tmp_path, monkeypatch):
    from innards.data import text as text_mod

    monkeypatch.setattr(text_mod, "MIN_SEGMENT", 512)  # many restart points in small files
    monkeypatch.setattr(text_mod, "WAVE", 4)  # and several waves
    src = _mixed_corpus(tmp_path / "c")
    seq = {d.id: d.text for d in iter_documents(str(src))}
    shuffled = open_text(str(src), order="shuffled", seed=3)
    first = [(d.id, d.text) for d in shuffled]
    assert dict(first) == seq and len(first) == len(seq)  # the same documents under the same ids, each once
    assert [d.id for d in shuffled] == [i for i, _ in first]  # the index is reused; the order is seeded
    assert [d.id for d in open_text(str(src), order="shuffled", seed=3)] == [i for i, _ in first]
    assert [d.id for d in open_text(str(src), order="shuffled", seed=4)] != [i for i, _ in first]
    assert len(shuffled._index()) > 12  # files really were cut into segments
    # with every segment in one wave, a prefix of the stream samples every file, not the first ones
    monkeypatch.setattr(text_mod, "WAVE", 128)
    head = {d.id.split(":")[0] for _, d in zip(range(len(first) // 10), open_text(str(src), order="shuffled"))}
    assert head == {"a.txt", "g.txt.gz", "j.jsonl", "c.csv", "z.csv.zst"}
    for split in ("line", "formfeed", "file"):
        want = {d.id: d.text for d in iter_documents(str(src / "a.txt"), split=split)}
        assert {d.id: d.text for d in open_text(str(src / "a.txt"), split=split, order="shuffled")} == want


def test_shuffled_hf_dataset_keeps_row_ids(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)]}).save_to_disk(str(tmp_path / "saved"))
    docs = list(open_text(str(tmp_path / "saved"), order="shuffled", seed=1))
    assert sorted(d.text for d in docs) == sorted(f"row {i}" for i in range(50))
    assert all(d.id.rsplit(":", 1)[1] == d.text.split()[1] for d in docs)  # ids keep the row numbers
    assert [d.text for d in docs][:10] != [f"row {i}" for i in range(10)]
    with pytest.raises(InnardsError, match="order"):
        open_text(str(tmp_path / "saved"), order="random")


# ---------------------------------------------------------------- long documents


def _nasty_text(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["Once", "upon", "a", "time,", "the", "fox", "ran", "  ", "\n", "\n\n", "héllo", "naïve", "—", "“q”",
             "12345", "x" * 30, "!!!", "\t", "The", "don't", "😀"]
    return "".join(rng.choice(words) + rng.choice([" ", "", "  ", "\n"]) for _ in range(n))


def test_windowed_tokens_equal_the_whole_text(tok, tiny_llama, tmp_path):
    from innards.data.text import _encode, chunk_pieces, text_tokens
    from innards.models.load import load_model

    text = _nasty_text(6000)
    bert = load_model(make_tiny_model("bert", tmp_path)).tokenizer
    for t in (tok, bert, load_model("demo").tokenizer):
        whole = np.asarray(_encode(t, [text])[0])
        pieces = list(text_tokens(text, t, window=2048))
        assert len(pieces) > 3 and np.array_equal(np.concatenate(pieces), whole)
    # chunks cut from pieces are the chunks of the whole
    frame = framing(tok)
    whole = np.asarray(_encode(tok, [text])[0])
    a = list(chunk_tokens(5, whole, 50, frame, "d"))
    b = list(chunk_pieces(5, text_tokens(text, tok, window=2048), 50, frame, "d"))
    assert len(a) == len(b) and all(np.array_equal(x.ids, y.ids) and np.array_equal(x.positions, y.positions)
                                    and x.start == y.start and x.name == y.name == "d" for x, y in zip(a, b))


def test_memory_is_flat_in_document_size(tok):
    """A one-line 1 MB document: tokenising it whole took ~230 bytes per character; windows take a few MB."""
    import os
    import threading
    import time

    from tiny_models import SENTENCES

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc")
    words = " ".join(SENTENCES).split()
    text = " ".join(np.random.default_rng(0).choice(words, 200_000))  # ~1 MB, no newline
    base = peak = rss()
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        rows = sum(int(c.keep.sum()) for c in iter_chunks([(0, Document("big", text))], tok, 128))
    finally:
        stop.set()
        t.join()
    assert rows > 500_000
    assert peak - base < 60, (base, peak)  # whole: ~230 MB


def test_children_pd_prefix_covers_every_file(shared_data):
    """The corpus's files hold its authors in alphabetical order: a shuffled prefix samples every file."""
    root = shared_data / "corpus" / "children-pd"
    if not root.is_dir():
        pytest.skip("children-pd corpus absent")
    files = {p.name for p in root.glob("*.txt.gz")}
    head = [d.id.split(":")[0] for _, d in zip(range(3000), open_text(str(root), order="shuffled"))]
    assert set(head) == files
    seq = {d.id.split(":")[0] for _, d in zip(range(3000), open_text(str(root)))}
    assert len(seq) == 1  # the sequential order stays in the first file (one author)
