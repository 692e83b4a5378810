"""The status table shared by ``blockmirror status``, the demo and the web page."""

from __future__ import annotations

from typing import Any

from blockmirror.units import human_size

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


JOURNAL_HEADERS = (
    "journal",
    "used",
    "capacity",
    "fill",
    "records",
    "oldest",
    "newest seq",
    "enqueue",
)
CONSUMER_HEADERS = ("consumer", "volume", "mode", "paused", "backlog", "records", "dirty")


def human_age(seconds: float) -> str:
    """A short age for tables: "0.4 s", "12 s", "3 min", "2.5 h"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def journal_rows(status: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """One row per volume with a journal: fill, records, age of the oldest, enqueueing."""
    rows = []
    for vol in status.get("volumes", []):
        j = vol.get("journal")
        if not isinstance(j, dict):
            continue
        used, capacity = _int(j.get("used")), _int(j.get("capacity"))
        records = _int(j.get("records"))
        rows.append(
            [
                str(vol.get("name", "")),
                human_size(used),
                human_size(capacity),
                f"{used / capacity:.0%}" if capacity else "-",
                str(records),
                human_age(float(j.get("oldest_age_seconds") or 0)) if records else "-",
                str(j.get("newest_seq", "-")),
                "paused" if j.get("enqueue_paused") else "on",
            ]
        )
    return JOURNAL_HEADERS, rows


def consumer_rows(status: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """One row per consumer of every journal: mode, pause, backlog and dirty bytes."""
    rows = []
    for vol in status.get("volumes", []):
        j = vol.get("journal")
        consumers = j.get("consumers") if isinstance(j, dict) else None
        if not isinstance(consumers, dict):
            continue
        for name, c in consumers.items():
            if not isinstance(c, dict):
                continue
            rows.append(
                [
                    str(name),
                    str(vol.get("name", "")),
                    str(c.get("mode", "?")),
                    "yes" if c.get("paused") else "no",
                    human_size(_int(c.get("backlog_bytes"))),
                    str(_int(c.get("backlog_records"))),
                    human_size(_int(c.get("dirty_bytes"))),
                ]
            )
    return CONSUMER_HEADERS, rows


PEER_HEADERS = ("peer", "volume", "state", "acked seq", "lag", "lag s", "sent", "rate/s", "error")
REPLICA_HEADERS = ("replica", "source", "state", "received", "applied", "bytes in", "connected")


def peer_rows(status: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """One row per replication peer of every volume: what a sender knows about its link."""
    rows = []
    for vol in status.get("volumes", []):
        for p in vol.get("peers") or []:
            lag_s = p.get("lag_seconds")
            rows.append(
                [
                    str(p.get("address", "?")),
                    str(vol.get("name", "")),
                    str(p.get("state", "?")),
                    str(_int(p.get("acked_seq"))),
                    human_size(_int(p.get("lag_bytes"))),
                    "-" if lag_s is None else f"{float(lag_s):.1f}",
                    human_size(_int(p.get("bytes_sent"))),
                    human_size(_int(p.get("throughput_bytes_per_second"))),
                    str(p.get("last_error") or "")[:40],
                ]
            )
    return PEER_HEADERS, rows


def replica_rows(status: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """One row per replica this unit holds: its source and whether it is consistent."""
    rows = []
    for vol in status.get("volumes", []):
        r = vol.get("replica")
        if not isinstance(r, dict):
            continue
        rows.append(
            [
                str(vol.get("name", "")),
                str(r.get("source_unit") or "-"),
                "consistent" if r.get("consistent") else "INCONSISTENT",
                str(_int(r.get("received_seq"))),
                str(_int(r.get("applied_seq"))),
                human_size(_int(r.get("bytes_received"))),
                "yes" if r.get("connected") else "no",
            ]
        )
    return REPLICA_HEADERS, rows


def history_rows(status: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """One row per volume keeping history, or with a consistent point a resync holds on to."""
    headers = ("history", "oldest point", "newest point", "space", "consistent point")
    rows: list[list[str]] = []
    for vol in status.get("volumes", []):
        h = vol.get("history") or {}
        point = vol.get("consistent_point")
        if not h.get("enabled") and not h.get("failed") and not point:
            continue
        oldest = f"seq {h.get('oldest_seq')} {h.get('oldest_time') or ''}".strip()
        newest = f"seq {h.get('newest_seq')} {h.get('newest_time') or ''}".strip()
        space = human_size(_int(h.get("bytes"))) + (
            " (cap shortens it)" if h.get("shortened") else ""
        )
        shown = f"seq {point.get('seq')} {point.get('time') or ''}".strip() if point else "-"
        if h.get("failed"):
            oldest, newest = "FAILED", str(h["failed"])
        rows.append([str(vol.get("name", "?")), oldest, newest, space, shown])
    return headers, rows


def _table(headers: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _nbd_line(nbd: Any) -> str | None:
    """The unit-wide NBD limits and their use, in one line."""
    if not isinstance(nbd, dict):
        return None
    line = (
        f"nbd: {_int(nbd.get('connections'))}/{_int(nbd.get('max_connections'))} connections, "
        f"{human_size(_int(nbd.get('reply_bytes_in_flight')))}"
        f"/{human_size(_int(nbd.get('reply_budget')))} reply bytes in flight"
    )
    refused = _int(nbd.get("refused_connections"))
    return f"{line}, {refused} refused" if refused else line


ARCHIVE_HEADERS = ("archive", "volume", "state", "last seq", "lag s", "uploaded", "gaps", "reason")


def archive_rows(status: dict[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """One row per archive of every volume (docs/archive.md)."""
    rows = []
    for vol in status.get("volumes", []):
        for a in vol.get("archives") or []:
            rows.append(
                [
                    str(a.get("archive", "?")),
                    str(vol.get("name", "")),
                    str(a.get("state", "?")),
                    str(_int(a.get("last_seq"))),
                    f"{float(a.get('lag_seconds') or 0):.1f}",
                    human_size(_int(a.get("bytes_uploaded"))),
                    str(len(a.get("gaps") or [])),
                    str(a.get("reason") or "")[:50],
                ]
            )
    return ARCHIVE_HEADERS, rows


def format_status_table(status: dict[str, Any]) -> str:
    """The volume table; under it journals, consumers, peers, replicas and any problem."""
    headers, rows = status_rows(status)
    title = f"unit {status.get('unit', '?')}  (blockmirror {status.get('version', '?')})"
    lines = [title, *_table(headers, rows)]
    if not rows:
        lines.append("(no volumes)")
    nbd_line = _nbd_line(status.get("nbd"))
    if nbd_line:
        lines += ["", nbd_line]
    jheaders, jrows = journal_rows(status)
    if jrows:
        lines += ["", *_table(jheaders, jrows)]
    cheaders, crows = consumer_rows(status)
    if crows:
        lines += ["", *_table(cheaders, crows)]
    for table_rows in (
        peer_rows(status),
        archive_rows(status),
        replica_rows(status),
        history_rows(status),
    ):
        theaders, trows = table_rows
        if trows:
            lines += ["", *_table(theaders, trows)]
    problems = status_problems(status, degraded=False)
    if problems:
        lines += ["", "problems:", *(f"  {p}" for p in problems)]
    return "\n".join(lines)


def status_problems(status: dict[str, Any], *, degraded: bool = True) -> list[str]:
    """What needs an operator, one line each: volumes not served, split brains and, with
    ``degraded``, also volumes stalled or failed, peers not replicating a consistent replica,
    replicas not consistent and histories given up (``blockmirror status -x``)."""
    problems: list[str] = []
    if status.get("config_lost"):
        problems.append(
            f"configuration lost: {status['config_lost']} (serving nothing; restore it with "
            "`blockmirror config fetch` and reload)"
        )
    for vol in status.get("volumes", []):
        name = vol.get("name", "?")
        if vol.get("problem"):
            problems.append(f"{name}: {vol['problem']}")
        # A split brain is a problem an operator must resolve: it is never left to the JSON.
        problems += [
            f"{name}: split brain with {split.get('peer')} since seq "
            f"{split.get('common_seq')} (run `blockmirror resolve {name} "
            "--discard-local` on the unit that gives up its writes)"
            for split in vol.get("split_brain") or []
        ]
        if not degraded:
            continue
        state = vol.get("state")
        if state not in ("serving", "replica") and not vol.get("problem"):
            problems.append(f"{name}: {state}")
        for peer in vol.get("peers") or []:
            if peer.get("state") != "replicating" or not peer.get("consistent"):
                why = peer.get("last_error") or peer.get("reason") or ""
                problems.append(
                    f"{name} -> {peer.get('address')}: {peer.get('state')}"
                    + ("" if peer.get("consistent") else ", replica not consistent")
                    + (f" ({why})" if why else "")
                )
        replica = vol.get("replica")
        if replica and not replica.get("consistent"):
            problems.append(f"{name}: replica not consistent (a copy or resync runs)")
        for archive in vol.get("archives") or []:
            if archive.get("state") != "archiving" or archive.get("gaps"):
                problems.append(
                    f"{name} -> archive {archive.get('archive')}: {archive.get('state')}"
                    + (f" ({archive['reason']})" if archive.get("reason") else "")
                    + (f", {len(archive['gaps'])} gaps" if archive.get("gaps") else "")
                )
        history = vol.get("history") or {}
        if history.get("failed"):
            problems.append(f"{name}: history given up: {history['failed']}")
    return problems
