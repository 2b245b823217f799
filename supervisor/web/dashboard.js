// The procward dashboard: one table of instances kept live from the event stream, actions on
// them, a filter, and a log pane that follows one instance. Plain browser APIs, no build step.
"use strict";

const rows = new Map();      // name -> {status, row, at}: at = when status was fetched (ms)
const chosen = new Set();    // selected names
const $ = (id) => document.getElementById(id);
const tbody = document.querySelector("#instances tbody");
const REFRESH_MS = 5000;     // CPU and memory figures: read again this often while the page is shown
const LOG_LIMIT = 200000;    // characters kept in the log pane
// An event stream refused (see listen): the wait before the page asks again, growing by half at each
// refusal in a row up to the longest, each ±10 % so that many tabs refused together come back apart.
const RETRY_FIRST_MS = 10000;
const RETRY_LONGEST_MS = 30000;
let refusals = 0;            // event streams refused in a row
let stream = null;           // the page's EventSource now

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (!response.ok && response.status !== 409) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function say(text, error = false) {
  const box = $("message");
  box.textContent = text;
  box.className = error ? "error" : "";
}

function uptime(status, at) {
  if (status.uptime_s == null) return "-";
  let s = Math.floor(status.uptime_s + (Date.now() - at) / 1000);
  const d = Math.floor(s / 86400); s %= 86400;
  const h = Math.floor(s / 3600); s %= 3600;
  const clock = `${h}:${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
  return d ? `${d}d ${clock}` : clock;
}

function memory(bytes) {
  if (bytes == null) return "-";
  const units = ["B", "K", "M", "G"];
  let size = bytes, unit = 0;
  while (size >= 1024 && unit < 3) { size /= 1024; unit += 1; }
  return (unit === 0 || size >= 100 ? size.toFixed(0) : size.toFixed(1)) + units[unit];
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = label;
  b.addEventListener("click", onClick);
  return b;
}

function render(name) {
  const entry = rows.get(name);
  const s = entry.status;
  const tr = entry.row || document.createElement("tr");
  entry.row = tr;
  tr.dataset.name = name;
  tr.dataset.state = s.state;
  tr.replaceChildren();
  const pick = document.createElement("td");
  const box = document.createElement("input");
  box.type = "checkbox";
  box.checked = chosen.has(name);
  box.setAttribute("aria-label", `select ${name}`);
  box.addEventListener("change", () => { box.checked ? chosen.add(name) : chosen.delete(name); showSelection(); });
  pick.append(box);
  const title = document.createElement("td");
  title.className = "name";
  title.append(button(name, () => follow(name)));
  title.firstChild.dataset.action = "logs";
  const state = cell(s.state, `state state-${s.state}`);
  // A program stopped by a signal (SIGSTOP, a debugger) is `running` and does nothing: said even then.
  const why = s.paused ? "paused by a stop signal: send it CONT to resume" : s.reason || s.status_text;
  if (why && (s.paused || s.state !== "running")) {
    const small = document.createElement("span");
    small.className = "reason";
    small.textContent = why;
    small.title = why;
    state.append(small);
  }
  const actions = document.createElement("td");
  const buttons = document.createElement("span");
  buttons.className = "actions";
  for (const verb of ["start", "stop", "restart"]) buttons.append(button(verb, () => act(verb, [name])));
  actions.append(buttons);
  tr.append(pick, title, state, cell(s.pid ?? "-", "pid col-pid"), cell(uptime(s, entry.at), "uptime col-uptime"),
    cell(String(s.restarts), "restarts col-restarts"),
    cell(s.cpu_percent == null ? "-" : `${s.cpu_percent.toFixed(1)}%`, "cpu"),
    cell(memory(s.rss_bytes), "mem"), cell(s.ready == null ? "-" : s.ready ? "yes" : "no", "ready col-ready"),
    actions);
  tr.classList.toggle("chosen", chosen.has(name));
  applyFilter(tr);
  return tr;
}

function applyFilter(tr) {
  const words = $("filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const s = rows.get(tr.dataset.name).status;
  const text = `${s.name} ${s.group} ${s.state}`.toLowerCase();
  tr.hidden = !words.every((w) => text.includes(w));
}

function summarize() {
  const counts = {};
  for (const { status } of rows.values()) counts[status.state] = (counts[status.state] || 0) + 1;
  $("summary").textContent = `${rows.size} instances: ` +
    Object.entries(counts).map(([state, n]) => `${n} ${state}`).join(", ");
}

function showSelection() {
  for (const [name, { row }] of rows) row.classList.toggle("chosen", chosen.has(name));
  $("selected-count").textContent = chosen.size ? `${chosen.size} selected` : "";
  for (const b of document.querySelectorAll("[data-bulk]")) b.disabled = chosen.size === 0;
}

async function refreshAll() {
  const statuses = await (await api("v1/instances")).json();
  const at = Date.now();
  const seen = new Set();
  const order = [];
  for (const status of statuses) {
    seen.add(status.name);
    const entry = rows.get(status.name) || {};
    rows.set(status.name, { ...entry, status, at });
    order.push(render(status.name));
  }
  for (const name of [...rows.keys()]) {
    if (!seen.has(name)) { rows.get(name).row?.remove(); rows.delete(name); chosen.delete(name); }
  }
  tbody.replaceChildren(...order);
  summarize();
  showSelection();
}

async function refreshOne(name) {
  if (!rows.has(name)) return refreshAll();  // a new instance (a reload): the whole table
  const response = await fetch(`v1/instances/${encodeURIComponent(name)}`, { credentials: "same-origin" });
  if (response.status === 404) return refreshAll();
  rows.get(name).status = await response.json();
  rows.get(name).at = Date.now();
  render(name);
  summarize();
}

async function act(verb, names) {
  say(`${verb}: ${names.join(", ")}…`);
  try {
    const response = await api(`v1/instances/${verb}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ names, wait: false }),
    });
    const answer = await response.json();
    const failed = answer.results.filter((r) => !r.ok);
    if (failed.length) say(failed.map((r) => `${r.name}: ${r.error}`).join("; "), true);
    else say(`${verb} requested: ${names.join(", ")}`);
  } catch (error) {
    say(`${verb} failed: ${error.message}`, true);
  }
}

