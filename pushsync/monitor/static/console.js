// pushsync monitor: the console's one script. No framework, no build step.
// Every value from the server reaches the page as a text node or an attribute
// set with setAttribute (never parsed from a string as markup), so a device id, a rule name
// or a message's content shows as the text it is.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const KINDS = ["written", "sent", "confirmed", "expired", "failed"];
const state = {
  view: "fleet",
  pulse: null,
  busy: false,
  again: false,
  timeline: { span: 5 * 60 * 1000, end: null },  // end null: follows now
  flow: null,
};

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) throw new Error("no event attributes");
    node.setAttribute(key, String(value));
  }
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function $(id) {
  return document.getElementById(id);
}

async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const why = body && body.error ? body.error : response.status + " " + response.statusText;
    throw new Error(why);
  }
  return body;
}

function showError(text) {
  const node = $("error");
  node.textContent = text || "";
  node.hidden = !text;
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { hour12: false });
}

function ago(iso, now) {
  if (!iso) return "never";
  const seconds = Math.max(0, ((now || Date.now()) - new Date(iso).getTime()) / 1000);
  if (seconds < 60) return Math.round(seconds) + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return value.toFixed(2) + " ms";
  if (value < 1000) return value.toFixed(value < 10 ? 1 : 0) + " ms";
  return (value / 1000).toFixed(value < 10000 ? 2 : 1) + " s";
}

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== "" && value !== null && value !== undefined) search.set(key, value);
  }
  const text = search.toString();
  return text ? "?" + text : "";
}

// ---------------------------------------------------------------- the pulse

function showPulse(pulse) {
  state.pulse = pulse;
  if (pulse.error) {
    showError(pulse.error);
    return;
  }
  const outbox = pulse.outbox || {};
  $("pulse-devices").textContent = pulse.devices;
  $("pulse-connected").textContent = pulse.connected;
  $("pulse-pending").textContent = (outbox.pending || 0) + (outbox.sending || 0);
  $("pulse-sent").textContent = outbox.sent || 0;
  $("pulse-dispatchers").textContent = pulse.dispatchers;
}

function live() {
  const badge = $("live");
  const events = new EventSource("/events");
  events.addEventListener("open", () => badge.classList.remove("off"));
  events.addEventListener("error", () => badge.classList.add("off"));
  events.addEventListener("pulse", (event) => {
    showPulse(JSON.parse(event.data));
    refresh();
  });
}

// ---------------------------------------------------------------- views

const VIEWS = {
  fleet: drawFleet,
  flow: drawFlow,
  latency: drawLatency,
  timeline: drawTimeline,
  request: drawRequest,
};

function route() {
  const hash = decodeURIComponent(location.hash.replace(/^#/, ""));
  const [view, arg] = hash.split("/", 2);
  state.view = VIEWS[view] ? view : "fleet";
  state.arg = arg || "";
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== "view-" + state.view;
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === state.view);
  }
  if (state.view === "request" && state.arg) $("request-id").value = state.arg;
  refresh();
}

// One fetch of the current view at a time; a change meanwhile fetches again after it.
async function refresh() {
  if (state.busy) {
    state.again = true;
    return;
  }
  state.busy = true;
  try {
    do {
      state.again = false;
      await VIEWS[state.view]();
      showError("");
    } while (state.again);
  } catch (error) {
    showError(error.message);
  } finally {
    state.busy = false;
  }
}

// ---------------------------------------------------------------- fleet

