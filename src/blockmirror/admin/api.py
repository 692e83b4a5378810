"""The admin HTTP API: a deliberately small HTTP/1.1 server on asyncio streams.

It serves ``GET /api/status`` (JSON), ``GET /`` (a page that renders the same data, with a
sign-in form) and the operator controls, ``POST /api/volumes/...`` (routed and validated by
:mod:`blockmirror.admin.controls`). Every request is bounded in size and time, and a malformed
one gets a 4xx without disturbing the unit.

Who may do what (:class:`blockmirror.admin.access.AdminAccess`), checked in this order, and a
refused request changes nothing:

1. ``Host`` must name this unit: an IP literal, ``localhost``, the configured admin host or one
   of ``admin_hosts``; otherwise 421. This defeats DNS rebinding.
2. A request other than GET that carries an ``Origin`` must come from this very origin
   (scheme, host and port of the ``Host`` it addressed); otherwise 403. So does a browser's
   ``Sec-Fetch-Site: cross-site``.
3. Credentials: ``Authorization: Bearer TOKEN``, or the web page's session cookie. A cookie
   alone is enough to read; an action with a cookie also needs the session's CSRF token in
   ``X-CSRF-Token`` (403 without). No credential, or a wrong token: 401 with
   ``WWW-Authenticate: Bearer``. Status and the page's table are readable without credentials
   only with ``admin_public_status = true``; every control always needs them.

A browser cannot send an ``Authorization`` or ``X-CSRF-Token`` header across origins without
a CORS preflight, and this server approves none: a cross-site form or ``text/plain`` POST can
never carry what a control needs.

``POST /api/session`` (a JSON body ``{"token": "..."}`` or the bearer header) starts a session
of the page: it sets an HttpOnly, SameSite=Strict cookie and answers the CSRF token.
``DELETE /api/session`` ends it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from blockmirror.admin.access import AdminAccess, bearer, cookie_value, split_host, token_matches
from blockmirror.admin.controls import is_control_path
from blockmirror.admin.http import Request, Response, json_response
from blockmirror.admin.metrics import CONTENT_TYPE, render_metrics
from blockmirror.admin.page import SCRIPT, render_page, render_sign_in

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 * 1024
# Controls take their parameters from the query string; a body is read (so the connection stays
# well-formed for the client) and ignored, up to this size. /api/session reads its JSON body.
MAX_REQUEST_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
SESSION_PATH = "/api/session"
SCRIPT_PATH = "/admin.js"
# Headers that must not come twice: two Hosts (or tokens) would let two parsers disagree.
_SINGLE_HEADERS = frozenset(
    {"host", "authorization", "origin", "cookie", "x-csrf-token", "content-length", "content-type"}
)
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

StatusProvider = Callable[[], dict[str, Any]]
# (method, path, query) -> (HTTP status, JSON body): blockmirror.admin.controls.handle, bound to
# the unit.
ControlHandler = Callable[[str, str, str], Awaitable[tuple[int, dict[str, Any]]]]
# More GET pages the unit serves (events, the log, the lag history): path -> (route, whether
# admin_public_status opens it to callers without credentials).
ReadRoute = Callable[[Request], Response]
ReadRoutes = Mapping[str, tuple[ReadRoute, bool]]


@dataclass(frozen=True, slots=True)
class _Caller:
    """What a request proved: a valid bearer token, or a live session (with its CSRF token)."""

    token: bool = False
    session: str | None = None
    csrf: str | None = None
    csrf_ok: bool = False

    @property
    def can_read(self) -> bool:
        return self.token or self.session is not None

    @property
    def can_act(self) -> bool:
        return self.token or (self.session is not None and self.csrf_ok)


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminServer:
    def __init__(
        self,
        status: StatusProvider,
        controls: ControlHandler | None = None,
        *,
        access: AdminAccess,
        tls: ssl.SSLContext | None = None,
        reads: ReadRoutes | None = None,
    ) -> None:
        self._status = status
        self._controls = controls
        self._reads = dict(reads or {})
        self._access = access
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    def set_access(self, access: AdminAccess) -> None:
        """New access rules (a reload). Sessions of the page survive unless the token changed:
        a new token is how an operator signs everyone out."""
        if access.token == self._access.token:
            access = dataclasses.replace(access, sessions=self._access.sessions)
        self._access = access

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("admin server is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    @property
    def _cookie_name(self) -> str:
        # Cookies are not separated by port: two units on one host need two names.
        return f"blockmirror_session_{self.address[1]}"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._serve,
            host,
            port,
            reuse_address=True,
            limit=MAX_REQUEST_HEAD,
            ssl=self._tls,
            ssl_handshake_timeout=REQUEST_TIMEOUT if self._tls is not None else None,
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
            request = await asyncio.wait_for(self._read(reader, writer), REQUEST_TIMEOUT)
            # No timeout here: a control waits for a checkpoint, and cancelling it half-way
            # would leave the operator guessing whether it took effect.
            response = await self._respond(request)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            response = Response(HTTPStatus.BAD_REQUEST, "text/plain", b"bad request\n")
        except (ConnectionError, ssl.SSLError):
            self._clients.discard(task)
            writer.close()
            return
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        # A stream has no length: its end is the connection's close.
        length = "" if response.stream else f"Content-Length: {len(response.body)}\r\n"
        try:
            writer.write(
                f"HTTP/1.1 {response.status.value} {response.status.phrase}\r\n"
                f"Content-Type: {response.ctype}\r\n{length}"
                f"{extra}X-Content-Type-Options: nosniff\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                + response.body
            )
            await writer.drain()
            if response.stream is not None:
                await response.stream(reader, writer)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | Response:
        """The request, or the answer to a malformed one."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return Response(HTTPStatus.BAD_REQUEST, "text/plain", b"bad request line\n")
        method, target, _ = parts
        path, _, query = target.partition("?")
        try:
            headers = self._headers(lines[1:])
            body = await self._read_body(headers, reader, writer)
        except _BadRequest as exc:
            return json_response(exc.status, {"error": exc.message})
        return Request(method, path, query, headers, body)

    @staticmethod
    def _headers(lines: list[str]) -> dict[str, str]:
        fields: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip().lower()
            if key in fields and key in _SINGLE_HEADERS:
                raise _BadRequest(HTTPStatus.BAD_REQUEST, f"header {name.strip()} is repeated")
            fields[key] = value.strip()
        return fields

    # --- who is asking ------------------------------------------------------------------------

    def _check_host_and_origin(self, request: Request) -> Response | None:
        host_header = request.header("host")
        if host_header is None:
            return json_response(HTTPStatus.BAD_REQUEST, {"error": "a Host header is required"})
        parsed = split_host(host_header)
        if parsed is None or not self._access.host_allowed(parsed[0]):
            log.warning("admin API: refused a request for Host %r", host_header[:100])
            return json_response(
                HTTPStatus.MISDIRECTED_REQUEST,
                {
                    "error": f"this unit does not answer to Host {host_header[:100]!r}; "
                    "use its IP address or add the name to [unit] admin_hosts"
                },
            )
        if request.method in ("GET", "HEAD"):
            return None
        origin = request.header("origin")
        if origin is not None and not self._access.origin_matches(origin, host_header):
            log.warning("admin API: refused a %s from origin %r", request.method, origin[:100])
            return json_response(
                HTTPStatus.FORBIDDEN,
                {"error": f"cross-origin request refused (Origin {origin[:100]!r})"},
            )
        if request.header("sec-fetch-site") in ("cross-site", "same-site"):
            return json_response(HTTPStatus.FORBIDDEN, {"error": "cross-site request refused"})
        return None

    def _caller(self, request: Request) -> _Caller | Response:
        authorization = request.header("authorization")
        if authorization is not None:
            offered = bearer(authorization)
            if offered is None or not token_matches(offered, self._access.token):
                return self._unauthorized("the admin token is wrong", invalid=True)
            return _Caller(token=True)
        sid = cookie_value(request.header("cookie"), self._cookie_name)
        csrf = self._access.sessions.csrf(sid)
        if csrf is None:
            return _Caller()
        sent = request.header("x-csrf-token")
        ok = sent is not None and token_matches(sent, csrf)
        return _Caller(session=sid, csrf=csrf, csrf_ok=ok)

    @staticmethod
    def _unauthorized(message: str, *, invalid: bool = False) -> Response:
        response = json_response(HTTPStatus.UNAUTHORIZED, {"error": message})
        challenge = 'Bearer realm="blockmirror"'
        if invalid:
            challenge += ', error="invalid_token"'
        response.headers.append(("WWW-Authenticate", challenge))
        return response

    def _refuse_action(self, caller: _Caller) -> Response | None:
        if caller.can_act:
            return None
        if caller.session is not None:
            return json_response(
                HTTPStatus.FORBIDDEN,
                {"error": "a session needs its CSRF token in the X-CSRF-Token header"},
            )
        return self._unauthorized(
            "this needs the admin token: send Authorization: Bearer TOKEN "
            "(the token is in the unit's admin_token_file, or STATE_DIR/admin.token)"
        )

    def _refuse_read(self, caller: _Caller) -> Response | None:
        if caller.can_read or self._access.public_status:
            return None
        return self._unauthorized(
            "status needs the admin token: send Authorization: Bearer TOKEN "
            "(or set [unit] admin_public_status = true)"
        )

    # --- routing -----------------------------------------------------------------------------

    async def _respond(self, request: Request | Response) -> Response:
        if not isinstance(request, Request):
            return request
        refused = self._check_host_and_origin(request)
        if refused is not None:
            return refused
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        method, path = request.method, request.path
        if is_control_path(path):
            return self._refuse_action(caller) or await self._control(method, path, request.query)
        if path == SESSION_PATH:
            return self._session(request, caller)
        if method != "GET":
            if path.startswith("/api/"):
                response = json_response(
                    HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} takes GET, not {method}"}
                )
            else:
                response = Response(
                    HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"only GET is supported\n"
                )
            response.headers.append(("Allow", "GET"))
            return response
        if path == "/api/status":
            return self._refuse_read(caller) or json_response(HTTPStatus.OK, self._status())
        if path == "/metrics":
            refused = self._refuse_read(caller)
            return refused or Response(HTTPStatus.OK, CONTENT_TYPE, render_metrics(self._status()))
        route = self._reads.get(path)
        if route is not None:
            handler, public = route
            refused = (
                self._refuse_read(caller)
                if public
                else (None if caller.can_read else self._refuse_action(caller))
            )
            return refused or handler(request)
        if path in ("/", "/index.html"):
            return self._page(caller)
        if path == SCRIPT_PATH:
            return Response(HTTPStatus.OK, "text/javascript; charset=utf-8", SCRIPT.encode())
        if path.startswith("/api/"):
            return json_response(HTTPStatus.NOT_FOUND, {"error": f"no such API: {path}"})
        return Response(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def _page(self, caller: _Caller) -> Response:
        if caller.can_read or self._access.public_status:
            text = render_page(self._status(), csrf=caller.csrf if caller.session else None)
        else:
            text = render_sign_in()
        response = Response(HTTPStatus.OK, "text/html; charset=utf-8", text.encode())
        response.headers += [
            ("Content-Security-Policy", _PAGE_POLICY),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
        ]
        return response

    def _session(self, request: Request, caller: _Caller) -> Response:
        if request.method == "POST":
            return self._sign_in(request, caller)
        if request.method == "DELETE":
            refused = self._refuse_action(caller)
            if refused is not None:
                return refused
            if caller.session is not None:
                self._access.sessions.drop(caller.session)
            response = json_response(HTTPStatus.OK, {"signed_out": True})
            response.headers.append(("Set-Cookie", self._cookie("", max_age=0)))
            return response
        response = json_response(
            HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{SESSION_PATH} takes POST or DELETE"}
        )
        response.headers.append(("Allow", "POST, DELETE"))
        return response

    def _sign_in(self, request: Request, caller: _Caller) -> Response:
        if not caller.token:
            ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                # Only JSON (never a form a foreign page could submit) carries a token here.
                return self._unauthorized(
                    'sign in with a JSON body {"token": "..."} '
                    "(Content-Type: application/json) or Authorization: Bearer TOKEN"
                )
            try:
                doc = json.loads(request.body)
            except ValueError:
                return json_response(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"})
            offered = doc.get("token") if isinstance(doc, dict) else None
            if not isinstance(offered, str) or not token_matches(
                offered.strip(), self._access.token
            ):
                log.warning("admin API: a sign-in with a wrong token was refused")
                return self._unauthorized("the admin token is wrong", invalid=True)
        sid, csrf = self._access.sessions.create()
        response = json_response(HTTPStatus.OK, {"csrf_token": csrf})
        response.headers.append(("Set-Cookie", self._cookie(sid)))
        return response

    def _cookie(self, value: str, *, max_age: int | None = None) -> str:
        age = self._access.sessions.lifetime if max_age is None else max_age
        secure = "; Secure" if self._tls is not None else ""
        return (
            f"{self._cookie_name}={value}; Path=/; Max-Age={int(age)}; HttpOnly; "
            f"SameSite=Strict{secure}"
        )

    @staticmethod
    async def _read_body(
        fields: dict[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        """Read a request body announced by Content-Length, bounded in size."""
        if "transfer-encoding" in fields:
            raise _BadRequest(
                HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not supported"
            )
        text = fields.get("content-length")
        if text is None:
            return b""
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
        return await reader.readexactly(length)

    async def _control(self, method: str, path: str, query: str) -> Response:
        if self._controls is None:
            return json_response(HTTPStatus.NOT_FOUND, {"error": "this server has no controls"})
        try:
            code, doc = await self._controls(method, path, query)
        except Exception as exc:
            # A bug in a control must not take the admin API (or the unit) down with it.
            log.exception("control %s %s failed", method, path)
            return json_response(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}"}
            )
        response = json_response(HTTPStatus(code), doc)
        if code == HTTPStatus.METHOD_NOT_ALLOWED:
            response.headers.append(("Allow", "POST"))
        return response
