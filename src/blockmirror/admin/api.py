"""The admin HTTP API: a deliberately small HTTP/1.1 server on asyncio streams.

It serves ``GET /api/status`` (JSON) and ``GET /`` (a page that renders the same data). It is for
operators and monitoring on a trusted network; every request is bounded in size and time, and a
malformed one gets a 400 without disturbing the unit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from blockmirror.admin.page import render_page

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 * 1024
REQUEST_TIMEOUT = 10.0

StatusProvider = Callable[[], dict[str, Any]]


class AdminServer:
    def __init__(self, status: StatusProvider) -> None:
        self._status = status
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
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, ctype, body = self._respond(head)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status, ctype, body = HTTPStatus.BAD_REQUEST, "text/plain", b"bad request\n"
        except ConnectionError:
            self._clients.discard(task)
            writer.close()
            return
        try:
            writer.write(
                f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    def _respond(self, head: bytes) -> tuple[HTTPStatus, str, bytes]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return HTTPStatus.BAD_REQUEST, "text/plain", b"bad request line\n"
        method, target, _ = parts
        path = target.split("?", 1)[0]
        if method != "GET":
            return HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"only GET is supported\n"
        if path == "/api/status":
            body = json.dumps(self._status(), indent=2).encode() + b"\n"
            return HTTPStatus.OK, "application/json", body
        if path in ("/", "/index.html"):
            return HTTPStatus.OK, "text/html; charset=utf-8", render_page(self._status()).encode()
        return HTTPStatus.NOT_FOUND, "text/plain", b"not found\n"
