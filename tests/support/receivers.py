"""Real alert receivers on 127.0.0.1, for tests of alert delivery: Debian's ``snmptrapd``, an
``aiosmtpd`` server with STARTTLS and AUTH, and a small HTTP(S) server for webhooks.

Each is a context manager that starts the receiver on a free port, yields an object to read
what arrived (with ``wait(n)``, which polls until ``n`` items are in or fails after a timeout),
and stops it on the way out, whether the test passed or not::

    user = SnmpUser("bm", engine_id=default_engine_id("site-a"))
    with snmptrapd(tmp_path, users=[user]) as trapd:
        ...  # send to trapd.address ("127.0.0.1:PORT")
        [trap] = trapd.wait(1)
        assert trap.oid == RAISED and trap.text(OBJECTS["bmEventName"]) == "link-down"

    with smtp_server(tmp_path, username="alerts", password="s3cret") as smtp:
        ...  # smtp.address, smtp.cert (the CA to trust: the server's self-signed certificate)
        [mail] = smtp.wait(1)  # mail.message is an email.message.EmailMessage

    with webhook_server(tmp_path, tls=True) as hook:
        hook.reply_with(500, 500)  # the next two requests fail, then 200 again
        ...  # hook.url, hook.cert
        [request] = hook.wait(1)  # request.json(), request.headers["authorization"]

The pieces are usable from any test, in-process (the dispatcher's tests) or against a unit
process (the end-to-end alert tests): nothing here shares an event loop with the caller.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.unit_process import require_commands

# How long wait() polls before it fails the test: generous, a loaded machine is slow.
WAIT = 15.0
SNMP_TRAP_OID = "1.3.6.1.6.3.1.1.4.1.0"
# How Net-SNMP prints octets that are not text: upper-case hex pairs, each followed by spaces.
_HEX_OCTETS = re.compile(r"(?:[0-9A-F]{2} +)+")


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port of 127.0.0.1 that was free a moment ago (for servers that cannot bind port 0
    themselves and report it: snmptrapd, aiosmtpd's Controller)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def self_signed_cert(directory: Path, name: str = "receiver") -> tuple[Path, Path]:
    """``(cert, key)``: a throwaway P-256 certificate for 127.0.0.1 and localhost; the
    certificate is its own CA, so clients verify against it (``tls_ca = cert``)."""
    require_commands("openssl")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def _wait_for(count: int, items: Sequence[Any], what: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while len(items) < count:
        if time.monotonic() > end:
            raise AssertionError(f"{len(items)} {what} arrived within {timeout} s, not {count}")
        time.sleep(0.02)


# -- SNMP: snmptrapd --------------------------------------------------------------------------


@dataclass(frozen=True)
class SnmpUser:
    """An SNMPv3 user snmptrapd accepts traps from. ``auth`` and ``priv`` are Net-SNMP's names
    (``SHA-256``, ``AES``, ``AES-256``, ``AES-256-C``, ``DES``; ``priv=None``: authNoPriv);
    ``engine_id`` is the *sender's* snmpEngineID (a trap's sender is authoritative)."""

    name: str
    engine_id: bytes
    auth: str = "SHA-256"
    auth_key: str = "authpass-123"
    priv: str | None = "AES"
    priv_key: str = "privpass-456"

    def create_line(self) -> str:
        line = f"createUser -e 0x{self.engine_id.hex()} {self.name} {self.auth} {self.auth_key}"
        return line + (f" {self.priv} {self.priv_key}" if self.priv else "")


@dataclass
class Trap:
    """One trap as snmptrapd's traphandle got it: ``oid`` is snmpTrapOID.0, ``varbinds`` maps
    each OID (numeric, no leading dot) to the value as printed (strings in quotes)."""

    source: str
    oid: str
    varbinds: dict[str, str]

    def text(self, oid: str) -> str:
        """The string at ``oid``, unquoted. Net-SNMP prints a string that is not printable
        ASCII (UTF-8, say) as quoted hex octets ("64 C3 A9 "), decoded here as UTF-8; the
        traphandle form has no type, so a string that itself reads like that would be too."""
        value = self.varbinds[oid]
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
            if not _HEX_OCTETS.fullmatch(value):
                return value.replace('\\"', '"').replace("\\\\", "\\")
        return bytes.fromhex(value.replace(" ", "")).decode("utf-8")


def parse_traps(text: str) -> list[Trap]:
    """The traps in a traphandle log (each block: host line, transport line, then one
    ``OID VALUE`` per line, a long hex value wrapped onto more lines; ``--END--`` closes it)."""
    traps = []
    for block in text.split("--END--\n")[:-1]:
        lines = block.splitlines()
        varbinds: dict[str, str] = {}
        last = ""
        for line in lines[2:]:
            if line.startswith("."):
                last, _, value = line[1:].partition(" ")
                varbinds[last] = value
            elif last:
                varbinds[last] += " " + line.strip()
        trap_oid = varbinds.get(SNMP_TRAP_OID, "").lstrip(".")
        traps.append(Trap(lines[1] if len(lines) > 1 else "", trap_oid, varbinds))
    return traps


@dataclass
class TrapReceiver:
    port: int
    log: Path
    output: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def traps(self) -> list[Trap]:
        return parse_traps(self.log.read_text()) if self.log.exists() else []

    def wait(self, count: int, timeout: float = WAIT) -> list[Trap]:
        """At least ``count`` traps (all that arrived), or AssertionError after ``timeout``."""
        end = time.monotonic() + timeout
        while len(traps := self.traps()) < count:
            if time.monotonic() > end:
                raise AssertionError(
                    f"{len(traps)} traps arrived within {timeout} s, not {count}; "
                    f"snmptrapd said:\n{self.output.read_text()[-3000:]}"
                )
            time.sleep(0.05)
        return traps


@contextmanager
def snmptrapd(
    directory: Path, *, community: str | None = "public", users: Sequence[SnmpUser] = ()
) -> Iterator[TrapReceiver]:
    """snmptrapd on 127.0.0.1, accepting SNMPv2c with ``community`` (None: no v2c) and
    SNMPv3 from ``users`` (authPriv, or authNoPriv for a user without ``priv``)."""
    require_commands("snmptrapd")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port(socket.SOCK_DGRAM)
    log, handler, conf = directory / "traps.log", directory / "handler.sh", directory / "trapd.conf"
    # The handler appends each trap as a block; a lock keeps two at once from interleaving.
    handler.write_text(
        f"#!/bin/sh\nexec 9>>{log}.lock; flock 9\n{{ cat; echo --END--; }} >> {log}\n"
    )
    handler.chmod(0o755)
    lines = [f"authCommunity log,execute {community}"] if community else []
    for user in users:
        level = "priv" if user.priv else "auth"
        lines += [user.create_line(), f"authUser log,execute {user.name} {level}"]
    lines.append(f"traphandle default {handler}")
    conf.write_text("\n".join(lines) + "\n")
    output = directory / "trapd.out"
    # -C -c: only this configuration; -m "": no MIBs (Debian ships none, each would be a
    # warning); -n: no DNS; -On: numeric OIDs; -Lo: log to stdout (the output file).
    args = ["snmptrapd", "-f", "-Lo", "-C", "-c", str(conf), "-m", "", "-n", "-On"]
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [*args, f"udp:127.0.0.1:{port}"],
            env=dict(os.environ, SNMP_PERSISTENT_DIR=str(directory / "persist")),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_bound(proc, port, output)
        yield TrapReceiver(port, log, output)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_bound(proc: subprocess.Popen[bytes], port: int, output: Path) -> None:
    """Until snmptrapd holds its UDP port (read from /proc/net/udp: binding the port to find
    out could take it from snmptrapd), or it died."""
    wanted = f"0100007F:{port:04X}"
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"snmptrapd exited {proc.returncode}:\n{output.read_text()}")
        table = Path("/proc/net/udp").read_text().splitlines()[1:]
        if any(line.split()[1] == wanted for line in table):
            return
        time.sleep(0.02)
    raise RuntimeError(f"snmptrapd did not bind 127.0.0.1:{port}:\n{output.read_text()}")


# -- e-mail: aiosmtpd -------------------------------------------------------------------------


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


class _Sink:
    def __init__(self, receiver: SmtpReceiver) -> None:
        self.receiver = receiver

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        # Content arrives with CRLF line ends; compare bodies as text.
        parsed = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.receiver.messages.append(
            Mail(str(envelope.mail_from), [str(r) for r in envelope.rcpt_tos], parsed)
        )
        return "250 OK"


@dataclass
class SmtpReceiver:
    port: int
    cert: Path | None
    username: str | None
    password: str | None
    messages: list[Mail] = field(default_factory=list)
    # Every AUTH attempt, as (username, password) text.
    logins: list[tuple[str, str]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait(self, count: int, timeout: float = WAIT) -> list[Mail]:
        _wait_for(count, self.messages, "mails", timeout)
        return list(self.messages)

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = (auth_data.login.decode(), auth_data.password.decode())
        self.logins.append(login)
        # handled=False: aiosmtpd answers 235/535 itself (True would leave the client hanging).
        return AuthResult(success=login == (self.username, self.password), handled=False)


@contextmanager
def smtp_server(
    directory: Path,
    *,
    username: str | None = "alerts",
    password: str | None = "s3cret",
    starttls: bool = True,
) -> Iterator[SmtpReceiver]:
    """An SMTP server in a thread. With ``starttls`` (the default) it requires STARTTLS
    (certificate ``receiver.cert``) and, when ``username`` is set, AUTH with that login."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = key = None
    context = None
    if starttls:
        cert, key = self_signed_cert(directory, "smtp")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    receiver = SmtpReceiver(free_port(), cert, username, password)
    controller = Controller(
        _Sink(receiver),
        hostname="127.0.0.1",
        port=receiver.port,
        tls_context=context,
        require_starttls=starttls,
        authenticator=receiver.authenticate if username else None,
        auth_required=bool(username),
    )
    controller.start()  # returns once the server answers
    try:
        yield receiver
    finally:
        controller.stop()


