// A hospital's own page (served by its daemon on loopback): polls /api/state and redraws.
"use strict";
const $ = (id) => document.getElementById(id);

function render(doc) {
  $("title").textContent = `hospital ${doc.hospital}`;
  document.title = `fedtune: ${doc.hospital}`;
  const link = doc.link;
  $("link-state").textContent = link.state;
  $("link-state").className = "state " + link.state;
  const detail = [`coordinator ${link.coordinator}`, `since ${link.since}`];
  for (const k of ["node_id", "attempts", "error", "reason"]) if (link[k] !== undefined) detail.push(`${k.replace("_", " ")} ${link[k]}`);
  $("link-detail").textContent = detail.join(" \u00b7 ");
  table($("runs"), doc.runs);
  const audit = doc.audit;
  $("audit-verdict").replaceChildren(node("span", { class: "state " + (audit.ok ? "ok" : "bad") }, audit.ok ? "chain verifies" : "chain does NOT verify"),
    document.createTextNode(` ${audit.verdict}; ${audit.records} messages, ${audit.bytes} bytes sent (${audit.path})`));
  table($("messages"), audit.messages, ["seq", "time", "run", "round", "kind", "bytes", "sha256", "epsilon"]);
  const priv = doc.privacy;
  $("privacy-policy").textContent = priv.policy || "";
  table($("privacy"), (priv.datasets || []).map((d) => ({ ...d, dataset: d.dataset.slice(0, 12) })));
  const runs = [...new Set(audit.messages.filter((m) => m.epsilon !== null).map((m) => m.run))];
  lineChart($("chart-epsilon"), "epsilon spent after each training reply (audit trail)", runs.map((r, i) => ({
    name: r, color: COLORS[i % COLORS.length],
    points: audit.messages.filter((m) => m.run === r && m.kind === "train" && m.epsilon !== null).reverse().map((m) => [m.round, m.epsilon]),
  })), [], "(no message under DP yet)");
  const release = doc.release || { adopted: "", last: [] };
  $("release-adopted").textContent = release.adopted;
  table($("release-last"), release.last);
  table($("errors"), doc.errors, ["time", "level", "message"]);
}

poll(() => "/api/state", render, 1000);
