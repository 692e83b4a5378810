"""``POST /api/volumes/{volume}/peers/{peer}/link?KEY=VALUE...``: change a live link.

The keys, any of them in one request: ``bandwidth`` (a rate as the configuration writes it,
``"10Mbit"``, ``"1544kbit"``, or ``none``), ``compression`` (``zstd`` or ``none``),
``compression_level`` (zstd's 1..19) and ``priority`` (``normal`` or ``background``). Every
value is checked before any is applied: a request with one bad value changes nothing. The link
takes them at once, with no reconnect, and keeps them until the next reload or restart, which
apply the file's values again: write them in the file to keep them. Answers the peer's status.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs

from blockmirror.admin.http import path_segments
from blockmirror.errors import SizeError
from blockmirror.link.compression import LEVELS, Codec
from blockmirror.link.settings import LinkSettings, Priority
from blockmirror.units import parse_rate

__all__ = ["LinkedVolume", "handle_link_path"]

PREFIX = "/api/volumes/"
_KEYS = ("bandwidth", "compression", "compression_level", "priority")
Reply = tuple[int, dict[str, Any]]


class LinkSender(Protocol):
    @property
    def consumer_name(self) -> str: ...

    @property
    def settings(self) -> LinkSettings: ...

    def set_rate(self, bits_per_second: int | None) -> None: ...

    def set_compression(self, codec: Codec, level: int) -> None: ...

    def set_priority(self, priority: Priority) -> None: ...

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
    unknown = sorted(set(params) - set(_KEYS))
    if unknown or not params:
        return HTTPStatus.BAD_REQUEST, {
            "error": f"give one or more of {', '.join(k + '=' for k in _KEYS)}; "
            f"unknown: {', '.join(unknown) or 'nothing'}"
        }
    values = {key: texts[-1].strip() for key, texts in params.items()}
    try:
        change = _parse(values)
    except ValueError as exc:
        return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
    try:
        rt = runtime(volume)
    except KeyError:
        return HTTPStatus.NOT_FOUND, {"error": f"no volume named {volume!r}"}
    for sender in rt.senders:
        if sender.consumer_name == peer:
            _apply(sender, change)
            return HTTPStatus.OK, dict(sender.status())
    return HTTPStatus.NOT_FOUND, {"error": f"volume {volume} has no peer {peer!r}"}


def _parse(values: dict[str, str]) -> dict[str, Any]:
    """The typed values of a request; ValueError names the first bad one."""
    out: dict[str, Any] = {}
    if "bandwidth" in values:
        text = values["bandwidth"]
        try:
            out["bandwidth"] = None if text.lower() == "none" else parse_rate(text)
        except SizeError as exc:
            raise ValueError(str(exc)) from None
    if "compression" in values:
        try:
            out["compression"] = Codec(values["compression"].lower())
        except ValueError:
            raise ValueError(
                f"invalid compression {values['compression']!r}: zstd or none"
            ) from None
    if "compression_level" in values:
        text = values["compression_level"]
        if not text.isdigit() or int(text) not in LEVELS:
            raise ValueError(
                f"invalid compression_level {text!r}: {LEVELS.start}..{LEVELS.stop - 1}"
            )
        out["compression_level"] = int(text)
    if "priority" in values:
        try:
            out["priority"] = Priority(values["priority"].lower())
        except ValueError:
            raise ValueError(
                f"invalid priority {values['priority']!r}: normal or background"
            ) from None
    return out


def _apply(sender: LinkSender, change: dict[str, Any]) -> None:
    if "bandwidth" in change:
        sender.set_rate(change["bandwidth"])
    if "compression" in change or "compression_level" in change:
        current = sender.settings
        sender.set_compression(
            change.get("compression", current.compression),
            change.get("compression_level", current.compression_level),
        )
    if "priority" in change:
        sender.set_priority(change["priority"])
