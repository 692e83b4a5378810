"""Pre-shared-key mutual authentication of a link (docs/link-protocol.md, "Handshake").

Each side proves it holds the key by an HMAC-SHA256 over both nonces and the volume name, so
the key never crosses the wire and a proof is worth nothing on another connection (fresh nonces)
or for another volume. The two proofs start with different role labels: a proof the secondary
sends can never be replayed (reflected) as the source's proof, or the other way round.

The message of a proof is the concatenation of UTF-8 bytes: the 26-byte role label, the two
nonces as their 64 lowercase hex characters and the volume name. Every part but the last has a
fixed length, so no two different inputs give the same message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from typing import Final

from blockmirror.errors import LinkError

__all__ = [
    "MIN_KEY_BYTES",
    "NONCE_BYTES",
    "AuthError",
    "client_proof",
    "is_token",
    "load_psk",
    "new_nonce",
    "server_proof",
    "verify",
]

NONCE_BYTES: Final = 32
# Shorter keys are typed by people, and a short typed secret can be guessed offline from one
# recorded handshake (nonces and proofs travel in clear without TLS).
MIN_KEY_BYTES: Final = 16

_SERVER_LABEL: Final = b"blockmirror-link-v1 server"
_CLIENT_LABEL: Final = b"blockmirror-link-v1 client"
assert len(_SERVER_LABEL) == len(_CLIENT_LABEL) == 26

# Nonces and proofs are both 32 bytes as lowercase hex. One spelling only: a proof compared as a
# string must not fail (or pass) because of letter case.
_TOKEN: Final = re.compile(r"[0-9a-f]{64}")


class AuthError(LinkError):
    """A pre-shared key cannot be used (missing, unreadable, empty or too short)."""


def is_token(value: str) -> bool:
    """True when ``value`` is spelled as a nonce or a proof: 64 lowercase hex characters."""
    return _TOKEN.fullmatch(value) is not None


def new_nonce() -> str:
    """A fresh nonce: 32 bytes from the operating system's CSPRNG, as lowercase hex."""
    return secrets.token_hex(NONCE_BYTES)


def _proof(key: bytes, label: bytes, first: str, second: str, volume: str) -> str:
    # A malformed nonce here is a caller's bug (the codec refuses them on the wire); refusing it
    # keeps the "fixed-length parts" argument of the module docstring true.
    if not (is_token(first) and is_token(second)):
        raise ValueError("nonces must be 64 lowercase hex characters")
    message = label + first.encode("ascii") + second.encode("ascii") + volume.encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def server_proof(key: bytes, client_nonce: str, server_nonce: str, volume: str) -> str:
    """The secondary's proof: HMAC-SHA256(key, server label | client_nonce | server_nonce | volume).

    Like :func:`client_proof`, the nonces are taken in the order the message holds them.
    """
    return _proof(key, _SERVER_LABEL, client_nonce, server_nonce, volume)


def client_proof(key: bytes, server_nonce: str, client_nonce: str, volume: str) -> str:
    """The source's proof: HMAC-SHA256(key, client label | server_nonce | client_nonce | volume).

    The nonces are in the other order than in :func:`server_proof`'s message, as the protocol
    says; the parameters follow the message, so a call reads like the documentation.
    """
    return _proof(key, _CLIENT_LABEL, server_nonce, client_nonce, volume)


def verify(expected: str, given: str) -> bool:
    """Whether ``given`` equals ``expected``, in time independent of where they differ.

    Compared as bytes: ``hmac.compare_digest`` raises TypeError for non-ASCII strings, and
    ``given`` comes from the peer. ``surrogatepass`` makes any ``str`` encodable.
    """
    return hmac.compare_digest(
        expected.encode("utf-8", "surrogatepass"), given.encode("utf-8", "surrogatepass")
    )


def load_psk(path: str | os.PathLike[str]) -> bytes:
    """The key in the file at ``path``: its bytes without trailing whitespace (a final newline
    left by an editor or ``echo`` must not change the key).

    Raises :class:`AuthError` when the file cannot be read, or when the key is empty or shorter
    than :data:`MIN_KEY_BYTES` bytes.
    """
    try:
        with open(path, "rb") as f:
            key = f.read().rstrip()
    except OSError as exc:
        raise AuthError(f"cannot read pre-shared key file {os.fsdecode(path)}: {exc}") from exc
    if not key:
        raise AuthError(f"pre-shared key file {os.fsdecode(path)} is empty")
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(
            f"pre-shared key in {os.fsdecode(path)} is {len(key)} bytes, "
            f"need at least {MIN_KEY_BYTES}"
        )
    return key
