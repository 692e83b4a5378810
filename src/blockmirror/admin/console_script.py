"""The web console's script (served as ``/admin.js``): sign-in, the volume cards, the controls.

The page (:mod:`blockmirror.admin.page`) is a frame; this script fills it from the admin API,
same origin, authenticated by the session cookie: ``GET /api/status`` every two seconds,
``GET /api/lag-history`` every ten (the graph, :mod:`.console_graph`), and the events from
``GET /api/events`` once, then from its event stream (``Accept: text/event-stream``), or polled
when the unit has no stream. Nothing reloads the page but a lost session.

Volume and peer names, messages and errors are operator or network text: they only ever enter
the page as text nodes (``textContent``, ``append`` of strings) and attribute values, never as
HTML. Ids are built from names with :func:`idPart` (below, and ``id_part`` in the tests): ASCII
letters, digits and ``-`` stay, every other UTF-8 byte becomes ``_xx``; ``__`` joins a volume's
part to a peer's or a drill's, so an id is unique and the same on every refresh.

Every control asks first, in the page's own dialog (``#confirm``: ``#confirm-ok``,
``#confirm-cancel``), then POSTs with the session's CSRF token in ``X-CSRF-Token`` and shows the
API's answer, or its ``error``, in ``#message``.
"""

from __future__ import annotations

__all__ = ["CONSOLE_SCRIPT", "START_SCRIPT"]

