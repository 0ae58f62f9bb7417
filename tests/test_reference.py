"""The GLP reference's released layout: exact parity with outputs the reference code itself computed,
both config.yaml shapes, safe loading, hub ids through the fake cache, and the round trip both ways."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from innards.errors import InnardsError
from innards.glp import reference as ref
from innards.glp import schedule as sch
from innards.glp.model import GLP, NO_SITE, GLPConfig, _scaled, file_sha256, sinusoid

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
REF = FIX / "glp-reference"
HF = FIX / "hf-cache"
TINY = "generative-latent-prior/glp-tiny-test"
needs_fixtures = pytest.mark.skipif(not (REF / "expected.safetensors").is_file(), reason="../shared/fixtures is absent")
ATOL = 1e-5  # CPU fp32; the largest measured difference is 9.5e-7 (`python tests/test_reference.py` prints them all)


@pytest.fixture(scope="module")
def E() -> dict[str, torch.Tensor]:
    if not (REF / "expected.safetensors").is_file():
        pytest.skip("../shared/fixtures is absent")
    return load_file(str(REF / "expected.safetensors"))


@pytest.fixture(scope="module")
def single() -> GLP:
    if not REF.is_dir():
        pytest.skip("../shared/fixtures is absent")
    return GLP.from_pretrained(REF / "single")


@pytest.fixture(scope="module")
def multi() -> GLP:
    if not REF.is_dir():
        pytest.skip("../shared/fixtures is absent")
    return GLP.from_pretrained(REF / "multi")


def _tau(E: dict[str, torch.Tensor], key: str = "denoiser.timesteps") -> torch.Tensor:
    return E[key].double() / 1000  # float64 t, so that 1000 t is the reference's float32 tau exactly


def parity(E: dict[str, torch.Tensor], single: GLP, multi: GLP) -> dict[str, float]:
    """innards' output for every saved reference output, as max |difference| (from the same inputs and noise)."""
    out: dict[str, torch.Tensor] = {}
    T = _tau(E)
    with torch.no_grad():
        g, m = single, multi
        out["single.x_norm"] = g.normalize(E["single.x_raw"])
        out["single.x_denorm_of_norm"] = g.denormalize(E["single.x_norm"])
        out["single.z_denorm"] = g.denormalize(E["single.z"])
        out["single.time_embedding"] = sinusoid(_scaled(T, 1000.0), 32)
        xn = E["single.x_norm"]
        out["single.denoiser.out"] = torch.stack([g(xn, T[i]) for i in range(5)])
        out["single.denoiser.out_per_sample"] = g(xn, _tau(E, "single.denoiser.per_sample_timesteps"))
        out["single.denoiser.out_noisy_input"] = g(E["single.z"], T[2])
        ck = GLP.from_pretrained(TINY, cache_dir=HF, checkpoint="checkpoints/epoch_0001")
        out["single.ckpt_epoch_0001.denoiser.out_t2"] = ck(xn, T[2])
        sig = sch.reference_train_sigma(E["single.fm.u"])
        out["single.fm.sigmas"] = sig
        out["single.fm.timesteps"] = _scaled(sig, 1000.0)
        out["single.fm.noisy"], out["single.fm.target"] = sch.flow_matching_inputs(xn[:, 0], E["single.fm.noise"][:, 0], sig)
        out["single.train.pred"] = g(out["single.fm.noisy"], sig)
        out["single.train.loss"] = g.loss(E["single.x_raw"], sig, noise=E["single.fm.noise"]).mean()
        for key, u, n in (("single.sdedit_u0.5_n20", 0.5, 20), ("single.sdedit_u0.25_n50", 0.25, 50)):
            grid = sch.sdedit_grid(1 - u, n, "grid")
            out[f"{key}.grid_sigmas"] = torch.tensor(sch.reference_grid(n) + [0.0])
            out[f"{key}.grid_timesteps"] = _scaled(torch.tensor(sch.reference_grid(n)), 1000.0)
            out[f"{key}.start_sigma"] = torch.tensor([grid[0]])
            out[f"{key}.start_timestep"] = _scaled(torch.tensor([grid[0]]), 1000.0)
            x = g.normalize(E[f"{key}.input"].reshape(-1, 16))
            out[f"{key}.normalized"] = x
            out[f"{key}.noisy"], _ = sch.flow_matching_inputs(x, E[f"{key}.noise"][:, 0], grid[0])
            out[f"{key}.denoised_normalized"] = sch.integrate(lambda z, t: g(z, t), out[f"{key}.noisy"], grid)
            out[f"{key}.output"] = g.project(E[f"{key}.input"], t_start=1 - u, steps=n, schedule="grid",
                                             noise=E[f"{key}.noise"])
        noise = E["single.sample.noise"]
        out["single.sample_n10.grid_sigmas"] = torch.tensor(sch.sample_grid(10, "reference"))
        out["single.sample_n10.grid_timesteps"] = _scaled(torch.tensor(sch.reference_grid(10)), 1000.0)
        out["single.sample_n10.output"] = g.sample(6, steps=10, schedule="reference", noise=noise, normalized=True)
        out["single.sample_n10.output_denorm"] = g.sample(6, steps=10, schedule="reference", noise=noise)

        L = E["multi.layer_idx"]
        xr, xn = E["multi.x_raw"][:, 0], E["multi.x_norm"]
        out["multi.x_norm"] = m.normalize(xr, L)
        out["multi.x_denorm_of_norm"] = m.denormalize(xn[:, 0], L)
        out["multi.x_norm_layer2"] = m.normalize(xr, 2)
        out["multi.z_denorm_layer1"] = m.denormalize(E["multi.z"], 1)
        out["multi.layer_embedding"] = sinusoid(_scaled(torch.arange(4), m.config.site_scale), 32)
        for name, site in (("out_layer0", 0), ("out_layer3", 3), ("out_no_layer", NO_SITE)):
            out[f"multi.denoiser.{name}"] = torch.stack([m(xn, T[i], site) for i in range(5)])
        out["multi.denoiser.out_per_sample"] = m(xn[:, 0], _tau(E, "single.denoiser.per_sample_timesteps"), L)
        for key, site in (("multi.sdedit_u0.5_n20_layer2", 2), ("multi.sdedit_u0.5_n20_per_row", L)):
            grid = sch.sdedit_grid(0.5, 20, "grid")
            out[f"{key}.grid_sigmas"] = torch.tensor(sch.reference_grid(20) + [0.0])
            out[f"{key}.grid_timesteps"] = _scaled(torch.tensor(sch.reference_grid(20)), 1000.0)
            out[f"{key}.start_sigma"] = torch.tensor([grid[0]])
            out[f"{key}.start_timestep"] = _scaled(torch.tensor([grid[0]]), 1000.0)
            x = m.normalize(E[f"{key}.input"], site)
            out[f"{key}.normalized"] = x
            out[f"{key}.noisy"], _ = sch.flow_matching_inputs(x, E[f"{key}.noise"][:, 0], grid[0])
            out[f"{key}.denoised_normalized"] = sch.integrate(lambda z, t, s=site: m(z, t, s), out[f"{key}.noisy"], grid)
            out[f"{key}.output"] = m.project(E[f"{key}.input"], t_start=0.5, steps=20, schedule="grid",
                                             noise=E[f"{key}.noise"], site=site)
        out["multi.sample_n10_layer1.output"] = m.sample(6, steps=10, schedule="reference", noise=noise, normalized=True, site=1)
        out["multi.sample_n10_layer1.output_denorm"] = m.sample(6, steps=10, schedule="reference", noise=noise, site=1)
    return {k: float((v.reshape(E[k].shape).to(E[k].dtype) - E[k]).abs().max()) for k, v in out.items()}


