"""The journal's record codec: the 64-byte record header of docs/journal.md, sans-I/O.

A record on disk is a header, ``payload_len`` bytes of payload, then zero bytes up to the next
multiple of :data:`RECORD_ALIGN`. The header ends with a CRC-32C over its first 60 bytes and the
payload, so a torn or corrupted record is recognised during recovery.

This module is on the host write path (one :func:`encode_header` per host write), so it keeps the
per-record cost to one precompiled ``struct`` call, one CRC call per payload part and a few
comparisons. Payload parts are checksummed where they lie: nothing is copied or joined.

Padding records are the exception to "the CRC covers the payload": their payload is the unused
end of the ring, never written, so their CRC covers the header alone (docs/journal.md).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from crc32c import crc32c

from blockmirror.errors import JournalError

__all__ = [
    "CRC_OFFSET",
    "EXTENT_KINDS",
    "HEADER_SIZE",
    "HEADER_STRUCT",
    "MAGIC",
    "MAX_BOOKMARK",
    "MAX_PAYLOAD",
    "PAYLOAD_KINDS",
    "RECORD_ALIGN",
    "VERSION",
    "Buffer",
    "Kind",
    "RecordError",
    "RecordHeader",
    "decode_header",
    "encode_header",
    "padding_bytes",
    "record_iov",
    "record_size",
    "verify_record",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

HEADER_SIZE: Final = 64
RECORD_ALIGN: Final = 8
# Little-endian, so the first four bytes on disk read "BMJR" in a hex dump.
MAGIC: Final = 0x524A4D42
VERSION: Final = 1
MAX_PAYLOAD: Final = 0xFFFF_FFFF  # payload_len is a u32

# Bytes 0..60: everything the CRC covers. Bytes 60..64: the CRC itself. Bytes 52..56 name the
# unit where the write was made (its origin id; zero in journals written before origins were
# kept, which still open), bytes 56..60 are reserved and must be zero.
_BODY = struct.Struct("<IHHQQQQQIII")
_CRC = struct.Struct("<I")
_FULL = struct.Struct("<IHHQQQQQIIII")
_CRC_OFFSET: Final = 60
assert _BODY.size == _CRC_OFFSET and _FULL.size == HEADER_SIZE
# The whole header, CRC last, for a reader that decodes many records from one buffer and checks
# the fields itself (the start-up scan, journal/scan.py): magic, version, kind, seq, timestamp,
# offset, length, durable_seq, payload_len, origin, reserved, CRC. The CRC covers bytes
# 0..CRC_OFFSET, then the payload.
HEADER_STRUCT: Final = _FULL
CRC_OFFSET: Final = _CRC_OFFSET

# Zero fill after a payload is at most RECORD_ALIGN - 1 bytes; slices of this avoid allocating.
_ZERO_FILL: Final = bytes(RECORD_ALIGN)


class RecordError(JournalError):
    """Bytes in the ring are not a valid record. The message says what is wrong with them."""


class Kind(enum.IntEnum):
    """What a record does to the volume (or, for padding, that it fills the end of the ring)."""

    WRITE = 1
    ZERO = 2
    TRIM = 3
    FLUSH = 4
    PADDING = 5
    # A named point (issue 10): the payload is the UTF-8 name, ``length`` its size, ``offset``
    # zero; it changes nothing in the volume and marks nothing dirty.
    BOOKMARK = 6


# Records whose payload is their ``length`` bytes, and records that change a range of the
# volume (a bookmark and a flush change none).
PAYLOAD_KINDS: Final = frozenset({Kind.WRITE, Kind.BOOKMARK})
EXTENT_KINDS: Final = frozenset({Kind.WRITE, Kind.ZERO, Kind.TRIM})
# The longest bookmark name, in bytes of UTF-8.
MAX_BOOKMARK: Final = 200


# A dict lookup is several times cheaper than calling the enum on the decode path.
_KINDS: Final = {int(k): k for k in Kind}


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """A decoded record header (without magic, version, reserved bytes and CRC).

    ``length`` is the extent in the volume; for a write it equals ``payload_len``. A padding record
    carries the sequence number of the record that follows it and covers the rest of the ring
    with ``payload_len``. ``timestamp_ns`` and ``origin`` are the time and the unit of the
    host's write at its primary: every hop keeps them (history depends on it).
    """

    kind: Kind
    seq: int
    timestamp_ns: int
    offset: int
    length: int
    durable_seq: int
    payload_len: int
    origin: int = 0

    @property
    def size(self) -> int:
        """Bytes this record occupies in the ring, header and zero fill included."""
        return record_size(self.payload_len)


def record_size(payload_len: int) -> int:
    """Header plus payload, rounded up to :data:`RECORD_ALIGN`."""
    return (HEADER_SIZE + payload_len + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)


def padding_bytes(payload_len: int) -> int:
    """Zero bytes that follow a payload of ``payload_len`` bytes to keep records aligned."""
    return -payload_len % RECORD_ALIGN


def _inconsistency(kind: int, length: int, payload_len: int) -> str | None:
    """Why ``payload_len`` cannot belong to a record of this kind, or None when it can."""
    if kind in (Kind.WRITE, Kind.BOOKMARK):
        if payload_len != length:
            name = Kind(kind).name.lower()
            return f"{name} record with payload_len {payload_len} != length {length}"
        if kind == Kind.BOOKMARK and not 0 < length <= MAX_BOOKMARK:
            return f"bookmark record with a name of {length} bytes (1 to {MAX_BOOKMARK})"
    elif kind != Kind.PADDING and payload_len != 0:
        return f"{Kind(kind).name.lower()} record with payload_len {payload_len}, expected 0"
    return None


def encode_header(h: RecordHeader, payload: Sequence[Buffer] = ()) -> bytes:
    """The 64 header bytes of a record whose payload is the concatenation of ``payload``.

    The parts are checksummed in place, so the caller can hand the host's buffers straight to
    ``pwritev`` after this header (see :func:`record_iov`). A padding record takes no payload
    parts: its CRC covers the header alone. Raises :class:`ValueError` for a header that could
    not be decoded again (the journal must never hold a record recovery would reject).
    """
    if h.kind not in _KINDS:
        raise ValueError(f"unknown record kind {h.kind!r}")
    why = _inconsistency(h.kind, h.length, h.payload_len)
    if why is not None:
        raise ValueError(why)
    total = 0
    for part in payload:
        total += part.nbytes if isinstance(part, memoryview) else len(part)
    expected = 0 if h.kind == Kind.PADDING else h.payload_len
    if total != expected:
        raise ValueError(f"payload parts hold {total} bytes, the header says {expected}")
    try:
        body = _BODY.pack(
            MAGIC,
            VERSION,
            h.kind,
            h.seq,
            h.timestamp_ns,
            h.offset,
            h.length,
            h.durable_seq,
            h.payload_len,
            h.origin,
            0,
        )
    except struct.error as exc:
        raise ValueError(f"record header field out of range: {exc}") from None
    crc = crc32c(body)
    for part in payload:
        crc = crc32c(part, crc)
    return body + _CRC.pack(crc)


def record_iov(h: RecordHeader, payload: Sequence[Buffer] = ()) -> list[Buffer]:
    """The buffers of a whole record, ready for ``pwritev``: header, payload parts, zero fill.

    A padding record is only its header: the rest of the space it covers is not written.
    """
    iov: list[Buffer] = [encode_header(h, payload)]
    if h.kind != Kind.PADDING:
        iov.extend(payload)
        fill = padding_bytes(h.payload_len)
        if fill:
            iov.append(_ZERO_FILL[:fill])
    return iov


def decode_header(buf: Buffer) -> RecordHeader:
    """Parse the first 64 bytes of ``buf`` (later bytes are ignored) without checking the CRC.

    Raises :class:`RecordError` saying why the bytes are not a record header: too short, bad
    magic, unknown version or kind, reserved bytes not zero, or a payload length that does not
    fit the kind. Use :func:`verify_record` to check the CRC as well.
    """
    size = buf.nbytes if isinstance(buf, memoryview) else len(buf)
    if size < HEADER_SIZE:
        raise RecordError(f"short record header: {size} bytes, need {HEADER_SIZE}")
    (
        magic,
        version,
        kind,
        seq,
        timestamp_ns,
        offset,
        length,
        durable_seq,
        payload_len,
        origin,
        reserved,
        _crc,
    ) = _FULL.unpack_from(buf)
    if magic != MAGIC:
        raise RecordError(f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}")
    if version != VERSION:
        raise RecordError(f"unknown record format version {version}, expected {VERSION}")
    k = _KINDS.get(kind)
    if k is None:
        raise RecordError(f"unknown record kind {kind}")
    if reserved != 0:
        raise RecordError(f"reserved bytes are not zero (0x{reserved:08x})")
    why = _inconsistency(kind, length, payload_len)
    if why is not None:
        raise RecordError(why)
    return RecordHeader(k, seq, timestamp_ns, offset, length, durable_seq, payload_len, origin)


def verify_record(header_bytes: Buffer, payload: Buffer = b"") -> RecordHeader:
    """Decode a header and check its CRC against the first ``payload_len`` bytes of ``payload``.

    ``payload`` may be longer than the payload (a whole read of the ring, say): the rest is
    ignored. For a padding record the payload is not looked at, since its CRC covers the
    header alone. Raises :class:`RecordError` for a bad header, a short payload or a CRC
    mismatch.
    """
    h = decode_header(header_bytes)
    crc = crc32c(memoryview(header_bytes).cast("B")[:_CRC_OFFSET])
    if h.kind != Kind.PADDING and h.payload_len:
        view = memoryview(payload).cast("B")
        if len(view) < h.payload_len:
            raise RecordError(
                f"truncated record seq {h.seq}: {len(view)} payload bytes, need {h.payload_len}"
            )
        crc = crc32c(view[: h.payload_len], crc)
    (stored,) = _CRC.unpack_from(header_bytes, _CRC_OFFSET)
    if stored != crc:
        raise RecordError(
            f"crc mismatch in record seq {h.seq}: stored 0x{stored:08x}, computed 0x{crc:08x}"
        )
    return h
