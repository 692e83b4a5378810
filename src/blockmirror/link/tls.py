"""TLS for links: contexts built from the ``[replication]`` certificate files.

Both ends present a certificate and check the other's against ``tls_ca`` (mutual TLS). Peers
are often addressed by IP, so the peer's certificate is checked against the CA, not its host name:
holding a certificate from the replication CA is what authorises a unit.
"""

from __future__ import annotations

import ssl

from blockmirror.config import ReplicationConfig


def server_ssl_context(rc: ReplicationConfig) -> ssl.SSLContext | None:
    if rc.tls_cert is None or rc.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(rc.tls_cert, rc.tls_key)
    if rc.tls_ca is not None:
        ctx.load_verify_locations(rc.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(rc: ReplicationConfig) -> ssl.SSLContext | None:
    if rc.tls_ca is None and rc.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=rc.tls_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if rc.tls_cert is not None and rc.tls_key is not None:
        ctx.load_cert_chain(rc.tls_cert, rc.tls_key)
    return ctx
