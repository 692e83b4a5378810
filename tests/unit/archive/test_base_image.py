"""Base images: chunks round trip and are checked against length and digest; manifests round
trip, and every malformed one (truncated, a byte flipped, resealed with counts that do not fit)
is refused with ArchiveFormatError and nothing else; a 1 TiB volume's manifest decodes fast."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import struct
import time

import pytest
import zstandard
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.archive.base_image import (
    CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ZERO_CHUNK,
    ChunkRef,
    Manifest,
    chunk_digest,
    decode_chunk,
    decode_manifest,
    encode_chunk,
    encode_manifest,
    zero_ref,
)
from blockmirror.archive.keys import ArchiveFormatError, DataKey
from blockmirror.link.compression import FLAG_ZSTD, Codec

GEN = "ef" * 16
U64 = st.integers(0, 2**64 - 1)
HEADER = struct.Struct("<4sHHIQQQQQII16sI")


@given(st.binary(max_size=5000) | st.integers(1, 3000).map(lambda n: b"xyz" * n))
def test_chunk_round_trip(data: bytes) -> None:
    digest = chunk_digest(data)
    assert len(digest) == 16
    for codec in (Codec.NONE, Codec.ZSTD):
        stored, flags = encode_chunk(data, codec, 3)
        assert flags in (0, FLAG_ZSTD)
        assert flags == 0 or len(stored) < len(data)
        assert decode_chunk(stored, flags, len(data), digest) == data
        assert decode_chunk(memoryview(stored), flags, len(data), digest) == data


def test_chunk_compression_only_when_it_saves() -> None:
    assert encode_chunk(bytes(MIN_CHUNK_SIZE), Codec.ZSTD, 3)[1] == FLAG_ZSTD
    noise = random.Random(3).randbytes(MIN_CHUNK_SIZE)
    assert encode_chunk(noise, Codec.ZSTD, 3) == (noise, 0)
    with pytest.raises(ValueError):
        encode_chunk(noise, Codec.ZSTD, 0)


def test_chunk_refusals() -> None:
    data = b"abc" * 1000
    d = chunk_digest(data)
    zipped, flags = encode_chunk(data, Codec.ZSTD, 3)
    assert flags == FLAG_ZSTD
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    for stored, fl, n, digest in [
        (data, 0, len(data) + 1, d),
        (data[:-1], 0, len(data), d),
        (data, 0, len(data), chunk_digest(b"other")),
        (zipped, FLAG_ZSTD, len(data) - 1, d),  # the frame states another size
        (zipped, FLAG_ZSTD, len(data), bytes(16)),
        (zipped[:-1], FLAG_ZSTD, len(data), d),
        (zipped + zipped, FLAG_ZSTD, len(data), d),
        (unsized, FLAG_ZSTD, len(data), d),
        (data, FLAG_ZSTD, len(data), d),
        (data, 2, len(data), d),
    ]:
        with pytest.raises(ArchiveFormatError):
            decode_chunk(stored, fl, n, digest)


@given(st.binary(max_size=200), st.sampled_from([0, FLAG_ZSTD, 4]), st.integers(0, 10_000))
def test_chunk_garbage(stored: bytes, flags: int, raw_len: int) -> None:
    with contextlib.suppress(ArchiveFormatError):
        decode_chunk(stored, flags, raw_len, bytes(16))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    chunk = draw(st.sampled_from([MIN_CHUNK_SIZE, 1 << 20, CHUNK_SIZE, 64 << 20]))
    count = draw(st.integers(0, 12))
    size = 0 if count == 0 else (count - 1) * chunk + draw(st.integers(1, chunk))
    n_objects = draw(st.integers(0, 3))
    objects = tuple(
        DataKey(draw(st.sampled_from([GEN, "01" * 16])), draw(U64), n).key for n in range(n_objects)
    )
    refs = []
    for i in range(count):
        length = min(chunk, size - i * chunk)
        if n_objects == 0 or draw(st.booleans()):
            refs.append(zero_ref(length))
            continue
        zstd = length > 1 and draw(st.booleans())
        stored = draw(st.integers(1, length - 1)) if zstd else length
        refs.append(
            ChunkRef(
                draw(st.integers(0, n_objects - 1)),
                draw(st.integers(0, 2**40)),
                stored,
                FLAG_ZSTD if zstd else 0,
                draw(st.binary(min_size=16, max_size=16)),
            )
        )
    end = draw(U64)
    return Manifest(
        volume_size=size,
        chunk_size=chunk,
        generation=GEN,
        start_seq=draw(st.integers(0, end)),
        end_seq=end,
        end_ts=draw(U64) if end else 0,
        created_ns=draw(U64),
        objects=objects,
        chunks=tuple(refs),
    )


@given(manifests())
def test_manifest_round_trip(m: Manifest) -> None:
    b = encode_manifest(m)
    assert decode_manifest(b) == m
    assert decode_manifest(memoryview(b)) == m
    assert m.key.end == m.end_seq and m.key.start == m.start_seq
    covered = 0
    for i in range(len(m.chunks)):
        offset, length = m.chunk_range(i)
        assert offset == covered and 0 < length <= m.chunk_size
        covered += length
    assert covered == m.volume_size


@settings(max_examples=60)
@given(manifests(), st.data())
def test_manifest_truncated_or_flipped(m: Manifest, data: st.DataObject) -> None:
    b = encode_manifest(m)
    cut = data.draw(st.integers(0, len(b) - 1))
    with pytest.raises(ArchiveFormatError):
        decode_manifest(b[:cut])
    i = data.draw(st.integers(0, len(b) - 1))
    flipped = bytearray(b)
    flipped[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ArchiveFormatError):
        decode_manifest(bytes(flipped))


def reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32c(body))


@settings(max_examples=200)
@given(manifests(), st.data())
def test_manifest_resealed_flip_never_escapes(m: Manifest, data: st.DataObject) -> None:
    """A change the CRC does not catch (it was recomputed) is refused or decodes to a valid
    manifest: never another exception, never an unbounded allocation."""
    body = bytearray(encode_manifest(m)[:-4])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(ArchiveFormatError):
        decode_manifest(reseal(bytes(body)))


def one_chunk() -> Manifest:
    obj = DataKey(GEN, 9, 0).key
    return Manifest(
        volume_size=MIN_CHUNK_SIZE + 100,
        chunk_size=MIN_CHUNK_SIZE,
        generation=GEN,
        start_seq=3,
        end_seq=9,
        end_ts=50,
        created_ns=7,
        objects=(obj,),
        chunks=(ChunkRef(0, 0, MIN_CHUNK_SIZE, 0, bytes(16)), zero_ref(100)),
    )


def header_fields(b: bytes) -> list[int | bytes]:
    return list(HEADER.unpack_from(b))


def with_header(b: bytes, **changes: int | bytes) -> bytes:
    names = "magic version flags chunk volume start end end_ts created objs chunks gen reserved"
    fields = dict(zip(names.split(), header_fields(b), strict=True))
    fields.update(changes)
    return reseal(HEADER.pack(*fields.values()) + b[HEADER.size : -4])


@pytest.mark.parametrize(
    "change",
    [
        {"magic": b"BMAX"},
        {"version": 2},
        {"flags": 1},
        {"reserved": 1},
        {"chunk": MIN_CHUNK_SIZE + 1},  # no power of two
        {"chunk": MIN_CHUNK_SIZE // 2},
        {"chunk": 128 << 20},
        {"volume": MIN_CHUNK_SIZE * 3},  # three chunks, two listed
        {"volume": MIN_CHUNK_SIZE},  # one chunk, two listed
        {"objs": 2},
        {"objs": 0},  # chunk 0's object is not listed
        {"objs": 0xFFFF_FFFF},
        {"chunks": 3},
        {"chunks": 1},
        {"chunks": 0xFFFF_FFFF},
        {"start": 10},  # after end
        {"end": 0},
    ],
)
def test_manifest_resealed_but_inconsistent(change: dict[str, int | bytes]) -> None:
    b = encode_manifest(one_chunk())
    assert decode_manifest(with_header(b)) == one_chunk()
    with pytest.raises(ArchiveFormatError):
        decode_manifest(with_header(b, **change))


def test_manifest_refuses() -> None:
    b = encode_manifest(one_chunk())
    with pytest.raises(ArchiveFormatError):
        decode_manifest(b, max_size=len(b) - 1)
    with pytest.raises(ArchiveFormatError):
        decode_manifest(reseal(b[:-4] + bytes(36)))  # a trailing entry
    key = DataKey(GEN, 9, 0).key.encode()
    at = b.index(key)
    for bad in (b"\xff" + key[1:], b"x" * len(key)):  # not UTF-8; not a data object key
        with pytest.raises(ArchiveFormatError):
            decode_manifest(reseal(b[:at] + bad + b[at + len(key) : -4]))


@pytest.mark.parametrize(
    "ref",
    [
        ChunkRef(1, 0, MIN_CHUNK_SIZE, 0, bytes(16)),  # no object 1
        ChunkRef(0, 0, MIN_CHUNK_SIZE - 1, 0, bytes(16)),  # raw, but short
        ChunkRef(0, 0, MIN_CHUNK_SIZE, FLAG_ZSTD, bytes(16)),  # compressed, but no saving
        ChunkRef(0, 0, 0, FLAG_ZSTD, bytes(16)),
        ChunkRef(0, 0, MIN_CHUNK_SIZE, 2, bytes(16)),
        ChunkRef(0, 0, MIN_CHUNK_SIZE, 0, bytes(15)),
        ChunkRef(0, 2**64 - 1, MIN_CHUNK_SIZE, 0, bytes(16)),
        ChunkRef(ZERO_CHUNK, 0, 0, 0, bytes(16)),  # not the digest of zeros
        ChunkRef(ZERO_CHUNK, 0, 0, 0, zero_ref(100).digest),  # of the wrong length
        ChunkRef(ZERO_CHUNK, 1, 0, 0, zero_ref(MIN_CHUNK_SIZE).digest),
    ],
)
def test_manifest_checks_chunk_refs(ref: ChunkRef) -> None:
    good = one_chunk()
    with pytest.raises(ArchiveFormatError):
        dataclasses.replace(good, chunks=(ref, good.chunks[1]))
    # The same reference read from bytes is refused alike.
    body = encode_manifest(good)[:-4]
    entries = body[-72:]
    forged = body[:-72] + struct.pack("<IQII", *ref[:4]) + ref.digest + entries[36:]
    if len(ref.digest) == 16:
        with pytest.raises(ArchiveFormatError):
            decode_manifest(reseal(forged))


def test_manifest_checks_objects() -> None:
    good = one_chunk()
    for objects in ((good.objects[0], good.objects[0]), ("README",)):
        with pytest.raises(ArchiveFormatError):
            dataclasses.replace(good, objects=objects)


def test_a_terabyte_volume_decodes_in_linear_time() -> None:
    count = (1 << 40) // CHUNK_SIZE
    objects = tuple(DataKey(GEN, 100, n).key for n in range(64))
    refs = tuple(
        ChunkRef(i % 64, (i // 64) * CHUNK_SIZE, CHUNK_SIZE, 0, i.to_bytes(16, "little"))
        for i in range(count)
    )
    m = Manifest(1 << 40, CHUNK_SIZE, GEN, 90, 100, 5, 6, objects, refs)
    b = encode_manifest(m)
    assert len(b) < 10 << 20
    began = time.monotonic()
    assert decode_manifest(b) == m
    assert time.monotonic() - began < 10  # about 0.3 s; quadratic would be hours
