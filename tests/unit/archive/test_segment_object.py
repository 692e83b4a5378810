"""Segment objects: round trips of journal records raw and compressed, and every malformed
object (truncated, a byte flipped, resealed with right CRCs but wrong contents) refused with
ArchiveFormatError and nothing else."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import pytest
import zstandard
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.archive.keys import ArchiveFormatError, SegmentKey
from blockmirror.archive.segment_object import (
    SEGMENT_HEADER_SIZE,
    decode_segment,
    encode_segment,
    segment_header,
)
from blockmirror.journal.format import Kind, RecordHeader, encode_header, record_iov
from blockmirror.link.compression import Codec

U64 = st.integers(0, 2**64 - 1)
GEN = "cd" * 16


@dataclass(frozen=True)
class Rec:
    kind: Kind
    ts: int
    offset: int
    length: int
    payload: bytes = b""
    origin: int = 0


def journal_bytes(recs: list[Rec], first: int) -> bytes:
    out = []
    for seq, r in enumerate(recs, first):
        h = RecordHeader(r.kind, seq, r.ts, r.offset, r.length, 0, len(r.payload), r.origin)
        out += [bytes(b) for b in record_iov(h, [r.payload] if r.payload else [])]
    return b"".join(out)


payloads = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.integers(1, 5000).map(lambda n: b"ab" * n),
)
recs = st.one_of(
    st.builds(
        lambda ts, off, p, o: Rec(Kind.WRITE, ts, off, len(p), p, o),
        U64,
        st.integers(0, 2**40),
        payloads,
        st.integers(0, 2**32 - 1),
    ),
    st.builds(Rec, st.sampled_from([Kind.ZERO, Kind.TRIM]), U64, st.integers(0, 2**40), U64),
    st.builds(Rec, st.just(Kind.FLUSH), U64, st.just(0), st.just(0)),
    st.builds(
        lambda ts, name: Rec(Kind.BOOKMARK, ts, 0, len(name), name),
        U64,
        st.binary(min_size=1, max_size=200),
    ),
)


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[Rec], int]:
    return draw(st.lists(recs, min_size=1, max_size=8)), draw(st.integers(1, 2**40))


def encode(rs: list[Rec], first: int, codec: Codec = Codec.ZSTD) -> bytes:
    return encode_segment(
        journal_bytes(rs, first),
        first=first,
        last=first + len(rs) - 1,
        first_ts=rs[0].ts,
        last_ts=rs[-1].ts,
        codec=codec,
        level=3,
    )


def seal(
    stored: bytes,
    *,
    first: int,
    last: int,
    raw_len: int,
    first_ts: int = 0,
    last_ts: int = 0,
    flags: int = 0,
    count: int | None = None,
    magic: bytes = b"BMAS",
    version: int = 1,
    reserved: int = 0,
) -> bytes:
    """A segment object built by hand (not by the encoder under test) with right CRCs."""
    head = struct.pack(
        "<4sHHQQIIQQQI",
        magic,
        version,
        flags,
        first,
        last,
        last - first + 1 if count is None else count,
        crc32c(stored),
        raw_len,
        first_ts,
        last_ts,
        reserved,
    )
    return head + struct.pack("<I", crc32c(head)) + stored


@given(runs(), st.sampled_from([Codec.NONE, Codec.ZSTD]))
def test_round_trip(run: tuple[list[Rec], int], codec: Codec) -> None:
    rs, first = run
    obj = encode(rs, first, codec)
    seg = decode_segment(obj)
    assert (seg.first, seg.last) == (first, first + len(rs) - 1)
    assert (seg.first_ts, seg.last_ts) == (rs[0].ts, rs[-1].ts)
    assert len(seg.records) == len(rs)
    for seq, (got, want) in enumerate(zip(seg.records, rs, strict=True), first):
        assert (got.kind, got.seq, got.timestamp_ns, got.offset, got.length, got.origin) == (
            want.kind,
            seq,
            want.ts,
            want.offset,
            want.length,
            want.origin,
        )
        assert b"".join(bytes(d) for d in got.data) == want.payload
    h = segment_header(obj[:SEGMENT_HEADER_SIZE])
    assert (h.first, h.last, h.count, h.raw_len) == (
        seg.first,
        seg.last,
        len(rs),
        len(journal_bytes(rs, first)),
    )
    h.check_key(SegmentKey(GEN, seg.first, seg.last, seg.last_ts))
    with pytest.raises(ArchiveFormatError):
        h.check_key(SegmentKey(GEN, seg.first, seg.last + 1, seg.last_ts))


def test_compression_only_when_it_saves() -> None:
    compressible = [Rec(Kind.WRITE, 1, 0, 65536, bytes(65536))]
    obj = encode(compressible, 1)
    assert segment_header(obj).compressed and len(obj) < 1000
    noise = random.Random(7).randbytes(65536)
    obj = encode([Rec(Kind.WRITE, 1, 0, 65536, noise)], 1)
    raw = journal_bytes([Rec(Kind.WRITE, 1, 0, 65536, noise)], 1)
    assert not segment_header(obj).compressed
    assert obj[SEGMENT_HEADER_SIZE:] == raw
    assert not segment_header(encode(compressible, 1, Codec.NONE)).compressed


@settings(max_examples=50)
@given(runs(), st.sampled_from([Codec.NONE, Codec.ZSTD]), st.data())
def test_truncated_or_flipped(
    run: tuple[list[Rec], int], codec: Codec, data: st.DataObject
) -> None:
    rs, first = run
    obj = encode(rs, first, codec)
    cut = data.draw(st.integers(0, len(obj) - 1))
    with pytest.raises(ArchiveFormatError):
        decode_segment(obj[:cut])
    i = data.draw(st.integers(0, len(obj) - 1))
    flipped = bytearray(obj)
    flipped[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ArchiveFormatError):
        decode_segment(bytes(flipped))


@given(st.binary(max_size=200), st.booleans(), st.integers(1, 4), st.integers(0, 400))
def test_garbage_behind_a_right_header(junk: bytes, zstd: bool, count: int, raw: int) -> None:
    obj = seal(junk, first=5, last=4 + count, raw_len=raw * 8, flags=int(zstd))
    with pytest.raises(ArchiveFormatError):
        decode_segment(obj)


THREE = [Rec(Kind.WRITE, 10, 0, 5, b"hello"), Rec(Kind.FLUSH, 11, 0, 0), Rec(Kind.ZERO, 12, 0, 9)]
RAW = journal_bytes(THREE, 7)


def sealed(stored: bytes = RAW, **fields: int | bytes) -> bytes:
    base: dict[str, int | bytes] = {
        "first": 7,
        "last": 9,
        "raw_len": len(RAW),
        "first_ts": 10,
        "last_ts": 12,
    }
    base.update(fields)
    return seal(stored, **base)  # type: ignore[arg-type]


def test_hand_sealed_reference_decodes() -> None:
    seg = decode_segment(sealed())
    assert [r.seq for r in seg.records] == [7, 8, 9]
    zipped = zstandard.ZstdCompressor(write_content_size=True).compress(RAW)
    assert decode_segment(sealed(zipped, flags=1)).records[0].data[0] == b"hello"


def fill_of_first() -> bytes:
    raw = bytearray(RAW)
    raw[64 + 5] = 1  # the fill after "hello": outside the record's CRC
    return bytes(raw)


def padding() -> bytes:
    h = RecordHeader(Kind.PADDING, 7, 10, 0, 0, 0, 64)
    return encode_header(h) + RAW[RAW.index(b"hello") + 8 :]


def extra_record() -> bytes:
    return RAW + journal_bytes([Rec(Kind.FLUSH, 13, 0, 0)], 10)


def skipped_seq() -> bytes:
    return journal_bytes(THREE[:1], 7) + journal_bytes(THREE[1:], 9)


NO_SIZE = zstandard.ZstdCompressor(write_content_size=False).compress(RAW)
ZIPPED = zstandard.ZstdCompressor(write_content_size=True).compress(RAW)


@pytest.mark.parametrize(
    "obj",
    [
        sealed(magic=b"BMAT"),
        sealed(version=2),
        sealed(flags=2),
        sealed(reserved=1),
        sealed(count=4),
        sealed(first=9, last=7, count=3),
        sealed(first=0, last=2),
        sealed(first=8, last=10),  # the records are 7..9
        sealed(first=6, last=8),  # the records are 7..9
        sealed(raw_len=len(RAW) + 8),
        sealed(raw_len=len(RAW) - 8),
        sealed(first_ts=11),
        sealed(last_ts=13),
        sealed(RAW + bytes(8), raw_len=len(RAW) + 8),  # trailing bytes
        sealed(extra_record(), raw_len=len(extra_record())),  # a record past last
        sealed(fill_of_first()),
        sealed(padding(), raw_len=len(padding())),
        sealed(skipped_seq(), raw_len=len(skipped_seq())),
        sealed(NO_SIZE, flags=1),  # a frame that does not state its size
        sealed(ZIPPED, flags=1, raw_len=len(RAW) + 8),  # states another size
        sealed(ZIPPED + ZIPPED, flags=1),  # two frames
        sealed(RAW, flags=1),  # flagged compressed but raw
        sealed(b""),
    ],
)
def test_resealed_but_wrong(obj: bytes) -> None:
    with pytest.raises(ArchiveFormatError):
        decode_segment(obj)


def test_bomb_refused_before_decompressing() -> None:
    big = [Rec(Kind.WRITE, 1, 0, 1 << 20, bytes(1 << 20))]
    obj = encode(big, 1)
    assert len(obj) < 2000
    with pytest.raises(ArchiveFormatError, match="at most"):
        decode_segment(obj, max_raw=1 << 19)
    assert len(decode_segment(obj, max_raw=1 << 21).records) == 1


@pytest.mark.parametrize(
    "first, last, first_ts, last_ts, codec, level",
    [
        (7, 8, 10, 12, Codec.NONE, 3),  # three records
        (7, 10, 10, 12, Codec.NONE, 3),
        (8, 10, 10, 12, Codec.NONE, 3),
        (7, 9, 11, 12, Codec.NONE, 3),
        (7, 9, 10, 11, Codec.NONE, 3),
        (0, 2, 10, 12, Codec.NONE, 3),
        (7, 9, 10, 12, Codec.ZSTD, 0),
        (7, 9, 10, 12, Codec.ZSTD, 23),
    ],
)
def test_encoder_checks_its_arguments(
    first: int, last: int, first_ts: int, last_ts: int, codec: Codec, level: int
) -> None:
    with pytest.raises(ValueError):
        encode_segment(
            RAW,
            first=first,
            last=last,
            first_ts=first_ts,
            last_ts=last_ts,
            codec=codec,
            level=level,
        )


def test_encoder_refuses_what_is_not_records() -> None:
    for raw in (b"", RAW[:-8], fill_of_first(), padding()):
        with pytest.raises(ValueError):
            encode_segment(raw, first=7, last=9, first_ts=10, last_ts=12, codec=Codec.NONE, level=3)