async function drawFleet(after) {
  const params = {
    search: $("fleet-search").value.trim(),
    show: $("fleet-show").value,
    window: $("fleet-window").value,
    after: typeof after === "string" ? after : "",
  };
  const body = await getJSON("/api/fleet" + query(params));
  const tbody = $("fleet-table").tBodies[0];
  if (!params.after) clear(tbody);
  const now = state.pulse ? new Date(state.pulse.now).getTime() : Date.now();
  for (const d of body.devices) {
    const connected = d.dispatcher !== null;
    const addresses = d.addresses.map((a) =>
      el("span", { class: "sub" }, a.medium + " " + a.address + " (" + a.source + (a.active ? "" : ", inactive") + ")"));
    const sync = d.last_sync;
    tbody.append(el("tr", { "data-device": d.device_id },
      el("td", { class: "device" }, d.device_id),
      el("td", {}, d.enabled ? "yes" : "disabled"),
      el("td", { class: connected ? "connected" : "disconnected", "data-testid": "connection" },
        connected ? "connected" : "disconnected",
        connected ? el("span", { class: "sub" }, "sync via " + d.dispatcher + " from " + d.peer + ", " + ago(d.connected_at, now)) : null),
      el("td", {}, addresses.length ? addresses : el("span", { class: "empty" }, "none")),
      el("td", { title: when(d.last_seen_at) }, ago(d.last_seen_at, now)),
      el("td", { title: sync ? when(sync.finished_at) : "" },
        sync ? ago(sync.finished_at, now) + " " + sync.outcome : "never",
        sync ? el("span", { class: "sub" }, "↑" + sync.upload_rows + " ↓" + sync.download_rows) : null),
      el("td", { class: "n" }, d.pending),
      el("td", { class: "n" }, d.sent),
      el("td", { class: "n" }, d.confirmed),
      el("td", { class: "n" }, d.expired),
      el("td", { class: "n" }, d.failed)));
  }
  const more = $("fleet-more");
  more.hidden = !body.more;
  more.dataset.after = body.devices.length ? body.devices[body.devices.length - 1].device_id : "";
}

// ---------------------------------------------------------------- flow

async function drawFlow() {
  const body = await getJSON("/api/flow" + query({ window: $("flow-window").value }));
  state.flow = body;
  fillFilter($("flow-rule"), body.buckets.map((b) => b.rule));
  fillFilter($("flow-gateway"), body.buckets.map((b) => b.gateway));
  const rule = $("flow-rule").value;
  const gateway = $("flow-gateway").value;
  const rows = body.buckets.filter((b) => (!rule || b.rule === rule) && (!gateway || b.gateway === gateway));
  const seconds = body.step_seconds || (body.step === "second" ? 1 : 60);
  const step = seconds * 1000;
  const unit = seconds === 1 ? "second" : seconds === 60 ? "minute" : seconds / 60 + " minutes";
  const end = Math.floor((state.pulse ? new Date(state.pulse.now).getTime() : Date.now()) / step) * step;
  const start = Math.floor(new Date(body.since).getTime() / step) * step;
  const count = Math.max(1, Math.round((end - start) / step) + 1);
  const series = Object.fromEntries(KINDS.map((k) => [k, new Array(count).fill(0)]));
  const totals = Object.fromEntries(KINDS.map((k) => [k, 0]));
  const perPair = new Map();
  for (const b of rows) {
    const index = Math.round((new Date(b.bucket).getTime() - start) / step);
    if (index >= 0 && index < count) series[b.kind][index] += b.n;
    totals[b.kind] += b.n;
    const key = JSON.stringify([b.rule, b.gateway]);
    if (!perPair.has(key)) perPair.set(key, Object.fromEntries(KINDS.map((k) => [k, 0])));
    perPair.get(key)[b.kind] += b.n;
  }
  lineChart($("flow-chart"), series, start, step, unit);
  const legend = clear($("flow-legend"));
  for (const kind of KINDS) {
    legend.append(el("li", { "data-kind": kind }, el("i", { class: "sw " + kind }), kind + " ",
      el("b", { class: "total" }, totals[kind])));
  }
  const tbody = clear($("flow-table").tBodies[0]);
  for (const [key, counts] of [...perPair.entries()].sort()) {
    const [r, g] = JSON.parse(key);
    tbody.append(el("tr", { "data-rule": r, "data-gateway": g }, el("td", {}, r), el("td", {}, g),
      KINDS.map((k) => el("td", { class: "n" }, counts[k]))));
  }
  if (!perPair.size) {
    tbody.append(el("tr", {}, el("td", { colspan: 7, class: "empty" }, "nothing in this period")));
  }
}

