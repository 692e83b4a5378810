"""The journal record codec: layout pinned to docs/journal.md, round trips, corruption caught."""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable

import pytest
from crc32c import crc32c
from hypothesis import assume, given
from hypothesis import strategies as st

from blockmirror.errors import BlockmirrorError
from blockmirror.journal.format import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    RECORD_ALIGN,
    VERSION,
    Buffer,
    Kind,
    RecordError,
    RecordHeader,
    decode_header,
    encode_header,
    padding_bytes,
    record_iov,
    record_size,
    verify_record,
)

U64 = st.integers(0, 2**64 - 1)
KINDS_WITHOUT_PAYLOAD = [Kind.ZERO, Kind.TRIM, Kind.FLUSH]


def raw_header(
    *,
    magic: int = MAGIC,
    version: int = VERSION,
    kind: int = Kind.WRITE,
    seq: int = 1,
    timestamp_ns: int = 0,
    offset: int = 0,
    length: int = 0,
    durable_seq: int = 0,
    payload_len: int = 0,
    reserved: int = 0,
    payload: bytes = b"",
) -> bytes:
    """Header bytes with any field values and a correct CRC, written independently of the codec."""
    body = struct.pack(
        "<IHHQQQQQIQ",
        magic,
        version,
        kind,
        seq,
        timestamp_ns,
        offset,
        length,
        durable_seq,
        payload_len,
        reserved,
    )
    return body + struct.pack("<I", crc32c(payload, crc32c(body)))


