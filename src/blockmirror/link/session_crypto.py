"""Sealed link sessions: every frame after the handshake encrypted and authenticated
(docs/link-protocol.md, "Sealed sessions").

With a pre-shared key and no TLS, both ends derive two session keys from the key, both nonces
and the HELLO they agreed on (HKDF-SHA256, one key per direction), and from then on every link
frame (or several, as the caller hands them over) travels as one *sealed record*:

| offset | size | field |
|---|---|---|
| 0 | 4 | magic `0x4B4C4D42` (`BMLK`) |
| 4 | 1 | type 13 (SEALED) |
| 5 | 3 | zero |
| 8 | 4 | length of what follows: ciphertext and the 16-byte tag |

then ChaCha20-Poly1305 over the plaintext frames, with the 12 header bytes as associated data
and as nonce the record's number in its direction (4 zero bytes, then a u64 counter from 0).
The counter is never sent: a record replayed, reordered, dropped or moved to the other direction
opens with the wrong nonce or key and is refused, like one with any bit changed.

Sans-I/O, like the frame codec: :class:`Sealer` turns buffers into sealed records, and
:class:`Opener` turns received bytes back into plaintext for :class:`~blockmirror.link.protocol.
LinkCodec`. One AEAD call per record, and a record carries a whole frame (a RECORDS frame of
many journal records, a 1 MiB SYNC_DATA), so the cost is per frame, never per block.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blockmirror.errors import ProtocolError
from blockmirror.journal.format import Buffer
from blockmirror.link.protocol import FRAME_HEADER_SIZE, MAGIC, MAX_PAYLOAD, Hello

__all__ = [
    "CHACHA20_POLY1305",
    "KEY_BYTES",
    "MAX_SEALED",
    "SEALED_HEADER_SIZE",
    "SEALED_TYPE",
    "TAG_BYTES",
    "IntegrityError",
    "Opener",
    "Sealer",
    "SessionKeys",
    "derive_keys",
    "hello_digest",
]

CHACHA20_POLY1305: Final = "chacha20-poly1305"
"""The one AEAD of version 1, as HELLO's and AUTH_SERVER's ``crypto`` field names it."""

SEALED_TYPE: Final = 13
SEALED_HEADER_SIZE: Final = 12
TAG_BYTES: Final = 16
KEY_BYTES: Final = 32
# One record holds at most one largest frame and its tag: a peer cannot make us buffer more.
MAX_SEALED: Final = FRAME_HEADER_SIZE + MAX_PAYLOAD + TAG_BYTES

_HEADER: Final = struct.Struct("<IB3xI")
assert _HEADER.size == SEALED_HEADER_SIZE
_NONCE_PAD: Final = bytes(4)
_COUNTER: Final = struct.Struct("<Q")
_COUNTER_LIMIT: Final = 2**64

# HKDF "info" labels, one per direction, followed by the HELLO digest (32 bytes).
_SOURCE_LABEL: Final = b"blockmirror-link-v1 source-to-secondary"
_SECONDARY_LABEL: Final = b"blockmirror-link-v1 secondary-to-source"


class IntegrityError(ProtocolError):
    """A sealed record failed to open (altered, forged, replayed, reordered, dropped,
    truncated at a record boundary the peer never sent), or bytes that are not a sealed
    record arrived where one belongs. The session cannot go on."""


_NOT_DIGESTED = ("configs", "compression")


def hello_digest(hello: Hello) -> bytes:
    """SHA-256 of the HELLO's fields in one canonical spelling (JSON, sorted keys).

    Mixed into the session keys, so both ends seal with the same keys only if they saw the
    same HELLO: a man in the middle who changed its ``volume_id``, ``size``, ``max_record`` or
    ``crypto`` (which the proofs do not cover) makes the first sealed frame fail to open.
    Computed from the decoded fields, not the bytes: unknown keys a peer adds do not count,
    and both ends agree whatever JSON spelling the sender used.
    """
    fields = asdict(hello)
    # Capabilities added after this digest was defined are left out, so that an older peer
    # (which ignores their keys) derives the same keys. A changed flag only turns an optional
    # exchange on or off; what it enables travels sealed.
    for late in _NOT_DIGESTED:
        fields.pop(late, None)
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).digest()


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(key)


class SessionKeys:
    """The two keys of one session: ``source`` seals what the source sends, ``secondary``
    what the secondary sends."""

    __slots__ = ("secondary", "source")

    def __init__(self, source: bytes, secondary: bytes) -> None:
        self.source = source
        self.secondary = secondary


def derive_keys(psk: bytes, client_nonce: str, server_nonce: str, hello: Hello) -> SessionKeys:
    """HKDF-SHA256 with the pre-shared key as input key material, the two nonces (decoded,
    client's first) as salt, and per direction a label and :func:`hello_digest` as info."""
    salt = bytes.fromhex(client_nonce) + bytes.fromhex(server_nonce)
    digest = hello_digest(hello)
    return SessionKeys(
        _hkdf(psk, salt, _SOURCE_LABEL + digest), _hkdf(psk, salt, _SECONDARY_LABEL + digest)
    )


def _nonce(counter: int) -> bytes:
    return _NONCE_PAD + _COUNTER.pack(counter)


class Sealer:
    """Seals one direction of a session: buffers in, one sealed record out per call."""

    __slots__ = ("_aead", "counter")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.counter = 0

    def seal(self, buffers: Sequence[Buffer]) -> list[Buffer]:
        """One sealed record holding ``buffers`` joined (at most one largest frame), as
        buffers for ``writelines``."""
        plain: Buffer = buffers[0] if len(buffers) == 1 else b"".join(buffers)
        size = memoryview(plain).nbytes
        if size == 0 or size + TAG_BYTES > MAX_SEALED:
            raise ValueError(f"cannot seal {size} bytes (1..{MAX_SEALED - TAG_BYTES})")
        if self.counter >= _COUNTER_LIMIT:
            raise IntegrityError("2**64 sealed records in one session: reconnect")
        header = _HEADER.pack(MAGIC, SEALED_TYPE, size + TAG_BYTES)
        sealed = self._aead.encrypt(_nonce(self.counter), plain, header)
        self.counter += 1
        return [header, sealed]


class Opener:
    """Opens one direction of a session: received bytes in, plaintext out, in order.

    Every check that the 12 header bytes allow is made on them before the record is buffered
    (magic, type, zero fill, a length of at most :data:`MAX_SEALED`). Once a record fails, the
    opener stays failed: nothing after it is trusted.
    """

    __slots__ = ("_aead", "_buffer", "_error", "_need", "counter")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._buffer = bytearray()
        self._need: int | None = None  # ciphertext length of the record in progress
        self._error: IntegrityError | None = None
        self.counter = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: Buffer) -> list[bytes]:
        """Plaintext of every record completed by ``data`` (possibly none)."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except IntegrityError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise

    def _feed(self, data: Buffer) -> list[bytes]:
        buf = self._buffer
        buf += data
        out: list[bytes] = []
        while True:
            if self._need is None:
                if len(buf) < SEALED_HEADER_SIZE:
                    return out
                magic, kind, length = _HEADER.unpack_from(buf)
                if magic != MAGIC or kind != SEALED_TYPE or bytes(buf[5:8]) != b"\0\0\0":
                    what = f"frame type {kind}" if magic == MAGIC else f"magic 0x{magic:08x}"
                    raise IntegrityError(
                        f"sealed record {self.counter}: {what} where a sealed record belongs "
                        "(an unsealed frame injected, or a peer that does not seal)"
                    )
                if not TAG_BYTES < length <= MAX_SEALED:
                    raise IntegrityError(
                        f"sealed record {self.counter} announces {length} bytes, "
                        f"allowed {TAG_BYTES + 1}..{MAX_SEALED}"
                    )
                self._need = length
            end = SEALED_HEADER_SIZE + self._need
            if len(buf) < end:
                return out
            with memoryview(buf) as view:
                try:
                    plain = self._aead.decrypt(
                        _nonce(self.counter),
                        view[SEALED_HEADER_SIZE:end],
                        view[:SEALED_HEADER_SIZE],
                    )
                except InvalidTag:
                    raise IntegrityError(
                        f"sealed record {self.counter} of {self._need} bytes failed "
                        "authentication (altered, forged, replayed, reordered or dropped on "
                        "the way)"
                    ) from None
            del buf[:end]
            self._need = None
            self.counter += 1
            out.append(plain)