function fillFilter(select, values) {
  const chosen = select.value;
  const known = new Set([...select.options].map((o) => o.value));
  for (const value of [...new Set(values)].sort()) {
    if (!known.has(value)) select.append(el("option", { value }, value));
  }
  select.value = chosen;
}

function lineChart(box, series, start, step, unit) {
  const width = Math.max(box.clientWidth || 900, 300);
  const height = 240;
  const pad = { l: 40, r: 10, t: 10, b: 24 };
  const count = series.written.length;
  const top = Math.max(1, ...KINDS.map((k) => Math.max(...series[k])));
  const x = (i) => pad.l + (count === 1 ? 0 : (i * (width - pad.l - pad.r)) / (count - 1));
  const y = (v) => height - pad.b - (v * (height - pad.t - pad.b)) / top;
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, height, role: "img", "aria-label": "notifications per " + unit });
  for (const v of [0, top / 2, top]) {
    chart.append(svg("line", { class: "grid", x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v) }));
    chart.append(svg("text", { x: 4, y: y(v) + 4 }, Number.isInteger(v) ? v : v.toFixed(1)));
  }
  for (const i of [0, Math.floor(count / 2), count - 1]) {
    const label = new Date(start + i * step).toLocaleTimeString(undefined, { hour12: false });
    chart.append(svg("text", { x: Math.min(x(i), width - 60), y: height - 6 }, label));
  }
  for (const kind of KINDS) {
    const points = series[kind].map((v, i) => (i ? "L" : "M") + x(i).toFixed(1) + "," + y(v).toFixed(1));
    chart.append(svg("path", { class: "series k-" + kind, d: points.join(""), "data-kind": kind },
      svg("title", {}, kind + " per " + unit)));
  }
  clear(box).append(chart);
}

// ---------------------------------------------------------------- latency

const SERIES = {
  written_to_sent: "written → sent (first attempt)",
  sent_to_confirmed: "sent → confirmed",
  sync: "synchronization duration",
};

async function drawLatency() {
  const body = await getJSON("/api/latency" + query({ window: $("latency-window").value }));
  const box = clear($("latency-series"));
  for (const [name, title] of Object.entries(SERIES)) {
    const s = body.series[name];
    const card = el("div", { class: "series-card", "data-series": name }, el("h2", {}, title));
    if (!s) {
      card.append(el("p", { class: "empty" }, "nothing in this period"));
    } else {
      card.append(el("div", { class: "figures" },
        el("span", {}, "n ", el("b", {}, s.n)),
        el("span", {}, "p50 ", el("b", { "data-testid": "p50" }, ms(s.p50))),
        el("span", {}, "p95 ", el("b", {}, ms(s.p95))),
        el("span", {}, "p99 ", el("b", {}, ms(s.p99))),
        el("span", {}, "max ", el("b", {}, ms(s.max)))));
      card.append(histogram(s.histogram, body.bounds_ms));
    }
    box.append(card);
  }
}

function histogram(counts, bounds) {
  const width = 900;
  const height = 140;
  const pad = { l: 10, r: 10, t: 10, b: 22 };
  const top = Math.max(1, ...counts);
  const w = (width - pad.l - pad.r) / counts.length;
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, height, class: "hist" });
  counts.forEach((n, i) => {
    const h = (n * (height - pad.t - pad.b)) / top;
    const upper = i + 1 < bounds.length ? ms(bounds[i + 1]) : "∞";
    chart.append(svg("rect", { x: pad.l + i * w + 1, y: height - pad.b - h, width: w - 2, height: h },
      svg("title", {}, n + " in [" + ms(bounds[i]) + ", " + upper + ")")));
    chart.append(svg("text", { x: pad.l + i * w + 2, y: height - 6 }, ms(bounds[i])));
  });
  return chart;
}

// ---------------------------------------------------------------- timeline

