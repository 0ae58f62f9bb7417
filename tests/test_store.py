import hashlib
import json
import shutil
from pathlib import Path

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
                        context=16, batch_size=4, store_dtype="fp32", shard_tokens=128, val_fraction=0.2, order="sequential")
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


def test_indexing_like_a_map_style_dataset(built):
    """store[i] is one raw row, store[a:b] / index arrays / boolean masks (n, d), negatives from the end."""
    root, model = built["root"], built["model"]
    with pytest.raises(InnardsError, match="different widths"):
        built["store"][0]  # sites of two widths: read them with rows(site=...)
    harvest(HarvestConfig(model=str(root / "llama"), site=["blocks.2.resid_post"], text=str(built["text"]), tokens=700,
                          out=str(root / "one"), context=16, batch_size=4, store_dtype="fp32", shard_tokens=128), model=model)
    one = ActivationStore(root / "one")
    every = one.rows(np.arange(len(one)))
    assert one[3].shape == (32,) and torch.equal(one[3], every[3]) and torch.equal(one[-1], every[-1])
    assert torch.equal(one[10:20], every[10:20]) and torch.equal(one[::100], every[::100]) and one[5:5].shape == (0, 32)
    assert torch.equal(one[[5, 1, 5]], every[[5, 1, 5]]) and torch.equal(one[np.array([-1, 0])], every[[699, 0]])
    assert torch.equal(one[torch.tensor([2, 3])], every[2:4])
    mask = np.zeros(len(one), dtype=bool)
    mask[[4, 9]] = True
    assert torch.equal(one[mask], every[[4, 9]])
    for bad in (700, -701, [0, 700], np.zeros(3, dtype=bool), np.array([0.5])):
        with pytest.raises(IndexError):
            one[bad]
    assert sum(len(b) for b in torch.utils.data.DataLoader(one, batch_size=256)) == 700  # a torch Dataset as it is
    harvest(HarvestConfig(model=str(root / "llama"), site=["blocks.0.resid_post", "blocks.2.resid_post"],
                          text=str(built["text"]), tokens=700, out=str(root / "two"), context=16, batch_size=4,
                          store_dtype="fp32", shard_tokens=128), model=model)
    two = ActivationStore(root / "two")
    assert two[[1, 2]].shape == (2, 2, 32) and torch.equal(two[7], two.rows([7])[0])
    assert torch.equal(two[7][1], one[7])  # the same stream: the same rows whatever else is harvested


FIXTURE = Path(__file__).parent / "fixtures" / "store-v1"


def test_store_written_by_innards_0_2_loads_bit_exactly():
    """A store written by the code before the data layer was rebuilt (tests/fixtures/store-v1) reads the same."""
    exp = json.loads((FIXTURE.parent / "store-v1.expected.json").read_text())
    st = ActivationStore(FIXTURE)
    assert st.verify()["ok"] and len(st) == exp["rows"] and st.sites == exp["sites"] and st.dtype == exp["dtype"]
    for s in exp["sites"]:
        x = st.rows(np.arange(len(st)), site=s).numpy()
        assert hashlib.sha256(x.tobytes()).hexdigest() == exp[f"rows_sha256.{s}"]
        assert x[0, :4].tolist() == exp[f"first_row.{s}"]
        stats = st.stats(s)
        assert hashlib.sha256(stats["mean"].tobytes()).hexdigest() == exp[f"mean_sha256.{s}"]
        assert hashlib.sha256(stats["var"].tobytes()).hexdigest() == exp[f"var_sha256.{s}"]
        assert stats["mean_norm"] == exp[f"mean_norm.{s}"] and stats["rms_norm"] == exp[f"rms_norm.{s}"]
        b = next(iter(st.loader(64, seed=3, sites=s, split="train")))
        assert hashlib.sha256(b.numpy().tobytes()).hexdigest() == exp[f"loader_first_batch_sha256.{s}"]
    assert st.doc_ids.tolist() == exp["doc_ids"] and st.positions.tolist() == exp["positions"]
    assert st.token_ids.tolist() == exp["token_ids"] and st.doc_table == exp["doc_table"]
    assert st.split_rows("train").tolist() == exp["train_rows"]


def test_this_code_writes_the_0_2_store_byte_for_byte(tmp_path):
    """Harvesting the fixture's settings (sequential order) again gives the very same shard files."""
    from tiny_models import SENTENCES as S
    from tiny_models import make_tiny_model

    from innards.models.load import load_model

    old = json.loads((FIXTURE / "manifest.json").read_text())
    model = load_model(make_tiny_model("llama", tmp_path))
    if model.innards_source.get("sha256") != old["model"]["sha256"]:
        pytest.skip("tests/tiny_models.py builds another model now; the fixture's weights cannot be rebuilt")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(S, size=int(rng.integers(1, 3)))) for _ in range(24)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    harvest(HarvestConfig(model=str(tmp_path / "llama"), site=["blocks.1.resid_post", "blocks.0.mlp_hidden"],
                          text=str(tmp_path / "corpus.txt"), tokens=300, out=str(tmp_path / "st"), context=16, batch_size=4,
                          store_dtype="bf16", shard_tokens=128, val_fraction=0.25, seed=0, order="sequential"), model=model)
    new = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert new["shards"] == old["shards"]  # names, rows, offsets, every file's size and SHA-256
    assert new["stats"]["sha256"] == old["stats"]["sha256"] and new["docs"]["sha256"] == old["docs"]["sha256"]
    for rec in (tmp_path / "st" / "shards").glob("r000-*.json"):
        assert rec.read_bytes() == (FIXTURE / "shards" / rec.name).read_bytes()


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("dtype"), "dtype is None"), (lambda m: m.update(dtype="fp64"), "dtype is 'fp64'"),
    (lambda m: m.pop("sites"), "'sites' is missing"), (lambda m: m.pop("shards"), "'shards' is missing"),
    (lambda m: m["shards"][0]["files"].pop("index"), "shard 0 lacks"), (lambda m: m.update(tokens=5), "token count"),
    (lambda m: m.pop("stats"), "'stats'"), (lambda m: m.update(format_version="1"), "format_version"),
    (lambda m: m["sites"].append(m["sites"][0]), "listed twice"),
])
def test_damaged_manifest_is_one_line(tmp_path, edit, match):
    st = tmp_path / "st"
    shutil.copytree(FIXTURE, st)
    m = json.loads((st / "manifest.json").read_text())
    edit(m)
    (st / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InnardsError, match=match) as e:
        ActivationStore(st)
    assert "\n" not in str(e.value) and "damaged" in str(e.value)


def test_damaged_manifest_on_the_command_line(tmp_path, capsys):
    from innards.cli import main as cli

    st = tmp_path / "st"
    shutil.copytree(FIXTURE, st)
    m = json.loads((st / "manifest.json").read_text())
    m["dtype"] = "fp64"
    (st / "manifest.json").write_text(json.dumps(m))
    assert cli(["glp", "train", "--acts", str(st), "--out", str(tmp_path / "g"), "--steps", "1"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("innards: error:") and "fp64" in err[0], err
    assert not (tmp_path / "g").exists()
