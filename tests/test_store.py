import json
import shutil

import numpy as np
import pytest
import torch

from innards.data.harvest import HarvestConfig, harvest
from innards.data.store import ActivationStore, decode, encode
from innards.data.text import iter_chunks, iter_documents
from innards.errors import ChecksumError, InnardsError
from tiny_models import SENTENCES, make_tiny_model

SITES = ["blocks.0.resid_post", "blocks.2.resid_post", "blocks.1.mlp_hidden"]


def write_corpus(path, n_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(SENTENCES, size=int(rng.integers(1, 4)))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from innards.models.load import load_model

    root = tmp_path_factory.mktemp("store")
    model_dir = make_tiny_model("llama", root)
    text = write_corpus(root / "corpus.txt")
    cfg = HarvestConfig(model=str(model_dir), site=SITES, text=str(text), tokens=700, out=str(root / "st"),
                        context=16, batch_size=4, dtype="fp32", shard_tokens=128, val_fraction=0.2)
    model = load_model(str(model_dir))
    harvest(cfg, model=model)
    return {"store": ActivationStore(root / "st"), "model": model, "cfg": cfg, "root": root, "text": text}


def test_rows_in_order_equal_per_chunk_forward(built):
    from innards.models.hooks import run_with_cache

    store, model, cfg = built["store"], built["model"], built["cfg"]
    assert len(store) == 700 and store.sites == SITES
    assert store.width("blocks.1.mlp_hidden") == 48 and store.width("blocks.0.resid_post") == 32
    docs = list(enumerate(iter_documents(cfg.text)))
    want = {s: [] for s in SITES}
    doc, pos, tok = [], [], []
    with torch.inference_mode():
        for c in iter_chunks(docs, model.tokenizer, cfg.context):
            acts = run_with_cache(model, torch.from_numpy(c.ids)[None], SITES)
            for s in SITES:
                want[s].append(acts[s][0][torch.from_numpy(c.keep)])
            doc += [c.doc] * int(c.keep.sum())
            pos += c.positions[c.keep].tolist()
            tok += c.ids[c.keep].tolist()
    assert store.doc_ids.tolist() == doc[:700]
    assert store.positions.tolist() == pos[:700]
    assert store.token_ids.tolist() == tok[:700]
    for s in SITES:
        got = torch.cat(list(store.loader(64, shuffle=False, normalize=False, sites=s)))
        torch.testing.assert_close(got, torch.cat(want[s])[:700], atol=1e-5, rtol=1e-4)
    table = store.doc_table
    assert table[0] == "corpus.txt:0" and table[store.doc_ids[-1]] == f"corpus.txt:{store.doc_ids[-1]}"


def test_manifest_is_self_describing(built):
    m = built["store"].manifest
    assert m["tokens"] == 700 and m["dtype"] == "fp32" and m["context"] == 16
    assert "resid_post[L] == resid_pre[L+1]" in m["index_convention"]
    assert [s["site"] for s in m["sites"]] == SITES and m["sites"][0]["tl_name"] == "blocks.0.hook_resid_post"
    assert m["model"]["sha256"] and m["text"]["fingerprint"] and m["innards"]["version"]
    assert len(m["shards"]) == 6 and [s["rows"] for s in m["shards"]] == [128] * 5 + [60]
    assert all(len(f["sha256"]) == 64 for s in m["shards"] for f in s["files"].values())
    assert m["stats"]["summary"]["blocks.2.resid_post"]["count"] == 700
    assert m["special_tokens"]["prefix"] == [1]


def test_stats_cover_the_whole_stream(built):
    store = built["store"]
    for s in SITES:
        x = store.rows(np.arange(len(store)), site=s).double().numpy()
        st = store.stats(s)
        np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(st["var"], x.var(0), rtol=1e-6, atol=1e-9)
        assert st["count"] == 700
        assert st["mean_norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-6)
        assert st["rms_norm"] == pytest.approx(np.sqrt(np.sum(x.mean(0) ** 2 + x.var(0))), rel=1e-6)


def test_shuffle_is_global_and_per_epoch(built):
    store = built["store"]
    loader = store.loader(100, seed=1, normalize=False, sites="blocks.0.resid_post")
    assert len(loader) == 7
    rows = store.rows(np.arange(len(store)), site="blocks.0.resid_post")
    order = loader.order(0)
    assert sorted(order.tolist()) == list(range(700))
    first = next(iter(loader))
    torch.testing.assert_close(first, rows[order[:100]])
    shards = set((order[:100] // 128).tolist())
    assert len(shards) >= 4  # one batch draws from across the store, not one shard
    loader = store.loader(100, seed=1, normalize=False, sites="blocks.0.resid_post")
    e0 = torch.cat(list(loader))
    e1 = torch.cat(list(loader))
    assert e0.shape == e1.shape == (700, 32)
    assert not torch.equal(e0, e1)
    torch.testing.assert_close(e0.sum(0), e1.sum(0), atol=1e-4, rtol=1e-5)
    assert not np.array_equal(store.loader(100, seed=2).order(0), order)


def test_several_sites_normalize_and_rows(built):
    store = built["store"]
    both = ["blocks.0.resid_post", "blocks.2.resid_post"]
    b = next(iter(store.loader(50, sites=both, shuffle=False, normalize=False)))
    assert b.shape == (50, 2, 32) and b.dtype == torch.float32
    torch.testing.assert_close(b[:, 1], store.rows(np.arange(50), site="blocks.2.resid_post"))
    torch.testing.assert_close(store.rows([3, 1], site=both)[:, 0], store.rows([3, 1], site="blocks.0.resid_post"))
    z = torch.cat(list(store.loader(128, sites="blocks.2.resid_post", normalize=True)))
    torch.testing.assert_close(z.double().mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.double().var(0, unbiased=False), torch.ones(32, dtype=torch.float64), atol=1e-4, rtol=0)
    with pytest.raises(InnardsError, match="different widths"):
        next(iter(store.loader(8)))
    with pytest.raises(InnardsError, match="not in store"):
        store.loader(8, sites="blocks.9.resid_post")
    assert store.stats("blocks.0.hook_resid_post")["count"] == 700  # TL spelling resolves
    with pytest.raises(InnardsError, match="out of range"):
        store.rows([700], site="blocks.0.resid_post")


def test_split_by_document(built):
    store = built["store"]
    train, val = store.split_rows("train"), store.split_rows("val")
    assert len(train) + len(val) == 700 and len(val) > 0 and not set(train) & set(val)
    docs = store.doc_ids
    assert not set(docs[train]) & set(docs[val])
    got = torch.cat(list(store.loader(64, split="val", shuffle=False, normalize=False, sites="blocks.0.resid_post")))
    torch.testing.assert_close(got, store.rows(val, site="blocks.0.resid_post"))
    assert store.manifest["split"]["val_docs"] == int(store.val_docs().sum())


def test_loader_state_resumes_exactly(built):
    store = built["store"]
    kw = dict(batch_size=64, seed=5, sites="blocks.2.resid_post", split="train", drop_last=True)
    ref = store.loader(**kw)
    full = [list(ref), list(ref)]  # two epochs
    a = store.loader(**kw)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))
    b = store.loader(**kw)
    b.load_state_dict(state)
    rest = list(b) + list(b)
    expect = full[0][3:] + full[1]
    assert len(rest) == len(expect)
    for x, y in zip(rest, expect):
        assert torch.equal(x, y)
    c = store.loader(**{**kw, "seed": 6})
    with pytest.raises(InnardsError, match="seed"):
        c.load_state_dict(state)


def test_bf16_and_fp16_encoding_roundtrip():
    x = torch.randn(5, 7) * 100
    assert torch.equal(decode(encode(x, "bf16"), "bf16"), x.to(torch.bfloat16).float())
    assert encode(x, "bf16").dtype == np.uint16
    assert torch.equal(decode(encode(x, "fp16"), "fp16"), x.half().float())
    assert torch.equal(decode(encode(x, "fp32"), "fp32"), x)


def test_corrupted_and_truncated_shards_are_detected(built, tmp_path):
    st = tmp_path / "copy"
    shutil.copytree(built["root"] / "st", st)
    store = ActivationStore(st)
    assert store.verify()["ok"]
    target = st / store.manifest["shards"][2]["files"]["blocks.0.resid_post"]["path"]
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    s2 = ActivationStore(st)
    s2.rows([0], site="blocks.0.resid_post")  # other shards still read
    with pytest.raises(ChecksumError, match="checksum"):
        s2.rows([300], site="blocks.0.resid_post")
    with pytest.raises(ChecksumError):
        ActivationStore(st).verify()
    target.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ChecksumError, match="truncated"):
        list(ActivationStore(st).loader(64, sites="blocks.0.resid_post"))
    with pytest.raises(ChecksumError, match="truncated"):
        list(ActivationStore(st, verify="size").loader(64, sites="blocks.0.resid_post"))


def test_missing_and_incomplete_stores(tmp_path):
    with pytest.raises(InnardsError, match="no activation store"):
        ActivationStore(tmp_path)
    (tmp_path / "harvest.json").write_text("{}")
    with pytest.raises(InnardsError, match="incomplete"):
        ActivationStore(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InnardsError, match="not valid JSON"):
        ActivationStore(tmp_path)
