// The coordinator's (and a simulation's) live page: polls /api/state and redraws.
"use strict";
const chosen = new URLSearchParams(location.search).get("run");
const $ = (id) => document.getElementById(id);

function siteSeries(points, key) {
  const sites = [...new Set(points.flatMap((p) => Object.keys(p[key] || {})))].filter((s) => s !== "pooled").sort();
  const out = sites.map((s, i) => ({ name: s, color: COLORS[i % COLORS.length], points: points.map((p) => [p.round, (p[key] || {})[s]]) }));
  out.push({ name: "pooled", color: "#000", width: 2.5, points: points.map((p) => [p.round, (p[key] || {}).pooled]) });
  return out;
}

function baselineLines(view, key) {
  return Object.entries(view.baselines || {}).map(([name, b]) => ({ name, y: b[key], color: BASELINE_COLORS[name] || "#777" }));
}

function renderView(view) {
  $("run-name").textContent = view.run;
  $("round").textContent = view.round;
  $("rounds").textContent = view.rounds === null ? "?" : view.rounds;
  $("done").textContent = view.done;
  $("phase").textContent = view.phase;
  $("phase").className = "state " + view.phase;
  $("phase-for").textContent = view["phase-for"] === null ? "" : `for ${Math.round(view["phase-for"])} s`;
  $("run-state").textContent = view.state + (view.reason ? ": " + view.reason : "");
  table($("hospitals"), view.hospitals, ["hospital", "train", "evaluate", "why", "last seen (s ago)"]);
  const pts = view.points;
  lineChart($("chart-loss"), "eval loss (pooled and per hospital)", siteSeries(pts, "loss"), baselineLines(view, "loss"));
  lineChart($("chart-metric"), "task metric: field accuracy (pooled and per hospital)", siteSeries(pts, "metric"), baselineLines(view, "metric"));
  const epsSites = [...new Set(pts.flatMap((p) => Object.keys(p.epsilon)))].sort();
  const eps = epsSites.map((s, i) => ({ name: s, color: COLORS[i % COLORS.length], points: pts.map((p) => [p.round, p.epsilon[s]]) }));
  eps.push({ name: "client-level", color: "#000", points: pts.map((p) => [p.round, p["client-epsilon"]]) });
  lineChart($("chart-epsilon"), "epsilon spent per hospital (cumulative)", eps, [], "(no DP in this run, or no round yet)");
  lineChart($("chart-bytes"), "bytes per round", [
    { name: "to the coordinator", color: COLORS[0], points: pts.map((p) => [p.round, p["upload-bytes"]]) },
    { name: "to the hospitals", color: COLORS[1], points: pts.map((p) => [p.round, p["download-bytes"]]) },
  ]);
  lineChart($("chart-seconds"), "round duration (s)", [{ name: "seconds", color: COLORS[2], points: pts.map((p) => [p.round, p.seconds]) }]);
  table($("rounds-table"), pts.map((p) => ({
    round: p.round, "pooled loss": p.loss.pooled, "pooled metric": p.metric.pooled, "train loss": p["train-loss"],
    "bytes up": p["upload-bytes"], "bytes down": p["download-bytes"], seconds: p.seconds,
    accepted: p.accepted, rejected: p.rejected.map((r) => fmt(r)), refused: p.refused.map((r) => fmt(r)),
  })));
}

function render(doc) {
  $("title").textContent = doc.title;
  document.title = doc.title;
  $("superlink").textContent = doc.superlink || "";
  $("registry-box").hidden = !doc.registry;
  if (doc.registry) table($("registry"), doc.registry);
  table($("runs"), doc.runs, null, { run: (r) => "?run=" + encodeURIComponent(r.run) });
  if (doc.view) renderView(doc.view);
}

poll(() => "/api/state" + (chosen ? "?run=" + encodeURIComponent(chosen) : ""), render, 1000);
