"""innards report: the same pages as static files, checked in a real browser opened from file://."""

from __future__ import annotations

import json

import pytest
from test_viewer import check_all_pages, check_component_and_graph, check_search_and_neuron, run_id
from viewer_runs import Tab, browser, viewer_runs  # noqa: F401  (fixtures)

from innards.cli import main as cli
from innards.errors import InnardsError
from innards.viewer.report import build_report, js_literal


@pytest.fixture(scope="module")
def site(viewer_runs, tmp_path_factory):
    root = viewer_runs["store"].parents[1]
    out = tmp_path_factory.mktemp("report") / "site"
    index = build_report([root], out)
    assert index == out / "index.html"
    text = (out / "data" / "index.js").read_text()
    return out, json.loads(text[text.index(",") + 1:text.rindex(")")])


def test_static_report_pages_from_file_url(site, browser, viewer_runs):
    out, index = site
    tab = Tab(browser)
    try:
        base = (out / "index.html").as_uri()
        check_all_pages(tab, base, index)
        check_search_and_neuron(tab, base, run_id(index, "neurons"), viewer_runs)
        check_component_and_graph(tab, base, run_id(index, "vpd", "lm"))
        tab.page.goto(base + "#/playground")
        tab.page.wait_for_selector("text=static report")
        assert tab.errors == []
    finally:
        tab.close()


def test_report_files_are_relative_and_escaped(site):
    out, index = site
    html = (out / "index.html").read_text()
    assert 'src="static/app.js"' in html and "http" not in html.replace("http-equiv", "")
    for p in out.rglob("*"):
        if p.suffix in (".js", ".css", ".html"):
            t = p.read_text()
            assert "https://" not in t and "http://" not in t.replace("http://www.w3.org/2000/svg", ""), p
    # no data file can close a script or open markup: every < > & is escaped
    for p in (out / "data").rglob("*.js"):
        t = p.read_text()
        assert "<" not in t and ">" not in t, p
    assert js_literal({"a": "</script><img onerror=x>\u2028"}) == \
        '{"a":"\\u003c/script\\u003e\\u003cimg onerror=x\\u003e\\u2028"}'
    assert (out / ".innards-report").is_file()


def test_report_replaces_its_own_output_only(viewer_runs, tmp_path, capsys):
    root = viewer_runs["store"].parents[1]
    out = tmp_path / "site"
    assert cli(["report", str(root / "vpd"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli(["report", str(root / "vpd"), "--out", str(out)]) == 0  # an earlier report is replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(InnardsError, match="not an innards report"):
        build_report([root], other)
    assert (other / "notes.txt").read_text() == "keep"
    run_folder = tmp_path / "wrapped"  # an innards.run folder holding only its record: the site goes in beside it
    run_folder.mkdir()
    (run_folder / "run.json").write_text("{}")
    build_report([root / "vpd"], run_folder)
    build_report([root / "vpd"], run_folder)
    assert (run_folder / "run.json").read_text() == "{}" and (run_folder / "index.html").is_file()
    assert cli(["report", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "s2")]) == 2
    assert "folder not found" in capsys.readouterr().err
