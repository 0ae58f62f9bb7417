"""innards view in a real headless browser: every page kind from tiny real runs, search, VPD graph, playground."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from viewer_runs import XSS_SCRIPT, Tab, browser, viewer_runs  # noqa: F401  (fixtures)

from innards.viewer.server import ViewerServer


@pytest.fixture(scope="module")
def server(viewer_runs):
    root = viewer_runs["store"].parents[1]
    srv = ViewerServer([root], port=0, model="demo").start()
    yield srv
    srv.shutdown()


def run_id(srv_or_index: dict, kind: str, name: str | None = None) -> str:
    """Id of the run of a kind (and folder/file name) in an index."""
    hits = [r["id"] for r in srv_or_index["runs"] if r["kind"] == kind and (name is None or r["name"] == name)]
    assert hits, f"no {kind} run {name or ''}"
    return hits[0]


def api(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# what each page kind must show: (CSS selector, at least how many)
KEY_ELEMENTS = {
    "store": [(".samples .tok.peak", 3), ("svg.chart", 3)],
    "glp": [("svg.chart", 4)],
    "glp+eval": [("table.eval", 1), ("figure img", 1)],
    "eval": [("table.eval", 1), ("figure img", 1)],
    "sae": [(".kv .kv-item", 3)],
    "scale": [("svg.chart .dot", 3)],
    "neurons": [(".list-table tbody tr", 5)],
    "vector": [(".kv .kv-item", 3)],
    "sweep": [("svg.chart .dot", 4), (".side-table tbody tr", 3)],
    "probe": [("svg.chart .bar", 2), ("a.neuron-link", 1)],
    "vpd": [(".list-table tbody tr", 10), ("svg.chart", 2)],
    "vpd-contexts": [("a.item-link", 5)],
    "vpd-ablate": [("svg.chart .bar", 2)],
    "vpd-graph": [("svg.graph circle.node.comp", 5)],
}


def check_all_pages(tab: Tab, base: str, index: dict) -> None:
    """Open the index and every run's page; key elements present, images loaded, no console errors."""
    pg = tab.page
    pg.goto(base + "#/")
    pg.wait_for_selector("section.group[data-kind=glp]")
    kinds = {r["kind"] for r in index["runs"]}
    assert {k for k in KEY_ELEMENTS if "+" not in k} <= kinds, kinds
    assert pg.locator("a.run-link").count() >= len(index["runs"])
    for r in index["runs"]:
        pg.goto(f"{base}#/run/{r['id']}")
        pg.wait_for_selector(".run-head h1")
        evaluated = r["kind"] == "glp" and any(u.endswith("eval.json") for u in r["used_by"])
        for sel, n in KEY_ELEMENTS.get(r["kind"], []) + (KEY_ELEMENTS["glp+eval"] if evaluated else []):
            try:
                pg.wait_for_function("([s, n]) => document.querySelectorAll(s).length >= n", arg=[sel, n], timeout=10_000)
            except Exception:
                found = pg.evaluate("(s) => document.querySelectorAll(s).length", sel)
                raise AssertionError(f"{r['kind']} page {r['rel']}: {found} of {n} '{sel}'") from None
        pg.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
        broken = pg.evaluate("Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src)")
        assert not broken, broken
        assert pg.locator(".damaged-box").count() == 0, (r["rel"], pg.inner_text(".damaged-box"))
    # the toy decomposition shows its ground-truth tables
    pg.goto(f"{base}#/run/{[r['id'] for r in index['runs'] if r['rel'].endswith('vpd/tms')][0]}")
    pg.wait_for_selector("text=Ground truth recovery")
    assert tab.errors == []


def chosen_neuron(runs: dict) -> tuple[str, str]:
    """(meta-neuron B:U, task) of a probing task whose selected 1-D GLP feature it is."""
    t = json.loads((runs["probe"] / "tasks" / "1_joy.json").read_text())
    best = next(f["best"] for name, f in t["features"].items() if name.startswith("glp:"))
    return f"{best['block']}:{best['neuron']}", t["task"]


