// fedtune live pages: DOM helpers, tables, hand-written SVG line charts and the polling loop.
// Shipped inside the package; every text is set with textContent (names come from files).
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const BASELINE_COLORS = { "base model": "#d62728", "centralized": "#2ca02c", "local only (mean)": "#9467bd" };

function node(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    if (v !== 0 && Math.abs(v) < 0.001) return v.toExponential(1);
    return v.toFixed(Math.abs(v) >= 100 ? 0 : 3);
  }
  if (Array.isArray(v)) return v.length ? v.join(", ") : "-";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

const STATES = new Set(["accepted", "evaluated", "refused", "rejected", "failed", "sampled", "answered", "no reply",
  "online", "offline", "connected", "retrying", "starting", "stopped", "ok", "bad"]);

// rows: list of objects; columns default to the union of their keys
function table(target, rows, columns, link) {
  target.replaceChildren();
  if (!rows || !rows.length) { target.append(node("p", { class: "muted" }, "(none yet)")); return; }
  columns = columns || [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const t = node("table"), head = node("tr");
  columns.forEach((c) => head.append(node("th", {}, c)));
  t.append(head);
  for (const r of rows) {
    const tr = node("tr");
    for (const c of columns) {
      const v = r[c], td = node("td", typeof v === "number" ? { class: "num" } : {});
      if (link && link[c]) { const a = node("a", { href: link[c](r) }, fmt(v)); td.append(a); }
      else if (typeof v === "string" && STATES.has(v)) td.append(node("span", { class: "state " + v.replace(" ", "-") }, v));
      else td.textContent = fmt(v);
      tr.append(td);
    }
    t.append(tr);
  }
  target.append(t);
}

// series: [{name, points: [[x, y]], color, dash, width}]; lines: [{name, y, color}] drawn across
function lineChart(figure, title, series, lines, empty) {
  figure.replaceChildren(node("figcaption", {}, title));
  series = series.filter((s) => s.points.some((p) => p[1] !== null && p[1] !== undefined));
  lines = (lines || []).filter((l) => l.y !== null && l.y !== undefined);
  const W = 420, H = 220, L = 52, R = 10, T = 10, B = 30;
  const svg = node("svg:svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, "data-series": series.length });
  const pts = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  if (!pts.length && !lines.length) {
    figure.append(node("p", { class: "muted" }, empty || "(no rounds yet)"));
    return;
  }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]).concat(lines.map((l) => l.y));
  let x0 = Math.min(1, ...xs), x1 = Math.max(x0 + 1, ...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(node("svg:rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fff", stroke: "#ccd" }));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(node("svg:line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), stroke: "#eef" }));
    svg.append(node("svg:text", { x: L - 4, y: Y(y) + 4, "text-anchor": "end", "font-size": 10 }, fmt(y)));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 10));
  for (let x = Math.ceil(x0); x <= x1; x += step)
    svg.append(node("svg:text", { x: X(x), y: H - B + 14, "text-anchor": "middle", "font-size": 10 }, x));
  svg.append(node("svg:text", { x: (L + W) / 2, y: H - 3, "text-anchor": "middle", "font-size": 10 }, "round"));
  const legend = node("div", { class: "legend" });
  for (const l of lines) {
    svg.append(node("svg:line", { x1: L, x2: W - R, y1: Y(l.y), y2: Y(l.y), stroke: l.color, "stroke-dasharray": "6 4",
      "stroke-width": 1.5, class: "baseline", "data-name": l.name }));
    legend.append(swatch(l.color, l.name + " (baseline)"));
  }
  for (const s of series) {
    const good = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
    const d = good.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    svg.append(node("svg:path", { d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.5,
      class: "series", "data-name": s.name, "data-points": good.length, "stroke-dasharray": s.dash || "none" }));
    for (const p of good) svg.append(node("svg:circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: s.color }));
    legend.append(swatch(s.color, s.name));
  }
  figure.append(svg, legend);
}

function swatch(color, name) {
  const item = node("span"), box = node("i");
  box.style.background = color;
  item.append(box, document.createTextNode(name));
  return item;
}

// GET url every `every` ms and hand the JSON to render; the page never reloads itself
function poll(url, render, every) {
  const updated = document.getElementById("updated"), error = document.getElementById("error");
  async function once() {
    try {
      const answer = await fetch(url(), { credentials: "same-origin", cache: "no-store" });
      const doc = await answer.json();
      if (!answer.ok) throw new Error(doc.error || answer.status);
      render(doc);
      error.textContent = "";
      updated.textContent = "updated " + new Date().toLocaleTimeString() + " (every " + every / 1000 + " s)";
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } catch (err) {
      error.textContent = "cannot read the state: " + err.message;
    }
    setTimeout(once, every);
  }
  once();
}
