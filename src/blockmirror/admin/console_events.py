"""The web console's events: JavaScript for the active and recent events of ``GET /api/events``.

Part of the page's script (:data:`blockmirror.admin.page.SCRIPT`). The list is read once with
``GET /api/events`` (``{"events": [...], "active": [...]}``, oldest first, each an
:meth:`blockmirror.events.Event.to_json`), then kept up to date from the event stream the same
path serves to ``Accept: text/event-stream`` (``EventSource``: it reconnects by itself and
sends ``Last-Event-ID``). While the stream is down, the console's poll reads the list every
two seconds; while it is up, every thirty, which also puts right whatever a reconnect missed.
An event is keyed by its ``id``; the open episodes (``active``) by event name, volume and peer,
so a clear removes its raise. The events of a volume also show on its card.
"""

from __future__ import annotations

__all__ = ["EVENTS_SCRIPT"]

EVENTS_SCRIPT = r"""
const events = new Map();
let active = new Map();
let fresh = [];  // what the stream brought while a GET of the list was under way
let streaming = false;
const eventKey = (ev) => JSON.stringify([ev.event, ev.volume, ev.peer]);
const subject = (ev) => (ev.volume == null ? "unit"
  : ev.peer ? `${ev.volume} → ${ev.peer}` : ev.volume);

function applyEvent(ev) {
  if (ev.state === "raised") active.set(eventKey(ev), ev); else active.delete(eventKey(ev));
}

function eventItem(ev) {
  return el("li", {class: "event", "data-state": ev.state, "data-event": ev.event},
    el("time", {datetime: new Date(ev.time * 1000).toISOString()}, clock(ev.time)), " ",
    el("span", {class: "badge"}, ev.state), " ", el("strong", {}, ev.event), ` ${subject(ev)}: `,
    ev.message);
}

function renderEvents() {
  const newest = Array.from(events.values()).sort((a, b) => b.id - a.id);
  for (const old of newest.slice(500)) events.delete(old.id);
  syncKeyed($("events"), newest.slice(0, 100), (ev) => String(ev.id), eventItem, () => {});
  const open = Array.from(active.values()).sort((a, b) => a.id - b.id);
  syncKeyed($("active-events"), open, eventKey, eventItem, () => {});
  $("no-active-events").hidden = open.length > 0;
  for (const card of $("volumes").children) {
    const mine = open.filter((ev) => ev.volume === card.dataset.volume);
    syncKeyed(card.parts.alerts, mine, eventKey, eventItem, () => {});
  }
}

async function loadEvents() {
  fresh = [];
  try {
    const response = await fetch("/api/events", {headers: {Accept: "application/json"}});
    if (!response.ok) {
      $("events-note").textContent = `events: ${await answer(response)}`;
      return;
    }
    const doc = await response.json();
    const list = Array.isArray(doc.events) ? doc.events : [];
    const top = list.reduce((m, ev) => Math.max(m, ev.id), 0);
    const newer = fresh.filter((ev) => ev.id > top);
    events.clear();
    for (const ev of list) events.set(ev.id, ev);
    active = new Map((Array.isArray(doc.active) ? doc.active : []).map((ev) => [eventKey(ev), ev]));
    for (const ev of newer) { events.set(ev.id, ev); applyEvent(ev); }
    $("events-note").textContent = streaming ? "live" : "polled every 2 s";
    renderEvents();
  } catch (e) { /* the status poll says the unit is unreachable */ }
}

function openStream() {
  if (!window.EventSource) return;
  const source = new EventSource("/api/events");
  source.onopen = () => { streaming = true; $("events-note").textContent = "live"; };
  source.onerror = () => { streaming = false; };  // it retries by itself; polling covers the gap
  source.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    if (!ev || typeof ev.id !== "number" || events.has(ev.id)) return;
    events.set(ev.id, ev);
    fresh.push(ev);
    applyEvent(ev);
    renderEvents();
  };
}
"""
