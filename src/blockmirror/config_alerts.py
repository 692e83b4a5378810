"""The ``[alerts]`` table: when conditions become events, and where events are delivered.

Targets are e-mail (SMTP with STARTTLS), SNMP traps (v2c or v3) and a JSON webhook; the package
:mod:`blockmirror.notify` delivers to them. Secrets (SMTP password, SNMPv3 passphrases, the
webhook's bearer token) are only ever named by file, never written inline, so a configuration
file can be shown or committed; :func:`read_secret` is the one reader, used by ``check-config``
and at delivery time alike, so both apply the same rules.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from blockmirror import config_paths
from blockmirror.addresses import Address, address_or_reason, valid_host
from blockmirror.config_table import Problem, Table, type_name
from blockmirror.errors import NotifyError

__all__ = [
    "SNMP_AUTH",
    "SNMP_PRIV",
    "AlertsConfig",
    "EmailTarget",
    "SnmpTarget",
    "WebhookTarget",
    "parse_alerts",
    "parse_engine_id",
    "read_secret",
    "webhook_target",
]

# SNMPv3 protocols by the names the configuration uses. AES192/AES256 are the key extension of
# draft-blumenthal-aes-usm (Net-SNMP's "AES-192"/"AES-256"); the C forms are the one Cisco uses
# (Net-SNMP's "AES-192-C"/"AES-256-C"). They differ only when the auth hash is shorter than
# the privacy key (SHA with AES256, say), which is why both are offered.
SNMP_AUTH = ("SHA", "SHA224", "SHA256", "SHA384", "SHA512", "MD5")
SNMP_PRIV = ("AES128", "AES192", "AES256", "AES192C", "AES256C", "DES", "none")
# RFC 3414 section 11.2: a passphrase shorter than 8 octets must be refused.
MIN_SNMP_KEY_CHARS = 8
MAX_SECRET_BYTES = 4096
# snmpEngineID is 5 to 32 octets (RFC 3411, SnmpEngineID).
ENGINE_ID_OCTETS = (5, 32)

SnmpVersion = Literal["2c", "3"]
_VERSIONS: dict[str, SnmpVersion] = {"2c": "2c", "3": "3"}

_KEYS = ("rpo_seconds", "link_down_seconds", "email", "snmp", "webhook")
_EMAIL_KEYS = ("to", "from", "smtp", "starttls", "username", "password_file", "tls_ca")
_SNMP_KEYS = (
    "targets", "version", "community", "community_file", "user", "auth", "auth_key_file",
    "priv", "priv_key_file", "engine_id",
)  # fmt: skip
_WEBHOOK_KEYS = ("url", "token_file", "tls_ca")
# A bare address: no display name, no whitespace or characters that end a header field.
_MAILBOX_RE = re.compile(r"[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9.-]+", re.ASCII)
# Printable ASCII without spaces: what a request line and a header field can carry as is.
_URL_CHARS_RE = re.compile(r"[!-~]+", re.ASCII)


@dataclass(frozen=True)
class EmailTarget:
    """``[alerts] email``: one SMTP server, one message per event to every address in ``to``."""

    to: tuple[str, ...]
    sender: str  # the key "from", a keyword in Python
    smtp: Address
    starttls: bool = True
    username: str | None = None
    password_file: Path | None = None
    # CA bundle (PEM) the server's certificate must chain to; None: the system's CAs.
    tls_ca: Path | None = None


@dataclass(frozen=True)
class SnmpTarget:
    """``[alerts] snmp``: traps to every receiver in ``targets``, SNMPv2c or SNMPv3 (USM)."""

    targets: tuple[Address, ...]
    version: SnmpVersion = "2c"
    community: str | None = None
    community_file: Path | None = None
    user: str | None = None
    auth: str = "SHA256"
    auth_key_file: Path | None = None
    priv: str = "AES128"
    priv_key_file: Path | None = None
    # The sending engine's snmpEngineID (a trap's sender is authoritative, so receivers know
    # users by it); None: derived from the unit's name (blockmirror.notify.traps).
    engine_id: bytes | None = None


@dataclass(frozen=True)
class WebhookTarget:
    """``[alerts] webhook``: an HTTP(S) POST of each event as JSON."""

    url: str
    https: bool
    host: str
    port: int
    target: str  # the request target: path and query, as sent on the request line
    token_file: Path | None = None
    tls_ca: Path | None = None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.https else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class AlertsConfig:
    """The ``[alerts]`` table. Without it: no RPO check, link-down after 30 s, no targets."""

    rpo_seconds: float | None = None
    link_down_seconds: float = 30.0
    email: EmailTarget | None = None
    snmp: SnmpTarget | None = None
    webhook: WebhookTarget | None = None


def read_secret(path: Path, what: str, *, min_chars: int = 1, token: bool = False) -> str:
    """The secret in ``path``, surrounding whitespace (a final newline) dropped.

    Refused, with NotifyError saying why: a file other users may read or its group may
    write (the admin token's rule), not UTF-8, empty, shorter than ``min_chars``, larger
    than 4 KiB (no secret is; a wrong path such as a log file is), or, with ``token``, not
    printable ASCII without spaces (it goes into an HTTP header as is).
    """
    try:
        # O_NONBLOCK: a FIFO at the path must be refused below, not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            raw = f.read(MAX_SECRET_BYTES + 1) if stat.S_ISREG(st.st_mode) else b""
    except OSError as exc:
        raise NotifyError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise NotifyError(f"the {what} file {path} is not a regular file")
    if st.st_mode & 0o027:
        raise NotifyError(
            f"{path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"the {what} must not be: chmod 600 {path} (or 640)"
        )
    if len(raw) > MAX_SECRET_BYTES:
        raise NotifyError(f"the {what} file {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise NotifyError(f"the {what} in {path} is not UTF-8 text") from None
    if not secret:
        raise NotifyError(f"the {what} file {path} is empty")
    if len(secret) < min_chars:
        raise NotifyError(
            f"the {what} in {path} is {len(secret)} characters; at least {min_chars} are needed"
        )
    if token and not _URL_CHARS_RE.fullmatch(secret):
        raise NotifyError(f"the {what} in {path} is not printable ASCII without spaces")
    if not token and not secret.isprintable():
        raise NotifyError(f"the {what} in {path} holds control characters (or several lines)")
    return secret


def parse_engine_id(text: str) -> bytes | str:
    """The octets of a hex engine ID (``"0x8000..."`` or ``"8000..."``), or why not."""
    digits = text.strip().removeprefix("0x").removeprefix("0X")
    low, high = ENGINE_ID_OCTETS
    if not re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", digits, re.ASCII):
        return f"{text!r} is not an even number of hex digits (like 0x80007ed904626d)"
    octets = bytes.fromhex(digits)
    if not low <= len(octets) <= high:
        return f"{text!r} is {len(octets)} octets; an SNMP engine ID is {low} to {high}"
    return octets


def parse_alerts(
    data: object, problems: list[Problem], base_dir: Path, *, check_paths: bool = True
) -> AlertsConfig:
    """The ``[alerts]`` table (``data`` is its raw TOML value; None when absent).

    Every problem is appended to ``problems`` as ``(key, message)``; what is invalid falls
    back to its default. With ``check_paths`` the secret and CA files named are read and
    checked as delivery will (never written).
    """
    if data is None:
        return AlertsConfig()
    if not isinstance(data, dict):
        problems.append(("alerts", f"expected an [alerts] table, got {type_name(data)}"))
        return AlertsConfig()
    t = Table(data, "alerts", _KEYS, problems, base_dir)
    rpo = t.duration("rpo_seconds")
    if rpo is not None and rpo <= 0:
        t.fail("rpo_seconds", "must be greater than 0 (leave it out for no RPO check)")
        rpo = None
    link_down = t.duration("link_down_seconds")
    defaults = AlertsConfig()
    secrets = _Secrets(problems, check_paths)
    return AlertsConfig(
        rpo_seconds=rpo,
        link_down_seconds=defaults.link_down_seconds if link_down is None else link_down,
        email=_parse_email(_table(t, "email"), secrets),
        snmp=_parse_snmp(_table(t, "snmp"), secrets),
        webhook=_parse_webhook(t, secrets),
    )


class _Secrets:
    """The file checks of ``check-config``, run only when asked to look at the disk."""

    def __init__(self, problems: list[Problem], check_paths: bool) -> None:
        self.problems = problems
        self.check_paths = check_paths

    def secret(
        self, t: Table, name: str, what: str, *, min_chars: int = 1, token: bool = False
    ) -> Path | None:
        path = t.path(name)
        if path is not None and self.check_paths:
            try:
                read_secret(path, what, min_chars=min_chars, token=token)
            except NotifyError as exc:
                t.fail(name, str(exc))
        return path

    def input_file(self, t: Table, name: str) -> Path | None:
        path = t.path(name)
        if path is not None and self.check_paths:
            why = config_paths.check_input_file(path, must_be_nonempty=True)
            if why is not None:
                t.fail(name, why)
        return path


def _table(parent: Table, name: str) -> Table | None:
    value = parent.typed(name, (dict,), "a table", False)
    if not isinstance(value, Mapping):
        return None
    allowed = {"email": _EMAIL_KEYS, "snmp": _SNMP_KEYS}[name]
    return Table(value, parent.key(name), allowed, parent.problems, parent.base_dir)


def _parse_email(t: Table | None, secrets: _Secrets) -> EmailTarget | None:
    if t is None:
        return None
    recipients = _mailboxes(t)
    sender = t.text("from", required=True)
    if sender is not None and not _MAILBOX_RE.fullmatch(sender):
        t.fail("from", f"{sender!r} is not an e-mail address like alerts@example.com")
    smtp = t.address("smtp", allow_zero=False)
    if smtp is None and "smtp" not in t.bad:
        t.fail("smtp", "missing required key (the mail server, like smtp.example.com:587)")
    starttls = t.flag("starttls")
    username = t.text("username")
    if username is not None and (not username or not username.isprintable()):
        t.fail("username", "must be a non-empty string of printable characters")
    password_file = secrets.secret(t, "password_file", "SMTP password")
    tls_ca = secrets.input_file(t, "tls_ca")
    if (username is None) != (password_file is None) and not t.bad & {"username", "password_file"}:
        lacks = "username" if username is None else "password_file"
        t.fail(lacks, "missing; username and password_file go together")
    if starttls is False:
        if username is not None:
            t.fail("username", "set with starttls = false: the password would cross in clear")
        if tls_ca is not None:
            t.fail("tls_ca", "set with starttls = false: there is no TLS to verify")
    if t.bad or not recipients or sender is None or smtp is None:
        return None
    return EmailTarget(
        to=recipients,
        sender=sender,
        smtp=smtp,
        starttls=starttls is not False,
        username=username,
        password_file=password_file,
        tls_ca=tls_ca,
    )


def _mailboxes(t: Table) -> tuple[str, ...]:
    value = t.typed("to", (list,), "an array of e-mail addresses", True)
    if not isinstance(value, list):
        return ()
    if not value:
        t.fail("to", "is empty; list at least one address")
    found: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _MAILBOX_RE.fullmatch(item):
            t.fail(f"to[{i}]", f"{item!r} is not an e-mail address like ops@example.com")
            t.bad.add("to")
        elif item in found:
            t.fail(f"to[{i}]", f"{item} is listed twice")
        else:
            found.append(item)
    return tuple(found)


def _parse_snmp(t: Table | None, secrets: _Secrets) -> SnmpTarget | None:
    if t is None:
        return None
    targets = _receivers(t)
    version = t.choice("version", tuple(_VERSIONS))
    community = t.text("community")
    community_file = secrets.secret(t, "community_file", "SNMP community")
    user = t.text("user")
    auth = t.choice("auth", SNMP_AUTH)
    auth_key_file = secrets.secret(
        t, "auth_key_file", "SNMP auth passphrase", min_chars=MIN_SNMP_KEY_CHARS
    )
    priv = t.choice("priv", SNMP_PRIV)
    priv_key_file = secrets.secret(
        t, "priv_key_file", "SNMP privacy passphrase", min_chars=MIN_SNMP_KEY_CHARS
    )
    engine_text = t.text("engine_id")
    engine_id = None if engine_text is None else parse_engine_id(engine_text)
    if isinstance(engine_id, str):
        t.fail("engine_id", engine_id)
        engine_id = None
    if community is not None and (not community or not community.isprintable()):
        t.fail("community", "must be a non-empty string of printable characters")
    if version == "3":
        _check_v3(t, user, priv, auth_key_file, priv_key_file)
        for name in ("community", "community_file"):
            if name in t.data:
                t.fail(name, 'set with version = "3", which authenticates by user instead')
    elif "version" not in t.bad:
        if (community is None) == (community_file is None) and not t.bad & {
            "community",
            "community_file",
        }:
            t.fail("community", "give exactly one of community and community_file for SNMPv2c")
        for name in ("user", "auth", "auth_key_file", "priv", "priv_key_file", "engine_id"):
            if name in t.data:
                t.fail(name, 'is for SNMPv3; set version = "3" (the default is "2c")')
    if t.bad or not targets:
        return None
    defaults = SnmpTarget(())
    return SnmpTarget(
        targets=targets,
        version=_VERSIONS[version or "2c"],
        community=community,
        community_file=community_file,
        user=user,
        auth=auth or defaults.auth,
        auth_key_file=auth_key_file,
        priv=priv or defaults.priv,
        priv_key_file=priv_key_file,
        engine_id=engine_id,
    )


def _check_v3(
    t: Table, user: str | None, priv: str | None, auth_key: Path | None, priv_key: Path | None
) -> None:
    if user is None and "user" not in t.bad:
        t.fail("user", 'missing; SNMPv3 (version = "3") sends as a USM user')
    elif user is not None and not (1 <= len(user) <= 32 and user.isprintable()):
        t.fail("user", f"{user!r} is not a USM user name (1 to 32 printable characters)")
    if auth_key is None and "auth_key_file" not in t.bad:
        t.fail("auth_key_file", "missing; SNMPv3 traps are authenticated (authNoPriv or authPriv)")
    if priv != "none" and priv_key is None and not t.bad & {"priv", "priv_key_file"}:
        t.fail("priv_key_file", f"missing; priv = {priv or 'AES128'!r} needs a passphrase")
    if priv == "none" and priv_key is not None:
        t.fail("priv_key_file", 'set with priv = "none"; remove one of them')


def _receivers(t: Table) -> tuple[Address, ...]:
    value = t.typed("targets", (list,), "an array of HOST:PORT strings", True)
    if not isinstance(value, list):
        return ()
    if not value:
        t.fail("targets", "is empty; list at least one trap receiver, like nms.example:162")
    found: list[Address] = []
    for i, item in enumerate(value):
        key = f"targets[{i}]"
        if not isinstance(item, str):
            t.fail(key, f"expected a HOST:PORT string, got {type_name(item)} ({item!r})")
            continue
        address = t.address_value(key, item, allow_zero=False)
        if address is None:
            continue
        if address in found:
            t.fail(key, f"{address} is listed twice")
        else:
            found.append(address)
    return tuple(found)


def _parse_webhook(parent: Table, secrets: _Secrets) -> WebhookTarget | None:
    value = parent.typed("webhook", (str, dict), "a URL or a table with url", False)
    if isinstance(value, str):
        # A plain string is reported under alerts.webhook, where the operator wrote it.
        where, name, url = parent, "webhook", value
        token_file = tls_ca = None
    elif isinstance(value, Mapping):
        where = Table(value, parent.key("webhook"), _WEBHOOK_KEYS, parent.problems, parent.base_dir)
        given = where.text("url", required=True)
        token_file = secrets.secret(where, "token_file", "webhook token", token=True)
        tls_ca = secrets.input_file(where, "tls_ca")
        if given is None:
            return None
        name, url = "url", given
    else:
        return None
    parsed = _parse_url(url)
    if isinstance(parsed, str):
        where.fail(name, parsed)
        return None
    https, host, port, target = parsed
    if tls_ca is not None and not https:
        where.fail("tls_ca", "set, but the url is http://; there is no TLS to verify")
        return None
    if where is not parent and where.bad:
        return None
    return WebhookTarget(url, https, host, port, target, token_file, tls_ca)


def webhook_target(
    url: str, *, token_file: Path | None = None, tls_ca: Path | None = None
) -> WebhookTarget:
    """The target of ``url`` (for code and tests that build one without a file); raises
    ValueError saying why a URL is refused, as ``check-config`` would."""
    parsed = _parse_url(url)
    if isinstance(parsed, str):
        raise ValueError(parsed)
    return WebhookTarget(url, *parsed, token_file=token_file, tls_ca=tls_ca)


def _parse_url(url: str) -> tuple[bool, str, int, str] | str:
    """``(https, host, port, request target)`` of an http(s) URL, or why it is refused."""
    if not _URL_CHARS_RE.fullmatch(url):
        return f"{url!r} is not a URL: no spaces or non-ASCII characters (percent-encode them)"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:  # urlsplit checks what is in brackets itself
        return f"{url!r} has a host in brackets that is not an IPv6 address"
    if parts.scheme not in ("http", "https"):
        return f"{url!r} is not an http:// or https:// URL"
    if "@" in parts.netloc:
        return "credentials in the URL are refused: put a bearer token in token_file"
    bracketed = parts.netloc.startswith("[")
    if not host or (not bracketed and not valid_host(host)):
        return f"{url!r} has no valid host"
    if bracketed and isinstance(address_or_reason(f"[{host}]:1", False), str):
        return f"{url!r} has a host in brackets that is not an IPv6 address"
    try:
        port = parts.port
    except ValueError:
        return f"{url!r} has an invalid port"
    if port == 0:
        return f"{url!r}: port 0 cannot be connected to"
    https = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return https, host, port or (443 if https else 80), target
