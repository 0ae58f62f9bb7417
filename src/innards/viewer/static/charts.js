/* innards viewer: small SVG charts (line, scatter with error bars, histogram, bars, attribution graph).
 * Every label is set with textContent; no data ever becomes markup. */
"use strict";

const Charts = (function () {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf"];

  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.appendChild(typeof kid === "string" || typeof kid === "number" ? document.createTextNode(String(kid)) : kid);
    }
    return el;
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }

  // ---------------------------------------------------------------- tooltip
  const tip = {
    el() { return document.getElementById("tip"); },
    show(lines, ev) {
      const el = this.el();
      if (!el) return;
      el.replaceChildren(...lines.map((t) => { const d = document.createElement("div"); d.textContent = t; return d; }));
      el.hidden = false;
      const x = Math.min(ev.clientX + 14, window.innerWidth - el.offsetWidth - 8);
      const y = Math.min(ev.clientY + 14, window.innerHeight - el.offsetHeight - 8);
      el.style.left = x + "px";
      el.style.top = y + "px";
    },
    hide() { const el = this.el(); if (el) el.hidden = true; },
  };

  // ---------------------------------------------------------------- scales and axes
  function niceStep(span, n) {
    const raw = span / Math.max(1, n);
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const m = raw / p;
    return (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p;
  }

  function scale(lo, hi, a, b, log) {
    if (log) {
      lo = Math.max(lo, 1e-300); hi = Math.max(hi, lo * 1.0001);
      const l0 = Math.log10(lo), l1 = Math.log10(hi);
      const f = (v) => a + (Math.log10(Math.max(v, 1e-300)) - l0) / (l1 - l0 || 1) * (b - a);
      f.ticks = () => {
        const out = [];
        for (let e = Math.floor(l0); e <= Math.ceil(l1); e++) {
          const v = Math.pow(10, e);
          if (v >= lo * 0.999 && v <= hi * 1.001) out.push(v);
        }
        if (out.length < 2) { out.length = 0; out.push(lo, Math.sqrt(lo * hi), hi); }
        return out;
      };
      f.inv = (px) => Math.pow(10, l0 + (px - a) / (b - a) * (l1 - l0));
      return f;
    }
    if (hi === lo) { hi = lo + 1; lo = lo - 1; }
    const f = (v) => a + (v - lo) / (hi - lo) * (b - a);
    f.ticks = (n = 5) => {
      const st = niceStep(hi - lo, n);
      const out = [];
      for (let v = Math.ceil(lo / st) * st; v <= hi + st * 1e-9; v += st) out.push(Math.abs(v) < st * 1e-9 ? 0 : v);
      return out;
    };
    f.inv = (px) => lo + (px - a) / (b - a) * (hi - lo);
    return f;
  }

  function extent(vals, log, pad = 0.05) {
    let v = vals.filter((x) => x !== null && x !== undefined && isFinite(x) && (!log || x > 0));
    if (!v.length) return [log ? 1 : 0, log ? 10 : 1];
    let lo = Math.min(...v), hi = Math.max(...v);
    if (log) return [lo / Math.pow(hi / lo || 10, pad), hi * Math.pow(hi / lo || 10, pad)];
    const span = hi - lo || Math.abs(hi) || 1;
    return [lo - span * pad, hi + span * pad];
  }

  function frame(o) {
    const W = o.width || 560, H = o.height || 260, M = { l: 58, r: 14, t: o.title ? 22 : 10, b: 40 };
    const X = scale(o.x[0], o.x[1], M.l, W - M.r, o.logx);
    const Y = scale(o.y[0], o.y[1], H - M.b, M.t, o.logy);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "chart", role: "img" });
    const grid = s("g", { class: "grid" });
    for (const t of X.ticks(6)) {
      const x = X(t);
      grid.appendChild(s("line", { x1: x, x2: x, y1: M.t, y2: H - M.b }));
      svg.appendChild(s("text", { x, y: H - M.b + 14, "text-anchor": "middle", class: "tick" }, fmt(t)));
    }
    for (const t of Y.ticks(5)) {
      const y = Y(t);
      grid.appendChild(s("line", { x1: M.l, x2: W - M.r, y1: y, y2: y }));
      svg.appendChild(s("text", { x: M.l - 5, y: y + 3, "text-anchor": "end", class: "tick" }, fmt(t)));
    }
    svg.insertBefore(grid, svg.firstChild);
    svg.appendChild(s("rect", { x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, class: "frame" }));
    if (o.xlabel) svg.appendChild(s("text", { x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle", class: "label" }, o.xlabel));
    if (o.ylabel) svg.appendChild(s("text", { x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle", class: "label",
      transform: `rotate(-90 12 ${(M.t + H - M.b) / 2})` }, o.ylabel));
    if (o.title) svg.appendChild(s("text", { x: M.l, y: 14, class: "title" }, o.title));
    const clip = "c" + Math.random().toString(36).slice(2);
    svg.appendChild(s("clipPath", { id: clip }, s("rect", { x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b })));
    const g = s("g", { "clip-path": `url(#${clip})` });
    svg.appendChild(g);
    return { svg, g, X, Y, M, W, H };
  }

  function legend(names, colors) {
    const d = document.createElement("div");
    d.className = "legend";
    names.forEach((n, i) => {
      const it = document.createElement("span");
      const sw = document.createElement("i");
      sw.style.background = colors[i];
      it.appendChild(sw);
      it.appendChild(document.createTextNode(n));
      d.appendChild(it);
    });
    return d;
  }

  function wrap(svg, leg, cls) {
    const d = document.createElement("div");
    d.className = "chart-box " + (cls || "");
    d.appendChild(svg);
    if (leg) d.appendChild(leg);
    return d;
  }

  // ---------------------------------------------------------------- line chart
  /* o: {series: [{name, points: [[x, y]], color?}], xlabel, ylabel, logx, logy, title, width, height} */
  function line(o) {
    const series = (o.series || []).filter((se) => se.points && se.points.length);
    const xs = series.flatMap((se) => se.points.map((p) => p[0]));
    const ys = series.flatMap((se) => se.points.map((p) => p[1]));
    const f = frame({ ...o, x: extent(xs, o.logx, 0.02), y: extent(ys, o.logy) });
    const colors = series.map((se, i) => se.color || PALETTE[i % PALETTE.length]);
    series.forEach((se, i) => {
      const pts = se.points.filter((p) => p[1] !== null && isFinite(p[1]) && (!o.logy || p[1] > 0));
      const d = pts.map((p, j) => `${j ? "L" : "M"}${f.X(p[0]).toFixed(1)},${f.Y(p[1]).toFixed(1)}`).join("");
      f.g.appendChild(s("path", { d, class: "series", stroke: colors[i], "stroke-dasharray": se.dash || null }));
      if (pts.length <= 60) pts.forEach((p) => f.g.appendChild(s("circle", { cx: f.X(p[0]), cy: f.Y(p[1]), r: 2, fill: colors[i] })));
    });
    const hover = s("rect", { x: f.M.l, y: f.M.t, width: f.W - f.M.l - f.M.r, height: f.H - f.M.t - f.M.b, class: "hover" });
    hover.addEventListener("mousemove", (ev) => {
      const box = f.svg.getBoundingClientRect();
      const px = (ev.clientX - box.left) * (f.W / box.width);
      const xv = f.X.inv(px);
      const lines = [];
      series.forEach((se) => {
        let best = null;
        for (const p of se.points) if (best === null || Math.abs(p[0] - xv) < Math.abs(best[0] - xv)) best = p;
        if (best) lines.push(`${se.name}: ${fmt(best[1])} at ${o.xlabel || "x"} ${fmt(best[0])}`);
      });
      tip.show(lines, ev);
    });
    hover.addEventListener("mouseleave", () => tip.hide());
    f.svg.appendChild(hover);
    return wrap(f.svg, series.length > 1 ? legend(series.map((se) => se.name), colors) : null);
  }

  // ---------------------------------------------------------------- scatter with error bars
  /* o: {groups: [{name, color?, connect?, points: [{x, y, xerr:[lo,hi], yerr:[lo,hi], label, tip:[lines], data}]}],
   *     onClick(point, group), xlabel, ylabel, logx, logy, curve: {name, fn, color}} */
  function scatter(o) {
    const groups = o.groups || [];
    const all = groups.flatMap((g) => g.points);
    const xs = all.flatMap((p) => [p.x, ...(p.xerr || [])]);
    const ys = all.flatMap((p) => [p.y, ...(p.yerr || [])]);
    const f = frame({ ...o, x: o.xrange || extent(xs, o.logx), y: o.yrange || extent(ys, o.logy) });
    const colors = groups.map((g, i) => g.color || PALETTE[i % PALETTE.length]);
    if (o.curve) {
      const [a, b] = [f.X.inv(f.M.l), f.X.inv(f.W - f.M.r)];
      const pts = [];
      for (let i = 0; i <= 100; i++) {
        const x = o.logx ? Math.pow(10, Math.log10(a) + (Math.log10(b) - Math.log10(a)) * i / 100) : a + (b - a) * i / 100;
        const y = o.curve.fn(x);
        if (isFinite(y) && (!o.logy || y > 0)) pts.push([f.X(x), f.Y(y)]);
      }
      f.g.appendChild(s("path", { d: pts.map((p, i) => `${i ? "L" : "M"}${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(""),
        class: "series", stroke: o.curve.color || "#444", "stroke-dasharray": "5 3" }));
    }
    groups.forEach((g, gi) => {
      const ok = g.points.filter((p) => isFinite(p.x) && isFinite(p.y) && p.x !== null && p.y !== null);
      if (g.connect && ok.length > 1) {
        f.g.appendChild(s("path", { d: ok.map((p, j) => `${j ? "L" : "M"}${f.X(p.x).toFixed(1)},${f.Y(p.y).toFixed(1)}`).join(""),
          class: "series thin", stroke: colors[gi] }));
      }
      for (const p of ok) {
        const cx = f.X(p.x), cy = f.Y(p.y);
        if (p.xerr && isFinite(p.xerr[0]) && isFinite(p.xerr[1]))
          f.g.appendChild(s("line", { x1: f.X(p.xerr[0]), x2: f.X(p.xerr[1]), y1: cy, y2: cy, class: "err", stroke: colors[gi] }));
        if (p.yerr && isFinite(p.yerr[0]) && isFinite(p.yerr[1]))
          f.g.appendChild(s("line", { x1: cx, x2: cx, y1: f.Y(p.yerr[0]), y2: f.Y(p.yerr[1]), class: "err", stroke: colors[gi] }));
        const dot = s("circle", { cx, cy, r: p.r || 4.5, fill: colors[gi], class: "dot" + (o.onClick ? " clickable" : ""),
          "data-group": g.name, "data-label": p.label === undefined ? null : String(p.label) });
        dot.addEventListener("mousemove", (ev) => tip.show(p.tip || [`${g.name} ${p.label ?? ""}`, `${fmt(p.x)}, ${fmt(p.y)}`], ev));
        dot.addEventListener("mouseleave", () => tip.hide());
        if (o.onClick) dot.addEventListener("click", () => {
          f.svg.querySelectorAll(".dot.selected").forEach((d) => d.classList.remove("selected"));
          dot.classList.add("selected");
          o.onClick(p, g);
        });
        f.g.appendChild(dot);
        if (p.label !== undefined && o.labels !== false)
          f.g.appendChild(s("text", { x: cx + 6, y: cy - 6, class: "pt-label", fill: colors[gi] }, String(p.label)));
      }
    });
    const names = groups.map((g) => g.name);
    if (o.curve) { names.push(o.curve.name); colors.push(o.curve.color || "#444"); }
    return wrap(f.svg, names.length > 1 ? legend(names, colors) : null);
  }

  // ---------------------------------------------------------------- histogram and bars
  /* o: {edges, counts, xlabel, ylabel, color, mark} */
  function hist(o) {
    const e = o.edges || [], c = o.counts || [];
    if (!c.length) { const p = document.createElement("p"); p.className = "muted"; p.textContent = "no values"; return p; }
    const f = frame({ ...o, x: [e[0], e[e.length - 1]], y: [0, Math.max(...c) * 1.08] });
    c.forEach((n, i) => {
      const x0 = f.X(e[i]), x1 = f.X(e[i + 1]);
      const bar = s("rect", { x: x0, y: f.Y(n), width: Math.max(0.5, x1 - x0 - 0.5), height: f.Y(0) - f.Y(n),
        fill: o.color || PALETTE[0], class: "bar" });
      bar.addEventListener("mousemove", (ev) => tip.show([`[${fmt(e[i])}, ${fmt(e[i + 1])})`, `${n}`], ev));
      bar.addEventListener("mouseleave", () => tip.hide());
      f.g.appendChild(bar);
    });
    if (o.mark !== undefined && o.mark !== null)
      f.g.appendChild(s("line", { x1: f.X(o.mark), x2: f.X(o.mark), y1: f.M.t, y2: f.H - f.M.b, class: "mark" }));
    return wrap(f.svg, null, "hist");
  }

  /* o: {labels, values, lo?, hi?, ylabel, yrange, color, horizontal labels} */
  function bars(o) {
    const n = o.labels.length;
    const W = Math.max(320, 70 * n + 80);
    const vals = o.values.concat(o.lo || [], o.hi || []);
    const f = frame({ ...o, width: W, x: [0, n], y: o.yrange || extent(vals.concat([0]), false) });
    o.labels.forEach((lab, i) => {
      const v = o.values[i];
      const x0 = f.X(i + 0.15), x1 = f.X(i + 0.85);
      const y0 = f.Y(Math.max(f.Y.inv(f.H - f.M.b), 0));
      const bar = s("rect", { x: x0, y: Math.min(f.Y(v), y0), width: x1 - x0, height: Math.abs(y0 - f.Y(v)),
        fill: (o.colors && o.colors[i]) || o.color || PALETTE[0], class: "bar" });
      const lines = [String(lab), fmt(v) + (o.lo ? ` [${fmt(o.lo[i])}, ${fmt(o.hi[i])}]` : "")];
      bar.addEventListener("mousemove", (ev) => tip.show(lines, ev));
      bar.addEventListener("mouseleave", () => tip.hide());
      f.g.appendChild(bar);
      if (o.lo && isFinite(o.lo[i]) && isFinite(o.hi[i])) {
        const cx = (x0 + x1) / 2;
        f.g.appendChild(s("line", { x1: cx, x2: cx, y1: f.Y(o.lo[i]), y2: f.Y(o.hi[i]), class: "err", stroke: "#222" }));
      }
      f.svg.appendChild(s("text", { x: (x0 + x1) / 2, y: f.H - f.M.b + 26, "text-anchor": "middle", class: "tick" },
        String(lab).length > 14 ? String(lab).slice(0, 13) + "…" : String(lab)));
    });
    // the x axis ticks of a bar chart are its labels
    f.svg.querySelectorAll("text.tick").forEach((t) => { if (t.getAttribute("y") == String(f.H - f.M.b + 14)) t.remove(); });
    return wrap(f.svg, null, "bars");
  }

  // ---------------------------------------------------------------- attribution graph
  /* o: {nodes: [{id, matrix, pos, component, ci, act, token}], edges: [{source, target, attr}], tokens, order,
   *     highlight: [ids], onClick(node)} ; wheel zooms, drag pans, double click resets */
  function graph(o) {
    const rows = ["wte"];
    const seen = new Set(o.nodes.map((n) => n.matrix));
    for (const m of o.order || []) if (seen.has(m)) rows.push(m);
    for (const n of o.nodes) if (!rows.includes(n.matrix) && n.matrix !== "output") rows.push(n.matrix);
    rows.push("output");
    const T = (o.tokens || []).length || 1 + Math.max(0, ...o.nodes.map((n) => n.pos || 0));
    const colW = 110, rowH = 46, L = 190, Tp = 20;
    const W = L + colW * T + 30, H = Tp + rowH * rows.length + 40;
    const pos = {};
    const cell = {};
    for (const n of o.nodes) {
      const r = rows.indexOf(n.matrix);
      const key = r + ":" + n.pos;
      const k = cell[key] = (cell[key] || 0) + 1;
      pos[n.id] = [L + colW * n.pos + 12 + ((k - 1) % 8) * 11, Tp + rowH * (rows.length - 1 - r) + 12 + Math.floor((k - 1) / 8) * 10];
    }
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart graph", width: "100%", height: Math.min(H, 620),
      preserveAspectRatio: "xMinYMin meet" });
    const view = s("g", { class: "view" });
    svg.appendChild(view);
    rows.forEach((m, r) => {
      const y = Tp + rowH * (rows.length - 1 - r);
      view.appendChild(s("line", { x1: L - 6, x2: W - 10, y1: y + 16, y2: y + 16, class: "row-line" }));
      const short = m.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "");
      view.appendChild(s("text", { x: L - 10, y: y + 19, "text-anchor": "end", class: "tick" }, short));
    });
    (o.tokens || []).forEach((t, i) => {
      view.appendChild(s("text", { x: L + colW * i + 40, y: H - 14, "text-anchor": "middle", class: "token-label" },
        JSON.stringify(t).slice(1, -1)));
    });
    const maxA = Math.max(1e-12, ...o.edges.map((e) => Math.abs(e.attr)));
    const edgeEls = [];
    for (const e of o.edges) {
      const a = pos[e.source], b = pos[e.target];
      if (!a || !b) continue;
      const w = Math.abs(e.attr) / maxA;
      const el = s("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: "edge",
        stroke: e.attr >= 0 ? "#1f77b4" : "#d62728", "stroke-width": (0.4 + 3 * w).toFixed(2),
        "stroke-opacity": (0.15 + 0.75 * w).toFixed(2) });
      el.addEventListener("mousemove", (ev) => tip.show([`${e.source} → ${e.target}`, `attribution ${fmt(e.attr)}`], ev));
      el.addEventListener("mouseleave", () => tip.hide());
      edgeEls.push([e, el]);
      view.appendChild(el);
    }
    const hl = new Set(o.highlight || []);
    for (const n of o.nodes) {
      const p = pos[n.id];
      if (!p) continue;
      const isComp = n.matrix !== "wte" && n.matrix !== "output";
      const c = s("circle", { cx: p[0], cy: p[1], r: isComp ? 3 + 4 * (n.ci || 0) : 4,
        class: "node" + (isComp ? " comp" : " pseudo") + (hl.has(n.id) ? " highlight" : ""),
        "data-id": n.id, "data-component": isComp ? `${n.matrix}:${n.component}` : null });
      c.addEventListener("mousemove", (ev) => {
        tip.show([n.id, `token ${JSON.stringify(n.token)}`].concat(isComp ? [`CI ${fmt(n.ci)}, activation ${fmt(n.act)}`, "click: open"] : []), ev);
        for (const [e, el] of edgeEls) el.classList.toggle("lit", e.source === n.id || e.target === n.id);
      });
      c.addEventListener("mouseleave", () => { tip.hide(); for (const [, el] of edgeEls) el.classList.remove("lit"); });
      if (isComp && o.onClick) c.addEventListener("click", (ev) => { if (!dragged) o.onClick(n); ev.stopPropagation(); });
      view.appendChild(c);
    }
    // zoom and pan on the <g>: wheel zooms around the cursor, drag pans, double click resets
    let k = 1, tx = 0, ty = 0, drag = null, dragged = false;
    const apply = () => view.setAttribute("transform", `translate(${tx.toFixed(1)} ${ty.toFixed(1)}) scale(${k.toFixed(3)})`);
    const toSvg = (ev) => {
      const b = svg.getBoundingClientRect();
      const sc = Math.max(W / b.width, H / b.height);
      return [(ev.clientX - b.left) * sc, (ev.clientY - b.top) * sc];
    };
    svg.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const [mx, my] = toSvg(ev);
      const f = Math.exp(-ev.deltaY * 0.0015);
      const nk = Math.min(12, Math.max(0.3, k * f));
      tx = mx - (mx - tx) * nk / k; ty = my - (my - ty) * nk / k; k = nk;
      apply();
    }, { passive: false });
    svg.addEventListener("pointerdown", (ev) => { drag = [ev.clientX, ev.clientY, tx, ty]; dragged = false; });
    svg.addEventListener("pointermove", (ev) => {
      if (!drag) return;
      const b = svg.getBoundingClientRect();
      const sc = Math.max(W / b.width, H / b.height);
      const dx = (ev.clientX - drag[0]) * sc, dy = (ev.clientY - drag[1]) * sc;
      if (Math.abs(dx) + Math.abs(dy) > 3) dragged = true;
      tx = drag[2] + dx; ty = drag[3] + dy;
      apply();
    });
    const end = () => { drag = null; setTimeout(() => { dragged = false; }, 0); };
    svg.addEventListener("pointerup", end);
    svg.addEventListener("pointerleave", end);
    svg.addEventListener("dblclick", () => { k = 1; tx = 0; ty = 0; apply(); });
    const box = wrap(svg, legend(["positive attribution", "negative attribution", "highlighted"], ["#1f77b4", "#d62728", "#ff7f0e"]), "graph-box");
    box.zoom = (f) => { k = Math.min(12, Math.max(0.3, k * f)); apply(); };
    return box;
  }

  return { s, fmt, tip, line, scatter, hist, bars, graph, PALETTE };
})();
