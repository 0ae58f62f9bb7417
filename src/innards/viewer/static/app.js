/* innards viewer: one page app over the runs found by `innards view` / `innards report`.
 * Data comes from the server's /api (view) or from data/*.js files (report, works from file://).
 * All corpus and model text is inserted with textContent / text nodes: it can never become markup. */
"use strict";

(function () {
  const CFG = JSON.parse(document.getElementById("innards-config").textContent);
  const STATIC = CFG.mode === "static";
  const APP = document.getElementById("app");
  const { fmt } = Charts;

  // ---------------------------------------------------------------- DOM helper
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
      else if (k === "class") el.className = v;
      else if (k === "value") el.value = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  // replaceChildren without the null/false holes that conditional pieces leave
  const put = (el, ...kids) => el.replaceChildren(...kids.flat(Infinity).filter((k) => k !== null && k !== undefined && k !== false));
  const enc = encodeURIComponent;
  const runHref = (id) => `#/run/${enc(id)}`;
  const itemHref = (id, item) => `#/run/${enc(id)}/item/${enc(item)}`;
  const fileUrl = (id, name) => `files/${enc(id)}/${name.split("/").map(enc).join("/")}`;

  // ---------------------------------------------------------------- data
  const cache = {};
  const waiting = {};
  window.innardsReceive = function (key, data) {
    cache[key] = data;
    (waiting[key] || []).forEach((w) => w.ok(data));
    delete waiting[key];
  };
  function script(key) {
    if (key in cache) return Promise.resolve(cache[key]);
    return new Promise((ok, bad) => {
      const first = !waiting[key];
      (waiting[key] = waiting[key] || []).push({ ok, bad });
      if (!first) return;
      const el = document.createElement("script");
      el.src = "data/" + key.split("/").map(enc).join("/") + ".js";
      el.onerror = () => { (waiting[key] || []).forEach((w) => w.bad(new Error("missing data file data/" + key + ".js"))); delete waiting[key]; };
      document.head.appendChild(el);
    });
  }
  async function getJSON(url, opts) {
    const r = await fetch(url, opts);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
    return body;
  }
  const memo = {};
  const once = (key, fn) => (memo[key] = memo[key] || fn().catch((e) => { delete memo[key]; throw e; }));
  const api = STATIC ? {
    index: () => script("index"),
    run: (id) => script(`run/${id}`),
    async list(id, q, offset, limit) {
      const L = await script(`run/${id}/list`);
      let rows = L.rows;
      if (q) { const ql = q.toLowerCase(); rows = rows.filter((r, i) => L.search[i].includes(ql)); }
      return { total: rows.length, offset, limit, rows: rows.slice(offset, offset + limit) };
    },
    async item(id, item) {
      const L = await script(`run/${id}/list`);
      const i = L.rows.findIndex((r) => r.id === item);
      if (i < 0) throw new Error("not found: " + item);
      const chunk = await script(`run/${id}/items-${Math.floor(i / L.per_file)}`);
      return chunk[item];
    },
    playgroundInfo: async () => ({ available: false, reason: "static report: run innards view --model M for the playground" }),
  } : {
    index: () => once("index", () => getJSON("api/index")),
    run: (id) => once("run/" + id, () => getJSON(`api/run/${enc(id)}`)),
    list: (id, q, offset, limit) => getJSON(`api/run/${enc(id)}/list?offset=${offset}&limit=${limit}&q=${enc(q || "")}`),
    item: (id, item) => once(`item/${id}/${item}`, () => getJSON(`api/run/${enc(id)}/item/${enc(item)}`)),
    playgroundInfo: () => once("pg", () => getJSON("api/playground")),
    generate: (body) => getJSON("api/playground", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) }),
  };

  // ---------------------------------------------------------------- small pieces
  let INDEX = { runs: [] };
  const byId = () => Object.fromEntries(INDEX.runs.map((r) => [r.id, r]));
  function runLink(id, label) {
    const r = byId()[id];
    return h("a", { href: runHref(id), class: "run-link", title: r ? r.rel : id }, label || (r ? `${r.kind}: ${r.rel}` : id));
  }
  function kv(obj, keys) {
    const items = [];
    for (const k of keys || Object.keys(obj || {})) {
      const v = obj ? obj[k] : undefined;
      if (v === undefined || v === null || v === "" || (typeof v === "object" && !Array.isArray(v))) continue;
      items.push(h("div", { class: "kv-item" }, h("span", { class: "k" }, k),
        h("span", { class: "v" }, Array.isArray(v) ? v.join(", ") : typeof v === "number" ? fmt(v) : String(v))));
    }
    return items.length ? h("div", { class: "kv" }, items) : null;
  }
  function table(cols, rows, cls) {
    return h("table", { class: "data " + (cls || "") },
      h("thead", null, h("tr", null, cols.map((c) => h("th", null, c)))),
      h("tbody", null, rows.map((r) => h("tr", null, r.map((c) => h("td", null, c instanceof Node ? c : c === null || c === undefined ? "–" : typeof c === "number" ? fmt(c) : String(c)))))));
  }
  const section = (title, ...kids) => h("section", null, h("h2", null, title), ...kids);
  const ci = (v, lo, hi) => `${fmt(v)} [${fmt(lo)}, ${fmt(hi)}]`;
  const pngs = (id, names) => (names || []).length ? h("div", { class: "pngs" }, names.map((n) =>
    h("figure", null, h("img", { src: fileUrl(id, n), alt: n }), h("figcaption", null, n)))) : null;
  const note = (text) => h("p", { class: "muted" }, text);
  const tokenText = (t) => String(t).replace(/\n/g, "⏎").replace(/\t/g, "⇥");

  function headline(hl) {
    return h("span", { class: "headline" }, Object.entries(hl || {}).map(([k, v]) =>
      h("span", { class: "chip" }, h("b", null, k), " ", typeof v === "number" ? fmt(v) : String(v))));
  }
  function status(r) {
    if (r.status === "damaged") return h("span", { class: "badge damaged", title: r.reason || "" }, "damaged");
    if (r.status === "running") return h("span", { class: "badge running" }, "running");
    return null;
  }

  function runHeader(page) {
    const r = page.run;
    const rel = (label, ids) => (ids && ids.length) ? h("div", { class: "rel" }, h("span", { class: "muted" }, label + " "),
      ids.map((i) => [runLink(i), " "])) : null;
    return h("div", { class: "run-head" },
      h("h1", null, h("span", { class: "badge kind" }, r.kind), " ", r.name, " ", status(r)),
      h("div", { class: "muted path" }, r.rel, r.source === "run.json" ? "  · run.json" : "  · recognised by its files"),
      r.status === "damaged" ? h("div", { class: "damaged-box" }, "This run is damaged: ", r.reason || "unknown reason") : null,
      page.error ? h("div", { class: "damaged-box" }, "Could not read this run: ", page.error) : null,
      headline(r.headline),
      rel("uses", r.uses), rel("used by", r.used_by), r.parent ? rel("inside", [r.parent]) : null, rel("contains", r.children));
  }
  function configBlock(page) {
    const out = [];
    if (page.config) out.push(h("details", null, h("summary", null, "config.yaml"), h("pre", null, page.config)));
    if (page.run_json) out.push(h("details", null, h("summary", null, "run.json"), h("pre", null, JSON.stringify(page.run_json, null, 1))));
    return out;
  }
  function crumbs(parts) {
    const nav = document.getElementById("crumbs");
    put(nav, parts.map((p, i) => [i ? h("span", { class: "sep" }, " / ") : null,
      p.href ? h("a", { href: p.href }, p.label) : h("span", null, p.label)]));
  }

  function curves(c, names, opts) {
    const series = names.filter((n) => c.series[n]).map((n) => ({ name: n, points: c.series[n] }));
    return series.length ? Charts.line({ series, xlabel: "step", ylabel: opts.ylabel || names.join(", "), logy: opts.logy,
      title: opts.title, width: opts.width || 520, height: opts.height || 240 }) : null;
  }
  function bucketCurves(c, name, title) {
    const b = c.buckets[name];
    if (!b) return null;
    const n = b.length;
    return Charts.line({ series: b.map((pts, j) => ({ name: `t ∈ [${fmt(j / n)}, ${fmt((j + 1) / n)})`, points: pts })),
      xlabel: "step", ylabel: "loss", title, width: 520, height: 240 });
  }

  // ---------------------------------------------------------------- index
  const KIND_ORDER = ["demo", "store", "glp", "eval", "sae", "scale", "neurons", "vector", "sweep", "probe", "vpd",
    "vpd-eval", "vpd-contexts", "vpd-ablate", "vpd-graph"];
  const KIND_TITLE = { demo: "Demo runs", store: "Activation stores", glp: "GLP meta-models", eval: "GLP evaluations",
    sae: "Sparse autoencoders", scale: "Scaling sweeps", neurons: "Meta-neuron contexts", vector: "Steering vectors",
    sweep: "Steering sweeps", probe: "Probing", vpd: "VPD decompositions", "vpd-eval": "VPD evaluations",
    "vpd-contexts": "VPD component contexts", "vpd-ablate": "VPD ablations", "vpd-graph": "VPD attribution graphs" };

  async function renderIndex() {
    crumbs([{ label: "runs" }]);
    const runs = INDEX.runs;
    const kinds = [...KIND_ORDER.filter((k) => runs.some((r) => r.kind === k)), ...INDEX.kinds.filter((k) => !KIND_ORDER.includes(k))];
    const filter = h("input", { type: "search", id: "run-filter", placeholder: "filter runs by path or kind", "aria-label": "filter runs" });
    const body = h("div", { id: "index-groups" });
    const draw = () => {
      const q = filter.value.toLowerCase();
      put(body, kinds.map((k) => {
        const rs = runs.filter((r) => r.kind === k && (!q || (r.rel + " " + r.kind).toLowerCase().includes(q)));
        if (!rs.length) return null;
        return h("section", { class: "group", "data-kind": k }, h("h2", null, KIND_TITLE[k] || k, h("span", { class: "count" }, ` ${rs.length}`)),
          h("table", { class: "data runs" }, h("tbody", null, rs.map((r) => h("tr", { class: r.status === "damaged" ? "damaged-row" : "" },
            h("td", { class: "name" }, h("a", { href: runHref(r.id), class: "run-link" }, r.rel), " ", status(r),
              r.status === "damaged" ? h("div", { class: "reason" }, r.reason || "") : null),
            h("td", null, headline(r.headline)),
            h("td", { class: "links" }, r.uses.map((u) => [h("span", { class: "muted" }, "← "), runLink(u, byId()[u] ? byId()[u].name : u), " "]),
              r.used_by.map((u) => [h("span", { class: "muted" }, "→ "), runLink(u, byId()[u] ? byId()[u].name : u), " "])))))));
      }));
    };
    filter.addEventListener("input", draw);
    draw();
    const pg = INDEX.playground ? h("p", null, h("a", { href: "#/playground", class: "button" }, "steering playground")) : null;
    const damaged = runs.filter((r) => r.status === "damaged").length;
    put(APP, h("h1", null, "Runs"),
      h("p", { class: "muted" }, `${runs.length} run(s)` + (damaged ? `, ${damaged} damaged` : "") +
        (STATIC ? " · static report" : " · innards view")), pg, filter, body,
      runs.length ? null : note("No innards runs were found under the folders given."));
  }

  // ---------------------------------------------------------------- run pages by kind
  const R = {};

  R.store = (p) => {
    const st = p.store;
    const out = [section("Store", kv({ model: st.model && (st.model.name || st.model.path), tokens: st.tokens,
      requested: st.tokens_requested, documents: st.documents, dtype: st.dtype, context: st.context, shards: st.shards,
      "validation docs": st.split && st.split.val_docs, "training docs": st.split && st.split.train_docs,
      text: st.text && (st.text.kind || st.text.source || st.text.path || st.text.spec), created: st.created }))];
    for (const s of p.sites) {
      const dims = (arr) => arr.map((v, i) => [i * s.stride, v]);
      out.push(section(`Site ${s.site} (width ${s.width})`,
        kv({ "TransformerLens name": s.tl_name, "HF module": s.hf_module, "mean row norm": s.mean_norm, "rms norm": s.rms_norm }),
        h("div", { class: "row" },
          Charts.line({ series: [{ name: "mean", points: dims(s.mean) }], xlabel: "dimension", ylabel: "mean", title: "per-dimension mean", width: 460, height: 220 }),
          Charts.line({ series: [{ name: "variance", points: dims(s.var) }], xlabel: "dimension", ylabel: "variance", logy: true, title: "per-dimension variance", width: 460, height: 220 }),
          Charts.hist({ ...(p.norms[s.site] || {}), xlabel: "L2 norm of a row", ylabel: "rows", title: `row norms (${p.norm_sample} sampled rows)`, width: 460, height: 220, mark: s.mean_norm }))));
    }
    const rows = (p.samples || {}).rows || [];
    out.push(section("Sample rows in their text",
      p.samples && !p.samples.decoded ? note("The model's tokenizer is not available offline: token ids shown.") : null,
      h("div", { class: "samples" }, rows.map((r) => h("div", { class: "sample" },
        h("div", { class: "muted" }, `row ${r.row} · ${r.doc || "?"} · position ${r.pos}`),
        h("div", { class: "tokens" }, r.tokens.map((t, i) => h("span", { class: "tok" + (i === r.centre ? " peak" : "") }, tokenText(t)))))))));
    return out;
  };

  function evalTable(t) {
    const used = t.columns.filter((c) => t.rows.some((r) => r.cells[c.key]));
    return h("table", { class: "data eval" },
      h("thead", null, h("tr", null, h("th", null, ""), used.map((c) => h("th", { class: c.key === "floor" ? "floor" : "" }, c.label)))),
      h("tbody", null, t.rows.map((r) => h("tr", null, h("th", null, r.metric), used.map((c) => {
        const cell = r.cells[c.key];
        if (!cell) return h("td", null, "–");
        return h("td", { class: c.key === "floor" ? "floor" : "" }, fmt(cell.value),
          cell.ci ? h("div", { class: "ci" }, `95% CI [${fmt(cell.ci[0])}, ${fmt(cell.ci[1])}]`) : null);
      })))));
  }
  function evalBlock(id, e) {
    if (e.error) return h("div", { class: "damaged-box" }, e.error);
    return h("div", { class: "eval-block" }, evalTable(e.table),
      note("FD: lower is better; the floor is the FD between two samples of real activations. C2ST AUC: 0.5 means indistinguishable. ΔLM: increase of the LM loss when the site is replaced; CIs where the eval recorded a standard error."),
      e.notes && e.notes.length ? h("ul", { class: "notes" }, e.notes.map((n) => h("li", null, n))) : null,
      kv(e.info), e.sae ? h("details", null, h("summary", null, "SAE baseline"), kv(e.sae)) : null, pngs(id, e.pngs));
  }

  R.glp = (p) => {
    const g = p.glp, c = p.curves;
    const tr = g.training || {};
    const out = [section("Meta-model", kv({ ...g.architecture, parameters: g.n_params, site: g.site,
      model: g.source_model && (g.source_model.name || g.source_model), steps: tr.step, activations: tr.activations,
      flops: tr.flops, "val loss": tr.val_loss, "train loss": tr.train_loss, precision: tr.precision, "t density": tr.t_dist }))];
    out.push(section("Training", h("div", { class: "row" },
      curves(c, ["train_loss", "val_loss"], { ylabel: "flow-matching loss", title: "loss", logy: false }),
      curves(c, ["lr"], { ylabel: "learning rate", title: "learning rate" }),
      curves(c, ["grad_norm"], { ylabel: "gradient norm", title: "gradient norm" }),
      bucketCurves(c, "train_loss_t", "training loss per t bucket"),
      bucketCurves(c, "val_loss_t", "validation loss per t bucket"))));
    if (p.checkpoints.length) out.push(section("Checkpoints", table(["checkpoint", "step", "val loss", "train loss", "activations", "FLOPs"],
      p.checkpoints.map((k) => [k.name, k.step, k.val_loss, k.train_loss, k.activations, k.flops]))));
    for (const e of p.evals) out.push(section("Evaluation", h("p", null, runLink(e.id)), evalBlock(e.id, e)));
    if (p.scale) out.push(section("Scaling fit", h("p", null, "part of ", runLink(p.scale.id)),
      p.scale.fit ? kv({ law: p.scale.law, ...p.scale.fit }) : note(p.scale.error || "")));
    out.push(pngs(p.run.id, p.pngs));
    return out;
  };

  R.eval = (p) => [section("Evaluation", evalBlock(p.run.id, p.eval))];

  R.scale = (p) => {
    const fit = (p.scale.fit || {});
    const depths = [...new Set(p.points.map((q) => q.depth))];
    const groups = depths.map((d) => ({ name: `depth ${d}`, connect: true, points: p.points.filter((q) => q.depth === d && q.compute > 0 && q.loss > 0)
      .map((q) => ({ x: q.compute, y: q.loss, r: q.on_envelope ? 5 : 3, tip: [`depth ${d}, step ${q.step}`, `compute ${fmt(q.compute)}`, `val loss ${fmt(q.loss)}`, q.on_envelope ? "on the envelope" : ""] })) }));
    const curve = isFinite(fit.alpha) ? { name: `fit L = ${fmt(fit.E)} + ${fmt(fit.A)}·C^-${fmt(fit.alpha)}`, fn: (C) => fit.E + fit.A * Math.pow(C, -fit.alpha) } : null;
    return [section("Compute scaling", Charts.scatter({ groups, curve, logx: true, logy: true, labels: false,
      xlabel: "compute C = 6·N·D (FLOPs)", ylabel: "validation loss", width: 640, height: 340 }),
      kv({ law: p.scale.law, ...fit, depths: (p.scale.depths || []).join(", ") }),
      (p.scale.notes || []).length ? h("ul", { class: "notes" }, p.scale.notes.map((n) => h("li", null, n))) : null),
    (p.scale.downstream || []).length ? section("Downstream on the envelope", table(["depth", "step", "loss", "compute", "C2ST AUC", "ΔLM"],
      p.scale.downstream.map((d) => [d.depth, d.step, d.loss, d.compute, d.c2st_auc_glp, d.delta_lm_glp]))) : null,
    pngs(p.run.id, p.pngs)];
  };

  R.sae = (p) => [section("Sparse autoencoder", kv(p.sae), kv(p.summary)),
    section("Training", h("div", { class: "row" }, Object.keys(p.curves.series).filter((k) => /fvu|loss|dead/.test(k)).slice(0, 4)
      .map((k) => curves(p.curves, [k], { title: k, ylabel: k })))), pngs(p.run.id, p.pngs)];

  R.vector = (p) => [section("Steering vector", kv(p.vector)), playgroundSection({ vector: p.run.id })];

  // ------------------------------ steering
  R.sweep = (p) => {
    const methods = Object.keys(p.methods);
    const strengths = [...new Set(methods.flatMap((m) => p.methods[m].map((r) => r.strength)))].sort((a, b) => a - b);
    const cellBox = h("div", { class: "cell-box", id: "cell-box" }, note("Hover a point for its numbers; click it for the continuations behind it."));
    const showCell = (m, r) => {
      const gens = (p.generations[m] || {})[String(r)] || [];
      cellBox.replaceChildren(h("h3", null, `${m} at strength ${fmt(r)}: ${gens.length} continuation(s)`),
        h("div", { class: "gens" }, gens.map((g) => h("div", { class: "gen" }, h("span", { class: "prompt" }, g.prompt),
          h("span", { class: "cont" }, g.text), h("span", { class: "muted score" }, ` concept ${fmt(g.concept)} · NLL ${fmt(g.nll)}`)))));
    };
    const groups = methods.map((m) => ({ name: m === "glp" ? "GLP-projected" : m, connect: true, color: m === "glp" ? "#1f77b4" : "#d62728",
      points: p.methods[m].map((r) => ({ x: r.nll, y: r.concept, xerr: r.nll_ci, yerr: r.concept_ci, label: fmt(r.strength), data: { m, r: r.strength },
        tip: [`${m}, strength ${fmt(r.strength)}`, `concept ${ci(r.concept, r.concept_ci[0], r.concept_ci[1])}`, `NLL ${ci(r.nll, r.nll_ci[0], r.nll_ci[1])}`, `distinct-2 ${fmt(r.distinct2)}`, "click: continuations"] })) }));
    const pareto = Charts.scatter({ groups, xlabel: "fluency: NLL under the unsteered model (lower is better)",
      ylabel: `concept: P(${p.sweep.concept || "concept"} | continuation)`, width: 640, height: 380, onClick: (pt) => showCell(pt.data.m, pt.data.r) });
    // raw vs GLP side by side per prompt, for one strength
    const side = h("div", { class: "side" });
    const pick = h("div", { class: "strengths" }, "strength: ", strengths.map((r) => h("button", { type: "button", class: "str", "data-r": r,
      onclick: (ev) => { pick.querySelectorAll("button").forEach((b) => b.classList.remove("on")); ev.target.classList.add("on"); drawSide(r); } }, fmt(r))));
    const drawSide = (r) => {
      const cols = methods.map((m) => (p.generations[m] || {})[String(r)] || []);
      const n = Math.max(0, ...cols.map((c) => c.length));
      const rows = [];
      for (let i = 0; i < n; i++) {
        const prompt = (cols.find((c) => c[i]) || [])[i].prompt;
        rows.push([prompt, ...cols.map((c) => c[i] ? h("span", null, c[i].text, h("span", { class: "muted score" }, ` (${fmt(c[i].concept)})`)) : "–")]);
      }
      side.replaceChildren(table(["prompt", ...methods.map((m) => m === "glp" ? "GLP-projected" : m)], rows, "side-table"));
    };
    if (strengths.length) { drawSide(strengths[strengths.length - 1]); setTimeout(() => { const b = pick.querySelector(`button[data-r="${strengths[strengths.length - 1]}"]`); if (b) b.classList.add("on"); }); }
    const comp = p.comparison;
    return [
      section("Concept vs fluency", pareto, cellBox),
      section("Raw vs GLP-projected continuations", pick, side),
      section("Cells", table(["method", "strength", "concept", "95% CI", "NLL", "95% CI", "distinct-2", "n"],
        methods.flatMap((m) => p.methods[m].map((r) => [m, r.strength, r.concept, `[${fmt(r.concept_ci[0])}, ${fmt(r.concept_ci[1])}]`, r.nll,
          `[${fmt(r.nll_ci[0])}, ${fmt(r.nll_ci[1])}]`, r.distinct2, r.n])))),
      comp ? section("GLP minus raw (paired over prompts)", table(["strength", "Δ concept", "95% CI", "Δ NLL", "95% CI"],
        comp.paired_glp_minus_raw.map((d) => [d.strength, d.concept_diff, `[${fmt(d.concept_diff_ci[0])}, ${fmt(d.concept_diff_ci[1])}]`,
          d.nll_diff, `[${fmt(d.nll_diff_ci[0])}, ${fmt(d.nll_diff_ci[1])}]`])),
        kv({ "GLP dominates pointwise at |r| ≥ 1": String(comp.glp_dominates_pointwise_at_r_ge_1), "pointwise fraction": comp.pointwise_dominated_fraction,
          "GLP frontier dominates at |r| ≥ 1": String(comp.glp_frontier_dominates_at_r_ge_1), "frontier fraction": comp.frontier_dominated_fraction }),
        note(comp.definition || "")) : null,
      section("Settings", kv(p.sweep), h("h3", null, "vector"), kv(p.vector)),
      playgroundSection({ vector: (p.run.uses || []).find((u) => (byId()[u] || {}).kind === "vector"), glp: (p.run.uses || []).find((u) => (byId()[u] || {}).kind === "glp") }),
      pngs(p.run.id, p.pngs)];
  };

  function playgroundSection(pref) {
    const box = h("section", { class: "playground", id: "playground" }, h("h2", null, "Playground"), note("checking…"));
    api.playgroundInfo().then((info) => {
      if (!info.available) { box.replaceChildren(h("h2", null, "Playground"), note(info.reason || "not available")); return; }
      box.replaceChildren(h("h2", null, "Playground"), playgroundForm(info, pref || {}));
    }).catch((e) => box.replaceChildren(h("h2", null, "Playground"), note(String(e.message || e))));
    return box;
  }

  function playgroundForm(info, pref) {
    const opt = (list, sel) => list.map((x) => h("option", { value: x.id, selected: x.id === sel }, `${x.rel}${x.site ? " · " + x.site : ""}`));
    const f = {
      prompt: h("textarea", { id: "pg-prompt", rows: 2, maxlength: info.limits.prompt_chars }, "Once upon a time"),
      vector: h("select", { id: "pg-vector" }, opt(info.vectors, pref.vector || info.default.vector)),
      glp: h("select", { id: "pg-glp" }, opt(info.glps, pref.glp || info.default.glp)),
      strength: h("input", { id: "pg-strength", type: "text", inputmode: "decimal", value: "1" }),
      positions: h("select", { id: "pg-positions" }, info.positions.map((x) => h("option", { value: x }, x))),
      t_start: h("input", { id: "pg-tstart", type: "text", inputmode: "decimal", value: "0.5" }),
      max_new_tokens: h("input", { id: "pg-max", type: "text", inputmode: "numeric", value: "24" }),
    };
    const out = h("div", { class: "pg-out", id: "pg-out" });
    const msg = h("div", { class: "pg-msg", id: "pg-msg", role: "status" });
    const btn = h("button", { type: "button", id: "pg-go", class: "button" }, "generate");
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      msg.className = "pg-msg";
      msg.textContent = "generating…";
      try {
        const body = Object.fromEntries(Object.entries(f).map(([k, el]) => [k, el.value]));
        const r = await api.generate(body);
        msg.textContent = `site ${r.site} · α = strength × ‖a‖ = ${fmt(r.alpha)} (‖a‖ = ${fmt(r.norm)} from the ${r.norm_source}) · ${fmt(r.seconds)} s`;
        out.replaceChildren(...[["unsteered", r.unsteered], ["raw steering", r.raw], ["GLP-projected", r.glp]].map(([t, c]) =>
          h("div", { class: "pg-col", "data-kind": t }, h("h3", null, t), h("p", null, h("span", { class: "prompt" }, body.prompt), h("span", { class: "cont" }, c)))));
      } catch (e) {
        msg.className = "pg-msg error";
        msg.textContent = String(e.message || e);
      } finally { btn.disabled = false; }
    });
    const lab = (t, el) => h("label", null, h("span", null, t), el);
    return h("div", { class: "pg-form" }, note(`Model ${info.model}. Prompt ≤ ${info.limits.prompt_chars} characters / ${info.limits.prompt_tokens} tokens, ≤ ${info.limits.max_new_tokens} new tokens, |strength| ≤ ${info.limits.strength}; one generation at a time.`),
      lab("prompt", f.prompt), h("div", { class: "row" }, lab("vector", f.vector), lab("GLP", f.glp)),
      h("div", { class: "row" }, lab("strength r", f.strength), lab("positions", f.positions), lab("t_start", f.t_start), lab("new tokens", f.max_new_tokens)),
      btn, msg, out);
  }

  // ------------------------------ probing
  R.probe = (p) => {
    const feats = p.summary.features || {};
    const names = Object.keys(feats);
    const ref = names[0];
    const out = [section("Feature sets",
      Charts.bars({ labels: names, values: names.map((n) => feats[n].mean_auc), lo: names.map((n) => feats[n].ci_low), hi: names.map((n) => feats[n].ci_high),
        ylabel: "mean test AUC", yrange: [Math.min(0.5, ...names.map((n) => feats[n].ci_low || 0.5)) - 0.02, 1], height: 260 }),
      table(["feature set", "features", "mean test AUC [95% CI]", "median", "mean CV AUC", `Δ vs ${ref} [95% CI]`, "wins / losses", "tasks"],
        names.map((n) => { const e = feats[n]; const d = e[`delta_vs_${ref}`];
          return [n, Array.isArray(e.n_features) ? e.n_features.join("–") : e.n_features, ci(e.mean_auc, e.ci_low, e.ci_high), e.median_auc, e.mean_cv_auc,
            d ? ci(d.mean, d.ci_low, d.ci_high) : "–", d ? `${d.wins} / ${d.losses}` : "–", e.n_tasks]; })),
      p.summary.ci ? note(`${p.summary.ci.method}, ${p.summary.ci.n_resamples} resamples; differences are paired over tasks.`) : null)];
    const link = (fs, best) => {
      if (!best) return "–";
      if (best.block !== undefined && p.neuron_links[fs]) return h("a", { href: itemHref(p.neuron_links[fs], `${best.block}:${best.neuron}`), class: "neuron-link" }, `${best.block}:${best.neuron}`);
      return best.block !== undefined ? `${best.block}:${best.neuron}` : `#${best.index}`;
    };
    out.push(section("Per task", table(["task", "n", "train / test", ...names.flatMap((n) => [`${n} AUC`, `${n} feature`])],
      p.tasks.map((t) => [t.task, t.n, t.n_train !== undefined ? `${t.n_train} / ${t.n_test}` : "–",
        ...names.flatMap((n) => { const f = (t.features || {})[n]; return f ? [f.test_auc, link(n, f.best)] : ["–", "–"]; })])),
      Object.keys(p.neuron_links).length ? note("Chosen GLP features link to their meta-neuron pages.") : null));
    if ((p.summary.skipped || []).length) out.push(section("Skipped tasks", table(["task", "reason"], p.summary.skipped.map((s) => [s.task, s.reason]))));
    out.push(pngs(p.run.id, p.pngs));
    return out;
  };

  // ------------------------------ lists (meta-neurons, subcomponents)
  function listSection(p, cols, cells, params) {
    const id = p.run.id;
    const per = 50;
    const input = h("input", { type: "search", id: "list-search", placeholder: `search ${p.list.what} (id or text)`, value: params.get("q") || "", "aria-label": "search" });
    const info = h("span", { class: "muted", id: "list-info" });
    const body = h("div", { id: "list-body" });
    let page = Math.max(0, parseInt(params.get("p") || "0", 10) || 0);
    let token = 0;
    const prev = h("button", { type: "button", id: "list-prev" }, "‹ previous");
    const next = h("button", { type: "button", id: "list-next" }, "next ›");
    const draw = async () => {
      const mine = ++token;
      const res = await api.list(id, input.value, page * per, per);
      if (mine !== token) return;
      info.textContent = `${res.total} ${p.list.what}` + (input.value ? " matching" : "") + (res.total ? ` · ${page * per + 1}–${Math.min(res.total, (page + 1) * per)}` : "");
      prev.disabled = page === 0;
      next.disabled = (page + 1) * per >= res.total;
      body.replaceChildren(table(cols, res.rows.map((r) => cells(r)), "list-table"));
      history.replaceState(null, "", `${runHref(id)}?q=${enc(input.value)}&p=${page}`);
    };
    let timer = null;
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { page = 0; draw(); }, 150); });
    prev.addEventListener("click", () => { page = Math.max(0, page - 1); draw(); });
    next.addEventListener("click", () => { page += 1; draw(); });
    draw();
    return section(p.list.what[0].toUpperCase() + p.list.what.slice(1), h("div", { class: "list-tools" }, input, " ", prev, next, " ", info), body);
  }

  R.neurons = (p, params) => {
    const n = p.neurons;
    return [section("Meta-neurons", kv({ GLP: n.glp, model: n.model, site: n.site, t: n.t, blocks: n.n_blocks, "units per block": n.d_mlp,
      neurons: n.n_neurons, contexts: n.n_contexts, tokens: n.n_tokens, text: n.text, "top contexts kept": n.top })),
    listSection(p, ["meta-neuron", "max", "peak token", "around the peak"], (r) => [h("a", { href: itemHref(p.run.id, r.id), class: "item-link" }, r.id), r.max,
      h("code", null, tokenText(r.peak)), h("span", { class: "snippet" }, tokenText(r.snippet))], params)];
  };

  function shaded(ex) {
    const mx = ex.max > 0 ? ex.max : 1;
    return h("div", { class: "tokens" }, ex.tokens.map((t, i) => {
      const a = ex.acts[i] || 0;
      const alpha = Math.max(0, Math.min(1, a / mx));
      const peak = i === ex.max_position;
      return h("span", { class: "tok" + (peak ? " peak" : "") + (ex.special[i] ? " special" : ""), title: `${fmt(a)}`,
        style: alpha > 0.03 ? { background: `rgba(255, 140, 0, ${alpha.toFixed(2)})` } : null }, tokenText(t));
    }));
  }

  async function renderNeuron(page, item) {
    const d = await api.item(page.run.id, item);
    if (d.error) return [h("div", { class: "damaged-box" }, d.error)];
    return [h("h1", null, h("span", { class: "badge kind" }, "meta-neuron"), ` ${d.id}`, h("span", { class: "muted" }, `  block ${d.block}, unit ${d.index} · max ${fmt(d.max)}`)),
      h("p", null, "of ", runLink(page.run.id)),
      h("div", { class: "row" }, section("Activations", Charts.hist({ ...d.histogram, xlabel: "activation (tokens of its top contexts)", ylabel: "tokens", width: 460, height: 220, color: "#ff7f0e" })),
        section("Selected by probing", d.probes.length ? table(["probe", "task", "feature set", "test AUC", "CV AUC", "sign"],
          d.probes.map((q) => [runLink(q.probe, (byId()[q.probe] || {}).name), q.task, q.feature_set, q.test_auc, q.cv_auc, q.sign]))
          : note("No probing task selected this meta-neuron as its 1-D feature."))),
      section(`Top contexts (${d.examples.length})`, note("Each token is shaded by its activation relative to the context's maximum; the peak token is outlined; hover a token for its value."),
        h("div", { class: "contexts" }, d.examples.map((ex) => h("div", { class: "context" }, h("div", { class: "muted" }, `${fmt(ex.max)} · ${ex.doc || ""}`), shaded(ex)))))];
  }

  // ------------------------------ VPD
  function vpdEval(e) {
    if (!e) return null;
    const out = [];
    if (e.lm) out.push(table(["masks", "CE", "ΔCE", "CE unrecovered", "KL"], [["target", e.ce_target, null, null, null],
      ...e.strategies.map((s) => [s.masks, s.ce, s.dce, s.unrecovered, s.kl])]));
    else out.push(table(["masks", "MSE"], e.strategies.map((s) => [s.masks, s.mse])));
    out.push(table(["matrix", "C", "alive", "dead", "L0"], [...e.matrices.map((m) => [m.matrix, m.C, m.alive, m.dead, m.l0]),
      ["total", null, e.alive_total, null, e.l0_total]]));
    out.push(note(`Δ-L2 ${fmt(e.delta_l2)} · L0 threshold ${fmt(e.threshold)}` + (e.pgd ? ` · adversary: fresh PGD ${e.pgd.steps} × ${fmt(e.pgd.step_size)}` : "")));
    const gt = e.ground_truth;
    if (gt) {
      out.push(h("h3", null, "Ground truth recovery"), kv(gt.summary), gt.matter ? kv(Object.fromEntries(Object.entries(gt.matter).map(([k, v]) => [`components that matter: ${k}`, v]))) : null);
      if (gt.per_matrix.length) {
        const keys = [...new Set(gt.per_matrix.flatMap((m) => Object.keys(m)))].filter((k) => k !== "matrix");
        out.push(table(["matrix", ...keys], gt.per_matrix.map((m) => [m.matrix, ...keys.map((k) => m[k])]), "gt"));
      }
      for (const f of gt.features) out.push(h("h4", null, `${f.matrix}: best-matching subcomponent per true feature`),
        table(["feature", "cosine", "norm ratio"], f.cosine.map((c, i) => [i, c, (f.norm_ratio || [])[i]])));
    }
    return out;
  }

  R.vpd = (p, params) => {
    const v = p.vpd;
    const out = [section("Decomposition", kv({ objective: v.objective, target: v.target, step: v.step }),
      v.components ? table(["matrix", "C", "d_in", "d_out"], v.components.map((c) => [c.name, c.C, c.d_in, c.d_out])) : null)];
    if (p.eval) out.push(section("Evaluation", vpdEval(p.eval)));
    const spec = Object.entries(p.spectrum || {});
    if (spec.length) out.push(section("Causal-importance spectrum", note(`Per matrix, its subcomponents sorted by mean causal importance over the contexts' text; firing: fraction of tokens with CI > ${fmt(p.threshold)}.`),
      h("div", { class: "row" },
        Charts.line({ series: spec.map(([m, s]) => ({ name: m, points: s.mean_ci.map((y, i) => [i + 1, y]) })), logy: true, xlabel: "rank", ylabel: "mean CI", title: "mean CI, sorted", width: 520, height: 280 }),
        Charts.line({ series: spec.map(([m, s]) => ({ name: m, points: s.firing.map((y, i) => [i + 1, y]) })), xlabel: "rank (by mean CI)", ylabel: "firing frequency", title: "firing frequency", width: 520, height: 280 }))));
    else out.push(section("Causal-importance spectrum", note("No contexts run for this decomposition (innards vpd contexts): the spectrum PNG of its eval, if any, is below.")));
    const terms = ["total", "stochastic", "adversarial", "importance", "frequency", "delta_l2"].filter((k) => p.curves.series[k]);
    if (terms.length) out.push(section("Training", h("div", { class: "row" }, terms.map((k) => curves(p.curves, [k], { title: k, ylabel: k, logy: k === "total" || k === "delta_l2", width: 340, height: 200 })))));
    if (p.analyses.length) out.push(section("Analyses", h("ul", null, p.analyses.map((a) => h("li", null, runLink(a.id), " ", headline(a.headline))))));
    out.push(listSection(p, ["subcomponent", "mean CI", "firing", "top context"], (r) => [h("a", { href: itemHref(p.run.id, r.id), class: "item-link" }, r.id), r.mean_ci, r.firing, h("span", { class: "snippet" }, tokenText(r.snippet))], params));
    out.push(pngs(p.run.id, p.pngs));
    return out;
  };

  function graphView(gd, order, vpdId, highlight) {
    const g = gd.graph || gd;
    const box = Charts.graph({ nodes: g.nodes, edges: g.edges, tokens: g.tokens, order, highlight,
      onClick: (n) => { if (vpdId) location.hash = itemHref(vpdId, `${n.matrix}:${n.component}`); } });
    return h("div", null, note(`Prompt ${JSON.stringify(g.prompt)} → next token ${JSON.stringify(g.output_token)}. Wheel: zoom · drag: pan · double click: reset · click a subcomponent to open it.`),
      h("div", { class: "graph-tools" }, h("button", { type: "button", onclick: () => box.zoom(1.3) }, "zoom in"), h("button", { type: "button", onclick: () => box.zoom(1 / 1.3) }, "zoom out")), box);
  }

  function ablation(a) {
    if (a.error) return h("div", { class: "damaged-box" }, a.error);
    const barsOf = (list, key, color) => Charts.bars({ labels: list.map((x) => JSON.stringify(x.token)), values: list.map((x) => x[key]), ylabel: "Δ probability", color, height: 220 });
    return h("div", { class: "ablation" }, kv({ prompt: a.prompt, "KL(target ‖ ablated)": a.kl_target_to_ablated,
      "ΔCE": a.delta_ce, "ΔCE (next token)": a.delta_ce_next }),
      a.delta_ce === undefined ? note("ΔCE is not recorded by this ablation (innards vpd ablate records the next-token distributions and their KL).") : null,
      h("div", { class: "row" }, h("div", null, h("h4", null, "promoted by removing it"), barsOf(a.most_increased || [], "dp", "#2ca02c")),
        h("div", null, h("h4", null, "demoted by removing it"), barsOf(a.most_decreased || [], "dp", "#d62728"))),
      table(["target top token", "p", "ablated top token", "p"], (a.top_target || []).map((t, i) => [JSON.stringify(t.token), t.p,
        a.top_ablated && a.top_ablated[i] ? JSON.stringify(a.top_ablated[i].token) : "–", a.top_ablated && a.top_ablated[i] ? a.top_ablated[i].p : null])),
      a.tokens ? h("div", null, h("h4", null, "its causal importance on the prompt"), h("div", { class: "tokens" }, a.tokens.map((t, i) =>
        h("span", { class: "tok", title: fmt(a.ci_per_position[i]), style: { background: `rgba(31, 119, 180, ${Math.min(1, Math.max(0, a.ci_per_position[i] || 0)).toFixed(2)})` } }, tokenText(t))))) : null);
  }

  async function renderComponent(page, item) {
    const d = await api.item(page.run.id, item);
    if (d.error) return [h("div", { class: "damaged-box" }, d.error)];
    return [h("h1", null, h("span", { class: "badge kind" }, "subcomponent"), ` ${d.matrix} : ${d.idx}`),
      h("p", null, "of ", runLink(page.run.id), h("span", { class: "muted" }, `  · mean CI ${fmt(d.mean_ci)} · firing ${fmt(d.firing)}`)),
      section("Top contexts", d.examples.length ? h("div", { class: "contexts" }, d.examples.map((e) => h("div", { class: "context vpd-ctx" },
        h("span", { class: "muted" }, `CI ${fmt(e.ci)}  `), h("span", null, tokenText(e.left)), h("mark", null, tokenText(e.token)), h("span", null, tokenText(e.right)))))
        : note("No contexts recorded (it never fired above the contexts threshold, or there is no contexts run).")),
      section("Ablation effect", d.ablations.length ? d.ablations.map((a) => h("div", null, h("p", null, runLink(a.id)), ablation(a)))
        : note("No ablation of this subcomponent was run (innards vpd ablate --component " + d.id + ").")),
      section("Attribution graphs", d.graphs.length ? d.graphs.map((g) => h("div", null, h("p", null, runLink(g.id)), graphView(g, g.order, d.vpd, g.highlight)))
        : note("No attribution graph among the runs contains this subcomponent."))];
  }

  R["vpd-graph"] = (p) => [section("Attribution graph", p.vpd ? h("p", null, "of ", runLink(p.vpd)) : null, graphView(p, p.order, p.vpd, []),
    kv({ nodes: p.graph.nodes.length, edges: p.graph.edges.length, threshold: p.graph.threshold })), pngs(p.run.id, p.pngs)];
  R["vpd-ablate"] = (p) => [section("Ablation", p.vpd ? h("p", null, h("a", { href: itemHref(p.vpd, p.ablation.component), class: "item-link" }, `open subcomponent ${p.ablation.component}`)) : null, ablation(p.ablation))];
  R["vpd-eval"] = (p) => [section("Evaluation", vpdEval(p.eval)), pngs(p.run.id, p.pngs)];
  R["vpd-contexts"] = (p) => [section("Contexts", kv(p.contexts), note(`${p.n} subcomponents have contexts; the 100 with the highest mean CI:`),
    table(["subcomponent", "mean CI", "firing", "top context"], p.top.map((c) => [p.vpd ? h("a", { href: itemHref(p.vpd, c.id), class: "item-link" }, c.id) : c.id, c.mean_ci, c.firing,
      h("span", { class: "snippet" }, tokenText(c.snippet || ""))])))];

  R.demo = (p) => {
    const d = p.demo;
    return [section("Demo", kv({ model: d.model, site: d.site })),
      d.stages ? section("Stages", table(["stage", "output", "seconds"], Object.entries(d.stages).map(([k, v]) => [k, v.dir || v.file || "", v.seconds]))) : null,
      d.eval ? section("Evaluation", kv(d.eval)) : null, pngs(p.run.id, p.pngs)];
  };

  R.generic = (p) => [p.files && p.files.length ? section("Files", table(["file", "bytes"], p.files.map((f) => [f.name, f.bytes]))) : null, pngs(p.run.id, p.pngs)];

  // ---------------------------------------------------------------- router
  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, "");
    const [path, query] = raw.split("?");
    return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "") };
  }

  let renderToken = 0;
  async function render() {
    const mine = ++renderToken;
    Charts.tip.hide();
    const { parts, params } = parseHash();
    try {
      INDEX = await api.index();
      document.getElementById("pg-link").hidden = !INDEX.playground;
      let kids;
      if (!parts.length) { await renderIndex(); window.scrollTo(0, 0); return; }
      if (parts[0] === "playground") {
        crumbs([{ label: "runs", href: "#/" }, { label: "playground" }]);
        kids = [h("h1", null, "Steering playground"), playgroundSection({})];
      } else if (parts[0] === "run" && parts[1]) {
        const page = await api.run(parts[1]);
        const r = page.run;
        if (parts[2] === "item" && parts[3]) {
          crumbs([{ label: "runs", href: "#/" }, { label: r.rel, href: runHref(r.id) }, { label: parts[3] }]);
          kids = r.kind === "neurons" ? await renderNeuron(page, parts[3]) : await renderComponent(page, parts[3]);
        } else {
          crumbs([{ label: "runs", href: "#/" }, { label: r.rel }]);
          const fn = R[r.kind] || R.generic;
          kids = [runHeader(page), ...(page.error ? [] : fn(page, params)), ...configBlock(page)];
        }
      } else {
        kids = [h("h1", null, "Not found"), h("p", null, h("a", { href: "#/" }, "back to the runs"))];
      }
      if (mine !== renderToken) return;
      put(APP, kids);
      if (!params.has("p")) window.scrollTo(0, 0);
    } catch (e) {
      if (mine !== renderToken) return;
      APP.replaceChildren(h("h1", null, "Could not show this page"), h("div", { class: "damaged-box" }, String(e.message || e)),
        h("p", null, h("a", { href: "#/" }, "back to the runs")));
    }
  }
  window.addEventListener("hashchange", render);
  render();
})();
