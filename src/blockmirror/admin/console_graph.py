"""The web console's lag graph: JavaScript that draws ``GET /api/lag-history`` as inline SVG.

Part of the page's script (:data:`blockmirror.admin.page.SCRIPT` joins it with
:mod:`.console_script`); kept apart because it is the one piece that does geometry. No
external asset: the unit has no Internet and the page's policy allows only its own script. Peer
addresses reach the SVG only as text nodes and attribute values, never as markup.

The x axis is the last ``span_seconds`` ending at the history's own ``now`` (the unit's clock,
so a browser whose clock is off still draws the right hour); the y axis is lag in seconds, or
in bytes after the toggle, from zero to a round maximum. A line breaks where a peer has no
value (seconds while it tracks in its dirty map) or where samples are missing (a restart).
"""

from __future__ import annotations

__all__ = ["GRAPH_SCRIPT"]

GRAPH_SCRIPT = r"""
const SVG_NS = "http://www.w3.org/2000/svg";
const GRAPH = {w: 600, h: 160, left: 64, right: 10, top: 10, bottom: 24};
// Distinguishable on white and for the common colour blindnesses (Okabe-Ito).
const COLORS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000"];

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  node.append(...children);
  return node;
}

function roundUp(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 5, 10]) if (m * power >= value) return m * power;
  return 10 * power;
}

function roundUpBytes(value) {
  if (!(value > 0)) return 1024;
  const k = Math.min(5, Math.floor(Math.log(value) / Math.log(1024)));
  const unit = Math.pow(1024, k);
  return roundUp(value / unit) * unit;
}

// One polyline per stretch without a gap; a lone point is a dot.
function segments(points, field, gap) {
  const runs = [];
  let run = [];
  let last = null;
  for (const p of points) {
    const value = p[field];
    if (typeof value !== "number" || (last !== null && p[0] - last > gap)) {
      if (run.length) runs.push(run);
      run = [];
    }
    if (typeof value === "number") run.push(p);
    last = p[0];
  }
  if (run.length) runs.push(run);
  return runs;
}

function drawLagGraph(graph, volume, doc, mode) {
  const {node, legend} = graph;
  const field = mode === "bytes" ? 2 : 1;
  const format = mode === "bytes" ? size : age;
  const span = doc && doc.span_seconds > 0 ? doc.span_seconds : 3600;
  const interval = doc && doc.interval_seconds > 0 ? doc.interval_seconds : 10;
  const peers = (doc && doc.volumes && doc.volumes[volume]) || {};
  const addresses = Object.keys(peers).sort();
  const now = doc && typeof doc.now === "number" ? doc.now : 0;
  let max = 0;
  for (const address of addresses) {
    for (const p of peers[address]) {
      if (typeof p[field] === "number" && p[0] >= now - span) max = Math.max(max, p[field]);
    }
  }
  const top = mode === "bytes" ? roundUpBytes(max) : roundUp(max);
  const width = GRAPH.w - GRAPH.left - GRAPH.right;
  const height = GRAPH.h - GRAPH.top - GRAPH.bottom;
  const x = (t) => GRAPH.left + width * (1 - Math.min(span, Math.max(0, now - t)) / span);
  const y = (v) => GRAPH.top + height * (1 - Math.min(v, top) / top);
  const parts = [];
  for (const level of [0, top / 2, top]) {
    parts.push(svg("line", {class: level ? "grid" : "axis", x1: GRAPH.left,
                            x2: GRAPH.w - GRAPH.right, y1: y(level), y2: y(level)}));
    parts.push(svg("text", {class: "tick", x: GRAPH.left - 6, y: y(level) + 4,
                            "text-anchor": "end"}, format(level)));
  }
  const minutes = Math.round(span / 60);
  for (const [t, label, anchor] of [[now - span, `-${minutes} min`, "start"],
                                    [now - span / 2, `-${Math.round(minutes / 2)} min`, "middle"],
                                    [now, "now", "end"]]) {
    parts.push(svg("text", {class: "tick", x: x(t), y: GRAPH.h - 6, "text-anchor": anchor}, label));
  }
  const items = [];
  let drawn = 0;
  addresses.forEach((address, i) => {
    const color = COLORS[i % COLORS.length];
    const group = svg("g", {class: "series", "data-peer": address}, svg("title", {}, address));
    for (const run of segments(peers[address], field, 3 * interval)) {
      drawn += run.length;
      if (run.length === 1) {
        group.append(svg("circle", {class: "dot", cx: x(run[0][0]), cy: y(run[0][field]), r: 2.5,
                                    fill: color}));
      } else {
        const points = run.map((p) => `${x(p[0]).toFixed(1)},${y(p[field]).toFixed(1)}`).join(" ");
        group.append(svg("polyline", {class: "lag-line", points, stroke: color}));
      }
    }
    parts.push(group);
    const newest = peers[address].length ? peers[address][peers[address].length - 1][field] : null;
    const swatch = el("span", {class: "swatch", "aria-hidden": "true"});
    swatch.style.background = color;
    const latest = typeof newest === "number" ? format(newest) : NONE;
    items.push(el("li", {"data-peer": address}, swatch, address,
                  el("span", {class: "muted"}, ` ${latest}`)));
  });
  if (!drawn) {
    const why = doc === undefined ? "loading…" : doc ? "no lag samples yet"
      : "this unit serves no lag history";
    parts.push(svg("text", {class: "empty", x: GRAPH.left + width / 2, y: GRAPH.top + height / 2,
                            "text-anchor": "middle"}, why));
  }
  node.replaceChildren(...parts);
  node.setAttribute("aria-label",
                    `lag in ${mode} of the peers of ${volume} over the last ${minutes} minutes`);
  node.dataset.points = String(drawn);
  legend.replaceChildren(...items);
}

function createLagGraph(vid, volume) {
  const node = svg("svg", {id: `graph-${vid}`, class: "lag-graph", role: "img",
                           viewBox: `0 0 ${GRAPH.w} ${GRAPH.h}`});
  const legend = el("ul", {class: "legend", id: `graph-legend-${vid}`});
  const toggle = el("button", {type: "button", id: `graph-mode-${vid}`, "aria-pressed": "false"},
                    "show bytes");
  const graph = {node, legend, toggle, mode: "seconds", volume,
                 box: el("figure", {class: "graph"},
                         el("figcaption", {}, "Lag, last hour ", toggle), node, legend)};
  toggle.addEventListener("click", () => {
    graph.mode = graph.mode === "seconds" ? "bytes" : "seconds";
    toggle.setAttribute("aria-pressed", String(graph.mode === "bytes"));
    toggle.textContent = graph.mode === "bytes" ? "show seconds" : "show bytes";
    drawLagGraph(graph, volume, lagDoc, graph.mode);
  });
  drawLagGraph(graph, volume, lagDoc, graph.mode);
  graph.drawn = lagDoc;
  return graph;
}
"""
