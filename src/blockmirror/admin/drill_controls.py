"""The admin API's drill controls (docs/operations.md, "Drills").

Routes (the same token as every control):

- ``POST /api/volumes/{volume}/drill/start?(seq=N|at=TIME|bookmark=NAME)[&writable=1][&name=N]``:
  serve that point as a new NBD export; answers its ``url``.
- ``POST /api/volumes/{volume}/drill/stop[?name=N]``: stop one drill, or every drill of the
  volume; a writable drill's copy-on-write file is deleted.
- ``GET|POST /api/volumes/{volume}/drills``: the volume's drills.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Literal

from blockmirror.admin.history_controls import (
    HistoryControlError,
    HistoryVolume,
    Reply,
    bad_request,
    point_doc,
    point_params,
    query_params,
)
from blockmirror.drills import DrillError
from blockmirror.history.index import PointError

__all__ = ["DrillAction", "drill_route", "handle_drill"]

DrillAction = Literal["start", "stop", "list"]


def drill_route(segments: list[str]) -> tuple[str, DrillAction] | None:
    """``(volume, action)`` for a drill route, else None."""
    match segments:
        case [volume, "drill", "start"] if volume:
            return volume, "start"
        case [volume, "drill", "stop"] if volume:
            return volume, "stop"
        case [volume, "drills"] if volume:
            return volume, "list"
    return None


def _flag(params: dict[str, str], key: str) -> bool:
    value = params.get(key, "0")
    if value not in ("0", "1", "true", "false"):
        raise bad_request(f"parameter {key!r} is 1, true, 0 or false, not {value!r}")
    return value in ("1", "true")


async def handle_drill(
    rt: HistoryVolume, method: str, volume: str, action: DrillAction, query: str
) -> Reply:
    """Validate and carry out a drill request; raises :class:`HistoryControlError`."""
    if action != "list" and method != "POST":
        raise HistoryControlError(HTTPStatus.METHOD_NOT_ALLOWED, f"drill {action} takes POST")
    if method not in ("GET", "POST"):
        raise HistoryControlError(HTTPStatus.METHOD_NOT_ALLOWED, "drills takes GET or POST")
    allowed = {
        "start": ("seq", "at", "bookmark", "writable", "name"),
        "stop": ("name",),
        "list": (),
    }
    params = query_params(query, allowed[action])
    drills, history = rt.drills, rt.history_log
    if drills is None or history is None:
        raise HistoryControlError(
            HTTPStatus.CONFLICT, f"volume {volume!r} has no journal, so no history to drill"
        )
    body: dict[str, Any] = {"volume": volume}
    try:
        if action == "list":
            body["drills"] = drills.status()
        elif action == "stop":
            body["stopped"] = await drills.stop(params.get("name"))
        else:
            seq, at_ns, bookmark = point_params(params)
            writable = _flag(params, "writable")
            try:
                point = history.find(seq=seq, at_ns=at_ns, bookmark=bookmark)
            except PointError as exc:
                raise HistoryControlError(HTTPStatus.CONFLICT, str(exc)) from None
            drill = await drills.start(point, writable=writable, name=params.get("name"))
            body |= drill.status() | point_doc(point)
    except DrillError as exc:
        raise HistoryControlError(HTTPStatus.CONFLICT, str(exc)) from None
    return HTTPStatus.OK, body
