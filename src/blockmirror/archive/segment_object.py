"""Segment objects: a run of journal records as one archive object (sans-I/O).

The body is whole journal records exactly as the ring holds them (64-byte headers, payloads,
zero fill to 8 bytes; docs/journal.md), so the uploader hands over what ``Journal.read_run``
gave it and a restore checks every record's own CRC. The body is stored raw or as one zstd
frame, behind a 64-byte header (little-endian)::

    0  magic "BMAS"      4  u16 version 1     6  u16 flags (bit 0: zstd)
    8  u64 first        16  u64 last         24  u32 count = last - first + 1
    28 u32 CRC-32C of the stored body         32  u64 raw body length
    40 u64 first_ts     48  u64 last_ts      56  u32 reserved 0   60 u32 CRC-32C of 0..60

The header has its own CRC so that a listing check (:func:`segment_header`) can trust what a
ranged read of the first 64 bytes says without the body. Decoding refuses a raw length over
``max_raw`` before it decompresses anything, and decompresses with that bound: a small object
cannot expand into more memory than the caller allowed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import zstandard
from crc32c import crc32c

from blockmirror.archive.keys import U64_MAX, ArchiveFormatError, SegmentKey
from blockmirror.journal.format import (
    HEADER_SIZE,
    RECORD_ALIGN,
    Buffer,
    Kind,
    RecordError,
    padding_bytes,
    verify_record,
)
from blockmirror.journal.record import Record
from blockmirror.link.compression import FLAG_ZSTD, LEVELS, MIN_SAVING, Codec

__all__ = [
    "MAX_RAW",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_MAGIC",
    "SEGMENT_VERSION",
    "Segment",
    "SegmentHeader",
    "decode_segment",
    "encode_segment",
    "segment_header",
]

SEGMENT_MAGIC: Final = b"BMAS"
SEGMENT_VERSION: Final = 1
SEGMENT_HEADER_SIZE: Final = 64
MAX_RAW: Final = 1 << 30

_HEADER: Final = struct.Struct("<4sHHQQIIQQQI")
_CRC: Final = struct.Struct("<I")
_CRC_AT: Final = 60
assert _HEADER.size == _CRC_AT and _HEADER.size + _CRC.size == SEGMENT_HEADER_SIZE
_ZERO_FILL: Final = bytes(RECORD_ALIGN)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    flags: int
    first: int
    last: int
    count: int
    body_crc: int
    raw_len: int
    first_ts: int
    last_ts: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)

    def check_key(self, key: SegmentKey) -> None:
        """Raise :class:`ArchiveFormatError` unless the object under ``key`` says the same."""
        if (self.first, self.last, self.last_ts) != (key.first, key.last, key.last_ts):
            raise ArchiveFormatError(
                f"{key.key} holds records {self.first}..{self.last} (last at {self.last_ts})"
            )


@dataclass(frozen=True, slots=True)
class Segment:
    """Records ``first..last``, in order; each write's data is a view of the decoded body."""

    first: int
    last: int
    first_ts: int
    last_ts: int
    records: tuple[Record, ...]


# The sample of a large segment zstd is tried on first (see encode_segment).
PROBE_BYTES: Final = 1024 * 1024


def encode_segment(
    raw: Buffer,
    *,
    first: int,
    last: int,
    first_ts: int,
    last_ts: int,
    codec: Codec,
    level: int,
) -> bytes:
    """The object of records ``first..last`` whose journal bytes are ``raw``.

    Raises :class:`ValueError` when the arguments do not describe ``raw`` (the records are
    split and checked: a segment the archive would refuse is never uploaded), or for a codec
    or level that cannot be used. Compresses with zstd when asked and when that saves at least
    MIN_SAVING of the body; otherwise stores it raw. Releases the GIL while zstd works.
    """
    body = memoryview(raw).cast("B")
    if not 1 <= first <= last <= U64_MAX or last - first + 1 > 0xFFFF_FFFF:
        raise ValueError(f"records {first}..{last} cannot be one segment")
    try:
        records = _split(body, first)
    except ArchiveFormatError as exc:
        raise ValueError(f"not the journal bytes of records {first}..{last}: {exc}") from None
    _check_run(records, first, last, first_ts, last_ts, exc_type=ValueError)
    stored: Buffer = body
    flags = 0
    if codec is Codec.ZSTD:
        if level not in LEVELS:
            raise ValueError(f"zstd level {level} is outside {LEVELS.start}..{LEVELS.stop - 1}")
        # A compressor per call: segments are encoded in worker threads, and a ZstdCompressor
        # must not be used by two at once.
        compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        # A large body is first tried on a sample: data that will not shrink (already
        # compressed, encrypted) then costs one probe, not seconds of zstd for nothing.
        sample = memoryview(body)[:PROBE_BYTES]
        if len(body) <= 2 * PROBE_BYTES or len(compressor.compress(sample)) <= len(sample) * (
            1 - MIN_SAVING
        ):
            packed = compressor.compress(body)
            if len(packed) <= len(body) * (1 - MIN_SAVING):
                stored, flags = packed, FLAG_ZSTD
    elif codec is not Codec.NONE:
        raise ValueError(f"no segment codec {codec}")
    header = _HEADER.pack(
        SEGMENT_MAGIC,
        SEGMENT_VERSION,
        flags,
        first,
        last,
        last - first + 1,
        crc32c(stored),
        len(body),
        first_ts,
        last_ts,
        0,
    )
    return b"".join((header, _CRC.pack(crc32c(header)), stored))


