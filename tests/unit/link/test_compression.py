"""Compressed bulk frames: round trips, raw fallback for incompressible data, and every
malformed compressed payload refused before anything is allocated for it."""

from __future__ import annotations

import os
import struct

import pytest
import zstandard
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.errors import ProtocolError
from blockmirror.journal.format import Kind, RecordHeader
from blockmirror.link.compression import (
    DECODABLE,
    FLAG_ZSTD,
    Codec,
    Compressor,
    decompress,
    negotiated,
)
from blockmirror.link.protocol import (
    MAGIC,
    MAX_PAYLOAD,
    FrameType,
    Heartbeat,
    LinkCodec,
    Records,
    SyncData,
    encode,
    encode_compressed,
    encode_records,
)


def frame(frame_type: int, payload: bytes, flags: int) -> bytes:
    """A frame built by hand (not by the encoder under test) with a right CRC."""
    prefix = struct.pack("<IBBHI", MAGIC, frame_type, flags, 0, len(payload))
    return prefix + struct.pack("<I", crc32c(payload, crc32c(prefix))) + payload


def body(raw: bytes, *, stated: int | None = None) -> bytes:
    return struct.pack("<I", len(raw) if stated is None else stated) + zstandard.compress(raw)


def streaming_codec() -> LinkCodec:
    codec = LinkCodec()
    codec.accept_flags(FLAG_ZSTD)
    return codec


def records_payload(data: bytes, seq: int = 1) -> bytes:
    header = RecordHeader(Kind.WRITE, seq, 0, 0, len(data), 0, len(data))
    frame_buffers = encode_records([(header, [data])])
    return b"".join(bytes(memoryview(b)) for b in frame_buffers)[16:]


@settings(max_examples=60, deadline=None)
@given(
    data=st.one_of(
        st.binary(min_size=1, max_size=20000),
        st.integers(1, 64).map(lambda n: b"text line of a log file\n" * n * 20),
    ),
    level=st.sampled_from([1, 3, 9]),
)
def test_records_round_trip_through_compression(data: bytes, level: int) -> None:
    payload = records_payload(data)
    packed = Compressor(Codec.ZSTD, level).compress(payload)
    codec = streaming_codec()
    if packed is None:
        return  # would go raw: the plain round trip is test_protocol's
    assert len(packed) < len(payload)
    for chunk in encode_compressed(int(FrameType.RECORDS), packed, FLAG_ZSTD):
        codec.feed(bytes(memoryview(chunk)))
    message = codec.next_event()
    assert isinstance(message, Records)
    assert bytes(message.records[0].payload) == data


def test_sync_data_round_trips_compressed() -> None:
    data = b"block " * 50000
    plain = encode(SyncData(7, 4096, 3, memoryview(data)))
    payload = b"".join(bytes(memoryview(b)) for b in plain)[16:]
    packed = Compressor(Codec.ZSTD).compress(payload)
    assert packed is not None and len(packed) < len(payload) // 10
    codec = streaming_codec()
    for chunk in encode_compressed(int(FrameType.SYNC_DATA), packed, FLAG_ZSTD):
        codec.feed(bytes(memoryview(chunk)))
    message = codec.next_event()
    assert isinstance(message, SyncData)
    assert (message.lsn, message.offset, message.as_of_seq) == (7, 4096, 3)
    assert bytes(message.data) == data


def test_incompressible_data_is_not_inflated() -> None:
    compressor = Compressor(Codec.ZSTD)
    assert compressor.compress(os.urandom(256 * 1024)) is None
    assert compressor.sent_raw == 1 and compressor.attempts == 1


def test_a_peer_without_the_codec_gets_plain_frames() -> None:
    assert negotiated(Codec.ZSTD, ()) is Codec.NONE
    assert negotiated(Codec.ZSTD, ("lz4",)) is Codec.NONE
    assert negotiated(Codec.ZSTD, DECODABLE) is Codec.ZSTD
    assert negotiated(Codec.NONE, DECODABLE) is Codec.NONE


def test_levels_outside_zstd_are_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        Compressor(Codec.ZSTD, 0)
    with pytest.raises(ValueError, match="compressor"):
        Compressor(Codec.NONE)


def test_compressed_frames_are_refused_until_negotiated() -> None:
    payload = body(records_payload(b"x" * 4096))
    codec = LinkCodec()  # accept_flags never called: a handshake, or a peer that did not offer
    codec.feed(frame(int(FrameType.RECORDS), payload, FLAG_ZSTD))
    with pytest.raises(ProtocolError, match="header flags 0x01"):
        codec.next_event()


@pytest.mark.parametrize("frame_type", [FrameType.ACK, FrameType.HEARTBEAT, FrameType.HELLO])
def test_only_bulk_frames_may_be_compressed(frame_type: FrameType) -> None:
    codec = streaming_codec()
    codec.feed(frame(int(frame_type), body(bytes(24)), FLAG_ZSTD))
    with pytest.raises(ProtocolError, match="header flags"):
        codec.next_event()


def test_unknown_flag_bits_are_refused() -> None:
    codec = streaming_codec()
    codec.feed(frame(int(FrameType.RECORDS), body(records_payload(b"y" * 100)), 0x03))
    with pytest.raises(ProtocolError, match="header flags 0x03"):
        codec.next_event()


RAW = records_payload(b"z" * 8192)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x01\x00", "allowed 5"),
        (struct.pack("<I", MAX_PAYLOAD + 1) + zstandard.compress(b"a"), "at most"),
        (body(RAW, stated=len(RAW) + 8), "states"),
        (body(RAW) + b"\x00" * 3, "unused data"),
        (struct.pack("<I", len(RAW)) + b"\x28\xb5\x2f\xfd" + b"\xff" * 40, "compressed payload"),
        (body(RAW[:-8] + b"\x01" * 8), "record 0"),
        (body(RAW[:20]), "expands to only 20"),
        (body(RAW + bytes(4)), "not a multiple"),
        (
            struct.pack("<I", 100)
            + zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 100),
            "states -1",
        ),
    ],
)
def test_malformed_compressed_payloads_are_refused(payload: bytes, reason: str) -> None:
    codec = streaming_codec()
    codec.feed(frame(int(FrameType.RECORDS), payload, FLAG_ZSTD))
    with pytest.raises(ProtocolError, match=reason):
        codec.next_event()
    # The codec stays failed: nothing after a bad frame is trusted.
    codec.feed(b"".join(bytes(memoryview(b)) for b in encode(Heartbeat(1, 0))))
    with pytest.raises(ProtocolError):
        codec.next_event()


def test_a_bomb_is_refused_before_it_is_expanded() -> None:
    # 64 MiB + 1 of zeros compress to a few KiB; the announced size alone refuses it.
    bomb = zstandard.compress(bytes(MAX_PAYLOAD + 8))
    with pytest.raises(ProtocolError, match="at most"):
        decompress(memoryview(struct.pack("<I", MAX_PAYLOAD + 8) + bomb), FLAG_ZSTD, MAX_PAYLOAD)


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=300), flags=st.integers(1, 255))
def test_arbitrary_compressed_bodies_never_crash(garbage: bytes, flags: int) -> None:
    try:
        raw = decompress(memoryview(garbage), flags, 1 << 20)
    except ProtocolError:
        return
    assert flags == FLAG_ZSTD and len(raw) <= 1 << 20