# inputs of the reference's calls, not outputs innards computes
INPUTS = {"denoiser.timesteps", "multi.layer_idx", "multi.x_raw", "multi.z", "single.x_raw", "single.z", "single.fm.u",
          "single.fm.noise", "single.denoiser.per_sample_timesteps", "single.sample.noise", "single.steer.w",
          "single.steer.act_norm", "multi.sdedit_u0.5_n20_per_row.input", "multi.sdedit_u0.5_n20_layer2.input",
          "single.sdedit_u0.5_n20.input", "single.sdedit_u0.25_n50.input", "single.sdedit_u0.5_n20.noise",
          "single.sdedit_u0.25_n50.noise", "multi.sdedit_u0.5_n20_layer2.noise", "multi.sdedit_u0.5_n20_per_row.noise"}


@needs_fixtures
def test_every_saved_reference_output_is_reproduced(E, single, multi):
    diffs = parity(E, single, multi)
    assert set(diffs) | INPUTS == set(E), sorted(set(E) - set(diffs) - INPUTS)
    bad = {k: v for k, v in diffs.items() if not v <= ATOL}
    assert not bad, bad
    # the schedules themselves are bit-exact: grids, start levels, training sigmas and timesteps
    for k in diffs:
        if k.endswith(("grid_sigmas", "grid_timesteps", "start_sigma", "start_timestep")) or k.startswith("single.fm."):
            assert diffs[k] == 0.0, k
    assert diffs["single.x_norm"] == 0.0 and diffs["single.time_embedding"] == 0.0


