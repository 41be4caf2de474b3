// The dashboard page: polls the JSON API every 2 s; no libraries, nothing from the network.
"use strict";

const prefix = document.body.dataset.prefix;
// The run's token (empty unless this browser opened the link the dashboard printed): sent in
// a header with replay and purge, which a page of another site cannot do.
// Kept for the tab (sessionStorage is per origin), then taken out of the address bar.
const token = document.body.dataset.token || sessionStorage.getItem("eventsource-token") || "";
if (document.body.dataset.token) {
  sessionStorage.setItem("eventsource-token", document.body.dataset.token);
  history.replaceState(null, "", location.pathname);
}
const readOnly = document.body.dataset.readOnly === "true";
const canAct = !!token && !readOnly;
const api = (path) => `/api/p/${encodeURIComponent(prefix)}${path}`;
const colours = ["#2f7ed8", "#e8743b", "#19a979", "#945ecf", "#ed4a7b", "#13a4b4"];
let dlqAfter = null;       // the page shown starts after this id (null: the first page)
let dlqPages = [null];     // the `after` of each page seen, for the page number

const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
};

function setStatus(text, error) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.classList.toggle("error", !!error);
}

async function getJson(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok && r.status !== 404) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function renderStream(o) {
  const dl = document.getElementById("stream");
  dl.replaceChildren();
  const facts = o.stream.exists
    ? [["name", o.stream.name], ["length", o.stream.length], ["entries added", o.stream.entries_added],
       ["first id", o.stream.first_id || "–"], ["last id", o.stream.last_id || "–"],
       ["dead letters", `${o.dlq.length} in ${o.dlq.name}`]]
    : [["name", o.stream.name], ["", "the stream does not exist yet"]];
  for (const [k, v] of facts) dl.append(el("dt", { text: k }), el("dd", { text: String(v) }));
  document.getElementById("dlq-count").textContent = `(${o.dlq.length})`;
}

function renderGroups(o) {
  const box = document.getElementById("groups");
  box.replaceChildren();
  if (!o.groups.length) box.append(el("p", { text: "no consumer groups" }));
  for (const g of o.groups) {
    const div = el("div", { class: "group", "data-group": g.name });
    div.append(el("h3", { text: g.name }));
    div.append(el("div", { class: "numbers" },
      el("span", { text: `pending ${g.pending ?? "–"}` }),
      el("span", { text: `lag ${g.lag ?? "unknown"}` }),
      el("span", { text: `last delivered ${g.last_delivered_id ?? "–"}` })));
    const table = el("table", { class: "consumers" },
      el("thead", {}, el("tr", {}, el("th", { text: "consumer" }), el("th", { text: "pending" }),
        el("th", { text: "idle" }))));
    const body = el("tbody");
    for (const c of g.consumers) {
      body.append(el("tr", {}, el("td", { class: "mono", text: c.name }), el("td", { text: String(c.pending ?? "–") }),
        el("td", { text: ms(c.idle_ms) })));
    }
    table.append(body);
    div.append(table);
    const max = Math.max(1, ...g.pending_by_age.map((b) => b.count));
    const bars = el("div", { class: "bars", "aria-label": "pending entries by age" });
    const labels = el("div", { class: "bar-labels" });
    for (const b of g.pending_by_age) {
      const bar = el("div", { class: "bar" }, el("span", { text: String(b.count) }));
      bar.style.height = `${Math.round((b.count / max) * 56) + 1}px`;
      bars.append(bar);
      labels.append(el("span", { text: b.age }));
    }
    div.append(el("div", { text: "pending by age" }), bars, labels);
    box.append(div);
  }
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1000) return `${v} ms`;
  if (v < 60000) return `${(v / 1000).toFixed(1)} s`;
  return `${Math.round(v / 60000)} min`;
}