CONSOLE_SCRIPT = r""""use strict";
const $ = (id) => document.getElementById(id);
const meta = document.querySelector('meta[name="csrf-token"]');
const csrf = meta ? meta.content : "";
const message = $("message");
let lagDoc;  // GET /api/lag-history: undefined until loaded, null when the unit has none

function say(text, error) {
  message.textContent = text;
  message.classList.toggle("error", Boolean(error));
}

async function answer(response) {
  const fallback = `${response.status} ${response.statusText}`.trim();
  try { const doc = await response.json(); return (doc && doc.error) || fallback; }
  catch (e) { return fallback; }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined && value !== false) {
      node.setAttribute(key, String(value));
    }
  }
  node.append(...children);  // strings become text nodes: nothing here is parsed as HTML
  return node;
}

function idPart(text) {
  let out = "";
  for (const byte of new TextEncoder().encode(String(text))) {
    const c = String.fromCharCode(byte);
    out += /[A-Za-z0-9-]/.test(c) ? c : "_" + byte.toString(16).padStart(2, "0");
  }
  return out;
}

const NONE = "\u2013";  // an en dash: no value
const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
function size(n) {
  if (typeof n !== "number" || !isFinite(n)) return NONE;
  let value = n, i = 0;
  while (Math.abs(value) >= 1024 && i < UNITS.length - 1) { value /= 1024; i++; }
  return i ? `${value.toFixed(1)} ${UNITS[i]}` : `${Math.round(value)} B`;
}
function age(s) {
  if (typeof s !== "number" || !isFinite(s)) return NONE;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${s.toFixed(0)} s`;
  if (s < 7200) return `${(s / 60).toFixed(0)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
const num = (n) => (typeof n === "number" ? String(n) : NONE);
const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB");

// Keep one child per item, in order, reusing the node of a key seen before: a refresh must not
// take the focus off a button or close what the operator is reading.
function syncKeyed(container, items, keyOf, create, update) {
  const old = new Map();
  for (const child of Array.from(container.children)) old.set(child.dataset.key, child);
  let previous = null;
  for (const item of items) {
    const key = keyOf(item);
    let node = old.get(key);
    if (node) old.delete(key); else { node = create(item, key); node.dataset.key = key; }
    update(node, item);
    const wanted = previous ? previous.nextSibling : container.firstChild;
    if (node !== wanted) container.insertBefore(node, wanted);
    previous = node;
  }
  for (const node of old.values()) node.remove();
}

// --- sign-in and sign-out (the server renders these) --------------------------------------
const form = $("signin");
if (form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const response = await fetch("/api/session", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({token: $("token").value.trim()}),
    });
    if (response.ok) { location.reload(); } else { say(await answer(response), true); }
  });
}
for (const button of document.querySelectorAll("button[data-path]")) {
  button.addEventListener("click", async () => {
    const response = await fetch(button.dataset.path, {
      method: button.dataset.method || "POST",
      headers: {"X-CSRF-Token": csrf},
    });
    if (response.ok) { location.reload(); } else { say(await answer(response), true); }
  });
}

// --- the confirmation step and the controls -----------------------------------------------
const dialog = $("confirm");
let pending = null;
if (dialog) {
  $("confirm-ok").addEventListener("click", () => {
    const act = pending;
    pending = null;
    dialog.close();
    if (!act) return;
    let path = act.path + (act.force && $("confirm-force").checked ? "?force=1" : "");
    if (act.rate) path += `?bandwidth=${encodeURIComponent($("confirm-rate").value.trim())}`;
    run(path, act.what);
  });
  $("confirm-cancel").addEventListener("click", () => { pending = null; dialog.close(); });
  dialog.addEventListener("close", () => { pending = null; });
}

function ask(question, path, what, force, rate) {
  $("confirm-text").textContent = question;
  $("confirm-force-row").hidden = !force;
  $("confirm-force").checked = false;
  // A link setting: the value is typed into the dialog, and sent only on Confirm.
  $("confirm-rate-row").hidden = rate === undefined;
  $("confirm-rate").value = rate === undefined ? "" : rate;
  pending = {path, what, force, rate: rate !== undefined};
  dialog.showModal();
  $("confirm-cancel").focus();  // the safe choice is the default one
}

async function run(path, what) {
  say(`${what}: sent, waiting for the unit…`, false);
  try {
    const response = await fetch(path, {method: "POST", headers: {"X-CSRF-Token": csrf}});
    if (response.ok) say(`${what}: done`, false);
    else say(`${what} failed: ${await answer(response)}`, true);
  } catch (e) {
    say(`${what} failed: the unit did not answer (${e.message})`, true);
  }
  refresh();
}

function control(id, label, path, question, what, force, rate) {
  const button = el("button", {type: "button", id, class: "control"}, label);
  button.addEventListener("click", () => ask(question, path, what, Boolean(force),
                                               rate === undefined ? undefined : rate()));
  return button;
}

const rateText = (n) => (typeof n === "number" ? `${n}bit` : "none");
function bits(n) {
  for (const [unit, name] of [[1e9, "Gbit"], [1e6, "Mbit"], [1e3, "kbit"]]) {
    if (n >= unit) return `${+(n / unit).toFixed(3)} ${name}/s`;
  }
  return `${n} bit/s`;
}

// --- the volume cards ---------------------------------------------------------------------
const canAct = csrf !== "";
const PEER_COLUMNS = [["address", "peer"], ["state", "state"], ["mode", "mode"],
  ["lagBytes", "lag"], ["lagRecords", "records"], ["lagSeconds", "lag (s)"],
  ["rate", "rate"], ["sent", "sent"], ["consistent", "consistent"], ["link", "link"],
  ["error", "last error"]];

function createCard(vol, name) {
  const vid = idPart(name);
  const api = `/api/volumes/${encodeURIComponent(name)}`;
  const p = {};
  p.role = el("span", {class: "badge role"});
  p.state = el("span", {class: "badge state"});
  p.problem = el("p", {class: "problem", role: "alert"});
  p.alerts = el("ul", {class: "alerts", id: `alerts-${vid}`});
  p.facts = el("p", {class: "facts"});
  p.meter = el("meter", {id: `journal-fill-${vid}`, min: 0, max: 1, low: 0.5, high: 0.8,
                         optimum: 0, "aria-label": `journal fill of ${name}`});
  p.journalText = el("span", {class: "journal-text", id: `journal-${vid}`});
  p.controls = el("div", {class: "controls", role: "group", "aria-label": `controls of ${name}`});
  p.buttons = {};
  if (canAct) {
    p.buttons = {
      journalPause: control(`journal-pause-${vid}`, "Pause journal", `${api}/journal/pause`,
        `Pause the journal of ${name}? Host writes go on, but become dirty bits instead of ` +
        "journal records until you resume.", `pause of the journal of ${name}`),
      journalResume: control(`journal-resume-${vid}`, "Resume journal", `${api}/journal/resume`,
        `Resume the journal of ${name}?`, `resume of the journal of ${name}`),
      promote: control(`promote-${vid}`, "Promote", `${api}/promote`,
        `Promote ${name} on this unit? It becomes primary and writable, and a new generation ` +
        "begins.", `promote of ${name}`, true),
      demote: control(`demote-${vid}`, "Demote", `${api}/demote`,
        `Demote ${name} on this unit? Host writes are refused from now on; the unit waits ` +
        "until every peer holds every record.", `demote of ${name}`),
    };
    p.controls.append(...Object.values(p.buttons));
  }
  p.peers = el("tbody");
  p.peerTable = el("table", {class: "peers", id: `peers-${vid}`},
    el("caption", {}, "Peers"),
    el("thead", {}, el("tr", {}, ...PEER_COLUMNS.map(([, h]) => el("th", {scope: "col"}, h)),
                       canAct ? el("th", {scope: "col"}, "consumer") : "")),
    p.peers);
  p.noPeers = el("p", {class: "muted"}, "No peers.");
  p.replica = el("p", {class: "replica", id: `replica-${vid}`});
  p.graph = createLagGraph(vid, name);
  p.history = el("p", {class: "history", id: `history-${vid}`});
  p.drills = el("ul", {class: "drills", id: `drills-${vid}`});
  p.drillsBox = el("div", {}, el("h3", {}, "Drills"), p.drills);
  const title = el("h2", {id: `volume-${vid}-title`}, el("span", {class: "name"}, name), " ",
                   p.role, " ", p.state);
  const card = el("section", {class: "volume", id: `volume-${vid}`, "data-volume": name,
                              "aria-labelledby": `volume-${vid}-title`},
    title, p.problem, p.alerts, p.facts,
    el("p", {class: "journal"}, el("span", {class: "label"}, "Journal "), p.meter, " ",
       p.journalText),
    p.controls, p.peerTable, p.noPeers, p.replica, p.graph.box, p.history, p.drillsBox);
  card.parts = p;
  card.vid = vid;
  return card;
}

function updateCard(card, vol) {
  const p = card.parts;
  const j = vol.journal;
  p.role.textContent = vol.role;
  p.state.textContent = vol.state;
  p.state.dataset.state = vol.state;
  p.problem.textContent = vol.problem || "";
  p.problem.hidden = !vol.problem;
  const facts = [`size ${size(vol.size)}`, `export ${vol.export || "none"}`];
  if (vol.generation) facts.push(`generation ${vol.generation}`);
  if (vol.configured_role && vol.configured_role !== vol.role) {
    facts.push(`configured ${vol.configured_role}`);
  }
  const c = vol.counters || {};
  facts.push(`${num(c.writes)} writes (${size(c.bytes_written)})`, `${num(c.reads)} reads`,
             `${num(c.connections)} connections`, `${num(c.errors)} errors`);
  p.facts.textContent = facts.join(" · ");
  if (j) {
    const fill = j.capacity ? j.used / j.capacity : 0;
    p.meter.value = fill;
    p.meter.hidden = false;
    const bits = [`${size(j.used)} of ${size(j.capacity)} (${(100 * fill).toFixed(1)} %)`,
                  `${num(j.records)} records`];
    if (j.records) bits.push(`oldest ${age(j.oldest_age_seconds)}`);
    if (j.ack && j.ack.mode) bits.push(`ack ${j.ack.mode}`);
    if (j.enqueue_paused) bits.push("enqueueing PAUSED");
    p.journalText.textContent = bits.join(" · ");
  } else {
    p.meter.hidden = true;
    p.journalText.textContent = "no journal";
  }
  const b = p.buttons;
  if (canAct) {
    b.journalPause.hidden = !(j && vol.role === "primary" && !j.enqueue_paused);
    b.journalResume.hidden = !(j && j.enqueue_paused);
    b.promote.hidden = !(j && vol.role !== "primary");
    b.demote.hidden = !(j && vol.role === "primary");
  }
  const peers = Array.isArray(vol.peers) ? vol.peers : [];
  const consumers = (j && j.consumers) || {};
  syncKeyed(p.peers, peers, (peer) => String(peer.address), createPeer(card),
            (row, peer) => updatePeer(row, peer, consumers[peer.address]));
  p.peerTable.hidden = !peers.length;
  p.noPeers.hidden = peers.length > 0;
  p.graph.box.hidden = !peers.length;  // the graph is of this volume's peers' lag
  updateReplica(p.replica, vol);
  updateHistory(p, vol, card);
  if (p.graph.drawn !== lagDoc) {
    drawLagGraph(p.graph, vol.name, lagDoc, p.graph.mode);
    p.graph.drawn = lagDoc;
  }
}

function createPeer(card) {
  return (peer, address) => {
    const volume = card.dataset.volume;
    const key = `${card.vid}__${idPart(address)}`;
    const parts = {};
    const row = el("tr", {class: "peer", id: `peer-${key}`, "data-peer": address});
    for (const [name] of PEER_COLUMNS) {
      parts[name] = el(name === "address" ? "th" : "td",
                       {scope: name === "address" ? "row" : null, class: name});
      row.append(parts[name]);
    }
    if (canAct) {
      const base = `/api/volumes/${encodeURIComponent(volume)}/consumers/` +
        encodeURIComponent(address);
      parts.pause = control(`consumer-pause-${key}`, "Pause", `${base}/pause`,
        `Pause sending ${volume} to ${address}? Its records stay in the journal until you resume.`,
        `pause of ${volume} → ${address}`);
      parts.resume = control(`consumer-resume-${key}`, "Resume", `${base}/resume`,
        `Resume sending ${volume} to ${address}?`, `resume of ${volume} → ${address}`);
      const link = `/api/volumes/${encodeURIComponent(volume)}/peers/` +
        `${encodeURIComponent(address)}/link`;
      parts.limit = control(`link-limit-${key}`, "Limit…", link,
        `Set the bandwidth limit of ${volume} → ${address} (until the next reload)?`,
        `limit of ${volume} → ${address}`, false, () => rateText(row.rateLimit));
      row.append(el("td", {class: "actions"}, parts.pause, parts.resume, parts.limit));
    }
    row.parts = parts;
    return row;
  };
}

function updatePeer(row, peer, consumer) {
  const c = row.parts;
  c.address.replaceChildren(String(peer.address),
                            peer.peer ? el("small", {}, ` ${peer.peer}`) : "");
  c.state.textContent = peer.state;
  c.state.dataset.state = peer.state;
  c.mode.textContent = peer.mode;
  c.lagBytes.textContent = size(peer.lag_bytes);
  c.lagRecords.textContent = num(peer.lag_records);
  c.lagSeconds.textContent = peer.lag_seconds === null ? NONE : age(peer.lag_seconds);
  c.rate.textContent = `${size(peer.throughput_bytes_per_second)}/s`;
  c.sent.textContent = size(peer.bytes_sent);
  c.consistent.textContent = peer.consistent ? "yes" : "no";
  // Link settings: compression while the peer takes it, the bandwidth limit (changed by
  // "Limit…"), background priority and a closed transmit window.
  const link = [];
  if (peer.compressing) {
    const ratio = typeof peer.compression_ratio === "number"
      ? ` ratio ${peer.compression_ratio.toFixed(2)}` : "";
    link.push(`${peer.compression}${ratio}`);
  }
  row.rateLimit = peer.rate_limit;
  if (typeof peer.rate_limit === "number") link.push(`limit ${bits(peer.rate_limit)}`);
  if (peer.priority === "background") link.push(`background (${peer.priority_control})`);
  if (peer.window === "closed") {
    link.push(peer.window_until ? `window closed until ${peer.window_until}` : "window closed");
  }
  c.link.textContent = link.join(" · ") || NONE;
  c.error.textContent = peer.last_error || peer.reason || "";
  const paused = consumer ? Boolean(consumer.paused) : peer.state === "paused";
  row.dataset.paused = String(paused);
  if (c.pause) { c.pause.hidden = paused; c.resume.hidden = !paused; }
}

function updateReplica(node, vol) {
  const r = vol.replica;
  node.hidden = !r;
  if (!r) return;
  const bits = [`source ${r.source || "none"}${r.source_unit ? ` (${r.source_unit})` : ""}`,
                r.consistent ? "consistent" : "NOT consistent", `received ${num(r.received_seq)}`,
                `applied ${num(r.applied_seq)}`, `${size(r.bytes_received)} received`];
  if (r.syncing) bits.push("syncing");
  if (r.delayed_records) bits.push(`${num(r.delayed_records)} records delayed`);
  const point = vol.consistent_point;
  if (point) bits.push(`consistent point ${point.seq} at ${point.time}`);
  if (r.last_refusal) bits.push(`refused: ${r.last_refusal}`);
  node.textContent = `Replica: ${bits.join(" · ")}`;
}

function updateHistory(p, vol, card) {
  const h = vol.history;
  p.history.hidden = !(h && h.enabled);
  if (h && h.enabled) {
    const bits = [`${h.oldest_time || NONE} → ${h.newest_time || NONE}`, size(h.bytes),
                  `${num(h.bookmarks)} bookmarks`];
    if (h.shortened) bits.push("shortened by history_size");
    if (h.failed) bits.push(`FAILED: ${h.failed}`);
    p.history.textContent = `History: ${bits.join(" · ")}`;
  }
  const drills = Array.isArray(vol.drills) ? vol.drills : [];
  p.drillsBox.hidden = !drills.length;
  syncKeyed(p.drills, drills, (d) => String(d.name), (d, name) => {
    const item = el("li", {id: `drill-${card.vid}__${idPart(name)}`, "data-drill": name});
    item.text = el("span");
    item.append(item.text);
    if (canAct) {
      const path = `/api/volumes/${encodeURIComponent(vol.name)}/drill/stop?name=` +
        encodeURIComponent(name);
      item.append(" ", control(`drill-stop-${card.vid}__${idPart(name)}`, "Stop", path,
        `Stop the drill ${name} of ${vol.name}? Its clients lose the export` +
        (d.writable ? " and its copy-on-write file is deleted." : "."), `stop of drill ${name}`));
    }
    return item;
  }, (item, d) => {
    item.text.textContent = `${d.name}: ${d.url} · point ${d.seq} at ${d.time} · ` +
      `${d.writable ? `writable (${size(d.cow_bytes)} copied)` : "read-only"} · ` +
      `${num(d.connections)} connections · ${age(d.running_seconds)}`;
  });
}

// --- refreshing -----------------------------------------------------------------------------
async function refresh() {
  try {
    const response = await fetch("/api/status");
    if (response.status === 401) { location.reload(); return; }  // the session is gone
    if (!response.ok) throw new Error(await answer(response));
    const status = await response.json();
    $("unit-name").textContent = status.unit;
    document.title = `blockmirror ${status.unit}`;
    $("uptime").textContent = age(status.uptime_seconds);
    $("version").textContent = status.version;
    const volumes = Array.isArray(status.volumes) ? status.volumes : [];
    syncKeyed($("volumes"), volumes, (v) => String(v.name), createCard, updateCard);
    $("no-volumes").hidden = volumes.length > 0;
    renderEvents();  // a new card gets its volume's open events at once
    $("updated").textContent = `updated ${clock(Date.now() / 1000)}`;
    $("updated").classList.remove("error");
  } catch (e) {
    $("updated").textContent = `could not refresh (${e.message}); retrying`;
    $("updated").classList.add("error");
  }
}

async function loadLag() {
  try {
    const response = await fetch("/api/lag-history");
    lagDoc = response.ok ? await response.json() : null;
  } catch (e) { return; }
  for (const card of $("volumes").children) {
    drawLagGraph(card.parts.graph, card.dataset.volume, lagDoc, card.parts.graph.mode);
    card.parts.graph.drawn = lagDoc;
  }
}

let tick = 0;
async function poll() {
  try {
    await refresh();
    if (tick % 5 === 0) await loadLag();
    if (!streaming || tick % 15 === 0) await loadEvents();
  } finally {
    tick++;
    setTimeout(poll, 2000);
  }
}
"""

# Last, once every part of the script has defined what it shares (a top-level const is not
# there before its line has run).
START_SCRIPT = """
if ($("volumes")) {
  openStream();
  poll();
}
"""
