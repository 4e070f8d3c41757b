// The dashboard's script (a file of its own: the page's CSP allows no inline script).
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const pill = (text, kind) => `<span class="pill ${kind}">${esc(text)}</span>`;
// The width is set from data-width after rendering: the CSP refuses inline style attributes.
const bar = (share) => `<div class="bar${share >= 0.9 ? " hot" : ""}"><div data-width="${Math.min(100, Math.round(share * 100))}"></div></div>`;
const HEALTH = {ready: "ok", warming: "warn", unknown: "dim", down: "bad"};
const BREAKER = {closed: "ok", half_open: "warn", open: "bad"};
const SEAT = {loaded: "ok", sleeping: "ok", loading: "warn", unloading: "warn", unloaded: "dim", failed: "bad"};

function rows(id, items, render, empty) {
  const body = $(id).querySelector("tbody");
  body.innerHTML = items.length ? items.map(render).join("") : `<tr><td colspan="6" class="empty">${empty}</td></tr>`;
  for (const el of body.querySelectorAll("[data-width]")) el.style.width = `${el.dataset.width}%`;
}

function chart(id, t, lines) {
  const svg = $(id), w = svg.clientWidth || 600, h = 160, pad = 28;
  const values = lines.flatMap((l) => l.values.filter((v) => v !== null));
  const max = Math.max(1e-9, ...values) * 1.1;
  if (t.length < 2) { svg.innerHTML = `<text x="10" y="20" fill="#8a92a3">collecting…</text>`; return; }
  const x = (i) => pad + (w - pad - 4) * i / (t.length - 1);
  const y = (v) => h - 16 - (h - 26) * v / max;
  let out = `<line x1="${pad}" y1="${h - 16}" x2="${w}" y2="${h - 16}" stroke="#c9ced8"/>`;
  out += `<text x="2" y="14" font-size="10" fill="#6b7385">${max.toPrecision(3)}</text><text x="2" y="${h - 18}" font-size="10" fill="#6b7385">0</text>`;
  for (const line of lines) {
    let d = "", pen = "M";
    line.values.forEach((v, i) => { if (v === null) { pen = "M"; return; } d += `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)} `; pen = "L"; });
    out += `<path d="${d}" fill="none" stroke="${line.color}" stroke-width="1.6"/>`;
  }
  const span = Math.round(t[t.length - 1] - t[0]);
  out += `<text x="${pad}" y="${h - 2}" font-size="10" fill="#6b7385">-${span}s</text><text x="${w - 30}" y="${h - 2}" font-size="10" fill="#6b7385">now</text>`;
  svg.innerHTML = out;
}

function render(d) {
  const replicas = d.models.flatMap((m) => m.replicas.map((r) => ({...r, model: m.model})));
  rows("replicas", replicas, (r) => `<tr data-replica="${esc(r.name)}"><td>${esc(r.model)}</td><td>${esc(r.name)}</td>
    <td class="health">${pill(r.state, HEALTH[r.state] || "dim")}</td><td class="breaker">${pill(r.breaker, BREAKER[r.breaker] || "dim")}</td>
    <td>${r.in_flight} / ${r.slots ?? "∞"}</td><td>${esc(r.last_error)}</td></tr>`, "no replicas");
  const seats = (d.hosts || []).flatMap((h) => h.models.map((m) => ({...m, host: h.name, swaps_last_hour: h.swaps_last_hour})));
  $("hosts-section").hidden = !seats.length;
  if (seats.length) rows("hosts", seats, (m) => `<tr data-host-model="${esc(m.model)}"><td>${esc(m.host)}</td><td>${esc(m.model)}</td>
    <td class="state">${pill(m.draining ? "draining" : m.state, SEAT[m.state] || "dim")}</td><td class="num">${m.in_flight}</td><td class="num">${m.waiting}</td>
    <td class="num">${m.load_s === null ? "-" : `${m.load_s.toFixed(2)} s`}</td><td class="num">${m.swaps_last_hour}</td></tr>`, "no hosts");
  rows("models", d.models, (m) => `<tr><td>${esc(m.model)}</td><td>${m.slots_in_use} / ${m.slots ?? "∞"}</td>
    <td>${m.slots ? bar(m.slots_in_use / m.slots) : ""}</td><td class="num">${m.queue}</td><td>${m.enabled ? pill("enabled", "ok") : pill("switched off", "bad")}</td></tr>`, "no models");
  rows("keys", d.top_keys, (k) => `<tr><td>${esc(k.key ?? "-")}</td><td>${esc(k.user ?? "-")}</td><td class="num">${k.requests}</td>
    <td class="num">${k.total_tokens.toLocaleString()}</td><td class="num">${k.cost.toFixed(4)}</td></tr>`, "no usage today");
  rows("budgets", d.budgets, (b) => `<tr><td>${esc(b.subject)} ${esc(b.who)}</td><td>${esc(b.period)}</td><td class="num">${b.spent.toFixed(4)}</td>
    <td class="num">${b.limit}</td><td>${bar(b.share)}</td></tr>`, "every budget is below half");
  rows("batches", d.batches, (b) => `<tr><td>${esc(b.id)}</td><td>${pill(b.status, b.status === "failed" ? "bad" : b.status === "completed" ? "ok" : "dim")}</td>
    <td class="num">${b.completed + b.failed} / ${b.total}</td><td>${bar(b.progress)}</td></tr>`, "no batch jobs");
  const s = d.series;
  chart("rps", s.t, [{values: s.rps, color: "#2f5bd3"}, {values: s.errors, color: "#d9432f"}]);
  chart("latency", s.t, [{values: s.p50, color: "#17663a"}, {values: s.p95, color: "#2f5bd3"}, {values: s.p99, color: "#d9432f"}]);
  const problems = d.errors.length ? ` · unavailable: ${d.errors.join(", ")}` : "";
  $("status").textContent = `${d.draining ? "draining · " : ""}updated ${new Date(d.now * 1000).toLocaleTimeString()}${problems}`;
}

async function refresh() {
  try {
    const resp = await fetch("/dashboard/data", {credentials: "same-origin", cache: "no-store"});
    if (resp.status === 403) { location.reload(); return; }  // signed out, expired or key revoked: the form
    const body = await resp.json();
    if (!resp.ok) { $("status").textContent = `unavailable: ${body.error?.message ?? resp.status}`; return; }
    render(body);
  } catch (err) {
    $("status").textContent = "gateway unreachable";
  }
}
// The live view polls only for a session that may read it (admin:read); console.js starts it.
window.startLiveView = () => { refresh(); setInterval(refresh, 1000); };
