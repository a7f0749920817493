// swarmtrain dashboard: polls /api/v1/state (every 2 s) and /api/v1/history (every 5 s) and redraws.
// Everything a peer publishes is untrusted: it only ever reaches the page through textContent / attributes,
// clipped to a fixed length. This file never uses innerHTML.
"use strict";

const STATE_EVERY_MS = 2000;
const HISTORY_EVERY_MS = 5000;
const MAX_TEXT = 64;
const MAX_PEER_SERIES = 16;

// ---------- small DOM and formatting helpers ----------

function clip(value, max = MAX_TEXT) {
  const text = value === null || value === undefined ? "" : String(value);
  return text.length > max ? text.slice(0, max - 1) + "…" : text;
}

function el(tag, opts = {}, children = []) {
  const node = document.createElement(tag);
  if (opts.text !== undefined) node.textContent = clip(opts.text, opts.max || MAX_TEXT);
  if (opts.cls) node.className = opts.cls;
  if (opts.title !== undefined) node.title = clip(opts.title, 4096);
  if (opts.data) for (const [k, v] of Object.entries(opts.data)) node.dataset[k] = clip(v, 128);
  for (const child of children) node.appendChild(child);
  return node;
}

function num(value, digits = 2) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (Math.abs(value) >= 1e6) return (value / 1e6).toFixed(1) + "M";
  if (Math.abs(value) >= 1e4) return (value / 1e3).toFixed(1) + "k";
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function bytes(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i++; }
  return (i === 0 ? value.toFixed(0) : value.toFixed(1)) + " " + units[i];
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.floor(seconds % 60) + " s";
  if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
  return Math.floor(seconds / 86400) + " d " + Math.floor((seconds % 86400) / 3600) + " h";
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function colorOf(key) {
  let hash = 0;
  for (let i = 0; i < key.length; i++) hash = (hash * 31 + key.charCodeAt(i)) >>> 0;
  return `hsl(${hash % 360}, 65%, 55%)`;
}

function peerLabel(peer) {
  return clip(peer.public_name || peer.short_id || ("…" + peer.peer_id.slice(-6)), 32);
}

// ---------- overview ----------

function card(label, value, cls = "") {
  return el("div", { cls: "card " + cls }, [el("div", { cls: "label", text: label }), el("div", { cls: "value", text: value })]);
}

function renderOverview(state) {
  const o = state.overview, m = state.manifest;
  document.getElementById("run-id").textContent = clip(state.run_id);
  const cards = [
    card("peers online", num(o.peers_online), "big good"),
    card("stale", num(o.peers_stale), o.peers_stale ? "warn" : ""),
    card("recently gone", num(o.peers_gone_recently), o.peers_gone_recently ? "bad" : ""),
    card("samples/s", num(o.samples_per_s, 1), "big"),
    card("swarm val loss", num(o.val_loss, 4), "big"),
    card("train loss", num(o.loss, 4)),
    card("samples processed", num(o.samples_total)),
    card("run uptime", duration(m ? m.run_uptime_s : null)),
    card("averaging rounds/min", num(o.averaging_rounds_per_min, 1)),
    card("bytes moved", bytes(o.averaging_bytes_total)),
    card("averaging staleness", duration(o.averaging_staleness_s)),
    card("ready to average", num(o.peers_ready_to_average)),
    card("experts under-served", `${num(o.experts_under_served)} / ${num(o.experts_total)}`,
      o.experts_under_served ? "bad" : ""),
  ];
  document.getElementById("cards").replaceChildren(...cards);

  const summary = document.getElementById("manifest-summary");
  if (!m) {
    summary.replaceChildren(el("span", { cls: "warn-text", text: "no verified manifest seen yet" }));
    return;
  }
  const experts = Object.entries(m.experts_per_layer).map(([k, v]) => `${k} ${v}`).join(", ");
  const items = [
    ["coordinator", "…" + String(m.coordinator).slice(-6)],
    ["modalities", m.modalities.join(", ")],
    ["model", `hidden ${m.model.hidden} · ${m.model.layers} layers · ${m.model.heads} heads`],
    ["experts/layer", experts],
    ["top-k", String(m.expert_pool.top_k)],
    ["batch", String(m.training.batch_size)],
    ["optimizer", `${m.optimizer.name} lr ${m.optimizer.lr}`],
    ["averaging every", duration(m.averaging.period_s)],
    ["dataset", m.dataset.name],
    ["created", new Date(m.created_at * 1000).toLocaleString()],
  ];
  if (m.resumed_from != null) items.push(["resumed from", "checkpoint of " + new Date(m.resumed_from * 1000).toLocaleString()]);
  if (!m.live) items.push(["manifest", "expired from the DHT (last seen copy)"]);
  summary.replaceChildren(...items.map(([k, v]) => el("span", { cls: "kv" }, [
    el("span", { cls: "k", text: k }), el("span", { cls: "v", text: v, max: 96 }),
  ])));
}

