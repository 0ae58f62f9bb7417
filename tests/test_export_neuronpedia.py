"""innards export neuronpedia: meta-neurons and VPD subcomponents as SAEDashboard/Neuronpedia batch JSON."""

from __future__ import annotations

import json

import pytest
from viewer_runs import viewer_runs  # noqa: F401  (fixture)

from innards.cli import main as cli
from innards.errors import InnardsError
from innards.export.neuronpedia import NeuronpediaConfig, export_neuronpedia

# SAEDashboard's NeuronpediaDashboardFeature.to_dict() and NeuronpediaDashboardActivation.to_dict() keys
# (sae_dashboard/neuronpedia/neuronpedia_dashboard.py), written out here independently of the exporter
FEATURE = {"feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
           "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
           "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
           "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
           "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
           "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations"}
ACTIVATION = {"bin_min", "bin_max", "bin_contains", "tokens", "values"}
BATCH = {"model_id", "layer", "sae_set", "features"}


def _check_batches(out):
    batches = [json.loads(p.read_text()) for p in sorted(out.glob("batch-*.json"))]
    assert batches
    for b in batches:
        assert set(b) == BATCH and isinstance(b["layer"], int) and isinstance(b["model_id"], str)
        for f in b["features"]:
            assert set(f) == FEATURE
            assert isinstance(f["feature_index"], int) and 0.0 <= f["frac_nonzero"] <= 1.0
            assert len(f["freq_hist_data_bar_values"]) == len(f["freq_hist_data_bar_heights"])
            for a in f["activations"]:
                assert set(a) == ACTIVATION and len(a["tokens"]) == len(a["values"]) > 0
                assert all(isinstance(t, str) for t in a["tokens"]) and all(isinstance(v, float) for v in a["values"])
    return batches


def test_meta_neurons_export(viewer_runs, tmp_path):
    out = tmp_path / "np"
    export_neuronpedia(NeuronpediaConfig(run=str(viewer_runs["neurons"]), out=str(out), batch_size=40))
    batches = _check_batches(out)
    assert len(batches) == 3  # 96 meta-neurons, 40 per file
    feats = [f for b in batches for f in b["features"]]
    src = json.loads((viewer_runs["neurons"] / "neurons.json").read_text())
    assert len(feats) == src["n_neurons"] and len({f["feature_index"] for f in feats}) == len(feats)
    mapping = json.loads((out / "mapping.json").read_text())
    first = src["neurons"][0]
    f0 = next(f for f in feats if mapping["features"][str(f["feature_index"])] == first["neuron"])
    ex, ctx = first["examples"][0], src["contexts"][str(first["examples"][0]["context"])]
    top = f0["activations"][0]
    assert top["tokens"] == [t for t, s in zip(ctx["tokens"], ctx["special"]) if not s]  # special tokens left out
    assert max(top["values"]) == pytest.approx(ex["max"], abs=1e-3)
    assert batches[0]["model_id"] == "demo" and batches[0]["layer"] == 3
    assert "neg_str" in mapping["empty_fields"]


def test_vpd_subcomponents_export(viewer_runs, tmp_path, capsys):
    out = tmp_path / "vpd"
    assert cli(["export", "neuronpedia", str(viewer_runs["vpd"]), "--out", str(out)]) == 0
    batches = _check_batches(out)
    assert [b["sae_set"] for b in batches] == ["vpd-mlp-down_proj", "vpd-mlp-gate_proj", "vpd-mlp-up_proj",
                                               "vpd-mlp-down_proj"]
    assert [b["layer"] for b in batches] == [0, 0, 0, 1]
    ctx = json.loads((viewer_runs["vpd"] / "contexts" / "contexts.json").read_text())["components"]
    f = batches[3]["features"][3]
    e = ctx["model.layers.1.mlp.down_proj:3"]
    assert f["frac_nonzero"] == pytest.approx(e["firing_frac"])
    a = f["activations"][0]
    assert max(a["values"]) == pytest.approx(e["examples"][0]["ci"], abs=1e-3)
    assert e["examples"][0]["token"] in a["tokens"]
    # a second export into the same folder needs --overwrite
    assert cli(["export", "neuronpedia", str(viewer_runs["vpd"]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_export_bad_input(viewer_runs, tmp_path):
    with pytest.raises(InnardsError, match="not found"):
        export_neuronpedia(NeuronpediaConfig(run=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    with pytest.raises(InnardsError, match="not a VPD run"):
        export_neuronpedia(NeuronpediaConfig(run=str(viewer_runs["glp"]), out=str(tmp_path / "o")))
    with pytest.raises(InnardsError, match="no VPD contexts"):
        export_neuronpedia(NeuronpediaConfig(run=str(viewer_runs["vpd-toy"]), out=str(tmp_path / "o")))
    with pytest.raises(InnardsError, match="batch-size"):
        NeuronpediaConfig(run="x", batch_size=0)
