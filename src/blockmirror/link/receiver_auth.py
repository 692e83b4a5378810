"""The secondary's check of a source at a link's handshake: certificate names, the
pre-shared-key proofs both ways, and sealing (docs/link-protocol.md, "Authentication").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from blockmirror.link import auth
from blockmirror.link.protocol import AuthClient, AuthServer, Hello
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.link.session_crypto import CHACHA20_POLY1305, Opener, Sealer, derive_keys

if TYPE_CHECKING:
    from blockmirror.link.receiver import ReceiverSession

__all__ = ["authenticate_source", "certificate_names"]


def certificate_names(cert: Mapping[str, Any]) -> set[str]:
    """The subject common names and DNS subjectAltNames of a peer certificate (getpeercert)."""
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(str(value))
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(str(value))
    return names


async def authenticate_source(
    session: ReceiverSession, hello: Hello, target: ReplicaRuntime | None
) -> bytes | None:
    """The source proves the replica's key (its own, or the listener's), and TLS sources the
    certificate names the replica allows; sealing starts when the source offers it. Returns the
    key the source proved (None: none was asked)."""
    if target is not None and target.tls_peers:
        _check_certificate_names(session, target)
    # A replica with a key of its own accepts only that key: one tenant's key does not
    # open another tenant's replica on a shared secondary.
    key = target.psk if target is not None and target.psk is not None else session.settings.psk
    if key is None:
        return None  # a source that expects a proof refuses us itself
    if hello.auth != "psk":
        raise session.refuse("auth", "this unit requires a pre-shared key")
    # Sealed frames (session_crypto) whenever the source offers them; required with a key
    # and no TLS, since the key alone protects only the handshake.
    sealed = hello.crypto == CHACHA20_POLY1305
    if not sealed and not session.settings.tls:
        offered = "nothing" if hello.crypto is None else repr(hello.crypto)
        raise session.refuse(
            "crypto-required",
            f"a pre-shared key without TLS needs sealed frames ({CHACHA20_POLY1305}); the "
            f"source offers {offered} (an older unit, or the offer was stripped on the way)",
        )
    nonce = auth.new_nonce()
    proof = auth.server_proof(key, hello.nonce, nonce, hello.volume)
    session.link.send(AuthServer(nonce, proof, CHACHA20_POLY1305 if sealed else None))
    answer = await session.link.expect(AuthClient)
    expected = auth.client_proof(key, nonce, hello.nonce, hello.volume)
    if not auth.verify(expected, answer.proof):
        raise session.refuse("auth", "wrong pre-shared key")
    if sealed:
        if session.link.codec.buffered:
            raise session.refuse("bad-frame", "frames after AUTH_CLIENT before the WELCOME")
        keys = derive_keys(key, hello.nonce, nonce, hello)
        session.link.seal(Sealer(keys.secondary), Opener(keys.source))
    return key


def _check_certificate_names(session: ReceiverSession, target: ReplicaRuntime) -> None:
    cert = session.link.extra("peercert")
    if not cert:
        raise session.refuse(
            "auth", f"replica {target.name} takes only TLS sources with a named certificate"
        )
    names = certificate_names(cert)
    if not names & set(target.tls_peers):
        shown = ", ".join(sorted(names)) or "none"
        raise session.refuse(
            "auth",
            f"a certificate naming {shown} may not write replica {target.name}",
        )
