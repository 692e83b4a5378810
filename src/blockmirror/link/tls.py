"""TLS for links: contexts built from the ``[replication]`` certificate files (paths only: this
layer never reads the configuration itself).

Both ends present a certificate and check the other's against ``tls_ca`` (mutual TLS). Peers
are often addressed by IP, so the peer's certificate is checked against the CA, not its host name:
holding a certificate from the replication CA is what authorises a unit.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The certificate files of one unit's links; any may be unset."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


def server_ssl_context(rc: TlsFiles) -> ssl.SSLContext | None:
    if rc.cert is None or rc.key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(rc.cert, rc.key)
    if rc.ca is not None:
        ctx.load_verify_locations(rc.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(rc: TlsFiles) -> ssl.SSLContext | None:
    if rc.ca is None and rc.cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=rc.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if rc.cert is not None and rc.key is not None:
        ctx.load_cert_chain(rc.cert, rc.key)
    return ctx
