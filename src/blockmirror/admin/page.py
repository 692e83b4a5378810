"""The admin web page: the status JSON rendered as a table that refreshes itself.

Without a session (and without ``admin_public_status``) the page is only a sign-in form: the
operator pastes the admin token, the script trades it for a session cookie at
``POST /api/session`` and reloads. A signed-in page carries the session's CSRF token in a
``<meta>`` tag; its buttons (journal pause and resume, sign out) send it in ``X-CSRF-Token``.
The script is served from ``/admin.js`` so that the page's policy can forbid inline scripts.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote

from blockmirror.admin.table import status_rows

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
form, .actions { margin-top: 1.5em; }
#message { color: #a00; }
</style>"""

SCRIPT = """"use strict";
const meta = document.querySelector('meta[name="csrf-token"]');
const csrf = meta ? meta.content : "";
const message = document.getElementById("message");
async function answer(response) {
  try { return (await response.json()).error || response.statusText; }
  catch (e) { return response.statusText; }
}
const form = document.getElementById("signin");
if (form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value.trim();
    const response = await fetch("/api/session", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({token: token}),
    });
    if (response.ok) { location.reload(); } else { message.textContent = await answer(response); }
  });
}
for (const button of document.querySelectorAll("button[data-path]")) {
  button.addEventListener("click", async () => {
    const response = await fetch(button.dataset.path, {
      method: button.dataset.method || "POST",
      headers: {"X-CSRF-Token": csrf},
    });
    if (response.ok) { location.reload(); } else { message.textContent = await answer(response); }
  });
}
if (document.body.dataset.refresh) {
  setInterval(() => {
    const token = document.getElementById("token");
    if (!token || (!token.value && document.activeElement !== token)) { location.reload(); }
  }, 2000);
}
"""

_SIGN_IN_FORM = """<form id="signin"><label>Admin token
<input id="token" type="password" autocomplete="off" size="50"></label>
<button type="submit">Sign in</button></form>
<p><small>The token is in the unit's <code>admin_token_file</code>, or in
<code>STATE_DIR/admin.token</code>.</small></p>"""


def _document(title: str, body: str, *, csrf: str | None = None, refresh: bool = False) -> str:
    meta = f'<meta name="csrf-token" content="{html.escape(csrf)}">' if csrf else ""
    data = ' data-refresh="1"' if refresh else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{meta}
<title>{title}</title>
{_STYLE}</head>
<body{data}><h1>{title}</h1>
{body}
<p id="message" role="status"></p>
<script src="/admin.js"></script>
</body></html>
"""


def render_sign_in() -> str:
    """The page for a visitor without a session: a sign-in form, and nothing of the unit."""
    return _document("blockmirror", _SIGN_IN_FORM)


def _actions(status: dict[str, Any]) -> str:
    buttons: list[str] = []
    for vol in status.get("volumes", []):
        journal = vol.get("journal") if isinstance(vol, dict) else None
        if not isinstance(journal, dict) or vol.get("role") != "primary":
            continue
        name = str(vol.get("name", ""))
        paused = bool(journal.get("enqueue_paused"))
        action = "resume" if paused else "pause"
        path = f"/api/volumes/{quote(name, safe='')}/journal/{action}"
        buttons.append(
            f'<button data-path="{html.escape(path)}">{action} journal of '
            f"{html.escape(name)}</button>"
        )
    buttons.append('<button data-path="/api/session" data-method="DELETE">sign out</button>')
    return f'<div class="actions">{" ".join(buttons)}</div>'


def render_page(status: dict[str, Any], *, csrf: str | None = None) -> str:
    """The status table; with a session's ``csrf`` token, its actions, else a sign-in form."""
    headers, rows = status_rows(status)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    title = f"blockmirror {html.escape(str(status.get('unit', '')))}"
    content = f"""<p>version {html.escape(str(status.get("version", "")))} &middot;
up {float(status.get("uptime_seconds", 0)):.0f} s &middot;
<a href="/api/status">/api/status</a> (JSON)</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{_actions(status) if csrf else _SIGN_IN_FORM}"""
    return _document(title, content, csrf=csrf, refresh=True)