@needs_fixtures
def test_steering_act_norm_and_the_sdedit_start(E, single):
    st = single.meta["stats"]
    assert float((st["mean"] ** 2 + st["var"]).sum().sqrt()) == pytest.approx(float(E["single.steer.act_norm"]), rel=1e-6)
    g = sch.sdedit_grid(0.5, 20, "grid")
    assert len(g) - 1 == 10 and g[0] == pytest.approx(0.47421, abs=1e-5)
    assert sch.n_evaluations(sch.sdedit_grid(0.75, 50, "grid")) == 38
    assert sch.grid_index(0.9, 1000) == 900 and sch.reference_train_sigma(torch.tensor([0.9]))[0] == pytest.approx(0.1)


@needs_fixtures
def test_what_a_reference_folder_loads_as(single, multi):
    assert single.config.n_blocks == 2 and single.config.d_in == 16 and single.config.d_model == 32
    assert single.meta["sites"] == ["blocks.1.resid_post"] and single.meta["model"] == {"name": "innards-test/tiny-llm-d16"}
    assert single.meta["site_info"][0]["hf_module"] == "model.layers.1"
    assert multi.meta["sites"] == [f"blocks.{i}.resid_post" for i in range(4)]
    assert multi.config.site_scale == pytest.approx(1 / 3)
    assert "first shard" in single.meta["reference"]["statistics"]
    assert ref.is_reference_dir(REF / "single") and ref.is_reference_dir(REF / "multi")
    sd = load_file(str(REF / "single" / "final.safetensors"))
    assert sum(v.numel() for v in sd.values()) == single.n_params == 20208
    assert multi.n_params == 22320


@needs_fixtures
def test_both_config_shapes_load_the_same(tmp_path, single, multi):
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    for name, variant, glp in (("single", "single.config.resolve_true.yaml", single),
                               ("multi", "multi.config.unresolved.yaml", multi)):
        d = shutil.copytree(REF / name, tmp_path / name)
        (d / "config.yaml").write_text((REF / "config-variants" / variant).read_text())
        other = GLP.from_pretrained(d)
        assert other.meta["sites"] == glp.meta["sites"]
        site = 1 if glp.config.n_sites > 1 else None
        assert torch.equal(other(x, 0.3, site), glp(x, 0.3, site))
    # the resolve=True shape carries a pathlib tag that plain safe loading refuses; innards reads it as a string
    text = (REF / "multi" / "config.yaml").read_text()
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)
    assert ref.read_config(REF / "multi" / "config.yaml")["output_path"] == "runs/glp-tiny-d2-multilayer-test"


