"""Webhook delivery: an HTTP/1.1 POST of each event as JSON, on asyncio streams (TLS optional).

Written here rather than with an HTTP client library because one request shape is all it
takes: a POST with ``Content-Length`` and ``Connection: close``, a status line and headers
read within bounds, the body of an error reply kept only as far as a log line needs. Any 2xx
is delivered; anything else (a redirect too: following one would send the token elsewhere) is a
failure that the dispatcher retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl

from blockmirror.config_alerts import WebhookTarget, read_secret
from blockmirror.errors import NotifyError
from blockmirror.events import Event

__all__ = ["Response", "WebhookDeliverer", "client_context", "payload", "post"]

# One attempt: connect, send, read the reply's head. A server that takes longer is retried.
TIMEOUT = 30.0
# Bounds on what a reply may make us read: its head, and the start of an error's body.
MAX_LINE = 8 * 1024
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
MAX_DETAIL = 512
# Interim (1xx) replies skipped before the final one.
MAX_INTERIM = 5
# Closing politely (TLS close_notify) must not hold a worker.
CLOSE_TIMEOUT = 2.0

_STATUS_RE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r?\n")


def payload(event: Event, version: str) -> bytes:
    """The JSON body: ``Event.to_json()`` with ``version`` and a one-line ``summary``."""
    document = {**event.to_json(), "summary": event.summary, "version": version}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Response:
    """A reply's status, reason and headers (names lower-cased), and an error body's start."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], detail: str) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.detail = detail


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise NotifyError("the webhook closed the connection before a complete reply") from exc
    except asyncio.LimitOverrunError as exc:
        raise NotifyError(f"the webhook's reply has a line over {MAX_LINE} bytes") from exc


async def _head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    first = await _line(reader)
    match = _STATUS_RE.fullmatch(first)
    if match is None:
        raise NotifyError(f"the webhook's reply is not HTTP/1.x: {first[:80]!r}")
    status = int(match.group(1))
    reason = (match.group(2) or b"").decode("latin-1").strip()
    headers: dict[str, str] = {}
    total = len(first)
    for _ in range(MAX_HEADERS + 1):
        line = await _line(reader)
        total += len(line)
        if total > MAX_HEAD:
            raise NotifyError(f"the webhook's reply head is over {MAX_HEAD} bytes")
        if line in (b"\r\n", b"\n"):
            return status, reason, headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise NotifyError(f"the webhook sent a malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    raise NotifyError(f"the webhook's reply has more than {MAX_HEADERS} headers")


async def _response(reader: asyncio.StreamReader) -> Response:
    for _ in range(MAX_INTERIM + 1):
        status, reason, headers = await _head(reader)
        if not 100 <= status < 200:
            break
    else:
        raise NotifyError("the webhook sent only interim (1xx) replies")
    detail = ""
    if not 200 <= status < 300:
        # The start of the body says why, for the log; the rest is never read.
        with contextlib.suppress(OSError):
            raw = await reader.read(MAX_DETAIL)
            detail = " ".join(raw.decode("utf-8", "replace").split())
    return Response(status, reason, headers, detail)


def _request_head(target: WebhookTarget, length: int, version: str, token: str | None) -> bytes:
    lines = [
        f"POST {target.target} HTTP/1.1",
        f"Host: {target.host_header}",
        f"User-Agent: blockmirror/{version}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {length}",
        "Connection: close",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def client_context(target: WebhookTarget) -> ssl.SSLContext | None:
    """The TLS context of an https target (None for http): it verifies the server against
    ``tls_ca`` or the system's CAs, and its name against the URL's host."""
    if not target.https:
        return None
    return ssl.create_default_context(cafile=None if target.tls_ca is None else str(target.tls_ca))


async def post(
    target: WebhookTarget,
    body: bytes,
    *,
    version: str,
    token: str | None = None,
    timeout: float = TIMEOUT,
    context: ssl.SSLContext | None = None,
) -> Response:
    """POST ``body`` to ``target``; the reply's head, whatever its status. Raises OSError,
    TimeoutError or NotifyError when there is no valid reply within ``timeout``. ``context``
    is the TLS context for https (by default :func:`client_context`'s)."""
    if context is None:
        context = client_context(target)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            target.host,
            target.port,
            ssl=context,
            server_hostname=target.host if context is not None else None,
            limit=MAX_LINE,
        )
    try:
        async with asyncio.timeout(timeout):
            writer.write(_request_head(target, len(body), version, token) + body)
            await writer.drain()
            return await _response(reader)
    finally:
        writer.close()
        # Outside the attempt's deadline: a reply already read must not turn into a failure
        # (and a duplicate on retry) because the close was slow.
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.wait_closed()


class WebhookDeliverer:
    """Posts each event to one :class:`WebhookTarget`; the token is read for every request,
    so a rotated token is used without a reload."""

    def __init__(self, target: WebhookTarget, version: str, *, timeout: float = TIMEOUT) -> None:
        self.target = target
        self.version = version
        self.timeout = timeout
        # Made once: loading the system's CAs takes tens of milliseconds of the event loop.
        self._tls: ssl.SSLContext | None = None

    async def deliver(self, event: Event) -> None:
        token = None
        if self.target.token_file is not None:
            token = read_secret(self.target.token_file, "webhook token", token=True)
        if self.target.https and self._tls is None:
            self._tls = client_context(self.target)
        reply = await post(
            self.target,
            payload(event, self.version),
            version=self.version,
            token=token,
            timeout=self.timeout,
            context=self._tls,
        )
        if not 200 <= reply.status < 300:
            detail = f": {reply.detail[:200]}" if reply.detail else ""
            raise NotifyError(
                f"webhook {self.target.url}: HTTP {reply.status} {reply.reason}{detail}".rstrip()
            )

    async def aclose(self) -> None:
        """Nothing is kept open between requests."""