# -- webhooks: a small HTTP server -------------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    port: int
    cert: Path | None
    requests: list[Request] = field(default_factory=list)
    # Statuses of the next replies (then 200); see reply_with.
    statuses: deque[int] = field(default_factory=deque)
    # While set, requests are read and recorded but never answered (a hung server).
    hang: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        scheme = "https" if self.cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}/hook"

    def reply_with(self, *statuses: int) -> None:
        """Answer the next requests with these statuses, in order, then 200 again."""
        self.statuses.extend(statuses)

    def wait(self, count: int, timeout: float = WAIT) -> list[Request]:
        _wait_for(count, self.requests, "webhook requests", timeout)
        return list(self.requests)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, target, _ = (await reader.readline()).decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Request(method, target, headers, body))
            if self.hang.is_set():
                await reader.read()  # until the client gives up
                return
            status = self.statuses.popleft() if self.statuses else 200
            text = b"ok" if status < 300 else b"receiver says no"
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status < 300 else 'Failed'}\r\n"
                f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n".encode()
                + text
            )
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass  # a client that hung up or sent garbage: nothing to record
        finally:
            writer.close()


@contextmanager
def webhook_server(
    directory: Path | None = None, *, tls: bool = False
) -> Iterator[WebhookReceiver]:
    """An HTTP server (HTTPS with ``tls``; the certificate is made in ``directory``) on its own
    event loop in a thread; every request is recorded and answered per ``reply_with``."""
    cert = key = None
    context = None
    if tls:
        assert directory is not None, "a TLS receiver needs a directory for its certificate"
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = self_signed_cert(directory, "webhook")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    receiver = WebhookReceiver(0, cert)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="webhook receiver", daemon=True)
    thread.start()
    stop = asyncio.run_coroutine_threadsafe(_make_event(), loop).result(WAIT)
    bound: asyncio.Future[int] = loop.create_future()
    serving = asyncio.run_coroutine_threadsafe(_serve(receiver, context, bound, stop), loop)
    try:
        receiver.port = asyncio.run_coroutine_threadsafe(_result(bound), loop).result(WAIT)
        yield receiver
    finally:
        loop.call_soon_threadsafe(stop.set)
        try:
            serving.result(WAIT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(WAIT)
            loop.close()


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


async def _result(future: asyncio.Future[int]) -> int:
    return await future


async def _serve(
    receiver: WebhookReceiver,
    context: ssl.SSLContext | None,
    bound: asyncio.Future[int],
    stop: asyncio.Event,
) -> None:
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await receiver.handle(reader, writer)
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    bound.set_result(server.sockets[0].getsockname()[1])
    try:
        await stop.wait()
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()