@needs_fixtures
def test_unsafe_or_unbuildable_files_are_one_line_errors(tmp_path):
    d = shutil.copytree(REF / "single", tmp_path / "g")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"mean": torch.zeros(16), "var": torch.ones(16), "x": Evil()}, d / "rep_statistics.pt")
    with pytest.raises(InnardsError, match="more than tensors") as e:
        GLP.from_pretrained(d)
    assert "\n" not in str(e.value)
    torch.save({"mean": torch.zeros(16), "var": 3}, d / "rep_statistics.pt")
    with pytest.raises(InnardsError, match="dict of tensors"):
        GLP.from_pretrained(d)
    torch.save({"mean": torch.zeros(8), "var": torch.ones(8)}, d / "rep_statistics.pt")
    with pytest.raises(InnardsError, match="width 8"):
        GLP.from_pretrained(d)
    shutil.copy(REF / "single" / "rep_statistics.pt", d / "rep_statistics.pt")
    cfg = yaml.safe_load((REF / "single" / "config.yaml").read_text())
    bad = {"use_rmsnorm": True}
    for change, msg in ((lambda c: c["glp_kwargs"]["denoiser_config"].update(bad), "cannot build: use_rmsnorm"),
                        (lambda c: c["glp_kwargs"].update({"guidance": {}}), "cannot build: guidance"),
                        (lambda c: c["glp_kwargs"]["denoiser_config"].update({"d_model": 33}), "odd"),
                        (lambda c: c["glp_kwargs"]["denoiser_config"].update({"n_layers": 3}), "does not match"),
                        (lambda c: c["glp_kwargs"]["denoiser_config"].update({"d_mlp": 48}), "does not fit"),
                        (lambda c: c.update({"glp_kwargs": {}}), "no glp_kwargs.denoiser_config")):
        c = yaml.safe_load((REF / "single" / "config.yaml").read_text())
        change(c)
        (d / "config.yaml").write_text(yaml.safe_dump(c))
        with pytest.raises(InnardsError, match=msg) as e:
            GLP.from_pretrained(d)
        assert "\n" not in str(e.value)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg) + "x: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InnardsError, match="not a config innards can read"):
        GLP.from_pretrained(d)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(InnardsError, match="no checkpoint 'checkpoints/epoch_0002'.*checkpoints/epoch_0001"):
        GLP.from_pretrained(d, checkpoint="epoch_0002")


@needs_fixtures
def test_hub_ids_resolve_offline_through_the_cache(monkeypatch, E, single):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = GLP.from_pretrained(TINY, cache_dir=HF)
    assert a.meta["hub"]["repo_id"] == TINY and a.meta["hub"]["revision"] == "baacf35e9335c15659a81ba1596a4581dcca4491"
    x = E["single.x_norm"]
    assert torch.equal(a(x, 0.5), single(x, 0.5))
    monkeypatch.setenv("HF_HUB_CACHE", str(HF))
    b = GLP.from_pretrained(f"{TINY}@baacf35e9335c15659a81ba1596a4581dcca4491")
    assert torch.equal(b(x, 0.5), single(x, 0.5))
    c = GLP.from_pretrained(TINY, revision="main", checkpoint="epoch_0001")
    assert (c(x, 0.5) - b(x, 0.5)).abs().max() > 1e-4  # the random init, not the trained weights
    assert file_sha256(TINY) == file_sha256(REF / "single")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(HF.parent / "nowhere"))
    with pytest.raises(InnardsError, match=r"not in the Hugging Face cache.*HF_HUB_OFFLINE is set.*hf download "
                                           r"generative-latent-prior/glp-tiny-test") as e:
        GLP.from_pretrained(TINY)
    assert "\n" not in str(e.value)
    with pytest.raises(InnardsError, match="no revision|not in the Hugging Face cache"):
        GLP.from_pretrained(TINY, cache_dir=HF, revision="v9")