async function drawTimeline() {
  const t = state.timeline;
  const end = t.end === null ? Date.now() : t.end;
  const start = end - t.span;
  const params = { since: Math.round(start), until: Math.round(end), search: $("timeline-search").value.trim() };
  const body = await getJSON("/api/timeline" + query(params));
  $("tl-range").textContent = when(new Date(start).toISOString()) + " – " + when(new Date(end).toISOString()) +
    (t.end === null ? " (following now)" : "") + (body.truncated ? " · showing the latest " + body.limit + " pushes and " + body.limit + " synchronizations only" : "");
  const lanes = [...new Set([...body.pushes, ...body.syncs].map((e) => e.device_id))].sort();
  const box = $("timeline-chart");
  const width = Math.max(box.clientWidth || 900, 400);
  const lane = 26;
  const pad = { l: 130, r: 10, t: 20, b: 10 };
  const height = pad.t + pad.b + Math.max(1, lanes.length) * lane;
  const x = (iso) => {
    const time = iso ? new Date(iso).getTime() : end;
    return pad.l + ((Math.min(Math.max(time, start), end) - start) * (width - pad.l - pad.r)) / t.span;
  };
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, height, "data-lanes": lanes.length });
  for (let i = 0; i <= 4; i++) {
    const at = start + (i * t.span) / 4;
    const gx = pad.l + (i * (width - pad.l - pad.r)) / 4;
    chart.append(svg("line", { class: "grid", x1: gx, x2: gx, y1: pad.t - 4, y2: height - pad.b }));
    chart.append(svg("text", { x: Math.min(gx, width - 60), y: 12 }, new Date(at).toLocaleTimeString(undefined, { hour12: false })));
  }
  lanes.forEach((device, i) => {
    const row = svg("g", { "data-lane": device });
    row.append(svg("text", { class: "lane-label", x: 4, y: pad.t + i * lane + 16 }, device));
    chart.append(row);
  });
  const laneOf = (device) => pad.t + lanes.indexOf(device) * lane;
  for (const s of body.syncs) {
    const x1 = x(s.started_at);
    const x2 = Math.max(x(s.finished_at), x1 + 3);
    const label = "sync " + (s.publication || "") + " " + s.outcome + ": ↑" + s.upload_rows + " ↓" +
      s.download_rows + " ✕" + s.conflicts + ", " + ms(new Date(s.finished_at) - new Date(s.started_at)) +
      (s.error ? " — " + s.error : "");
    chart.append(svg("rect", { class: "sync " + s.outcome, x: x1, y: laneOf(s.device_id) + 14, width: x2 - x1, height: 8,
      "data-sync": s.session_id }, svg("title", {}, s.device_id + ": " + label)));
  }
  for (const p of body.pushes) {
    const ended = p.confirmed_at || p.finished_at;
    const x1 = x(p.created_at);
    const x2 = Math.max(x(ended), x1 + 3);
    const y0 = laneOf(p.device_id) + 3;
    const text = p.device_id + ": " + p.rule + " [" + p.subject + "] " + p.content + " — " + p.state +
      " via " + p.gateway + ", " + p.attempts + " attempt(s)";
    const link = svg("a", { href: "#request/" + p.request_id, "data-request": p.request_id });
    link.append(svg("rect", { class: "push " + p.state, x: x1, y: y0, width: x2 - x1, height: 9 }, svg("title", {}, text)));
    if (p.sent_at) link.append(svg("circle", { class: "sent", cx: x(p.sent_at), cy: y0 + 4.5, r: 3 }));
    if (p.confirmed_at) link.append(svg("circle", { class: "confirmed", cx: x(p.confirmed_at), cy: y0 + 4.5, r: 3 }));
    chart.append(link);
  }
  if (!lanes.length) chart.append(svg("text", { x: pad.l, y: pad.t + 14 }, "nothing in this period"));
  clear(box).append(chart);
}

function zoom(factor) {
  const t = state.timeline;
  const end = t.end === null ? Date.now() : t.end;
  const middle = end - t.span / 2;
  t.span = Math.min(24 * 3600 * 1000, Math.max(5000, t.span * factor));
  t.end = t.end === null ? null : middle + t.span / 2;
  refresh();
}

