"""``GET /api/events``, ``GET /api/log`` and ``GET /api/lag-history``: what the unit saw lately.

``/api/events`` answers the newest events as JSON (``?limit=N``, ``?since=ID``), or, for
``Accept: text/event-stream``, a server-sent event stream: first the kept events newer than the
``Last-Event-ID`` the client sends (so a browser that reconnects misses nothing still kept),
then each new one as it happens, with a comment line every :data:`KEEPALIVE` seconds so proxies
and clients see a live connection. A client that reads too slowly is cut off (it reconnects and
resumes by its last id) rather than being buffered without bound; at most :data:`MAX_STREAMS`
streams are open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from blockmirror.admin.http import Request, Response, json_response
from blockmirror.events import KEEP, Event, EventLog

__all__ = ["LogBuffer", "events_route", "lag_history_route", "log_route"]

KEEPALIVE = 15.0
# How long one write may wait for a client to read before its stream is ended.
DRAIN_TIMEOUT = 30.0
MAX_STREAMS = 16
# Events waiting for one slow stream before it is cut off.
STREAM_QUEUE = 256
DEFAULT_LIMIT = 100
# Log lines /api/log keeps: about a day of a quiet unit, a few minutes of a noisy one.
LOG_LINES = 5000


def _query(request: Request) -> dict[str, list[str]]:
    return parse_qs(request.query, keep_blank_values=True)


def _int_param(params: dict[str, list[str]], name: str, default: int) -> int | str:
    """The parameter's value, or a message saying why it is not a number."""
    values = params.get(name)
    if not values:
        return default
    text = values[-1]
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        return f"{name} must be a non-negative integer, not {text[:40]!r}"
    return int(text)


class _Streams:
    """The open event streams of one admin server, to bound them."""

    def __init__(self) -> None:
        self.open = 0


def events_route(events: EventLog) -> Callable[[Request], Response]:
    streams = _Streams()

    def route(request: Request) -> Response:
        if "text/event-stream" in (request.header("accept") or ""):
            return _stream(events, streams, request)
        params = _query(request)
        limit = _int_param(params, "limit", DEFAULT_LIMIT)
        since = _int_param(params, "since", 0)
        for value in (limit, since):
            if isinstance(value, str):
                return json_response(HTTPStatus.BAD_REQUEST, {"error": value})
        assert isinstance(limit, int) and isinstance(since, int)
        newer = events.since(since)
        kept = newer[-min(limit, KEEP) :] if limit else []
        return json_response(
            HTTPStatus.OK,
            {
                "events": [e.to_json() for e in kept],
                "active": [e.to_json() for e in events.active()],
            },
        )

    return route


def _stream(events: EventLog, streams: _Streams, request: Request) -> Response:
    if streams.open >= MAX_STREAMS:
        response = json_response(
            HTTPStatus.SERVICE_UNAVAILABLE,
            {"error": f"{MAX_STREAMS} event streams are open already; try again later"},
        )
        response.headers.append(("Retry-After", "10"))
        return response
    last = request.header("last-event-id") or "0"
    last_id = int(last) if last.isascii() and last.isdigit() and len(last) < 19 else 0

    async def write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Counted and subscribed only here, once the head went out, and always given back in
        # the finally: a client that vanished before (or while) its head was sent holds
        # nothing. The backlog and the subscription are taken with no await in between, so
        # nothing raised meanwhile is missed or sent twice.
        queue: asyncio.Queue[Event | None] = asyncio.Queue(STREAM_QUEUE)

        def listener(event: Event) -> None:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # Too slow a reader: end its stream (None after emptying one slot).
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)
                with contextlib.suppress(ValueError):
                    events.listeners.remove(listener)

        if streams.open >= MAX_STREAMS:
            return
        streams.open += 1
        backlog = events.since(last_id)
        events.listeners.append(listener)
        # The client sends nothing more: anything read (EOF, a reset) means it has gone.
        gone = asyncio.ensure_future(reader.read(1))
        try:
            writer.write(b"retry: 2000\n\n" + b"".join(_frame(e) for e in backlog))
            await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT)
            while not gone.done():
                waiting = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    [waiting, gone], timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
                )
                if waiting not in done:
                    waiting.cancel()
                    if gone.done():
                        return
                    writer.write(b": keepalive\n\n")
                else:
                    event = waiting.result()
                    if event is None:
                        return
                    writer.write(_frame(event))
                # A client that stopped reading is cut off, not waited for.
                await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT)
        except TimeoutError:
            return
        finally:
            gone.cancel()
            streams.open -= 1
            with contextlib.suppress(ValueError):
                events.listeners.remove(listener)

    return Response(HTTPStatus.OK, "text/event-stream; charset=utf-8", b"", stream=write)


def _frame(event: Event) -> bytes:
    return f"id: {event.id}\ndata: {json.dumps(event.to_json())}\n\n".encode()


class LogBuffer(logging.Handler):
    """The unit's newest log lines, for the log dump (``GET /api/log``)."""

    def __init__(self, keep: int = LOG_LINES) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=keep)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)


def log_route(buffer: LogBuffer, unit: str) -> Callable[[Request], Response]:
    def route(request: Request) -> Response:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        body = "".join(line + "\n" for line in list(buffer.lines)).encode()
        response = Response(HTTPStatus.OK, "text/plain; charset=utf-8", body)
        response.headers.append(
            ("Content-Disposition", f'attachment; filename="blockmirror-{unit}-{stamp}.log"')
        )
        return response

    return route


def lag_history_route(source: Callable[[], dict[str, Any]]) -> Callable[[Request], Response]:
    def route(request: Request) -> Response:
        return json_response(HTTPStatus.OK, source())

    return route
