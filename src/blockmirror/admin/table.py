"""The status table shared by ``blockmirror status``, the demo and the web page."""

from __future__ import annotations

from typing import Any


def human_size(n: int) -> str:
    """An approximate, readable size for tables and progress lines ("733.2 MiB")."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


HEADERS = (
    "volume",
    "role",
    "state",
    "size",
    "export",
    "reads",
    "writes",
    "read",
    "written",
    "flushes",
    "errors",
    "conns",
)


def status_rows(status: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    rows = []
    for vol in status.get("volumes", []):
        c = vol.get("counters", {})
        rows.append(
            [
                str(vol.get("name", "")),
                str(vol.get("role", "")),
                str(vol.get("state", "")),
                human_size(int(vol.get("size", 0))),
                str(vol.get("export") or "-"),
                str(c.get("reads", 0)),
                str(c.get("writes", 0)),
                human_size(int(c.get("bytes_read", 0))),
                human_size(int(c.get("bytes_written", 0))),
                str(c.get("flushes", 0)),
                str(c.get("errors", 0)),
                str(c.get("connections", 0)),
            ]
        )
    return HEADERS, rows


def format_status_table(status: dict[str, Any]) -> str:
    headers, rows = status_rows(status)
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    title = f"unit {status.get('unit', '?')}  (blockmirror {status.get('version', '?')})"
    lines = [title, line(headers)]
    lines += [line(row) for row in rows]
    if not rows:
        lines.append("(no volumes)")
    return "\n".join(lines)
