"""Who may use the admin API: the admin token, sessions of the web page, Host and Origin checks.

The unit has one admin credential, a token. It comes from ``[unit] admin_token_file``, or, when
that is not set, from ``STATE_DIR/admin.token``, which the unit creates (random, mode 0600) at
its first start and keeps across restarts. Clients send it as ``Authorization: Bearer TOKEN``.
The web page trades it for a session (an HttpOnly, SameSite=Strict cookie) plus a CSRF token
that every action must carry in ``X-CSRF-Token``.

Nothing here imports the configuration: :mod:`blockmirror.config` uses :func:`check_token_file`
for ``check-config``, and the daemon and the CLI pass plain values.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import ssl
import stat
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from blockmirror.errors import AdminError
from blockmirror.io.fileio import sync_directory
from blockmirror.statedir import TOKEN_FILE_NAME

# A generated token: 32 random bytes, URL-safe base64 (43 characters).
TOKEN_BYTES = 32
# An operator's own token must not be guessable by trying: at least this many characters.
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096
# Sessions of the web page: a bounded number, each valid for a bounded time.
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 64


class AdminTokenError(AdminError):
    """The admin token file is missing, unreadable, empty, too weak or too widely readable."""


def token_path(token_file: Path | None, state_dir: Path) -> Path:
    """Where the unit's admin token lives: ``admin_token_file``, or ``STATE_DIR/admin.token``."""
    return token_file if token_file is not None else state_dir / TOKEN_FILE_NAME


def _mode_problem(path: Path, st: os.stat_result) -> str | None:
    # Group read is allowed (an operators' group may run the CLI); anything for "other", and
    # group write, is not: the token is the key to every control.
    if st.st_mode & 0o027:
        return (
            f"{path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"the admin token must not be: chmod 600 {path} (or 640)"
        )
    return None


def _token_problem(token: str, path: Path) -> str | None:
    if not token:
        return f"admin token file {path} is empty"
    if len(token) < MIN_TOKEN_CHARS:
        return (
            f"the admin token in {path} is {len(token)} characters, need at least {MIN_TOKEN_CHARS}"
        )
    if len(token) > MAX_TOKEN_CHARS:
        return f"the admin token in {path} is over {MAX_TOKEN_CHARS} characters"
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        return f"the admin token in {path} must be printable ASCII without spaces"
    return None


def load_token(path: Path, *, check_mode: bool = True) -> str:
    """The token in ``path`` (trailing whitespace, such as a final newline, dropped).

    ``check_mode`` refuses a file that other users may read (the unit does; a CLI reading
    a token an operator handed it does not).
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(MAX_TOKEN_CHARS + 2)
    except OSError as exc:
        raise AdminTokenError(
            f"cannot read the admin token file {path}: {exc.strerror or exc}"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise AdminTokenError(f"admin token file {path} is not a regular file")
    if check_mode:
        why = _mode_problem(path, st)
        if why is not None:
            raise AdminTokenError(why)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise AdminTokenError(f"the admin token in {path} is not ASCII text") from None
    why = _token_problem(token, path)
    if why is not None:
        raise AdminTokenError(why)
    return token


def check_token_file(path: Path) -> str | None:
    """Why ``path`` cannot serve as ``admin_token_file`` (for ``check-config``), or None."""
    try:
        load_token(path)
    except AdminTokenError as exc:
        return str(exc)
    return None


def ensure_token(path: Path) -> str:
    """The token in ``path``; when there is no such file yet, a new random one written there.

    The file is created with mode 0600 (exclusively, so two starts cannot write different
    tokens) and made durable before it is used.
    """
    try:
        return load_token(path)
    except AdminTokenError:
        if path.exists() or path.is_symlink():
            raise
    token = secrets.token_urlsafe(TOKEN_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if the file appeared meanwhile; then that one is the token.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    sync_directory(path.parent)
    return load_token(path)


def token_matches(offered: str, token: str) -> bool:
    """Constant-time comparison of a token a client offered with the unit's."""
    return hmac.compare_digest(offered.encode("utf-8", "replace"), token.encode())


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None for another scheme."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()


# --- Host and Origin ----------------------------------------------------------------------------


def split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` from a Host header (``[v6]:port`` too), lowercased; None if malformed."""
    value = value.strip().lower()
    if not value:
        return None
    port_text = ""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, sep, port_text = value.partition(":")
        if sep and not port_text:
            return None
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
            return None
        port: int | None = int(port_text)
        if port is not None and port > 65535:
            return None
    else:
        port = None
    host = host.rstrip(".")
    if not host or any(c in host for c in "/\\@?#% \t"):
        return None
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class SessionStore:
    """Sessions of the web page: id -> (CSRF token, expiry), bounded in number and age."""

    def __init__(self, *, lifetime: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self._lifetime = lifetime
        self._limit = limit
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @property
    def lifetime(self) -> float:
        return self._lifetime

    def create(self) -> tuple[str, str]:
        """A new session's (id, CSRF token); the oldest session goes when there are too many."""
        self._expire()
        while len(self._sessions) >= self._limit:
            self._sessions.popitem(last=False)
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._sessions[sid] = (csrf, time.monotonic() + self._lifetime)
        return sid, csrf

    def csrf(self, sid: str | None) -> str | None:
        """The CSRF token of a live session, or None."""
        if not sid:
            return None
        self._expire()
        for known, (csrf, _) in self._sessions.items():
            # Compared in constant time, like the token: a session id is a credential.
            if hmac.compare_digest(known.encode(), sid.encode("utf-8", "replace")):
                return csrf
        return None

    def drop(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, (_, until) in self._sessions.items() if until <= now]:
            del self._sessions[sid]


@dataclass(frozen=True)
class AdminAccess:
    """The rules the admin API enforces (see the module docstring)."""

    token: str
    public_status: bool = False
    # Host names (besides IP literals, ``localhost`` and ``bind_host``) a request may name.
    hosts: tuple[str, ...] = ()
    bind_host: str | None = None
    tls: bool = False
    sessions: SessionStore = field(default_factory=SessionStore)

    def host_allowed(self, host: str) -> bool:
        """Whether a request's Host names this unit: the DNS-rebinding defence."""
        if _is_ip(host) or host == "localhost":
            return True
        names = {h.lower().rstrip(".") for h in self.hosts}
        if self.bind_host:
            names.add(self.bind_host.lower().rstrip("."))
        return host in names

    def origin_matches(self, origin: str, host_header: str) -> bool:
        """Whether ``origin`` is this unit as the client addressed it (scheme, host, port)."""
        scheme = "https" if self.tls else "http"
        default = 443 if self.tls else 80
        want = split_host(host_header)
        o_scheme, sep, rest = origin.strip().lower().partition("://")
        if want is None or not sep or o_scheme != scheme or "/" in rest:
            return False
        got = split_host(rest)
        if got is None:
            return False
        return (got[0], got[1] or default) == (want[0], want[1] or default)


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header, or None."""
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


# --- TLS ------------------------------------------------------------------------------------------


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The admin API's TLS: a server certificate; clients authenticate with the token."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls_context(cafiles: Iterable[Path] = ()) -> ssl.SSLContext:
    """What the CLI verifies the admin API with: the given CA (or the server's own, self-signed
    certificate) files, or the system's CAs when none is given. Host names are checked."""
    files = list(cafiles)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in files:
        ctx.load_verify_locations(path)
    if files:
        # A certificate named here is trusted as it is, even when it is not a CA (self-signed).
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx
