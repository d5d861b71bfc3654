// The admin page's script (src/admin/index.html): asks for the API key, then once a second
// reads /ready, /api/stats and /api/admin/activity from this node and draws what they say.
// Rates and the latency quantiles come from the difference between two reads, so the page
// shows the last second, not an average since start. No libraries, no build step.
"use strict";

const POLL_MS = 1000;
const REQUEST_TIMEOUT_MS = 3000;
const HISTORY_POINTS = 120; // two minutes of chart at one point a second
const ERROR_WINDOW_MS = 60000;
const KEY_STORE = "switchboard.admin.key";

const $ = (id) => document.getElementById(id);
const state = {
  key: null,
  timer: null,
  prev: null, // {t, stats, activity}
  deliveries: [],
  p50: [],
  p99: [],
  totals: [], // [{t, errors, closes}] over the last ERROR_WINDOW_MS
};

function takeKeyFromUrl() {
  // `/admin#key=...` (the fragment never leaves the browser): handy for a bookmark or a
  // script; removed from the address bar at once.
  const m = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (!m) return;
  history.replaceState(null, "", location.pathname + location.search);
  try {
    sessionStorage.setItem(KEY_STORE, decodeURIComponent(m[1]));
  } catch (_) {
    // A malformed fragment (`%zz`): ignore it; the form asks for the key.
  }
}

function setText(id, v) {
  const el = $(id);
  if (el) el.textContent = v;
}

function fmtInt(n) {
  return Number(n).toLocaleString("en-US");
}

function fmtUptime(s) {
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return `${m}m ${s % 60}s`;
}

async function getJson(path, withKey) {
  const ctl = new AbortController();
  const t = setTimeout(() => ctl.abort(), REQUEST_TIMEOUT_MS);
  try {
    const headers = withKey ? { "X-API-Key": state.key } : {};
    const r = await fetch(path, { headers, cache: "no-store", signal: ctl.signal });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    return { status: r.status, body };
  } finally {
    clearTimeout(t);
  }
}

function lock(message) {
  state.key = null;
  sessionStorage.removeItem(KEY_STORE);
  clearTimeout(state.timer);
  document.body.dataset.state = "locked";
  $("live").hidden = true;
  $("login").hidden = false;
  setText("login-error", message || "");
  setText("status", "not connected");
  $("status").className = "status";
}

function unlock(key) {
  state.key = key;
  state.prev = null;
  state.deliveries = [];
  state.p50 = [];
  state.p99 = [];
  state.totals = [];
  $("login").hidden = true;
  $("live").hidden = false;
  setText("login-error", "");
  poll();
}

// Quantile q of the samples between two cumulative histograms (Prometheus'
// histogram_quantile: linear within the bucket). null when nothing was recorded.
function quantileMs(prev, now, q) {
  const total = now.count - (prev ? prev.count : 0);
  if (total <= 0) return null;
  const rank = q * total;
  let below = 0, lower = 0;
  for (let i = 0; i < now.buckets.length; i++) {
    const [le, c] = now.buckets[i];
    const cum = c - (prev ? prev.buckets[i][1] : 0);
    if (cum >= rank) {
      const inBucket = cum - below;
      const frac = inBucket > 0 ? (rank - below) / inBucket : 1;
      return (lower + (le - lower) * frac) / 1000;
    }
    below = cum;
    lower = le;
  }
  return lower / 1000; // past the last bound: at least this
}

function push(series, v) {
  series.push(v);
  if (series.length > HISTORY_POINTS) series.shift();
}