@st.composite
def records(draw: st.DrawFn, kinds: list[Kind] | None = None) -> tuple[RecordHeader, bytes]:
    """A consistent header of any kind with its payload (empty for all but writes)."""
    kind = draw(st.sampled_from(kinds or list(Kind)))
    if kind == Kind.WRITE:
        payload = draw(st.binary(max_size=3000))
    elif kind == Kind.BOOKMARK:
        payload = draw(st.binary(min_size=1, max_size=200))
    else:
        payload = b""
    if kind in (Kind.WRITE, Kind.BOOKMARK):
        length = len(payload)
        payload_len = len(payload)
    elif kind == Kind.PADDING:
        length = draw(st.one_of(st.just(0), U64))
        payload_len = draw(st.integers(0, MAX_PAYLOAD))
    else:
        length = draw(U64)
        payload_len = 0
    header = RecordHeader(
        kind=kind,
        seq=draw(U64),
        timestamp_ns=draw(U64),
        offset=draw(U64),
        length=length,
        durable_seq=draw(U64),
        payload_len=payload_len,
    )
    return header, payload


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[Buffer]:
    """``data`` cut at random points into bytes, bytearray and memoryview parts (some empty)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    parts: list[Buffer] = []
    for lo, hi in itertools.pairwise(bounds):
        piece = data[lo:hi]
        wrap = draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
        if wrap == "bytearray":
            parts.append(bytearray(piece))
        elif wrap == "memoryview":
            # A view into a larger buffer, as the NBD read path hands them over.
            parts.append(memoryview(b"<" + piece + b">")[1:-1])
        else:
            parts.append(piece)
    return parts


# --- layout, pinned to the table in docs/journal.md --------------------------------------------


def test_crc_is_castagnoli() -> None:
    # The standard check value of CRC-32C; CRC-32 (zlib) would give 0xCBF43926.
    assert crc32c(b"123456789") == 0xE3069283


def test_header_layout_matches_the_doc() -> None:
    h = RecordHeader(
        kind=Kind.WRITE,
        seq=0x1122334455667788,
        timestamp_ns=0x0102030405060708,
        offset=0x1000,
        length=5,
        durable_seq=0x99,
        payload_len=5,
    )
    raw = encode_header(h, [b"hello"])
    assert len(raw) == HEADER_SIZE == 64
    assert raw[0:4] == b"BMJR"
    assert raw[4:6] == (1).to_bytes(2, "little")
    assert raw[6:8] == (1).to_bytes(2, "little")
    assert raw[8:16] == (0x1122334455667788).to_bytes(8, "little")
    assert raw[16:24] == (0x0102030405060708).to_bytes(8, "little")
    assert raw[24:32] == (0x1000).to_bytes(8, "little")
    assert raw[32:40] == (5).to_bytes(8, "little")
    assert raw[40:48] == (0x99).to_bytes(8, "little")
    assert raw[48:52] == (5).to_bytes(4, "little")
    assert raw[52:60] == bytes(8)
    assert raw[60:64] == crc32c(raw[:60] + b"hello").to_bytes(4, "little")
    assert raw == raw_header(
        seq=h.seq,
        timestamp_ns=h.timestamp_ns,
        offset=h.offset,
        length=5,
        durable_seq=0x99,
        payload_len=5,
        payload=b"hello",
    )


def test_kind_values_match_the_doc() -> None:
    assert [(k.name, int(k)) for k in Kind] == [
        ("WRITE", 1),
        ("ZERO", 2),
        ("TRIM", 3),
        ("FLUSH", 4),
        ("PADDING", 5),
        ("BOOKMARK", 6),
    ]


@given(st.integers(0, 1 << 33))
def test_record_size_is_aligned_header_plus_payload(n: int) -> None:
    size = record_size(n)
    assert size % RECORD_ALIGN == 0
    assert size == HEADER_SIZE + n + padding_bytes(n)
    assert 0 <= padding_bytes(n) < RECORD_ALIGN
    assert size - RECORD_ALIGN < HEADER_SIZE + n <= size


def test_record_size_examples() -> None:
    assert record_size(0) == 64
    assert record_size(1) == 72
    assert record_size(8) == 72
    assert record_size(4096) == 4160
    assert padding_bytes(4095) == 1


# --- round trips -------------------------------------------------------------------------------


@given(records(), st.data())
def test_round_trip_all_kinds(record: tuple[RecordHeader, bytes], data: st.DataObject) -> None:
    h, payload = record
    parts = data.draw(split(payload))
    raw = encode_header(h, parts)
    assert len(raw) == HEADER_SIZE
    assert decode_header(raw) == h
    assert verify_record(raw, payload) == h
    # The parts were only read: the same parts encode to the same bytes again.
    assert encode_header(h, parts) == raw
    assert h.size == record_size(h.payload_len)


@given(records(), st.binary(max_size=100), st.binary(max_size=100))
def test_trailing_bytes_are_ignored(
    record: tuple[RecordHeader, bytes], after_header: bytes, after_payload: bytes
) -> None:
    h, payload = record
    raw = encode_header(h, [payload])
    assert decode_header(raw + after_header) == h
    assert decode_header(memoryview(bytearray(raw + after_header))) == h
    assert verify_record(raw + after_header, payload + after_payload) == h


@given(records(kinds=[Kind.WRITE]), st.data())
def test_record_iov_is_the_whole_aligned_record(
    record: tuple[RecordHeader, bytes], data: st.DataObject
) -> None:
    h, payload = record
    parts = data.draw(split(payload))
    whole = b"".join(bytes(b) for b in record_iov(h, parts))
    assert len(whole) == record_size(h.payload_len)
    assert whole[HEADER_SIZE : HEADER_SIZE + len(payload)] == payload
    assert whole[HEADER_SIZE + len(payload) :] == bytes(padding_bytes(len(payload)))
    assert verify_record(whole[:HEADER_SIZE], whole[HEADER_SIZE:]) == h


def test_padding_record_crc_covers_the_header_only() -> None:
    h = RecordHeader(Kind.PADDING, 7, 0, 0, 0, 0, payload_len=10_000)
    raw = encode_header(h)
    assert record_iov(h) == [raw]
    # Whatever lies in the skipped space, the record verifies: it is never written.
    assert verify_record(raw) == h
    assert verify_record(raw, b"\xff" * 20_000) == h
    assert raw[60:64] == crc32c(raw[:60]).to_bytes(4, "little")


# --- corruption --------------------------------------------------------------------------------


@given(records(), st.data())
def test_every_single_bit_flip_is_detected(
    record: tuple[RecordHeader, bytes], data: st.DataObject
) -> None:
    h, payload = record
    # A padding record's payload is never written, so only its header can be damaged.
    covered = HEADER_SIZE + (len(payload) if h.kind != Kind.PADDING else 0)
    buf = bytearray(encode_header(h, [payload]) + payload)
    bit = data.draw(st.integers(0, covered * 8 - 1), label="bit")
    buf[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordError):
        verify_record(buf[:HEADER_SIZE], buf[HEADER_SIZE:])


@given(records(kinds=[Kind.WRITE]), st.data())
def test_any_payload_damage_is_detected(
    record: tuple[RecordHeader, bytes], data: st.DataObject
) -> None:
    h, payload = record
    assume(payload)
    raw = encode_header(h, [payload])
    other = data.draw(st.binary(min_size=len(payload), max_size=len(payload)))
    assume(other != payload)
    with pytest.raises(RecordError, match="crc mismatch"):
        verify_record(raw, other)


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_garbage_raises_only_record_error(garbage: bytes, payload: bytes) -> None:
    decoders: list[Callable[[], RecordHeader]] = [
        lambda: decode_header(garbage),
        lambda: verify_record(garbage, payload),
    ]
    for decode in decoders:
        try:
            h = decode()
        except RecordError as exc:
            assert isinstance(exc, BlockmirrorError)
            assert str(exc)
        else:
            assert isinstance(h, RecordHeader)


@given(
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**16 - 1),
    st.binary(min_size=56, max_size=200),
    st.binary(max_size=100),
)
def test_garbage_behind_a_valid_magic_raises_only_record_error(
    version: int, kind: int, rest: bytes, payload: bytes
) -> None:
    # Past the magic, so the version, kind, reserved and length checks all get exercised.
    garbage = struct.pack("<IHH", MAGIC, version, kind) + rest
    with contextlib.suppress(RecordError):
        verify_record(garbage, payload)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"magic": 0x524A4D43}, "bad magic 0x524a4d43"),
        ({"version": 2}, "unknown record format version 2"),
        ({"kind": 0}, "unknown record kind 0"),
        ({"kind": 7}, "unknown record kind 7"),
        ({"reserved": 1 << 40}, "reserved bytes are not zero"),
        ({"kind": Kind.WRITE, "length": 4, "payload_len": 3}, "payload_len 3 != length 4"),
        ({"kind": Kind.ZERO, "length": 4096, "payload_len": 8}, "zero record with payload_len 8"),
        ({"kind": Kind.TRIM, "payload_len": 1}, "trim record with payload_len 1"),
        ({"kind": Kind.FLUSH, "payload_len": 64}, "flush record with payload_len 64"),
    ],
)
def test_decode_says_why(fields: dict[str, int], fragment: str) -> None:
    raw = raw_header(**fields)  # type: ignore[arg-type]
    with pytest.raises(RecordError, match=fragment):
        decode_header(raw)
    with pytest.raises(RecordError, match=fragment):
        verify_record(raw, bytes(100))


def test_padding_accepts_any_payload_len() -> None:
    raw = raw_header(kind=Kind.PADDING, payload_len=MAX_PAYLOAD, length=0)
    assert decode_header(raw).payload_len == MAX_PAYLOAD


def test_short_header_and_short_payload() -> None:
    h = RecordHeader(Kind.WRITE, 1, 0, 0, 10, 0, 10)
    raw = encode_header(h, [bytes(10)])
    with pytest.raises(RecordError, match="short record header: 63 bytes"):
        decode_header(raw[:63])
    with pytest.raises(RecordError, match="short record header: 0 bytes"):
        verify_record(b"")
    with pytest.raises(RecordError, match="truncated record seq 1: 9 payload bytes, need 10"):
        verify_record(raw, bytes(9))


def test_crc_mismatch_message_names_the_record() -> None:
    h = RecordHeader(Kind.WRITE, 42, 0, 0, 3, 0, 3)
    raw = encode_header(h, [b"abc"])
    with pytest.raises(RecordError, match=r"crc mismatch in record seq 42: stored 0x"):
        verify_record(raw, b"abd")


# --- encode refuses what decode would reject ---------------------------------------------------


@pytest.mark.parametrize(
    ("header", "parts", "fragment"),
    [
        (RecordHeader(Kind.WRITE, 1, 0, 0, 4, 0, 3), [b"abc"], "payload_len 3 != length 4"),
        (RecordHeader(Kind.WRITE, 1, 0, 0, 3, 0, 3), [b"ab"], "parts hold 2 bytes"),
        (RecordHeader(Kind.ZERO, 1, 0, 0, 4096, 0, 8), [bytes(8)], "zero record"),
        (RecordHeader(Kind.FLUSH, 1, 0, 0, 0, 0, 0), [b"x"], "parts hold 1 bytes"),
        (RecordHeader(Kind.PADDING, 1, 0, 0, 0, 0, 100), [bytes(100)], "parts hold 100"),
        (RecordHeader(Kind.TRIM, -1, 0, 0, 0, 0, 0), [], "out of range"),
        (RecordHeader(Kind.TRIM, 2**64, 0, 0, 0, 0, 0), [], "out of range"),
        (RecordHeader(Kind.PADDING, 1, 0, 0, 0, 0, 2**32), [], "out of range"),
        (RecordHeader(7, 1, 0, 0, 0, 0, 0), [], "unknown record kind 7"),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects_inconsistent_headers(
    header: RecordHeader, parts: list[bytes], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        encode_header(header, parts)


def test_header_is_frozen_and_slotted() -> None:
    h = RecordHeader(Kind.FLUSH, 1, 0, 0, 0, 0, 0)
    with pytest.raises(AttributeError):
        h.seq = 2  # type: ignore[misc]
    assert not hasattr(h, "__dict__")


@given(origin=st.integers(0, 2**32 - 1), seq=st.integers(1, 2**63), ts=st.integers(0, 2**63))
def test_origin_and_timestamp_round_trip(origin: int, seq: int, ts: int) -> None:
    h = RecordHeader(Kind.WRITE, seq, ts, 4096, 3, 0, 3, origin)
    raw = encode_header(h, [b"abc"])
    assert verify_record(raw, b"abc") == h


def test_a_header_written_before_origins_decodes_with_origin_zero() -> None:
    # Journals written before origins were kept have zeros at 52..60: they must still open.
    raw = raw_header(kind=Kind.FLUSH, seq=9, timestamp_ns=5)
    assert decode_header(raw).origin == 0


def test_the_reserved_half_after_the_origin_must_be_zero() -> None:
    with pytest.raises(RecordError, match="reserved bytes are not zero"):
        decode_header(raw_header(kind=Kind.FLUSH, reserved=1 << 32))
    assert decode_header(raw_header(kind=Kind.FLUSH, reserved=7)).origin == 7
