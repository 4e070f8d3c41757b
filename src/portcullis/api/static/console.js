// The console's script: keys, teams, budgets, usage and the audit log, through /dashboard/api/<path> (the admin
// API as this session). A file of its own: the page's CSP allows no inline script.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const csrf = document.querySelector('header input[name="csrf"]').value;
  let me = null;

  async function api(method, path, body) {
    const init = {method, credentials: "same-origin", cache: "no-store", headers: {}};
    if (method !== "GET") init.headers["x-csrf-token"] = csrf;
    if (body !== undefined) { init.headers["content-type"] = "application/json"; init.body = JSON.stringify(body); }
    const resp = await fetch(`/dashboard/api/${path}`, init);
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(data.error?.message ?? `${resp.status}`);
    return data;
  }

  function table(id, items, render, empty) {
    const tbody = $(id).querySelector("tbody");
    tbody.innerHTML = items.length ? items.map(render).join("") : `<tr><td colspan="7" class="empty">${esc(empty)}</td></tr>`;
    for (const el of tbody.querySelectorAll("[data-width]")) el.style.width = `${el.dataset.width}%`;
  }

  // -- keys --------------------------------------------------------------------------------------
  let teams = [];
  async function loadKeys() {
    const keys = (await api("GET", "keys")).data;
    table("key-list", keys, (k) => `<tr data-key="${esc(k.id)}"><td><code>${esc(k.id)}</code></td><td>${esc(k.user)}</td>
      <td>${esc(teamName(k.team_id))}</td><td>${esc(k.tier)}</td><td>${esc(k.status)}</td><td>${esc(k.label)}</td>
      <td>${k.status === "active" ? `<button class="rotate">Rotate</button><button class="revoke">Revoke</button>` : ""}</td></tr>`,
      "no keys you can see");
  }
  const teamName = (id) => (teams.find((t) => t.id === id) || {name: id}).name;

  $("key-list").addEventListener("click", async (event) => {
    const row = event.target.closest("tr[data-key]");
    if (!row || event.target.tagName !== "BUTTON") return;
    const id = row.dataset.key;
    try {
      if (event.target.classList.contains("revoke")) {
        await api("POST", `keys/${id}/revoke`, {});
      } else {
        const made = await api("POST", `keys/${id}/rotate`, {});
        showKey(made.key);
      }
      await loadKeys();
    } catch (err) { fail(err); }
  });

  $("new-key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {user: $("new-key-user").value.trim(), team_id: $("new-key-team").value};
    const label = $("new-key-label").value.trim();
    if (label) body.label = label;
    const models = $("new-key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
    if (models.length) body.models = models;
    const rpm = parseInt($("new-key-rpm").value, 10);
    if (rpm > 0) body.limits = {requests: {minute: rpm}};
    try {
      const made = await api("POST", "keys", body);
      showKey(made.key);
      await loadKeys();
    } catch (err) { fail(err); }
  });

  function showKey(key) { $("new-key-value").textContent = key; $("new-key").hidden = false; $("keys-error").hidden = true; }
  function fail(err) { $("keys-error").textContent = err.message; $("keys-error").hidden = false; }

  // -- teams -------------------------------------------------------------------------------------
  async function loadTeams() {
    teams = (await api("GET", "teams")).data;
    const orgs = Object.fromEntries((await api("GET", "organizations")).data.map((o) => [o.id, o.name]));
    $("new-key-team").innerHTML = teams.map((t) => `<option value="${esc(t.id)}">${esc(orgs[t.org_id] ?? t.org_id)} / ${esc(t.name)}</option>`).join("");
    const members = await Promise.all(teams.map((t) => api("GET", `teams/${t.id}/members`).then((m) => m.data).catch(() => [])));
    table("team-list", teams.map((t, i) => ({...t, members: members[i]})), (t) => `<tr><td>${esc(t.name)}</td><td>${esc(orgs[t.org_id] ?? t.org_id)}</td>
      <td>${esc(t.models ? t.models.join(", ") : "every model")}</td><td>${esc(t.limits ? JSON.stringify(t.limits) : "-")}</td>
      <td>${t.members.map((m) => `${esc(m.user)} (${esc(m.role)})`).join(", ")}</td></tr>`, "no teams you can see");
  }

  // -- budgets -----------------------------------------------------------------------------------
  async function loadBudgets() {
    const found = await api("GET", "budgets");
    table("budget-list", found.data, (b) => `<tr><td>${esc(b.level)} ${esc(b.name)}</td><td>${esc(b.period)}</td>
      <td class="num">${b.spent.toFixed(4)}</td><td class="num">${b.forecast.toFixed(4)}</td><td class="num">${b.limit} ${esc(found.currency)}</td>
      <td><div class="bar${b.forecast > b.limit ? " hot" : ""}"><div data-width="${Math.min(100, Math.round(b.share * 100))}"></div></div></td></tr>`,
      "no budgets you can see");
  }

  // -- usage -------------------------------------------------------------------------------------
  async function loadUsage() {
    const by = $("usage-by").value;
    $("usage-col").textContent = by;
    $("usage-csv").href = `/dashboard/api/usage?group_by=day,${by}&format=csv`;
    const rows = (await api("GET", `usage?group_by=day,${by}`)).data;
    const named = (v) => (by === "team" ? teamName(v) : v);
    table("usage-list", rows, (r) => `<tr><td>${esc(r.day)}</td><td>${esc(named(r[by]) ?? "-")}</td><td class="num">${r.requests}</td>
      <td class="num">${r.total_tokens.toLocaleString()}</td><td class="num">${r.cost.toFixed(4)}</td></tr>`, "no usage yet");
    const days = {};
    for (const r of rows) days[r.day] = (days[r.day] ?? 0) + r.cost;
    const svg = $("usage-chart"), names = Object.keys(days).sort(), w = svg.clientWidth || 600, h = 160;
    const max = Math.max(1e-9, ...Object.values(days)), step = (w - 40) / Math.max(1, names.length);
    svg.innerHTML = names.map((d, i) => {
      const bh = (h - 30) * days[d] / max;
      return `<rect x="${30 + i * step + 2}" y="${h - 18 - bh}" width="${Math.max(2, step - 4)}" height="${bh}" fill="#2f5bd3"><title>${esc(d)}: ${days[d].toFixed(4)}</title></rect>
        <text x="${30 + i * step + 2}" y="${h - 4}" font-size="10" fill="#6b7385">${esc(d.slice(5))}</text>`;
    }).join("") + `<text x="2" y="14" font-size="10" fill="#6b7385">${max.toPrecision(3)}</text>`;
  }
  $("usage-by").addEventListener("change", () => loadUsage().catch(fail));

  // -- audit -------------------------------------------------------------------------------------
  async function loadAudit() {
    const entries = (await api("GET", "audit?limit=100")).data;
    table("audit-list", entries, (e) => `<tr><td>${esc(new Date(e.at * 1000).toLocaleString())}</td><td>${esc(e.actor.user)} (${esc(e.actor.via)})</td>
      <td>${esc(e.action)}</td><td><code>${esc(e.target)}</code></td><td>${esc(e.actor.source ?? "-")}</td></tr>`, "nothing yet");
  }

  // -- tabs --------------------------------------------------------------------------------------
  const loaders = {keys: loadKeys, teams: loadTeams, budgets: loadBudgets, usage: loadUsage, audit: loadAudit, ops: async () => {}};
  function show(tab) {
    for (const el of document.querySelectorAll(".tab")) el.hidden = el.dataset.tab !== tab;
    $("console").hidden = tab === "ops";
    for (const b of document.querySelectorAll("nav#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
    loaders[tab]().catch(fail);
  }
  $("tabs").addEventListener("click", (event) => { if (event.target.dataset.tab) show(event.target.dataset.tab); });

  (async () => {
    me = await api("GET", "me");
    const admin = me.scopes.includes("admin:read");
    for (const el of document.querySelectorAll(".admin-only")) el.hidden = !admin;
    const role = me.roles.map((r) => r.role).join(", ") || (admin ? "admin" : "no role");
    $("who").textContent = `${me.user} · ${role}`;
    $("who").dataset.role = role;
    $("new-key-user").value = me.user;
    await loadTeams().catch(fail);
    if (admin) window.startLiveView(); else $("status").textContent = "";
    show(admin ? "ops" : "keys");
  })().catch((err) => { $("status").textContent = err.message; });
})();