// ---------- peers ----------

function renderPeers(state) {
  const rows = state.peers.map((p) => {
    // the peer id column already names the peer: drop a trailing /p2p/<its own id> from the shown address
    const own = "/p2p/" + p.peer_id;
    const first = p.maddrs.length ? (p.maddrs[0].endsWith(own) ? p.maddrs[0].slice(0, -own.length) : p.maddrs[0]) : "";
    const more = p.maddrs.length > 1 ? ` +${p.maddrs.length - 1}` : "";
    const experts = p.experts_served.length ? p.experts_served : p.experts;
    const row = el("tr", { cls: "state-" + p.state, data: { peerId: p.peer_id, state: p.state } }, [
      el("td", { cls: "name", text: p.public_name || "(unnamed)" }),
      el("td", { cls: "mono", text: p.short_id, title: p.peer_id }),
      el("td", {}, [el("span", { cls: "badge " + p.state, text: p.state })]),
      el("td", {}, [el("span", { cls: "badge reach-" + p.reachability, text: p.reachability,
        title: p.client_mode ? "client mode: not reachable directly" : "" })]),
      el("td", { cls: "mono addr", text: clip(first, 40) + more, title: p.maddrs.map((a) => clip(a, 256)).join("\n") }),
      el("td", { text: p.device }),
      el("td", { text: p.version }),
      el("td", { text: p.modalities.join(", ") }),
      el("td", { text: experts.length ? `${experts.length}: ${experts.slice(0, 3).join(" ")}${experts.length > 3 ? " …" : ""}` : "–",
        title: experts.join(" "), max: 80 }),
      el("td", { cls: "num", text: num(p.samples_per_s, 1) }),
      el("td", { cls: "num", text: num(p.loss, 4) }),
      el("td", { cls: "num", text: num(p.val_loss, 4) }),
      el("td", { cls: "num", text: num(p.steps) }),
      el("td", { cls: "num", text: num(p.averaging_rounds) }),
      el("td", { cls: "num", text: p.state === "gone" ? "gone " + duration(state.generated_at - p.gone_since) + " ago"
        : duration(p.heartbeat_age_s) }),
      el("td", { cls: "num", text: duration(p.uptime_s) }),
    ]);
    return row;
  });
  if (!rows.length) rows.push(el("tr", {}, [el("td", { cls: "empty", text: "no peer has published a heartbeat yet" })]));
  document.getElementById("peers-body").replaceChildren(...rows);
  document.getElementById("peers-hint").textContent =
    `stale after ${duration(state.stale_after_s)} without a heartbeat; gone when the heartbeat expires`;
}

// ---------- experts ----------

function renderExperts(state) {
  const blocks = Object.entries(state.experts).map(([modality, experts]) => {
    const byLayer = new Map();
    for (const e of experts) {
      if (!byLayer.has(e.layer)) byLayer.set(e.layer, []);
      byLayer.get(e.layer).push(e);
    }
    const layers = [...byLayer.entries()].sort((a, b) => a[0] - b[0]).map(([layer, list]) => el("div", { cls: "layer" }, [
      el("div", { cls: "layer-label", text: "layer " + layer }),
      el("div", { cls: "tiles" }, list.map((e) => el("div", {
        cls: "tile" + (e.under_served ? " under" : "") + (e.in_manifest ? "" : " extra"),
        data: { uid: e.uid, replicas: e.replicas },
        title: `${e.uid}\nhosts: ${e.hosts.map((h) => "…" + h.slice(-6)).join(", ") || "none"}\ncalls: ${e.calls}` +
          (e.in_manifest ? "" : "\nnot in the manifest"),
      }, [
        el("div", { cls: "uid", text: e.uid }),
        el("div", { cls: "replicas", text: `×${e.replicas}` }),
        el("div", { cls: "load", text: num(e.load, 1) + " r/s" }),
      ]))),
    ]));
    return el("div", { cls: "modality" }, [el("h3", { text: modality }), ...layers]);
  });
  if (!blocks.length) blocks.push(el("p", { cls: "hint", text: "no manifest and no expert records yet" }));
  document.getElementById("experts").replaceChildren(...blocks);
}

// ---------- charts ----------

const charts = {};

