"""Big run JSON files read once by spans (viewer.bigjson): same values as json.loads, any text, cached."""

from __future__ import annotations

import json

import pytest

from innards.viewer.bigjson import Spans, disk_cached, scan


def _doc():
    return {"glp": "g", "n": 3, "neurons": [{"neuron": f"0:{i}", "acts": [i, -1.5e-3, 2]} for i in range(3)],
            "contexts": {"7": {"tokens": ["a", " ünï", "\u2028<script>"]}, "8": {"tokens": []}}, "tail": [1, {"x": None}]}


@pytest.mark.parametrize("ascii_only", [True, False])
@pytest.mark.parametrize("indent", [None, 2])
def test_scan_spans_equal_json_loads(tmp_path, ascii_only, indent):
    doc = _doc()
    p = tmp_path / "n.json"
    p.write_text(json.dumps(doc, ensure_ascii=ascii_only, indent=indent), encoding="utf-8")
    header, found, text = scan(p, {"neurons": lambda k, v: v["neuron"], "contexts": lambda k, v: len(v["tokens"])})
    assert header == {"glp": "g", "n": 3, "tail": [1, {"x": None}]}
    assert (text is None) == ascii_only
    sp = Spans(p, text)
    assert [sp.load(a, b) for _, a, b, _ in found["neurons"]] == doc["neurons"]
    assert [d for *_, d in found["neurons"]] == ["0:0", "0:1", "0:2"]
    assert {k: sp.load(a, b) for k, a, b, _ in found["contexts"]} == doc["contexts"]


def test_scan_refuses_truncated_and_caches(tmp_path, monkeypatch):
    p = tmp_path / "n.json"
    p.write_text(json.dumps(_doc()))
    t = p.read_text()
    for cut in (5, len(t) // 2, len(t) - 2):
        q = tmp_path / f"t{cut}.json"
        q.write_text(t[:cut])
        with pytest.raises((ValueError, IndexError)):
            scan(q, {"neurons": lambda k, v: v})
    monkeypatch.setenv("INNARDS_VIEWER_CACHE", str(tmp_path / "cache"))
    calls = []

    def build():
        calls.append(1)
        return {"rows": [1, 2]}, True

    assert disk_cached(p, "t", build) == {"rows": [1, 2]}
    assert disk_cached(p, "t", build) == {"rows": [1, 2]} and len(calls) == 1  # second time from the cache
    p.write_text(json.dumps(_doc()) + " ")  # the file changed: built again
    assert disk_cached(p, "t", build) == {"rows": [1, 2]} and len(calls) == 2
    monkeypatch.setenv("INNARDS_VIEWER_CACHE", "off")
    disk_cached(p, "t", build)
    assert len(calls) == 3