function drawChart(canvas, lines, unit) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 24;
  ctx.clearRect(0, 0, w, h);
  let max = 0;
  for (const l of lines) for (const v of l.data) if (v != null && v > max) max = v;
  max = max > 0 ? max * 1.15 : 1;
  ctx.strokeStyle = "#d9dee4";
  ctx.fillStyle = "#67707c";
  ctx.font = "11px system-ui, sans-serif";
  for (let i = 0; i <= 2; i++) {
    const y = pad / 2 + ((h - pad) * i) / 2;
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(w, y); ctx.stroke();
    const v = max * (1 - i / 2);
    ctx.fillText(`${v >= 100 ? Math.round(v).toLocaleString("en-US") : v.toFixed(2)} ${unit}`, 4, y - 3);
  }
  const step = w / (HISTORY_POINTS - 1);
  for (const l of lines) {
    ctx.strokeStyle = l.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let pen = false;
    const x0 = w - (l.data.length - 1) * step;
    l.data.forEach((v, i) => {
      if (v == null) { pen = false; return; }
      const x = x0 + i * step, y = pad / 2 + (h - pad) * (1 - v / max);
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
    // A point between two gaps has no line: mark it.
    ctx.fillStyle = l.color;
    l.data.forEach((v, i) => {
      if (v == null || l.data[i - 1] != null || l.data[i + 1] != null) return;
      const x = x0 + i * step, y = pad / 2 + (h - pad) * (1 - v / max);
      ctx.fillRect(x - 2, y - 2, 4, 4);
    });
  }
}

function fillTable(id, rows, empty) {
  const tbody = $(id).tBodies[0];
  tbody.replaceChildren();
  if (!rows.length) {
    const tr = tbody.insertRow();
    const td = tr.insertCell();
    td.colSpan = 3;
    td.className = "empty";
    td.textContent = empty;
    return;
  }
  for (const { key, attr, cells } of rows) {
    const tr = tbody.insertRow();
    tr.dataset[attr] = key;
    for (const c of cells) tr.insertCell().textContent = c;
  }
}

// Totals by label now and their change over the last minute (from the oldest read kept).
function labelledRows(now, oldest, attr) {
  return Object.entries(now)
    .filter(([, v]) => v > 0)
    .sort((a, b) => b[1] - a[1])
    .map(([k, v]) => ({
      key: k,
      attr,
      cells: [k, fmtInt(v - (oldest && oldest[k] !== undefined ? oldest[k] : 0)), fmtInt(v)],
    }));
}

function render(stats, activity, ready, t) {
  setText("v-node_id", stats.node_id);
  setText("v-uptime", fmtUptime(stats.uptime_s));
  setText("v-connections", fmtInt(stats.connections));
  setText("v-max_connections", fmtInt(stats.max_connections));
  setText("v-rooms", fmtInt(stats.rooms));
  setText("v-users", fmtInt(stats.users));
  setText("v-shards", fmtInt(stats.shards));
  setText("v-draining", stats.draining ? "draining" : "serving");
  if (stats.cluster) {
    const ago = Math.max(0, Math.round((Date.now() - stats.cluster.as_of_ms) / 1000));
    setText("v-nodes", fmtInt(stats.cluster.nodes));
    setText("v-nodes-note", `cluster-wide, ${ago}s ago`);
    setText("v-cluster_connections", fmtInt(stats.cluster.connections));
    setText("v-cluster-note", `of ${fmtInt(stats.cluster.max_connections)}, ${ago}s ago`);
  } else {
    setText("v-nodes", "1");
    setText("v-nodes-note", "this node only");
    setText("v-cluster_connections", fmtInt(stats.connections));
    setText("v-cluster-note", "not clustered");
  }

  const prev = state.prev;
  if (prev) {
    const dt = (t - prev.t) / 1000;
    const rate = dt > 0 ? (stats.counters.deliveries - prev.stats.counters.deliveries) / dt : 0;
    push(state.deliveries, Math.max(0, rate));
    setText("v-deliveries_rate", `${fmtInt(Math.round(Math.max(0, rate)))}/s`);
    const p50 = quantileMs(prev.activity.latency_us, activity.latency_us, 0.5);
    const p99 = quantileMs(prev.activity.latency_us, activity.latency_us, 0.99);
    push(state.p50, p50);
    push(state.p99, p99);
    setText("v-p50", p50 == null ? "-" : p50.toFixed(2));
    setText("v-p99", p99 == null ? "-" : p99.toFixed(2));
  }
  drawChart($("c-deliveries"), [{ data: state.deliveries, color: "#2764c4" }], "/s");
  drawChart($("c-latency"), [
    { data: state.p50, color: "#2764c4" },
    { data: state.p99, color: "#c4542b" },
  ], "ms");

  setText("v-rooms_scanned", activity.rooms_scanned < activity.rooms
    ? `(the busiest of ${fmtInt(activity.rooms_scanned)} of ${fmtInt(activity.rooms)} rooms looked at)`
    : "(members on this node)");
  fillTable("t-rooms", activity.busiest_rooms.map((r) => ({
    key: r.room, attr: "room", cells: [r.room, fmtInt(r.members)],
  })), "no rooms");

  state.totals.push({ t, errors: activity.errors, closes: activity.closes });
  while (state.totals.length > 1 && t - state.totals[0].t > ERROR_WINDOW_MS) state.totals.shift();
  const oldest = state.totals.length > 1 ? state.totals[0] : null;
  fillTable("t-errors", labelledRows(activity.errors, oldest && oldest.errors, "reason"), "no errors since start");
  fillTable("t-closes", labelledRows(activity.closes, oldest && oldest.closes, "code"), "none since start");

  const st = $("status");
  if (ready.status === 200) {
    st.textContent = ready.body && ready.body.degraded ? `ready (degraded: ${ready.body.degraded})` : "ready";
    st.className = ready.body && ready.body.degraded ? "status bad" : "status ok";
  } else {
    st.textContent = `not ready${ready.body && ready.body.reason ? ": " + ready.body.reason : ""}`;
    st.className = "status bad";
  }
  setText("v-updated", new Date(t).toLocaleTimeString("en-GB"));
  state.prev = { t, stats, activity };
  document.body.dataset.state = "live";
}

async function poll() {
  clearTimeout(state.timer);
  if (!state.key) return;
  try {
    const [ready, s, a] = await Promise.all([
      getJson("/ready", false),
      getJson("/api/stats", true),
      getJson("/api/admin/activity", true),
    ]);
    if (s.status === 401 || a.status === 401 || s.status === 404) {
      lock((s.body && s.body.error) || (a.body && a.body.error) || `HTTP ${s.status}`);
      return;
    }
    if (s.status !== 200 || a.status !== 200 || !s.body || !a.body) {
      throw new Error(`HTTP ${s.status}/${a.status}`);
    }
    render(s.body, a.body, ready, Date.now());
  } catch (e) {
    const st = $("status");
    st.textContent = `cannot reach the node (${e.name === "AbortError" ? "timeout" : e.message})`;
    st.className = "status bad";
    document.body.dataset.state = "stale";
  }
  state.timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromUrl();
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key").value = "";
    unlock(key);
  });
  $("logout").addEventListener("click", (ev) => {
    ev.preventDefault();
    lock("");
  });
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) unlock(key); else lock("");
});