function makeChart(id, yTitle, opts = {}) {
  const scales = {
    x: { type: "linear", ticks: { maxTicksLimit: 6, callback: (v) => clock(v) }, grid: { color: "#263041" } },
    y: { title: { display: true, text: yTitle }, beginAtZero: !!opts.zero, grid: { color: "#263041" } },
  };
  if (opts.y2) scales.y2 = { position: "right", title: { display: true, text: opts.y2 }, beginAtZero: true, grid: { drawOnChartArea: false } };
  charts[id] = new Chart(document.getElementById(id), {
    type: "line",
    data: { datasets: [] },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
      spanGaps: true, elements: { point: { radius: 0 }, line: { borderWidth: 2, tension: 0.2 } },
      interaction: { mode: "nearest", intersect: false },
      plugins: { legend: { labels: { boxWidth: 10, color: "#c9d3e3" } },
        tooltip: { callbacks: { title: (items) => items.length ? clock(items[0].parsed.x) : "" } } },
      scales,
    },
  });
}

function points(t, values) {
  const out = [];
  for (let i = 0; i < t.length; i++) if (values[i] !== null && values[i] !== undefined) out.push({ x: t[i], y: values[i] });
  return out;
}

function series(label, color, data, axis = "y") {
  return { label: clip(label, 32), data, borderColor: color, backgroundColor: color, yAxisID: axis };
}

function setData(id, datasets, history) {
  const chart = charts[id];
  chart.data.datasets = datasets;
  // show the whole window once there is that much history; until then, fit the data
  let first = history.now;
  for (const d of datasets) if (d.data.length) first = Math.min(first, d.data[0].x);
  chart.options.scales.x.min = Math.max(history.now - history.window_s, first);
  chart.options.scales.x.max = history.now;
  chart.update("none");
  const n = datasets.reduce((sum, d) => sum + d.data.length, 0);
  chart.canvas.dataset.points = String(n);
}

function renderHistory(h) {
  const s = h.swarm;
  setData("chart-swarm-loss", [
    series("val loss", "#f4a261", points(s.t, s.val_loss)),
    series("train loss", "#4ea8de", points(s.t, s.loss)),
  ], h);
  setData("chart-peer-loss", h.peers
    .map((p) => series(peerLabel(p), colorOf(p.peer_id), points(p.t, p.loss)))
    .filter((d) => d.data.length).slice(0, MAX_PEER_SERIES), h);
  setData("chart-throughput", [
    series("samples/s", "#80ed99", points(s.t, s.samples_per_s)),
    series("peers online", "#c77dff", points(s.t, s.peers_online), "y2"),
  ], h);
  setData("chart-rounds", [series("rounds/min", "#ffd166", points(s.t, s.averaging_rounds_per_min))], h);
  setData("chart-bytes", [series("bytes/s", "#06d6a0", points(s.t, s.averaging_bytes_per_s))], h);
  setData("chart-staleness", [series("staleness s", "#ef476f", points(s.t, s.averaging_staleness_s))], h);
}

// ---------- polling ----------

function setStatus(ok, text) {
  document.getElementById("live-dot").className = "dot " + (ok ? "ok" : "bad");
  document.getElementById("status-text").textContent = text;
}

function showError(text) {
  const banner = document.getElementById("error-banner");
  banner.hidden = !text;
  banner.textContent = text ? clip(text, 300) : "";
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

async function pollState() {
  try {
    const state = await getJSON("/api/v1/state");
    renderOverview(state);
    renderPeers(state);
    renderExperts(state);
    const d = state.dashboard;
    showError(d.last_error ? "reading the DHT failed: " + d.last_error : "");
    setStatus(!d.last_error, `live · updated ${clock(state.generated_at)} · ${d.polls} polls · ` +
      `${d.dht_neighbours === null ? "?" : d.dht_neighbours} DHT neighbours`);
    document.body.dataset.polls = String(d.polls);
  } catch (e) {
    setStatus(false, "dashboard unreachable");
    showError(String(e));
  }
}

async function pollHistory() {
  try {
    const win = document.getElementById("window").value;
    renderHistory(await getJSON(`/api/v1/history?window_s=${encodeURIComponent(win)}&max_points=300`));
  } catch (e) {
    showError(String(e));
  }
}

function loop(fn, ms) {
  const tick = async () => { await fn(); setTimeout(tick, ms); };
  tick();
}

function main() {
  Chart.defaults.color = "#9aa8bd";
  Chart.defaults.font.size = 11;
  makeChart("chart-swarm-loss", "loss");
  makeChart("chart-peer-loss", "loss");
  makeChart("chart-throughput", "samples/s", { zero: true, y2: "peers" });
  makeChart("chart-rounds", "rounds/min", { zero: true });
  makeChart("chart-bytes", "bytes/s", { zero: true });
  makeChart("chart-staleness", "seconds", { zero: true });
  document.getElementById("window").addEventListener("change", pollHistory);
  loop(pollState, STATE_EVERY_MS);
  loop(pollHistory, HISTORY_EVERY_MS);
}

main();
