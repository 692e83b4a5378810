"""The admin web page: the status JSON rendered as a table that refreshes itself."""

from __future__ import annotations

import html
from typing import Any

from blockmirror.admin.table import status_rows


def render_page(status: dict[str, Any]) -> str:
    headers, rows = status_rows(status)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    title = f"blockmirror {html.escape(str(status.get('unit', '')))}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
</style></head>
<body><h1>{title}</h1>
<p>version {html.escape(str(status.get("version", "")))} &middot;
up {float(status.get("uptime_seconds", 0)):.0f} s &middot;
<a href="/api/status">/api/status</a> (JSON)</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
</body></html>
"""