@needs_fixtures
def test_only_the_files_of_the_asked_checkpoint_are_downloaded(monkeypatch, tmp_path):
    """Online (simulated): the first call finds nothing cached, the second downloads with allow_patterns."""
    import fnmatch

    from huggingface_hub.errors import LocalEntryNotFoundError

    from innards import hub

    src = HF / "models--generative-latent-prior--glp-tiny-test" / "snapshots" / "baacf35e9335c15659a81ba1596a4581dcca4491"
    asked: list[list[str]] = []

    def fake(repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        asked.append(list(allow_patterns))
        dst = tmp_path / "snap" / str(len(asked))
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dst / rel)
        return str(dst)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "snapshot_download", fake)
    GLP.from_pretrained(TINY)
    got = sorted(p.relative_to(tmp_path / "snap" / "1").as_posix() for p in (tmp_path / "snap" / "1").rglob("*") if p.is_file())
    assert got == ["config.yaml", "final.safetensors", "rep_statistics.pt"]
    GLP.from_pretrained(TINY, checkpoint="epoch_0001")
    got = sorted(p.relative_to(tmp_path / "snap" / "2").as_posix() for p in (tmp_path / "snap" / "2").rglob("*") if p.is_file())
    assert got == ["checkpoints/epoch_0001.safetensors", "config.yaml", "rep_statistics.pt"]


def _random_glp(n_sites: int = 1, f32_stats: bool = False, seed: int = 0) -> GLP:
    torch.manual_seed(seed)
    d = 12
    cfg = GLPConfig(d_in=d, n_blocks=3, d_model=16, d_mlp=20, n_sites=n_sites,
                    site_scale=1 / (n_sites - 1) if n_sites > 1 else 100.0)
    g = torch.Generator().manual_seed(seed + 1)
    sites = [f"blocks.{i}.resid_post" for i in range(n_sites)] if n_sites > 1 else ["blocks.2.resid_post"]
    stats = {}
    for s in sites:
        mean = torch.randn(d, generator=g, dtype=torch.float64)
        var = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
        if f32_stats:
            mean, var = mean.float().double(), var.float().double()
        stats[s] = {"mean": mean, "var": var, "count": 1000}
    glp = GLP(cfg, meta={"model": {"name": "tiny-org/tiny-llama", "sha256": "ab" * 32}, "sites": sites,
                         "site_info": [{"site": s, "hf_module": f"model.layers.{s.split('.')[1]}"} for s in sites],
                         "stats_by_site": stats})
    with torch.no_grad():  # LayerNorm affine off their 1/0 init, so a swapped parameter would show
        for p in glp.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return glp.eval()


def _outputs(glp: GLP, site=None) -> list[torch.Tensor]:
    x = torch.randn(7, glp.config.d_in, generator=torch.Generator().manual_seed(3)) * 2
    return [glp(x, 0.37, site), glp.normalize(x, site), glp.sample(5, steps=6, seed=1, site=site),
            glp.project(x, t_start=0.5, steps=8, seed=2, site=site), glp.meta_neurons(x, seed=4, site=site)]


