"""The admin API's history controls: list points, bookmark, restore (docs/history.md).

(Routed with the drill and verify controls by :mod:`.history_routes`.)

Routes (parameters in the query string; the same token as every control):

- ``GET|POST /api/volumes/{volume}/history``: the restorable range and the bookmarks.
- ``POST /api/volumes/{volume}/bookmark?name=NAME``: on a primary, journal a named point; it
  travels to every peer in the record stream.
- ``POST /api/volumes/{volume}/restore?(seq=N|at=TIME|bookmark=NAME)&to=PATH``: write a full
  image of the volume at that point to the new file PATH (on the unit's machine).

``at`` is ISO 8601 (a time without an offset is UTC) or relative to now, like ``-15m``.
Routing and validation are pure (:func:`parse`); refusals are 4xx with ``{"error"}`` and change
nothing.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qsl

from blockmirror.errors import AdminError, SizeError
from blockmirror.history.index import Point, PointError
from blockmirror.history.log import HistoryLog, iso_time

if TYPE_CHECKING:
    from blockmirror.drills import VolumeDrills
from blockmirror.history.restore import restore
from blockmirror.journal.format import MAX_BOOKMARK
from blockmirror.store.base import Store
from blockmirror.units import parse_duration

__all__ = [
    "HistoryControlError",
    "HistoryRequest",
    "handle_history",
    "parse",
    "parse_time",
]

log = logging.getLogger(__name__)

PREFIX = "/api/volumes/"
HistoryAction = Literal["history", "bookmark", "restore"]
_ACTIONS: frozenset[str] = frozenset({"history", "bookmark", "restore"})
_SEQ_RE = re.compile(r"[0-9]{1,20}", re.ASCII)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*", re.ASCII)
Reply = tuple[int, dict[str, Any]]


class HistoryControlError(AdminError):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    volume: str
    action: HistoryAction
    seq: int | None = None
    at_ns: int | None = None
    bookmark: str | None = None
    to: Path | None = None


def parse_time(text: str, *, now_ns: int | None = None) -> int:
    """Nanoseconds since the epoch for ``text``: ISO 8601 (no offset: UTC), or ``-DURATION``
    (``-15m``, ``-1h30m``) before now. Raises ValueError saying what is accepted."""
    now = time.time_ns() if now_ns is None else now_ns
    text = text.strip()
    if text.startswith("-"):
        try:
            return now - int(parse_duration(text[1:], key="time") * 1e9)
        except SizeError as exc:
            raise ValueError(str(exc)) from None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"time {text!r} is neither ISO 8601 (2026-12-02T10:15:00Z) nor relative (-15m)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def route(segments: list[str]) -> tuple[str, HistoryAction] | None:
    """``[volume, action]`` for a history route, else None."""
    if len(segments) == 2 and segments[0] and segments[1] in _ACTIONS:
        action: HistoryAction = segments[1]  # type: ignore[assignment]
        return segments[0], action
    return None


def bad_request(message: str) -> HistoryControlError:
    return _bad(message)


def _bad(message: str) -> HistoryControlError:
    return HistoryControlError(HTTPStatus.BAD_REQUEST, message)


def parse(method: str, volume: str, action: HistoryAction, query: str) -> HistoryRequest:
    """Validate a history request; raises :class:`HistoryControlError`."""
    if action != "history" and method != "POST":
        raise HistoryControlError(HTTPStatus.METHOD_NOT_ALLOWED, f"{action} takes POST")
    if method not in ("GET", "POST"):
        raise HistoryControlError(HTTPStatus.METHOD_NOT_ALLOWED, f"{action} takes GET or POST")
    allowed = {"history": (), "bookmark": ("name",), "restore": ("seq", "at", "bookmark", "to")}
    params = query_params(query, allowed[action])
    if action == "history":
        return HistoryRequest(volume, action)
    if action == "bookmark":
        name = params.get("name", "")
        if not _NAME_RE.fullmatch(name) or len(name) > MAX_BOOKMARK:
            raise _bad(
                f"a bookmark name is 1 to {MAX_BOOKMARK} letters, digits and ._:@+- "
                f"(starting with a letter or digit), not {name!r}"
            )
        return HistoryRequest(volume, action, bookmark=name)
    seq, at_ns, bookmark = point_params(params)
    to = params.get("to")
    if not to or not os.path.isabs(to):
        raise _bad("to must be an absolute path on the unit's machine for the new image")
    path = Path(to)
    if path.exists():
        raise HistoryControlError(
            HTTPStatus.CONFLICT, f"{path} exists; an image is written only to a new file"
        )
    if not path.parent.is_dir():
        raise _bad(f"{path.parent} is not a directory")
    return HistoryRequest(volume, action, seq, at_ns, bookmark, path)


def query_params(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters, each allowed and given once; raises HistoryControlError."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise _bad("the query string is malformed") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise _bad(f"unknown parameter {key!r} (allowed: {', '.join(allowed) or 'none'})")
        if key in params:
            raise _bad(f"parameter {key!r} is given twice")
        params[key] = value
    return params


def point_params(params: dict[str, str]) -> tuple[int | None, int | None, str | None]:
    """(seq, time in ns, bookmark) from ``seq=``, ``at=`` or ``bookmark=``: exactly one."""
    chosen = [k for k in ("seq", "at", "bookmark") if k in params]
    if len(chosen) != 1:
        raise _bad("give exactly one of seq, at or bookmark")
    seq = at_ns = None
    if "seq" in params:
        if not _SEQ_RE.fullmatch(params["seq"]):
            raise _bad(f"seq must be a sequence number, not {params['seq']!r}")
        seq = int(params["seq"])
    if "at" in params:
        try:
            at_ns = parse_time(params["at"])
        except ValueError as exc:
            raise _bad(str(exc)) from None
    return seq, at_ns, params.get("bookmark")


class HistoryVolume(Protocol):
    """What the history controls need of a volume: its history, store, role and journal."""

    @property
    def history_log(self) -> HistoryLog | None: ...

    @property
    def volume_store(self) -> Store: ...

    @property
    def role(self) -> str: ...

    @property
    def drills(self) -> VolumeDrills | None: ...

    async def bookmark(self, name: str) -> int: ...


def point_doc(point: Point) -> dict[str, Any]:
    return {"seq": point.seq, "time": iso_time(point.time_ns), "time_ns": point.time_ns}


def describe(history: HistoryLog) -> dict[str, Any]:
    """The restorable range and the bookmarks (``blockmirror history``)."""
    index = history.index
    doc: dict[str, Any] = dict(history.status())
    oldest = index.oldest()
    doc["oldest"] = point_doc(oldest) if oldest is not None else None
    doc["newest"] = point_doc(index.newest())
    point = index.consistent_point()
    doc["consistent_point"] = point_doc(point) if point is not None else None
    doc["resyncing"] = index.resyncing
    doc["bookmark_list"] = [
        {"name": m.name, "seq": m.seq, "time": iso_time(m.time_ns)}
        for m in sorted(index.bookmarks.values(), key=lambda m: m.pos)
    ]
    return doc


async def handle_history(rt: HistoryVolume, req: HistoryRequest) -> Reply:
    """Carry out a validated history request. Raises :class:`HistoryControlError` for a
    refusal; OSError and BlockmirrorError propagate (a 500)."""
    history = rt.history_log
    if req.action == "bookmark":
        if rt.role != "primary":
            raise HistoryControlError(
                HTTPStatus.CONFLICT,
                f"volume {req.volume!r} is a {rt.role}: bookmark on its primary, and the "
                "bookmark reaches every replica with the records",
            )
        assert req.bookmark is not None
        seq = await rt.bookmark(req.bookmark)
        return HTTPStatus.OK, {"volume": req.volume, "bookmark": req.bookmark, "seq": seq}
    if history is None:
        raise HistoryControlError(
            HTTPStatus.CONFLICT, f"volume {req.volume!r} has no journal, so no history"
        )
    if req.action == "history":
        return HTTPStatus.OK, {"volume": req.volume, **describe(history)}
    assert req.to is not None
    try:
        point = history.find(seq=req.seq, at_ns=req.at_ns, bookmark=req.bookmark)
    except PointError as exc:
        raise HistoryControlError(HTTPStatus.CONFLICT, str(exc)) from None
    try:
        result = await restore(history, rt.volume_store, point, req.to)
    except FileExistsError:
        raise HistoryControlError(
            HTTPStatus.CONFLICT, f"{req.to} exists; an image is written only to a new file"
        ) from None
    return HTTPStatus.OK, {
        "volume": req.volume,
        "to": str(result.path),
        **point_doc(result.point),
        "undone": result.entries,
        "seconds": round(result.seconds, 3),
    }
