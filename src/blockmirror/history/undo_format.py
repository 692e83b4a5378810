"""The history's record codec: the 64-byte undo-record header of docs/history.md, sans-I/O.

A history segment is a sequence of records, each a header, ``payload_len`` bytes of payload and
zero fill up to a multiple of :data:`ALIGN`. The header ends with a CRC-32C over its first 60
bytes and the payload, so the torn tail a crash leaves is recognised when the segment is read
again. The layout follows the journal's record header (``journal/format.py``) field for field
where the meaning is the same (seq, origin timestamp, offset, length, origin unit), with its own
magic so that a history segment is never taken for a journal ring or the other way round.
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
    "ALIGN",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_NAME",
    "NOT_WHOLE",
    "UNJOURNALED",
    "VERSION",
    "Buffer",
    "HistoryKind",
    "HistoryRecordError",
    "UndoHeader",
    "decode",
    "encode",
    "padded",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

HEADER_SIZE: Final = 64
ALIGN: Final = 8
# Little-endian, so a hex dump of a segment starts with "BMHU".
MAGIC: Final = 0x55484D42
VERSION: Final = 1
# A bookmark's name is at most this many bytes of UTF-8.
MAX_NAME: Final = 200
# Flag: the change that this before-image undoes was not a journal record (a resync region or
# a host write while the journal's enqueueing was paused); its ``seq`` is the last journal
# record applied before it.
UNJOURNALED: Final = 1
# Flag of a RESYNC_BEGIN: the volume was not consistent when the resync began.
NOT_WHOLE: Final = 1
_KNOWN_FLAGS: Final = UNJOURNALED | NOT_WHOLE

_BODY = struct.Struct("<IHHQQQQIIIII")
_CRC = struct.Struct("<I")
_CRC_OFFSET: Final = 60
assert _BODY.size == _CRC_OFFSET


class HistoryRecordError(JournalError):
    """Bytes in a history segment are not a valid record; the message says why."""


class HistoryKind(enum.IntEnum):
    """What one history record says."""

    # The bytes a change overwrote (payload: exactly ``length`` bytes).
    UNDO_DATA = 1
    # A change overwrote ``length`` bytes that read as zeros (no payload).
    UNDO_ZERO = 2
    # A named point: the state after record ``seq`` (payload: the UTF-8 name).
    BOOKMARK = 3
    # First record of every segment: the point just before the segment's first change
    # (``seq`` and ``timestamp_ns`` of the newest record applied before it).
    SEGMENT = 4
    # A resync began after record ``seq``: no point is whole until the next RESYNC_END.
    RESYNC_BEGIN = 5
    # The resync is done: the state after record ``seq`` is whole again.
    RESYNC_END = 6
    # The volume's numbering starts again at ``seq`` + 1 (a full copy from another source).
    REBASE = 7


_KINDS: Final = {int(k): k for k in HistoryKind}


@dataclass(frozen=True, slots=True)
class UndoHeader:
    """A decoded history record header (magic, version, reserved bytes and CRC aside)."""

    kind: HistoryKind
    seq: int
    timestamp_ns: int
    offset: int = 0
    length: int = 0
    origin: int = 0
    flags: int = 0
    payload_len: int = 0

    @property
    def size(self) -> int:
        """Bytes the record occupies in its segment, zero fill included."""
        return padded(HEADER_SIZE + self.payload_len)


def padded(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN`."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _inconsistency(kind: int, length: int, payload_len: int, flags: int) -> str | None:
    if flags & ~_KNOWN_FLAGS:
        return f"unknown flags 0x{flags:x}"
    if kind == HistoryKind.UNDO_DATA:
        if payload_len != length:
            return f"before-image of {length} bytes with payload_len {payload_len}"
    elif kind == HistoryKind.BOOKMARK:
        if not 0 < payload_len <= MAX_NAME:
            return f"bookmark name of {payload_len} bytes (1 to {MAX_NAME} allowed)"
    elif payload_len != 0:
        return f"{HistoryKind(kind).name.lower()} record with payload_len {payload_len}"
    return None


def encode(h: UndoHeader, payload: Sequence[Buffer] = ()) -> list[Buffer]:
    """The buffers of a whole record (header, payload parts, zero fill) for ``pwritev``.

    Raises :class:`ValueError` for a record that could not be decoded again.
    """
    why = _inconsistency(h.kind, h.length, h.payload_len, h.flags)
    if why is not None:
        raise ValueError(why)
    total = sum(memoryview(p).nbytes for p in payload)
    if total != h.payload_len:
        raise ValueError(f"payload parts hold {total} bytes, the header says {h.payload_len}")
    try:
        body = _BODY.pack(
            MAGIC,
            VERSION,
            h.kind,
            h.seq,
            h.timestamp_ns,
            h.offset,
            h.length,
            h.origin,
            h.flags,
            h.payload_len,
            0,
            0,
        )
    except struct.error as exc:
        raise ValueError(f"history record field out of range: {exc}") from None
    crc = crc32c(body)
    for part in payload:
        crc = crc32c(part, crc)
    iov: list[Buffer] = [body + _CRC.pack(crc), *payload]
    fill = padded(h.payload_len) - h.payload_len
    if fill:
        iov.append(bytes(fill))
    return iov


def decode(header: Buffer, payload: Buffer | None = None) -> UndoHeader:
    """Parse a 64-byte header and, with ``payload`` (at least ``payload_len`` bytes), check
    its CRC. Without ``payload`` only a record without one can be checked; for the others the
    CRC is left to the caller's second call. Raises :class:`HistoryRecordError` saying why."""
    view = memoryview(header).cast("B")
    if len(view) < HEADER_SIZE:
        raise HistoryRecordError(f"short history header: {len(view)} bytes of {HEADER_SIZE}")
    (
        magic,
        version,
        kind,
        seq,
        timestamp_ns,
        offset,
        length,
        origin,
        flags,
        payload_len,
        reserved_a,
        reserved_b,
    ) = _BODY.unpack_from(view)
    if magic != MAGIC:
        raise HistoryRecordError(f"bad magic 0x{magic:08x}")
    if version != VERSION:
        raise HistoryRecordError(f"unknown history format version {version}")
    k = _KINDS.get(kind)
    if k is None:
        raise HistoryRecordError(f"unknown history record kind {kind}")
    if reserved_a or reserved_b:
        raise HistoryRecordError("reserved bytes are not zero")
    why = _inconsistency(kind, length, payload_len, flags)
    if why is not None:
        raise HistoryRecordError(why)
    h = UndoHeader(k, seq, timestamp_ns, offset, length, origin, flags, payload_len)
    if payload is None and payload_len:
        return h
    crc = crc32c(view[:_CRC_OFFSET])
    if payload_len:
        body = memoryview(payload if payload is not None else b"").cast("B")
        if len(body) < payload_len:
            raise HistoryRecordError(f"truncated record: {len(body)} of {payload_len} bytes")
        crc = crc32c(body[:payload_len], crc)
    (stored,) = _CRC.unpack_from(view, _CRC_OFFSET)
    if stored != crc:
        raise HistoryRecordError(
            f"crc mismatch in history record (seq {seq}): stored 0x{stored:08x}, "
            f"computed 0x{crc:08x}"
        )
    return h