@pytest.mark.parametrize("n_sites", [1, 4])
def test_innards_to_reference_to_innards_is_bit_identical(tmp_path, n_sites):
    glp = _random_glp(n_sites)
    site = 2 if n_sites > 1 else None
    glp.save_pretrained(tmp_path / "ref", format="reference")
    back = GLP.from_pretrained(tmp_path / "ref")
    for a, b in zip(_outputs(glp, site), _outputs(back, site)):
        assert torch.equal(a, b)
    for s in glp.meta["sites"]:
        assert torch.equal(back.meta["stats_by_site"][s]["var"], glp.meta["stats_by_site"][s]["var"])
        assert back.meta["stats_by_site"][s]["count"] == 1000
    assert back.meta["model"] == glp.meta["model"] and back.meta["sites"] == glp.meta["sites"]
    # and back to innards' own layout, and to the reference layout again: same bytes of weights
    back.save_pretrained(tmp_path / "inn")
    again = GLP.from_pretrained(tmp_path / "inn")
    again.save_pretrained(tmp_path / "ref2", format="reference")
    a, b = load_file(str(tmp_path / "ref" / "final.safetensors")), load_file(str(tmp_path / "ref2" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_fixtures
@pytest.mark.parametrize("name", ["single", "multi"])
def test_written_layout_is_what_the_reference_loader_expects(tmp_path, name):
    """Same config keys and nesting, state-dict keys, shapes and dtypes as the reference's own files."""
    fixture = GLP.from_pretrained(REF / name)
    fresh = GLP(fixture.config, meta={k: fixture.meta[k] for k in ("model", "sites", "site_info", "stats_by_site")})
    for glp, out in ((fixture, tmp_path / "from_ref"), (fresh, tmp_path / "from_innards")):
        glp.save_pretrained(out, format="reference")
        mine, theirs = load_file(str(out / "final.safetensors")), load_file(str(REF / name / "final.safetensors"))
        assert mine.keys() == theirs.keys()
        assert all(mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype for k in mine)
        st, st_ref = torch.load(out / "rep_statistics.pt", weights_only=True), torch.load(REF / name / "rep_statistics.pt", weights_only=True)
        for k in ("mean", "var"):
            assert st[k].dtype == st_ref[k].dtype and st[k].shape == st_ref[k].shape
        assert set(st) - {"mean", "var"} <= {"innards.mean_f64", "innards.var_f64", "innards.count"}
        cfg, cfg_ref = ref.read_config(out / "config.yaml"), ref.read_config(REF / name / "config.yaml")
        assert set(cfg["glp_kwargs"]) == set(cfg_ref["glp_kwargs"])
        for part in ("denoiser_config", "tracedict_config"):
            assert cfg["glp_kwargs"][part] == cfg_ref["glp_kwargs"][part]
        # what the reference's load_glp needs: the interpolation it fills with the folder's statistics
        assert cfg["glp_kwargs"]["normalizer_config"] == {"rep_statistic": "${rep_statistic}"} and "rep_statistic" in cfg
        yaml.safe_load((out / "config.yaml").read_text())  # no Python tags in what innards writes
        assert cfg["model_name"] == "innards-test/tiny-llm-d16"
    # the fixture's own weights come back bit for bit
    w = load_file(str(tmp_path / "from_ref" / "final.safetensors"))
    theirs = load_file(str(REF / name / "final.safetensors"))
    assert all(torch.equal(w[k], theirs[k]) for k in w)
    st = torch.load(tmp_path / "from_ref" / "rep_statistics.pt", weights_only=True)
    st_ref = torch.load(REF / name / "rep_statistics.pt", weights_only=True)
    assert torch.equal(st["mean"], st_ref["mean"]) and torch.equal(st["var"], st_ref["var"])


def test_what_the_reference_format_cannot_express_is_refused(tmp_path):
    glp = _random_glp(4)
    glp.config.site_scale = 100.0  # innards' default site embedding
    with pytest.raises(InnardsError, match="site_scale"):
        glp.save_pretrained(tmp_path / "a", format="reference")
    odd = _random_glp(1)
    st = odd.meta["stats_by_site"]["blocks.2.resid_post"]
    odd.set_meta({"sites": ["blocks.2.mlp_out"], "stats_by_site": {"blocks.2.mlp_out": st}})
    with pytest.raises(InnardsError, match="mlp_out"):
        odd.save_pretrained(tmp_path / "b", format="reference")
    with pytest.raises(InnardsError, match="unknown GLP format"):
        odd.save_pretrained(tmp_path / "c", format="diffusers")


def test_restats_replaces_the_first_shard_statistics(tmp_path, tiny_model_dir):
    from test_glp_eval import make_tiny_store

    from innards.data.store import ActivationStore

    store = make_tiny_store(tmp_path, tiny_model_dir("llama"), tokens=2000)
    s = ActivationStore(store)
    site = "blocks.1.resid_post"
    d = s.width(site)
    glp = GLP(GLPConfig(d_in=d, n_blocks=1, d_model=8, d_mlp=8),
              meta={"model": s.manifest["model"], "sites": [site],
                    "stats_by_site": {site: {"mean": torch.zeros(d, dtype=torch.float64), "var": torch.ones(d, dtype=torch.float64)}}})
    glp.save_pretrained(tmp_path / "ref", format="reference")
    re = GLP.from_pretrained(tmp_path / "ref", restats=store)
    want = s.stats(site)
    assert torch.equal(re.meta["stats"]["mean"], torch.as_tensor(want["mean"], dtype=torch.float64))
    assert re.meta["stats"]["count"] == want["count"] and re.meta["restats"]["store"] == str(s.path)
    other = GLP(GLPConfig(d_in=d, n_blocks=1, d_model=8, d_mlp=8),
                meta={"model": s.manifest["model"], "sites": ["blocks.0.resid_post"],
                      "stats_by_site": {"blocks.0.resid_post": {"mean": torch.zeros(d), "var": torch.ones(d)}}})
    with pytest.raises(InnardsError, match="no site 'blocks.0.resid_post'"):
        ref.restats(other, store)
    with pytest.raises(InnardsError, match="trained on model"):
        ref.restats(GLP(glp.config, meta={**{k: glp.meta[k] for k in ("sites", "stats_by_site")},
                                          "model": {"name": "someone/else"}}), store)


def test_innards_layout_by_hub_id_with_a_checkpoint(tmp_path, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "cache" / "models--me--my-glp" / "snapshots" / sha
    glp, ck = _random_glp(1, seed=0), _random_glp(1, seed=5)
    glp.save_pretrained(snap)
    ck.save_pretrained(snap / "checkpoints" / "step_0000010")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    x = torch.randn(3, 12)
    assert torch.equal(GLP.from_pretrained("me/my-glp")(x, 0.2), glp(x, 0.2))
    assert torch.equal(GLP.from_pretrained("me/my-glp", checkpoint="step_0000010")(x, 0.2), ck(x, 0.2))
    with pytest.raises(InnardsError, match="without the files needed"):
        GLP.from_pretrained("me/my-glp", checkpoint="step_0000020")
    assert file_sha256("me/my-glp") == file_sha256(snap)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_statistics_file_is_read_only_as_tensors(tmp_path):
    p = tmp_path / "rep_statistics.pt"
    buf = io.BytesIO()
    torch.save([torch.zeros(3)], buf)
    p.write_bytes(buf.getvalue())
    with pytest.raises(InnardsError, match="dict of tensors"):
        ref.read_statistics(p)
    p.write_bytes(b"\x80\x04garbage")
    with pytest.raises(InnardsError, match="refused"):
        ref.read_statistics(p)
    save_file({"mean": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(InnardsError):
        ref.read_statistics(tmp_path / "x.safetensors")


@needs_fixtures
def test_written_config_resolves_as_the_reference_loader_resolves_it(tmp_path):
    """The reference's load_glp: OmegaConf.load, point rep_statistic at the folder's file, resolve (when installed)."""
    omegaconf = pytest.importorskip("omegaconf")
    for name, glp in (("single", GLP.from_pretrained(REF / "single")), ("multi", GLP.from_pretrained(REF / "multi")),
                      ("innards", _random_glp(4))):
        d = glp.save_pretrained(tmp_path / name, format="reference")
        cfg = omegaconf.OmegaConf.load(d / "config.yaml")
        cfg.rep_statistic = f"{d}/rep_statistics.pt"
        omegaconf.OmegaConf.resolve(cfg)
        gk = omegaconf.OmegaConf.to_container(cfg.glp_kwargs)
        assert gk["normalizer_config"] == {"rep_statistic": f"{d}/rep_statistics.pt"}
        assert set(gk["denoiser_config"]) == set(ref.DENOISER_DEFAULTS)


if __name__ == "__main__":  # the parity figures: python tests/test_reference.py
    exp = load_file(str(REF / "expected.safetensors"))
    for key, diff in sorted(parity(exp, GLP.from_pretrained(REF / "single"), GLP.from_pretrained(REF / "multi")).items()):
        print(f"{key:48s} {diff:.3g}")


def test_grid_training_sigmas_are_the_references_bit_for_bit():
    from innards.glp.train import GLPTrainConfig, sample_t

    t = sample_t(4096, GLPTrainConfig(t_dist="grid"), torch.Generator().manual_seed(0), torch.device("cpu"))
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, sch.reference_train_sigma(u))
    grid = set(sch.reference_grid(1000))
    assert all(float(s) in grid for s in t.unique())