function renderThroughput(o) {
  const canvas = document.getElementById("throughput");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 30;
  ctx.clearRect(0, 0, w, h);
  const points = o.throughput;
  const series = [["published", points.map((p) => p.published)]];
  const groups = new Set();
  for (const p of points) for (const g of Object.keys(p.read)) groups.add(g);
  for (const g of groups) series.push([`read by ${g}`, points.map((p) => p.read[g] ?? 0)]);
  const max = Math.max(1, ...series.flatMap(([, v]) => v));
  ctx.strokeStyle = "#ccd2dc"; ctx.fillStyle = "#677085"; ctx.font = "11px sans-serif";
  ctx.beginPath(); ctx.moveTo(pad, 5); ctx.lineTo(pad, h - pad); ctx.lineTo(w - 5, h - pad); ctx.stroke();
  ctx.fillText(String(max), 2, 12); ctx.fillText("0", 2, h - pad);
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  series.forEach(([name, values], i) => {
    ctx.strokeStyle = colours[i % colours.length]; ctx.lineWidth = 2; ctx.beginPath();
    values.forEach((v, j) => {
      const x = pad + (j / Math.max(1, values.length - 1)) * (w - pad - 10);
      const y = h - pad - (v / max) * (h - pad - 10);
      if (j === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    const i_ = el("i"); i_.style.background = colours[i % colours.length];
    legend.append(el("span", {}, i_, `${name}: ${values.length ? values[values.length - 1] : 0}/s`));
  });
  if (points.length < 2) ctx.fillText("collecting samples…", pad + 10, h / 2);
}

async function refreshOverview() {
  try {
    const o = await getJson(api("/overview"));
    renderStream(o); renderGroups(o); renderThroughput(o);
    setStatus(`updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    setStatus(`cannot read Redis: ${e.message}`, true);
  }
}

async function refreshDlq() {
  const q = new URLSearchParams({ count: "50" });
  if (dlqAfter) q.set("after", dlqAfter);
  const page = await getJson(api(`/dlq?${q}`));
  const body = document.querySelector("#dlq tbody");
  body.replaceChildren();
  for (const l of page.letters) {
    const replay = el("button", { type: "button", class: "replay", text: "replay" });
    const purge = el("button", { type: "button", class: "danger purge", text: "purge" });
    replay.onclick = () => act(l, "replay");
    purge.onclick = () => act(l, "purge");
    replay.disabled = purge.disabled = !canAct;
    body.append(el("tr", { "data-id": l.id },
      el("td", { class: "mono", text: l.id }), el("td", { text: l.event_type ?? "–" }),
      el("td", { text: l.group ?? "every group" }), el("td", { class: "reason", text: l.reason ?? "–" }),
      el("td", { text: l.retry_count ?? "–" }), el("td", { class: "mono", text: l.dead_lettered_at ?? "–" }),
      el("td", {}, replay, " ", purge)));
  }
  if (!page.letters.length) body.append(el("tr", {}, el("td", { colspan: "7", text: "no dead letters here" })));
  const next = document.getElementById("dlq-next");
  next.disabled = !page.next_after;
  next.onclick = () => { dlqAfter = page.next_after; dlqPages.push(dlqAfter); refreshDlq(); };
  document.getElementById("dlq-page").textContent = `page ${dlqPages.length}`;
}

async function act(letter, action) {
  const question = action === "replay"
    ? `Replay dead letter ${letter.id} (${letter.event_type}) to ${letter.group ?? "every group"}?`
    : `Delete dead letter ${letter.id} (${letter.event_type}) for good?`;
  if (!confirm(question)) return;
  const message = document.getElementById("dlq-message");
  try {
    const r = await getJson(api(`/dlq/${encodeURIComponent(letter.id)}/${action}`),
      { method: "POST", headers: { "X-Eventsource-Token": token } });
    message.textContent = r.outcome === "replayed" ? `replayed ${letter.id} as ${r.new_id}`
      : r.outcome === "purged" ? `purged ${letter.id}`
      : `${letter.id}: already replayed or purged`;
  } catch (e) {
    message.textContent = `${action} failed: ${e.message}`;
  }
  await Promise.all([refreshDlq(), refreshOverview()]);
}

if (!canAct) {
  const locked = document.getElementById("dlq-locked");
  locked.hidden = false;
  locked.textContent = readOnly
    ? "read-only dashboard: replay and purge with the CLI (eventsource dlq replay / purge)"
    : "to replay or purge, open the link the dashboard printed when it started (it carries its token)";
}
document.getElementById("dlq-first").onclick = () => { dlqAfter = null; dlqPages = [null]; refreshDlq(); };
refreshOverview(); refreshDlq().catch((e) => setStatus(`cannot read dead letters: ${e.message}`, true));
setInterval(refreshOverview, 2000);
setInterval(() => refreshDlq().catch(() => {}), 2000);