function listen() {
  const badge = $("connection");
  const events = new EventSource("v1/events");
  stream = events;
  const changed = (event) => {
    try { refreshOne(JSON.parse(event.data).instance).catch(() => {}); } catch (_) { /* not JSON */ }
  };
  events.onopen = () => {
    refusals = 0;
    badge.textContent = "live";
    badge.className = "badge live";
    badge.title = "the live event stream";
    refreshAll().catch(() => {});
  };
  events.onmessage = changed;                       // transitions: plain data lines
  events.addEventListener("update", changed);       // probe results, waiting reasons
  events.addEventListener("dropped", () => refreshAll().catch(() => {}));
  events.onerror = () => {
    badge.className = "badge down";
    if (events.readyState !== EventSource.CLOSED) {  // the connection dropped: the browser asks again itself
      badge.textContent = "reconnecting…";
      return;
    }
    // Answered with something other than a stream: a 503 while the service has as many streams
    // open as it keeps (other tabs, `logs -f`), a 401, a 502 from `supervisor dashboard` once the
    // service is gone. EventSource then gives up for good, and the badge said "reconnecting…" for
    // ever. Say why, and open a new one later: not at once (a tab in a tight loop would keep the
    // places taken), and less often the longer it is refused. The table is read every REFRESH_MS
    // meanwhile.
    events.close();
    const wait = Math.min(RETRY_LONGEST_MS, RETRY_FIRST_MS * 1.5 ** refusals) * (0.9 + Math.random() / 5);
    refusals += 1;
    const next = new Date(Date.now() + wait).toLocaleTimeString();
    badge.textContent = "live updates stopped";
    whyRefused().then((why) => {
      if (stream !== events) return;  // answered after the next try began: that one says how it went
      badge.textContent = `${refusalText(why)} (next try at ${next})`;
      badge.title = `${why ? why.error : "the event stream ended"}. The table is read every ` +
        `${REFRESH_MS / 1000} s meanwhile.`;
    });
    setTimeout(listen, wait);
  };
}

// EventSource tells neither the status nor the body of an answer it refuses: the same request by
// fetch does. A stream it is given after all (a place came free meanwhile) is hung up at once.
async function whyRefused() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REFRESH_MS);
  try {
    const response = await fetch("v1/events", { credentials: "same-origin", signal: controller.signal });
    if (response.ok) return null;
    let error = "";
    try { error = (await response.json()).error || ""; } catch (_) { /* not JSON */ }
    return { status: response.status, error: error || `${response.status} ${response.statusText}` };
  } catch (error) {
    const message = error.name === "AbortError" ? `no answer within ${REFRESH_MS / 1000} s` : error.message;
    return { status: 0, error: message };
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

function refusalText(why) {
  if (!why) return "live updates interrupted";
  if (why.status === 503 && why.error.startsWith("too many streams")) {
    return "live updates refused: too many streams are open; close some tabs";
  }
  return `live updates stopped: ${why.error}`;
}

let following = null;  // the AbortController of the log being followed

async function follow(name) {
  if (following) following.abort();
  const controller = new AbortController();
  following = controller;
  const stream = $("log-stream").value;
  const pane = $("log-lines");
  pane.textContent = "";
  pane.dataset.name = name;
  $("log-title").textContent = `log: ${name} (${stream})`;
  try {
    const response = await api(
      `v1/instances/${encodeURIComponent(name)}/logs?stream=${stream}&lines=200&follow=true`,
      { signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atBottom = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
      pane.append(decoder.decode(value, { stream: true }));
      if (pane.textContent.length > LOG_LIMIT) pane.textContent = pane.textContent.slice(-LOG_LIMIT / 2);
      if (atBottom) pane.scrollTop = pane.scrollHeight;
    }
  } catch (error) {
    if (error.name !== "AbortError") pane.append(`\n[${error.message}]\n`);
  }
}

function tick() {
  for (const { row, status, at } of rows.values()) {
    const td = row?.querySelector(".uptime");
    if (td) td.textContent = uptime(status, at);
  }
}

function start() {
  $("filter").addEventListener("input", () => { for (const { row } of rows.values()) applyFilter(row); });
  $("select-all").addEventListener("change", (event) => {
    for (const [name, { row }] of rows) {
      if (row.hidden) continue;
      event.target.checked ? chosen.add(name) : chosen.delete(name);
      row.querySelector("input[type=checkbox]").checked = event.target.checked;
    }
    showSelection();
  });
  for (const b of document.querySelectorAll("[data-bulk]")) {
    b.addEventListener("click", () => act(b.dataset.bulk, [...chosen]));
  }
  $("log-stream").addEventListener("change", () => {
    if ($("log-lines").dataset.name) follow($("log-lines").dataset.name);
  });
  refreshAll().catch((error) => say(`cannot reach the service: ${error.message}`, true));
  listen();
  setInterval(tick, 1000);
  setInterval(() => { if (!document.hidden) refreshAll().catch(() => {}); }, REFRESH_MS);
}

start();
