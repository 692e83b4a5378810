"""TCP addresses as the configuration and the command line spell them: ``host:port`` and
``[v6]:port``, parsed with a reason for every refusal, and the rule for listeners that clash."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from blockmirror.errors import ConfigError

__all__ = ["Address", "address_or_reason", "clashes", "parse_address", "valid_host"]

_HOSTNAME_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", re.ASCII)


@dataclass(frozen=True)
class Address:
    """A TCP endpoint. Port 0 (only where allowed) asks the kernel for an ephemeral port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def valid_host(host: str) -> bool:
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        # All-numeric names are IPv4 literals; "999.1.1.1" must not pass as a host name.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return len(host) <= 253 and all(_HOSTNAME_LABEL_RE.fullmatch(label) for label in labels)


def address_or_reason(text: str, allow_zero: bool) -> Address | str:
    example = "like 127.0.0.1:10809 or [::1]:10809"
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            return f"expected [IPV6]:PORT, {example}; got {text!r}"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} in brackets is not an IPv6 address"
        return _with_port(host, port_text, text, allow_zero)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return f"expected HOST:PORT, {example}; got {text!r}"
    if ":" in host:
        return f"an IPv6 address needs brackets, like [::1]:{port_text}; got {text!r}"
    if not host:
        return f"missing host in {text!r}; use 0.0.0.0 to listen on every interface"
    if not valid_host(host):
        return f"{host!r} is not a valid host name or IPv4 address"
    return _with_port(host, port_text, text, allow_zero)


def _with_port(host: str, port_text: str, text: str, allow_zero: bool) -> Address | str:
    if not port_text.isascii() or not port_text.isdigit():
        return f"port {port_text!r} is not a number, in {text!r}"
    # Capped before int(): a thousands-digit "port" would otherwise trip int's size guard.
    port = int(port_text) if len(port_text) <= 6 else 1 << 20
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        note = " (0 picks an ephemeral port)" if allow_zero else ""
        return f"port {port} is out of range {low}..65535{note}"
    return Address(host, port)


def parse_address(text: str, key: str = "address", *, allow_zero: bool = False) -> Address:
    """Parse ``host:port`` or ``[v6]:port``; raises ConfigError naming ``key``."""
    result = address_or_reason(text.strip(), allow_zero)
    if isinstance(result, str):
        raise ConfigError([(key, result)])
    return result


def _host_family(host: str) -> tuple[str, int | None]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower(), None
    return str(ip), ip.version


def clashes(a: Address, b: Address) -> bool:
    """Whether two listeners on one machine would fight over the same port."""
    if a.port == 0 or a.port != b.port:
        return False
    (ha, fa), (hb, fb) = _host_family(a.host), _host_family(b.host)
    if ha == hb or "::" in (ha, hb):
        # Linux binds "::" dual-stack by default, so it holds the port for IPv4 as well.
        return True
    # A host name may resolve to IPv4, so it counts as clashing with the IPv4 wildcard.
    return (ha == "0.0.0.0" and fb != 6) or (hb == "0.0.0.0" and fa != 6)