def check_search_and_neuron(tab: Tab, base: str, nid: str, runs: dict) -> None:
    """Search the meta-neuron list, open one, see its shaded contexts and the probing task that chose it."""
    neuron, task = chosen_neuron(runs)
    pg = tab.page
    pg.goto(f"{base}#/run/{nid}")
    pg.wait_for_selector(".list-table")
    pg.fill("#list-search", neuron)
    pg.wait_for_function("(n) => document.getElementById('list-info').textContent.includes('matching') && "
                         "Array.from(document.querySelectorAll('.list-table a.item-link')).some(a => a.textContent === n)",
                         arg=neuron)
    pg.click(f".list-table a.item-link >> text='{neuron}'")
    pg.wait_for_selector(".context .tok.peak")
    assert pg.locator(".context").count() == 5
    assert pg.locator(".context .tok.peak").count() == 5
    shaded = pg.evaluate("Array.from(document.querySelectorAll('.context .tok')).filter(t => t.style.background).length")
    assert shaded > 5
    assert pg.locator("svg.chart .bar").count() > 3  # the activation histogram
    assert task in pg.inner_text("#app")  # the probing task that chose this meta-neuron is listed
    assert tab.errors == []


def check_component_and_graph(tab: Tab, base: str, vid: str) -> None:
    """Open a VPD subcomponent through its graph: the graph draws, zooms, and a node click opens a component."""
    pg = tab.page
    pg.goto(f"{base}#/run/{vid}")
    pg.wait_for_selector(".list-table a.item-link")
    pg.fill("#list-search", "up_proj:2")
    pg.wait_for_function("() => document.querySelectorAll('.list-table tbody tr').length === 1")
    pg.click(".list-table a.item-link")
    pg.wait_for_selector("svg.graph circle.node.highlight")
    assert "model.layers.0.mlp.up_proj : 2" in pg.inner_text("h1")
    view = pg.locator("svg.graph g.view")
    before = view.get_attribute("transform")
    pg.locator("svg.graph").hover()
    pg.mouse.wheel(0, -400)
    pg.wait_for_function("(b) => document.querySelector('svg.graph g.view').getAttribute('transform') !== b", arg=before)
    pg.locator("svg.graph").dblclick(position={"x": 5, "y": 5})
    pg.wait_for_function("() => !document.querySelector('svg.graph g.view').getAttribute('transform').includes('scale(1.')"
                         " || document.querySelector('svg.graph g.view').getAttribute('transform').endsWith('scale(1.000)')")
    other = pg.locator("svg.graph circle.node.comp:not(.highlight)").first
    target = other.get_attribute("data-component")
    other.click(force=True)
    pg.wait_for_function("(t) => decodeURIComponent(location.hash).endsWith(t)", arg=target)
    pg.wait_for_selector("h1 >> text=subcomponent")
    assert target.replace(":", " : ") in pg.inner_text("h1").replace("  ", " ")
    assert tab.errors == []


def test_every_page_kind_renders(server, browser):
    _, index = api(server.url + "api/index")
    tab = Tab(browser)
    try:
        check_all_pages(tab, server.url, index)
    finally:
        tab.close()


def test_neuron_search_and_page(server, browser, viewer_runs):
    _, index = api(server.url + "api/index")
    tab = Tab(browser)
    try:
        check_search_and_neuron(tab, server.url, run_id(index, "neurons"), viewer_runs)
    finally:
        tab.close()


def test_vpd_component_and_graph(server, browser):
    _, index = api(server.url + "api/index")
    tab = Tab(browser)
    try:
        check_component_and_graph(tab, server.url, run_id(index, "vpd", "lm"))
    finally:
        tab.close()


def test_pareto_hover_and_click_shows_continuations(server, browser):
    _, index = api(server.url + "api/index")
    tab = Tab(browser)
    pg = tab.page
    try:
        pg.goto(f"{server.url}#/run/{run_id(index, 'sweep')}")
        dot = pg.locator("svg.chart .dot[data-group='GLP-projected'][data-label='1']")
        dot.hover()
        pg.wait_for_selector("#tip:not([hidden])")
        assert "strength 1" in pg.inner_text("#tip")
        dot.click()
        pg.wait_for_selector("#cell-box .gen")
        assert pg.locator("#cell-box .gen").count() == 3
        assert "glp at strength 1" in pg.inner_text("#cell-box")
        assert tab.errors == []
    finally:
        tab.close()


