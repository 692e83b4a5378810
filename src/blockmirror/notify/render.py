"""What an event says in words: the fields every target carries, times as ISO 8601 UTC.

One place, so that a mail, a trap and a webhook call describe an event the same way.
"""

from __future__ import annotations

import datetime

from blockmirror.events import Event

__all__ = ["fields", "iso_time", "mail_body", "mail_subject"]


def iso_time(seconds: float) -> str:
    """``2026-03-01T12:00:00.250Z``: wall-clock seconds since the epoch, in UTC."""
    when = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fields(event: Event, version: str) -> list[tuple[str, str]]:
    """Every field of ``event``, labelled, in the order a reader wants them."""
    return [
        ("event", str(event.name)),
        ("state", str(event.state)),
        ("unit", event.unit),
        ("volume", event.subject.volume or "-"),
        ("peer", event.subject.peer or "-"),
        ("message", event.message),
        ("time", iso_time(event.time)),
        ("since", iso_time(event.since)),
        ("event id", str(event.id)),
        ("version", f"blockmirror {version}"),
    ]


def mail_subject(event: Event) -> str:
    """``[blockmirror site-a] link-down raised: db → site-b:7800``."""
    return f"[blockmirror {event.unit}] {event.name} {event.state}: {event.subject}"


def mail_body(event: Event, version: str) -> str:
    rows = fields(event, version)
    width = max(len(label) for label, _ in rows) + 1
    lines = [f"{event.name} {event.state} on unit {event.unit}: {event.subject}", ""]
    lines += [f"{label + ':':<{width}} {value}" for label, value in rows]
    lines += ["", "This message was sent by blockmirror's alerts ([alerts] email)."]
    return "\n".join(lines) + "\n"