function pan(fraction) {
  const t = state.timeline;
  const end = (t.end === null ? Date.now() : t.end) + t.span * fraction;
  t.end = end >= Date.now() ? null : end;
  refresh();
}

function dragToPan(box) {
  let from = null;
  box.addEventListener("pointerdown", (event) => { from = event.clientX; });
  box.addEventListener("pointerup", (event) => {
    if (from === null) return;
    const moved = event.clientX - from;
    from = null;
    if (Math.abs(moved) > 5) pan(-moved / Math.max(box.clientWidth, 1));
  });
  box.addEventListener("wheel", (event) => {
    event.preventDefault();
    zoom(event.deltaY > 0 ? 1.25 : 0.8);
  }, { passive: false });
}

// ---------------------------------------------------------------- one request

async function drawRequest() {
  const box = $("request-body");
  const id = state.arg;
  if (!id) {
    clear(box).append(el("p", { class: "empty" }, "Give a request id, or choose a push in the timeline."));
    return;
  }
  const body = await getJSON("/api/request/" + encodeURIComponent(id));
  const r = body.request;
  const fields = [
    ["request id", r.request_id], ["state", r.state], ["where", r.place === "outbox" ? "outbox" : "history (finished)"],
    ["device", r.device_id], ["rule", r.rule + (r.rule_table ? " on " + r.rule_table + " (" + (r.rule_events || []).join(", ") + ")" : "")],
    ["subject", r.subject], ["content", r.content], ["priority", r.priority],
    ["gateway", r.gateway + (r.gateway_used ? ", used " + r.gateway_used : "")],
    ["attempts", r.attempts], ["coalesced changes", r.coalesced],
    ["last error", r.last_error || "–"], ["expires", when(r.expires_at)],
    ["rule's ttl, resend every", r.rule_ttl === undefined || r.rule_ttl === null ? "–" : r.rule_ttl + " s, " + r.rule_resend_every + " s"],
  ];
  if (r.place === "outbox") fields.push(["next attempt", when(r.next_attempt_at)], ["lease", r.lease_owner || "–"]);
  const dl = el("dl", { class: "fields" });
  for (const [name, value] of fields) dl.append(el("dt", {}, name), el("dd", { "data-field": name }, value));
  const steps = el("ol", { class: "steps", "data-testid": "steps" },
    el("li", {}, "written " + when(r.created_at)),
    r.sent_at ? el("li", {}, "sent " + when(r.sent_at) + " via " + (r.gateway_used || r.gateway) + " (" + ms(new Date(r.sent_at) - new Date(r.created_at)) + " after)") : el("li", {}, "not sent yet"),
    r.confirmed_at ? el("li", { "data-testid": "confirmation" }, "confirmed " + when(r.confirmed_at) + " (" + ms(new Date(r.confirmed_at) - new Date(r.sent_at || r.created_at)) + " after sending)") : el("li", {}, r.state === "confirmed" ? "confirmed" : "not confirmed"),
    r.finished_at ? el("li", {}, "moved to the history " + when(r.finished_at) + " as " + r.state) : null);
  const syncs = el("table", { "data-testid": "request-syncs" },
    el("thead", {}, el("tr", {}, ["publication", "started", "duration", "uploaded", "downloaded", "conflicts", "outcome"].map((h) => el("th", {}, h)))),
    el("tbody", {}, body.syncs.length ? body.syncs.map((s) => el("tr", {},
      el("td", {}, s.publication || "–"), el("td", {}, when(s.started_at)),
      el("td", {}, ms(new Date(s.finished_at) - new Date(s.started_at))),
      el("td", { class: "n" }, s.upload_rows), el("td", { class: "n" }, s.download_rows),
      el("td", { class: "n" }, s.conflicts), el("td", {}, s.outcome + (s.error ? ": " + s.error : ""))))
      : el("tr", {}, el("td", { colspan: 7, class: "empty" }, "no synchronization of the device since"))));
  clear(box).append(dl, el("h3", {}, "What happened"), steps,
    el("h3", {}, "Attempts"), attemptsNote(r), attemptsTable(r),
    el("h3", {}, "Synchronizations of the device since"), syncs);
}

