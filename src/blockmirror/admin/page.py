"""The admin web page at ``/``: the web console, or only a sign-in form.

Without a session (and without ``admin_public_status``) the page is only a sign-in form: the
operator pastes the admin token, the script trades it for a session cookie at
``POST /api/session`` and reloads. A signed-in page carries the session's CSRF token in a
``<meta>`` tag, which the script sends in ``X-CSRF-Token`` with every control.

The console itself is a frame that the script (:data:`SCRIPT`, served from ``/admin.js`` so
that the page's policy can forbid inline scripts) fills and refreshes from the admin API: one
card per volume (:mod:`.console_script`) with its lag graph (:mod:`.console_graph`), and the
events (:mod:`.console_events`). What the server renders from the status here is the unit's
name and version, and, for a browser without JavaScript, the status table inside
``<noscript>``, refreshed by a ``<meta>`` every five seconds. Everything taken from the status
is HTML-escaped.

Stable ids (the tests and the operator's own scripts use them): ``#signin``, ``#token``,
``#volumes``, ``#message``, ``#updated``, ``#uptime``, ``#version``, ``#log-download``,
``#sign-out``, ``#events``, ``#active-events``, ``#confirm`` with ``#confirm-text``,
``#confirm-force``, ``#confirm-ok`` and ``#confirm-cancel``, ``#footer``; the script's ids per
volume and peer are described in :mod:`.console_script`.
"""

from __future__ import annotations

import html
from typing import Any

from blockmirror.admin.console_events import EVENTS_SCRIPT
from blockmirror.admin.console_graph import GRAPH_SCRIPT
from blockmirror.admin.console_script import CONSOLE_SCRIPT, START_SCRIPT
from blockmirror.admin.table import status_rows

__all__ = ["COPYRIGHT", "SCRIPT", "render_page", "render_sign_in"]

COPYRIGHT = "© 2026 the blockmirror authors"
SCRIPT = CONSOLE_SCRIPT + EVENTS_SCRIPT + GRAPH_SCRIPT + START_SCRIPT

_STYLE = """<style>
:root { --line: #d8d8d8; --muted: #666; --bad: #b00020; --warn: #8a5a00; --good: #1b6e20; }
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 1em 2em; color: #222;
  max-width: 78em; }
header.top { display: flex; flex-wrap: wrap; align-items: baseline; gap: .4em 1.5em; }
header.top h1 { margin: 0; }
nav { display: flex; flex-wrap: wrap; gap: .4em 1em; align-items: baseline; }
.muted, small { color: var(--muted); }
#message { min-height: 1.4em; }
#message.error, #updated.error, .problem { color: var(--bad); }
.volume { border: 1px solid var(--line); border-radius: 6px; padding: .2em 1em 1em;
  margin: 1em 0; }
.volume h2 { font-size: 1.25em; }
.badge { display: inline-block; font-size: .75em; font-weight: normal; padding: .1em .5em;
  border-radius: .8em; background: #eee; vertical-align: middle; }
.badge.state[data-state="failed"], .badge.state[data-state="stalled"] { background: #fdd; }
.badge.state[data-state="serving"], .badge.state[data-state="replica"] { background: #dfd; }
meter { width: 14em; height: 1.1em; vertical-align: middle; }
.controls { display: flex; flex-wrap: wrap; gap: .5em; margin: .5em 0; }
button { font: inherit; padding: .2em .8em; cursor: pointer; }
table { border-collapse: collapse; margin: .6em 0; }
caption { text-align: left; font-weight: bold; padding-bottom: .2em; }
th, td { padding: .25em .6em; border-bottom: 1px solid var(--line); text-align: right;
  white-space: nowrap; }
td.error { white-space: normal; }
th:first-child, td:first-child, td.state, td.mode, td.link, td.error { text-align: left; }
td.state[data-state="replicating"] { color: var(--good); }
td.state[data-state="paused"], td.state[data-state="tracking"],
td.state[data-state="syncing"] { color: var(--warn); }
td.state[data-state="connecting"], td.state[data-state="split-brain"] { color: var(--bad); }
.graph { margin: .6em 0; }
.graph figcaption { font-weight: bold; }
.graph figcaption button { font-size: .8em; font-weight: normal; margin-left: 1em; }
.lag-graph { width: 100%; max-width: 46em; height: auto; display: block;
  border: 1px solid var(--line); }
.lag-graph .axis { stroke: #888; } .lag-graph .grid { stroke: #e4e4e4; }
.lag-graph .tick, .lag-graph .empty { font-size: 11px; fill: var(--muted); }
.lag-graph .lag-line { fill: none; stroke-width: 1.6; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .2em 1.5em; }
.swatch { display: inline-block; width: .9em; height: .9em; margin-right: .4em;
  vertical-align: middle; }
ul.alerts, #active-events { padding-left: 1.2em; }
#events { list-style: none; padding-left: 0; }
ul.alerts { color: var(--bad); }
.event[data-state="raised"] .badge { background: #fdd; }
.event[data-state="cleared"] .badge { background: #dfd; }
dialog { max-width: 32em; border: 1px solid #888; border-radius: 6px; }
dialog::backdrop { background: rgba(0, 0, 0, .35); }
.dialog-buttons { display: flex; justify-content: flex-end; gap: .8em; }
footer { margin-top: 2em; padding-top: .5em; border-top: 1px solid var(--line);
  color: var(--muted); font-size: .9em; }
</style>"""