def segment_header(obj_prefix: Buffer) -> SegmentHeader:
    """The header of a segment object from its first 64 bytes (more are ignored), checked:
    magic, version, its CRC, flags, reserved bytes, count and lengths that can be records."""
    view = memoryview(obj_prefix).cast("B")
    if len(view) < SEGMENT_HEADER_SIZE:
        raise ArchiveFormatError(f"segment of {len(view)} bytes is shorter than its header")
    (magic, version, flags, first, last, count, body_crc, raw_len, first_ts, last_ts, reserved) = (
        _HEADER.unpack_from(view)
    )
    if magic != SEGMENT_MAGIC:
        raise ArchiveFormatError(f"bad segment magic {magic!r}")
    if version != SEGMENT_VERSION:
        raise ArchiveFormatError(f"segment format version {version}, expected {SEGMENT_VERSION}")
    (stored_crc,) = _CRC.unpack_from(view, _CRC_AT)
    if crc32c(view[:_CRC_AT]) != stored_crc:
        raise ArchiveFormatError("segment header CRC mismatch")
    if flags & ~FLAG_ZSTD or reserved:
        raise ArchiveFormatError(f"segment flags 0x{flags:04x}, reserved 0x{reserved:08x}")
    if not 1 <= first <= last or count != last - first + 1:
        raise ArchiveFormatError(f"segment {first}..{last} with a count of {count}")
    # Every record is at least a header, and records keep the body aligned.
    if raw_len < count * HEADER_SIZE or raw_len % RECORD_ALIGN:
        raise ArchiveFormatError(f"segment body of {raw_len} bytes cannot hold {count} records")
    return SegmentHeader(flags, first, last, count, body_crc, raw_len, first_ts, last_ts)


def decode_segment(obj: Buffer, *, max_raw: int = MAX_RAW) -> Segment:
    """The records of a segment object, every check made: both CRCs, the raw length (at most
    ``max_raw``, before anything is decompressed), each record's CRC and zero fill, the seqs
    ``first..last`` with none missing or extra, and the timestamps the header repeats."""
    view = memoryview(obj).cast("B")
    h = segment_header(view)
    stored = view[SEGMENT_HEADER_SIZE:]
    if crc32c(stored) != h.body_crc:
        raise ArchiveFormatError("segment body CRC mismatch")
    if h.raw_len > max_raw:
        raise ArchiveFormatError(f"segment body of {h.raw_len} bytes, at most {max_raw}")
    body = memoryview(_unzstd(stored, h.raw_len)) if h.compressed else stored
    if len(body) != h.raw_len:
        raise ArchiveFormatError(f"segment body of {len(body)} bytes, header says {h.raw_len}")
    records = _split(body, h.first)
    _check_run(records, h.first, h.last, h.first_ts, h.last_ts, exc_type=ArchiveFormatError)
    return Segment(h.first, h.last, h.first_ts, h.last_ts, tuple(records))


def _unzstd(data: memoryview, size: int) -> bytes:
    """Exactly one zstd frame that states ``size`` as its content size, expanded."""
    try:
        stated = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ArchiveFormatError(f"compressed body: {exc}") from None
    if stated != size:
        raise ArchiveFormatError(f"zstd frame states {stated} bytes, the header {size}")
    try:
        # A decompressor per call: decoding runs in worker threads.
        raw = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=size, read_across_frames=False, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise ArchiveFormatError(f"compressed body: {exc}") from None
    if len(raw) != size:
        raise ArchiveFormatError(f"compressed body expanded to {len(raw)} bytes, not {size}")
    return raw


def _split(body: memoryview, first: int) -> list[Record]:
    """The records of ``body``, each verified, numbered from ``first`` with no gap."""
    end = len(body)
    pos = 0
    expected = first
    records: list[Record] = []
    while pos < end:
        if end - pos < HEADER_SIZE:
            raise ArchiveFormatError(f"{end - pos} bytes after record {expected - 1}")
        start = pos + HEADER_SIZE
        try:
            header = verify_record(body[pos:start], body[start:])
        except RecordError as exc:
            raise ArchiveFormatError(f"record at byte {pos}: {exc}") from None
        if header.kind is Kind.PADDING:
            # Padding fills the end of a ring; a run read from the journal never holds one.
            raise ArchiveFormatError(f"padding record at byte {pos}")
        if header.seq != expected:
            raise ArchiveFormatError(f"record seq {header.seq} where {expected} belongs")
        stop = start + header.payload_len
        fill = padding_bytes(header.payload_len)
        if stop + fill > end:
            raise ArchiveFormatError(f"record seq {header.seq} overruns the body")
        # The fill is outside every CRC, and the format says zero: junk there would be copied
        # on by whatever relays these bytes.
        if fill and body[stop : stop + fill] != _ZERO_FILL[:fill]:
            raise ArchiveFormatError(f"record seq {header.seq} has non-zero fill")
        records.append(Record.from_header(header, body[start:stop]))
        expected += 1
        pos = stop + fill
    return records


def _check_run(
    records: list[Record],
    first: int,
    last: int,
    first_ts: int,
    last_ts: int,
    *,
    exc_type: type[Exception],
) -> None:
    if not records or records[-1].seq != last:
        held = f"{first}..{records[-1].seq}" if records else "no records"
        raise exc_type(f"segment of records {first}..{last} holds {held}")
    if records[0].timestamp_ns != first_ts or records[-1].timestamp_ns != last_ts:
        raise exc_type(
            f"segment timestamps {first_ts}..{last_ts}, its records "
            f"{records[0].timestamp_ns}..{records[-1].timestamp_ns}"
        )