const KEPT_ATTEMPTS = 16;  // sql/0012_attempt_log.sql keeps the last 16
const ADDRESS = {
  sync: "the device's SYNC connection", mqtt: "the device's MQTT subscription",
  udp: "the device's UDP address", smtp: "the device's email address",
};

// Each recorded attempt: when its outcome was recorded, through which gateway
// (which says the kind of address), and what came of it.
function attemptsTable(r) {
  const log = r.attempt_log || [];
  const rows = log.map((a, i) => el("tr", { "data-outcome": a.outcome },
    el("td", { class: "n" }, i + 1),
    el("td", {}, when(a.at)),
    el("td", { class: "n" }, ms(new Date(a.at) - new Date(r.created_at))),
    el("td", {}, a.gateway || "–"),
    el("td", {}, a.gateway ? ADDRESS[a.gateway] || a.gateway : "–"),
    el("td", {}, outcome(a))));
  return el("table", { "data-testid": "attempts" },
    el("thead", {}, el("tr", {}, ["#", "at", "after writing", "gateway", "address", "outcome"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 6, class: "empty" }, "no attempt recorded"))));
}

function outcome(a) {
  if (a.outcome === "sent") return "sent";
  if (a.outcome === "retry") return "not sent, retried at the next resend: " + (a.error || "");
  if (a.outcome === "failed") return "failed for good: " + (a.error || "");
  return a.outcome + (a.error ? ": " + a.error : "");
}

// What `attempts` counts beyond the recorded ones: older attempts no longer
// kept, one under way, or claims whose dispatcher stopped before recording.
function attemptsNote(r) {
  const recorded = (r.attempt_log || []).length;
  let missing = r.attempts - recorded;
  const notes = [];
  if (r.state === "sending" && missing > 0) {
    notes.push("one attempt under way (" + (r.lease_owner || "a dispatcher") + ")");
    missing -= 1;
  }
  if (missing > 0) {
    notes.push(recorded >= KEPT_ATTEMPTS
      ? missing + " earlier attempt(s) not kept (the last " + KEPT_ATTEMPTS + " are)"
      : missing + " attempt(s) with no recorded outcome (the dispatcher stopped or lost its lease before recording it)");
  }
  return el("p", { class: "sub", "data-testid": "attempts-note" },
    r.attempts + " attempt(s)" + (notes.length ? "; " + notes.join("; ") : ""));
}

// ---------------------------------------------------------------- wiring

function start() {
  window.addEventListener("hashchange", route);
  for (const id of ["fleet-search", "timeline-search"]) $(id).addEventListener("input", () => refresh());
  for (const id of ["fleet-show", "fleet-window", "flow-window", "flow-rule", "flow-gateway", "latency-window"]) {
    $(id).addEventListener("change", () => refresh());
  }
  for (const form of document.querySelectorAll("form.controls")) {
    form.addEventListener("submit", (event) => event.preventDefault());
  }
  $("fleet-more").addEventListener("click", () => drawFleet($("fleet-more").dataset.after).catch((e) => showError(e.message)));
  $("tl-zoom-in").addEventListener("click", () => zoom(0.5));
  $("tl-zoom-out").addEventListener("click", () => zoom(2));
  $("tl-earlier").addEventListener("click", () => pan(-0.5));
  $("tl-later").addEventListener("click", () => pan(0.5));
  $("tl-now").addEventListener("click", () => { state.timeline.end = null; refresh(); });
  dragToPan($("timeline-chart"));
  $("request-form").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = "#request/" + $("request-id").value.trim();
  });
  // The flow and the timeline slide with time even when nothing happens.
  setInterval(() => { if (state.view === "flow" || state.view === "timeline") refresh(); }, 5000);
  live();
  route();
}

document.addEventListener("DOMContentLoaded", start);