_SIGN_IN_FORM = """<form id="signin"><label>Admin token
<input id="token" type="password" autocomplete="off" size="50"></label>
<button type="submit">Sign in</button></form>
<p><small>The token is in the unit's <code>admin_token_file</code>, or in
<code>STATE_DIR/admin.token</code>.</small></p>"""

_DIALOG = """<dialog id="confirm" aria-labelledby="confirm-title" aria-describedby="confirm-text">
<h2 id="confirm-title">Please confirm</h2>
<p id="confirm-text"></p>
<p id="confirm-force-row" hidden><label><input type="checkbox" id="confirm-force">
force: promote even if the replica is not consistent and has no consistent point</label></p>
<p id="confirm-rate-row" hidden><label for="confirm-rate">bandwidth limit</label>
<input id="confirm-rate" size="12" placeholder="10Mbit or none" autocomplete="off"></p>
<div class="dialog-buttons"><button type="button" id="confirm-cancel">Cancel</button>
<button type="button" id="confirm-ok">Confirm</button></div>
</dialog>"""

_EVENTS = """<section id="events-panel" aria-labelledby="events-title">
<h2 id="events-title">Events <small id="events-note"></small></h2>
<h3>Active</h3><ul id="active-events"></ul><p id="no-active-events" class="muted">None.</p>
<h3>Recent</h3><ol id="events" reversed></ol>
</section>"""


def _document(title: str, body: str, *, csrf: str | None = None, head: str = "") -> str:
    meta = f'<meta name="csrf-token" content="{html.escape(csrf)}">' if csrf else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{meta}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>{head}
{_STYLE}</head>
<body>
{body}
<script src="/admin.js"></script>
</body></html>
"""


def render_sign_in() -> str:
    """The page for a visitor without a session: a sign-in form, and nothing of the unit."""
    body = f"""<header class="top"><h1>blockmirror</h1></header>
{_SIGN_IN_FORM}
<p id="message" role="status" aria-live="polite"></p>
<footer id="footer">{COPYRIGHT}</footer>"""
    return _document("blockmirror", body)


def _noscript_table(status: dict[str, Any]) -> str:
    headers, rows = status_rows(status)
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"""<noscript><p>The console needs JavaScript. Without it, this table of the volumes
refreshes every five seconds.</p>
<table id="status-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></noscript>"""


def render_page(status: dict[str, Any], *, csrf: str | None = None) -> str:
    """The console; with a session's ``csrf`` token its controls, else a sign-in form (a
    visitor reads it without one only with ``admin_public_status``)."""
    unit = html.escape(str(status.get("unit", "")))
    version = html.escape(str(status.get("version", "")))
    uptime = float(status.get("uptime_seconds", 0) or 0)
    if csrf:
        # Reading the log needs a session: it says more about the unit than its status does.
        session = """<a id="log-download" href="/api/log" download>download the log</a>
<button type="button" id="sign-out" data-path="/api/session"
data-method="DELETE">sign out</button>"""
    else:
        session = ""
    body = f"""<header class="top"><h1>blockmirror <span id="unit-name">{unit}</span></h1>
<p>up <span id="uptime">{uptime:.0f} s</span> &middot;
<span id="updated">loading&hellip;</span></p>
<nav aria-label="unit"><a id="status-json" href="/api/status">status (JSON)</a>
<a id="metrics-link" href="/metrics">metrics</a>
{session}</nav></header>
{"" if csrf else _SIGN_IN_FORM}
<p id="message" role="status" aria-live="polite"></p>
<main>
<div id="volumes"></div>
<p id="no-volumes" class="muted" hidden>This unit holds no volumes.</p>
{_noscript_table(status)}
{_EVENTS}
</main>
{_DIALOG}
<footer id="footer">blockmirror <span id="version">{version}</span> &middot; {COPYRIGHT}</footer>"""
    refresh = '\n<noscript><meta http-equiv="refresh" content="5"></noscript>'
    return _document(f"blockmirror {unit}", body, csrf=csrf, head=refresh)
