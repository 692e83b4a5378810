"""Routing of the history and drill controls (:mod:`.history_controls`, :mod:`.drill_controls`)
ahead of the other controls: a request for one of their paths is answered here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

from blockmirror.admin.drill_controls import drill_route, handle_drill
from blockmirror.admin.history_controls import (
    PREFIX,
    HistoryControlError,
    HistoryVolume,
    Reply,
    handle_history,
    parse,
    route,
)
from blockmirror.admin.http import path_segments
from blockmirror.admin.verify_controls import VerifiedVolume, handle_verify, is_verify_route
from blockmirror.errors import BlockmirrorError

__all__ = ["RoutedVolume", "handle_path"]


class RoutedVolume(HistoryVolume, VerifiedVolume, Protocol):
    """What these routes need of a volume."""


log = logging.getLogger(__name__)


async def handle_path(
    runtime: Callable[[str], RoutedVolume], method: str, path: str, query: str
) -> Reply | None:
    """Answer ``path`` if it is a history route (None if it is not one of these)."""
    segments = path_segments(path, PREFIX)
    if segments is None:
        return None
    drill = drill_route(segments)
    found = route(segments)
    verify = is_verify_route(segments)
    if found is None and drill is None and verify is None:
        return None
    volume = drill[0] if drill is not None else found[0] if found is not None else verify or ""
    try:
        try:
            rt = runtime(volume)
        except KeyError:
            raise HistoryControlError(HTTPStatus.NOT_FOUND, f"no volume named {volume!r}") from None
        if verify is not None:
            return await handle_verify(rt, method, volume, query)
        if drill is not None:
            return await handle_drill(rt, method, drill[0], drill[1], query)
        assert found is not None
        return await handle_history(rt, parse(method, volume, found[1], query))
    except HistoryControlError as exc:
        return exc.status, {"error": exc.message}
    except (OSError, BlockmirrorError) as exc:
        log.error("history control %s %s failed: %s", method, path, exc)
        return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the control failed: {exc}"}