def test_playground_generates_and_rejects_bad_input(server, browser):
    _, index = api(server.url + "api/index")
    tab = Tab(browser)
    pg = tab.page
    try:
        pg.goto(f"{server.url}#/playground")
        pg.wait_for_selector("#pg-go")
        pg.fill("#pg-prompt", "Once upon a time a little fox")
        pg.fill("#pg-strength", "2")
        pg.click("#pg-go")
        pg.wait_for_selector(".pg-col[data-kind='GLP-projected']", timeout=60_000)
        cols = [pg.inner_text(f".pg-col[data-kind='{k}'] .cont") for k in ("unsteered", "raw steering", "GLP-projected")]
        assert all(c.strip() for c in cols), cols
        assert "α =" in pg.inner_text("#pg-msg")
        pg.fill("#pg-strength", "lots")
        pg.click("#pg-go")
        pg.wait_for_selector(".pg-msg.error")
        assert "strength must be a number" in pg.inner_text("#pg-msg")
        pg.fill("#pg-strength", "1")
        pg.evaluate("document.getElementById('pg-prompt').value = 'fox '.repeat(150)")  # past maxlength
        pg.click("#pg-go")
        pg.wait_for_function("() => document.getElementById('pg-msg').textContent.includes('prompt too long')")
        # the rejected requests are 400s, which Chromium reports as failed loads: nothing else may appear
        assert [e for e in tab.errors if "400" not in e] == []
    finally:
        tab.close()


def test_playground_api_bounds_and_one_at_a_time(server):
    url = server.url + "api/playground"
    code, info = api(url)
    assert code == 200 and info["available"], info
    ok = {"prompt": "The little fox", "strength": 1, "t_start": 0.5, "max_new_tokens": 4}
    for bad, msg in [({"strength": "nan"}, "finite"), ({"strength": 1e6}, "between"), ({"t_start": 2}, "between"),
                     ({"max_new_tokens": 1000}, "between"), ({"max_new_tokens": 2.5}, "whole"),
                     ({"positions": "everywhere"}, "positions"), ({"prompt": ""}, "prompt"),
                     ({"glp": "no-such-run"}, "GLP"), ({"prompt": "fox " * 60}, "tokens")]:
        code, body = api(url, ok | bad)
        assert code == 400 and msg in body["error"], (bad, code, body)
    pgd = server.viewer.playground
    assert pgd._run_lock.acquire(blocking=False)
    try:
        code, body = api(url, ok)
        assert code == 429 and "one generation at a time" in body["error"]
    finally:
        pgd._run_lock.release()
    code, body = api(url, ok)
    assert code == 200 and set(body) >= {"unsteered", "raw", "glp", "alpha"}
    req = urllib.request.Request(url, data=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 415  # a cross-site form post cannot reach the model


def test_xss_payloads_show_as_text(server, browser, viewer_runs):
    """Contexts holding <script> and onerror= render as text in neuron, store and VPD pages."""
    _, index = api(server.url + "api/index")
    tab = Tab(browser)
    pg = tab.page
    try:
        # a meta-neuron one of whose top contexts is a document carrying markup
        d = json.loads((viewer_runs["neurons"] / "neurons.json").read_text())
        marked = {k for k, c in d["contexts"].items() if "__xss" in "".join(c["tokens"])}
        neuron = next(n["neuron"] for n in d["neurons"] if any(str(e["context"]) in marked for e in n["examples"]))
        pg.goto(f"{server.url}#/run/{run_id(index, 'neurons')}/item/{neuron}")
        pg.wait_for_selector(".context")
        text = pg.inner_text("#app")
        assert "__xss" in text and ("<script>" in text or "onerror" in text)
        vid = run_id(index, "vpd", "lm")
        pg.goto(f"{server.url}#/run/{vid}?q=xss")
        pg.wait_for_selector(".list-table a.item-link")
        assert "__xss" in pg.inner_text(".list-table")
        pg.click(".list-table a.item-link >> nth=0")
        pg.wait_for_selector(".vpd-ctx")
        assert pg.evaluate("window.__xss") is None
        assert pg.locator("#app script, #app img[src=x]").count() == 0
        assert tab.errors == []
    finally:
        tab.close()
    # the corpus really holds the payload that the pages showed as text
    assert XSS_SCRIPT in (viewer_runs["store"].parents[1] / "inputs" / "stories.txt").read_text()
