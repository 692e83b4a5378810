"""``POST /api/volumes/{volume}/peers/{peer}/link?bandwidth=RATE``: change a live link.

``bandwidth`` is a rate as the configuration writes it (``"10Mbit"``, ``"1544kbit"``) or
``none``; the link's limit changes at once, with no reconnect. The change lasts until the next
reload or restart, which apply the file's value again: write it in the file to keep it.
Answers the peer's status. More link settings join ``bandwidth`` here (compression, priority:
issue 13).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs

from blockmirror.admin.http import path_segments
from blockmirror.errors import SizeError
from blockmirror.units import parse_rate

__all__ = ["LinkedVolume", "handle_link_path"]

PREFIX = "/api/volumes/"
_KEYS = frozenset({"bandwidth"})
Reply = tuple[int, dict[str, Any]]


class LinkSender(Protocol):
    @property
    def consumer_name(self) -> str: ...

    def set_rate(self, bits_per_second: int | None) -> None: ...

    def status(self) -> dict[str, object]: ...


class LinkedVolume(Protocol):
    @property
    def senders(self) -> Sequence[LinkSender]: ...


async def handle_link_path(
    runtime: Callable[[str], LinkedVolume], method: str, path: str, query: str
) -> Reply | None:
    """Answer ``path`` if it is a link route (None if it is not)."""
    match path_segments(path, PREFIX):
        case [volume, "peers", peer, "link"] if volume and peer:
            pass
        case _:
            return None
    if method != "POST":
        return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} takes POST"}
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        return HTTPStatus.BAD_REQUEST, {"error": "the query string is malformed"}
    unknown = sorted(set(params) - _KEYS)
    if unknown or not params:
        return HTTPStatus.BAD_REQUEST, {
            "error": f"give bandwidth=RATE (or none); unknown: {', '.join(unknown) or 'nothing'}"
        }
    text = params["bandwidth"][-1].strip()
    try:
        bits = None if text.lower() == "none" else parse_rate(text)
    except SizeError as exc:
        return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
    try:
        rt = runtime(volume)
    except KeyError:
        return HTTPStatus.NOT_FOUND, {"error": f"no volume named {volume!r}"}
    for sender in rt.senders:
        if sender.consumer_name == peer:
            sender.set_rate(bits)
            return HTTPStatus.OK, dict(sender.status())
    return HTTPStatus.NOT_FOUND, {"error": f"volume {volume} has no peer {peer!r}"}
