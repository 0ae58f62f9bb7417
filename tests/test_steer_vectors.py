"""Steering vectors: difference of means, file formats, SAE rows, compatibility and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_steer_helpers import NEG, POS, SITE, write_lines

from innards.cli import main as cli
from innards.errors import InnardsError
from innards.steer.vectors import SteeringVector, diff_means, load_vector, save_vector


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from innards.models.load import load_model

    d = tiny_model_dir("llama")
    return d, load_model(str(d))


def _last_token_mean(model, texts):
    from innards.models.hooks import run_with_cache

    rows = []
    for t in texts:
        ids = model.tokenizer(t, return_tensors="pt")["input_ids"]
        rows.append(run_with_cache(model, ids, [SITE])[SITE][0, -1].double())
    return torch.stack(rows).mean(0)


def test_diff_means_matches_manual_last_token(tiny):
    _, model = tiny
    sv = diff_means(model, SITE, POS, NEG, token="last", batch_size=5)
    want = _last_token_mean(model, POS) - _last_token_mean(model, NEG)
    assert torch.allclose(sv.vector.double(), want / want.norm(), atol=1e-5)
    assert abs(sv.vector.norm().item() - 1) < 1e-6
    assert sv.meta["raw_norm"] == pytest.approx(want.norm().item(), rel=1e-4)
    assert sv.meta["site"] == SITE and sv.meta["n_pos"] == len(POS) and sv.meta["width"] == 32


def test_mean_mode_differs_from_last(tiny):
    _, model = tiny
    a = diff_means(model, SITE, POS, NEG, token="last")
    b = diff_means(model, SITE, POS, NEG, token="mean")
    assert abs(b.vector.norm().item() - 1) < 1e-6
    assert not torch.allclose(a.vector, b.vector)


def test_cli_writes_vector_with_provenance(tiny, tmp_path):
    d, model = tiny
    pos, neg = write_lines(tmp_path / "pos.txt", POS), write_lines(tmp_path / "neg.txt", NEG)
    out = tmp_path / "v.safetensors"
    assert cli(["steer", "vector", "--model", str(d), "--site", "model.layers.1", "--pos", str(pos), "--neg", str(neg),
                "--token", "mean", "--out", str(out)]) == 0
    sv = load_vector(out, model=model, site=SITE, width=32)
    assert abs(sv.vector.norm().item() - 1) < 1e-6
    m = sv.meta
    assert m["site"] == SITE and m["token"] == "mean" and m["n_pos"] == 12 and m["n_neg"] == 12
    assert m["model_sha256"] == model.innards_source["sha256"]
    assert len(m["pos_sha256"]) == 64 and m["pos_file"].endswith("pos.txt") and m["raw_norm"] > 0
    assert (tmp_path / "v.safetensors.config.yaml").is_file() and (tmp_path / "v.safetensors.run.json").is_file()


def test_bad_label_files_exit_2(tiny, tmp_path, capsys):
    d, _ = tiny
    pos = write_lines(tmp_path / "pos.txt", POS)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    few = write_lines(tmp_path / "one.txt", POS[:1])
    out = tmp_path / "v.safetensors"
    base = ["steer", "vector", "--model", str(d), "--site", SITE, "--out", str(out)]
    assert cli(base + ["--pos", str(pos), "--neg", str(empty)]) == 2
    assert "no sentences" in capsys.readouterr().err
    assert cli(base + ["--pos", str(pos), "--neg", str(few)]) == 2  # 12:1 > 10:1
    assert "unbalanced" in capsys.readouterr().err
    assert cli(base + ["--pos", str(pos), "--neg", str(tmp_path / "missing.txt")]) == 2
    assert not out.exists()


def test_formats_are_unit_normalised(tmp_path):
    v = torch.arange(1.0, 9.0)
    torch.save(v * 3, tmp_path / "a.pt")
    torch.save({"vector": v}, tmp_path / "b.pt")
    np.save(tmp_path / "c.npy", (v * 7).numpy())
    np.save(tmp_path / "rows.npy", torch.stack([v, -v, 2 * v]).numpy())
    from safetensors.torch import save_file

    save_file({"direction": v * 0.1}, str(tmp_path / "d.safetensors"))
    for spec in ("a.pt", "b.pt", "c.npy", "d.safetensors", "rows.npy#1", "rows.npy#-1"):
        sv = load_vector(tmp_path / spec)
        assert abs(sv.vector.norm().item() - 1) < 1e-6
        sign = -1 if spec == "rows.npy#1" else 1
        assert torch.allclose(sv.vector, sign * v / v.norm(), atol=1e-6)
    with pytest.raises(InnardsError, match="pick one"):
        load_vector(tmp_path / "rows.npy")
    with pytest.raises(InnardsError, match="out of range"):
        load_vector(str(tmp_path / "rows.npy") + "#3")
    with pytest.raises(InnardsError, match="zero"):
        torch.save(torch.zeros(8), tmp_path / "z.pt")
        load_vector(tmp_path / "z.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(InnardsError, match="does not load"):
        load_vector(tmp_path / "bad.safetensors")
    with pytest.raises(InnardsError, match="format"):
        (tmp_path / "v.txt").write_text("1 2 3")
        load_vector(tmp_path / "v.txt")


def test_sae_decoder_row(tiny, tmp_path):
    from innards.sae.model import TopKSAE

    _, model = tiny
    sae = TopKSAE(32, 64, k=4)
    with torch.no_grad():
        sae.W_dec.normal_()
    sae.save_pretrained(tmp_path / "sae", hook_name=SITE, model_name=model.innards_source["name"])
    sv = load_vector(f"sae:{tmp_path / 'sae'}:5", model=model, site=SITE, width=32)
    w = sae.W_dec[5].detach()
    assert torch.allclose(sv.vector, w / w.norm(), atol=1e-6)
    with pytest.raises(InnardsError, match="out of range"):
        load_vector(f"sae:{tmp_path / 'sae'}:64")
    with pytest.raises(InnardsError, match="site"):
        load_vector(f"sae:{tmp_path / 'sae'}:5", model=model, site="blocks.0.resid_post")
    with pytest.raises(InnardsError, match="sae:SAE:LATENT"):
        load_vector(f"sae:{tmp_path / 'sae'}")
    # steer vector --from-sae writes the row as a vector file, checked against --site
    from innards.cli import main as cli

    out = tmp_path / "latent5.safetensors"
    mdir = tiny[0]
    assert cli(["steer", "vector", "--model", str(mdir), "--from-sae", f"{tmp_path / 'sae'}:5", "--site", SITE,
                "--out", str(out)]) == 0
    got = load_vector(out, model=model, site=SITE)
    assert torch.allclose(got.vector, w / w.norm(), atol=1e-6) and got.meta["method"] == "sae_decoder"
    assert got.meta["source"] == f"sae:{(tmp_path / 'sae').resolve()}:5"
    assert cli(["steer", "vector", "--model", str(mdir), "--from-sae", f"{tmp_path / 'sae'}:5", "--site", "blocks.0.resid_post",
                "--out", str(tmp_path / "x.safetensors")]) == 2
    assert cli(["steer", "vector", "--from-sae", "nolatent", "--out", str(tmp_path / "y.safetensors")]) == 2


def test_incompatible_vectors_refused(tiny, tmp_path):
    _, model = tiny
    sv = diff_means(model, SITE, POS, NEG)
    p = tmp_path / "v.safetensors"
    save_vector(p, sv)
    with pytest.raises(InnardsError, match="site"):
        load_vector(p, model=model, site="blocks.0.resid_post", width=32)
    with pytest.raises(InnardsError, match="width"):
        load_vector(p, width=48)
    other = SteeringVector(sv.vector, dict(sv.meta, model="someone/else", model_sha256="0" * 64))
    save_vector(tmp_path / "o.safetensors", other)
    with pytest.raises(InnardsError, match="model"):
        load_vector(tmp_path / "o.safetensors", model=model, site=SITE, width=32)
    # TransformerLens spelling of the same site is the same site
    load_vector(p, model=model, site="blocks.1.hook_resid_post", width=32)
