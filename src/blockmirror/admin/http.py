"""The admin server's response type, shared by the server and the routes that add pages to it.

A :class:`Response` is a whole body, or a ``stream``: a coroutine that writes the body itself
after the head (server-sent events), for as long as the client listens. The server still owns
the connection: it closes it when the stream returns or the server stops.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

__all__ = ["Request", "Response", "Stream", "json_response", "path_segments"]

# (reader, writer): the reader tells a stream when its client has gone (EOF or a reset).
Stream = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(slots=True)
class Response:
    status: HTTPStatus
    ctype: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: Stream | None = None


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def path_segments(path: str, prefix: str) -> list[str] | None:
    """The percent-decoded segments of ``path`` after ``prefix``; None when the path is not
    under it or a segment is not UTF-8. Split first, decode after: a name's %2F can never
    create or hide a level."""
    if not path.startswith(prefix):
        return None
    try:
        return [unquote(seg, errors="strict") for seg in path[len(prefix) :].split("/")]
    except UnicodeDecodeError:
        return None


def json_response(status: HTTPStatus, doc: dict[str, Any]) -> Response:
    return Response(status, "application/json", json.dumps(doc, indent=2).encode() + b"\n")
