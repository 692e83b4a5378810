"""The admin HTTP API: a deliberately small HTTP/1.1 server on asyncio streams.

It serves ``GET /api/status`` (JSON), ``GET /`` (a page that renders the same data) and the
operator controls, ``POST /api/volumes/...`` (routed and validated by
:mod:`blockmirror.admin.controls`). It is for operators and monitoring on a trusted network;
every request is bounded in size and time, and a malformed one gets a 4xx without disturbing
the unit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from blockmirror.admin.controls import is_control_path
from blockmirror.admin.page import render_page

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 * 1024
# Controls take their parameters from the query string; a body is read (so the connection stays
# well-formed for the client) and ignored, up to this size.
MAX_REQUEST_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0

StatusProvider = Callable[[], dict[str, Any]]
# (method, path, query) -> (HTTP status, JSON body): blockmirror.admin.controls.handle, bound to
# the unit.
ControlHandler = Callable[[str, str, str], Awaitable[tuple[int, dict[str, Any]]]]

_Response = tuple[HTTPStatus, str, bytes]


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    query: str


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(status: HTTPStatus, doc: dict[str, Any]) -> _Response:
    return status, "application/json", json.dumps(doc, indent=2).encode() + b"\n"


class AdminServer:
    def __init__(self, status: StatusProvider, controls: ControlHandler | None = None) -> None:
        self._status = status
        self._controls = controls
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("admin server is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, limit=MAX_REQUEST_HEAD
        )
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        request: _Request | _Response | None = None
        try:
            request = await asyncio.wait_for(self._read(reader, writer), REQUEST_TIMEOUT)
            # No timeout here: a control waits for a checkpoint, and cancelling it half-way
            # would leave the operator guessing whether it took effect.
            status, ctype, body = await self._respond(request)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, ctype, body = HTTPStatus.BAD_REQUEST, "text/plain", b"bad request\n"
        except ConnectionError:
            self._clients.discard(task)
            writer.close()
            return
        extra = ""
        if status == HTTPStatus.METHOD_NOT_ALLOWED and isinstance(request, _Request):
            extra = f"Allow: {'POST' if is_control_path(request.path) else 'GET'}\r\n"
        try:
            writer.write(
                f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | _Response:
        """The request's (method, path, query), or the answer to a malformed one."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return HTTPStatus.BAD_REQUEST, "text/plain", b"bad request line\n"
        method, target, _ = parts
        path, _, query = target.partition("?")
        try:
            await self._read_body(lines[1:], reader, writer)
        except _BadRequest as exc:
            return _json(exc.status, {"error": exc.message})
        return _Request(method, path, query)

    async def _respond(self, request: _Request | _Response) -> _Response:
        if not isinstance(request, _Request):
            return request
        method, path, query = request.method, request.path, request.query
        if is_control_path(path):
            return await self._control(method, path, query)
        if method != "GET":
            if path.startswith("/api/"):
                return _json(
                    HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} takes GET, not {method}"}
                )
            return HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"only GET is supported\n"
        if path == "/api/status":
            return _json(HTTPStatus.OK, self._status())
        if path in ("/", "/index.html"):
            return HTTPStatus.OK, "text/html; charset=utf-8", render_page(self._status()).encode()
        if path.startswith("/api/"):
            return _json(HTTPStatus.NOT_FOUND, {"error": f"no such API: {path}"})
        return HTTPStatus.NOT_FOUND, "text/plain", b"not found\n"

    @staticmethod
    async def _read_body(
        headers: list[str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Read (and drop) a request body announced by Content-Length, bounded in size."""
        fields: dict[str, str] = {}
        for line in headers:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        if "transfer-encoding" in fields:
            raise _BadRequest(
                HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not supported"
            )
        text = fields.get("content-length")
        if text is None:
            return
        if not text.isascii() or not text.isdigit():
            raise _BadRequest(HTTPStatus.BAD_REQUEST, f"bad Content-Length {text!r}")
        length = int(text)
        if length > MAX_REQUEST_BODY:
            raise _BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {length} bytes is over the {MAX_REQUEST_BODY} byte limit",
            )
        if length and fields.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        await reader.readexactly(length)

    async def _control(self, method: str, path: str, query: str) -> _Response:
        if self._controls is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": "this server has no controls"})
        try:
            code, doc = await self._controls(method, path, query)
        except Exception as exc:
            # A bug in a control must not take the admin API (or the unit) down with it.
            log.exception("control %s %s failed", method, path)
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}"})
        return _json(HTTPStatus(code), doc)
