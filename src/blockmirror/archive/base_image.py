"""Base images: the chunks of a volume copy and the manifest that lists them (sans-I/O).

A base covers the volume in chunks of ``chunk_size`` bytes (the last one may be shorter). Each
chunk is stored once, raw or as one zstd frame that states its size, in data objects that are
plain concatenations of stored chunks; the manifest says, per chunk, which object, where, how
long, how stored, and its BLAKE2b-128 digest. A chunk of zeros is stored nowhere. A manifest
may take chunks from older bases' objects, even an older generation's (a "synthetic full": an
unchanged chunk is not uploaded again), so objects are named by their keys, not by position.

The manifest's binary layout (little-endian)::

    header   "BMAM", u16 version 1, u16 flags 0, u32 chunk_size, u64 volume_size, u64 start,
             u64 end, u64 end_ts, u64 created_ns, u32 object count, u32 chunk count,
             16 bytes generation, u32 reserved 0                                 (80 bytes)
    objects  per object: u16 length, that many bytes of UTF-8 key
    chunks   per chunk: u32 object index, u64 offset, u32 stored length, u32 flags,
             16 bytes digest                                                     (36 bytes)
    u32      CRC-32C of everything before it

A 1 TiB volume in 4 MiB chunks is 262144 entries (9 MiB): decoding checks the CRC and the counts
against the bytes present before it allocates, then unpacks the table in one ``iter_unpack``.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

import zstandard
from crc32c import crc32c

from blockmirror.archive.keys import U64_MAX, ArchiveFormatError, DataKey, ManifestKey, parse_key
from blockmirror.journal.format import Buffer
from blockmirror.link.compression import FLAG_ZSTD, LEVELS, MIN_SAVING, Codec

__all__ = [
    "CHUNK_SIZE",
    "DIGEST_SIZE",
    "MANIFEST_MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_MANIFEST",
    "MIN_CHUNK_SIZE",
    "ZERO_CHUNK",
    "ChunkRef",
    "Manifest",
    "chunk_digest",
    "decode_chunk",
    "decode_manifest",
    "encode_chunk",
    "encode_manifest",
    "zero_ref",
]

CHUNK_SIZE: Final = 4 << 20
MIN_CHUNK_SIZE: Final = 64 << 10
MAX_CHUNK_SIZE: Final = 64 << 20
ZERO_CHUNK: Final = 0xFFFF_FFFF
DIGEST_SIZE: Final = 16
MANIFEST_MAGIC: Final = b"BMAM"
MANIFEST_VERSION: Final = 1
MAX_MANIFEST: Final = 256 << 20

_HEADER: Final = struct.Struct("<4sHHIQQQQQII16sI")
_OBJECT_LEN: Final = struct.Struct("<H")
_CHUNK: Final = struct.Struct("<IQII16s")
_CRC: Final = struct.Struct("<I")
assert _HEADER.size == 80 and _CHUNK.size == 36


def chunk_digest(data: Buffer) -> bytes:
    """BLAKE2b-128, as store/digests.py takes of a store's regions."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


@functools.lru_cache(maxsize=8)
def _zero_digest(length: int) -> bytes:
    # Two lengths per manifest at most (full chunks and the last one): hashed once each.
    return chunk_digest(bytes(length))


class ChunkRef(NamedTuple):
    """Where chunk i is stored. A tuple, not a dataclass: a manifest holds up to a few hundred
    thousand, made in one pass over the table."""

    object_index: int
    offset: int
    stored_len: int
    flags: int
    digest: bytes


def zero_ref(length: int) -> ChunkRef:
    """The reference of a chunk of ``length`` zero bytes (stored nowhere)."""
    return ChunkRef(ZERO_CHUNK, 0, 0, 0, _zero_digest(length))


def encode_chunk(data: Buffer, codec: Codec, level: int) -> tuple[bytes, int]:
    """(stored bytes, flags) of one chunk: one zstd frame with its content size when asked
    and when it saves MIN_SAVING, else the raw bytes with flags 0."""
    raw = memoryview(data).cast("B")
    if codec is Codec.ZSTD:
        if level not in LEVELS:
            raise ValueError(f"zstd level {level} is outside {LEVELS.start}..{LEVELS.stop - 1}")
        # A compressor per call: chunks are compressed in worker threads.
        packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
        if len(packed) <= len(raw) * (1 - MIN_SAVING):
            return packed, FLAG_ZSTD
    elif codec is not Codec.NONE:
        raise ValueError(f"no chunk codec {codec}")
    return bytes(raw), 0


def decode_chunk(stored: Buffer, flags: int, raw_len: int, digest: bytes) -> bytes:
    """The raw bytes of a stored chunk, checked against its length and digest. A compressed
    chunk is never expanded past ``raw_len``."""
    view = memoryview(stored).cast("B")
    if flags == 0:
        if len(view) != raw_len:
            raise ArchiveFormatError(f"raw chunk of {len(view)} bytes, expected {raw_len}")
        raw = bytes(view)
    elif flags == FLAG_ZSTD:
        try:
            stated = zstandard.frame_content_size(view)
            if stated != raw_len:
                raise ArchiveFormatError(f"zstd frame states {stated} bytes, expected {raw_len}")
            raw = zstandard.ZstdDecompressor().decompress(
                view, max_output_size=raw_len, read_across_frames=False, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise ArchiveFormatError(f"compressed chunk: {exc}") from None
        if len(raw) != raw_len:
            raise ArchiveFormatError(f"chunk expanded to {len(raw)} bytes, not {raw_len}")
    else:
        raise ArchiveFormatError(f"chunk flags 0x{flags:x} are no codec")
    if chunk_digest(raw) != digest:
        raise ArchiveFormatError("chunk digest mismatch")
    return raw


@dataclass(frozen=True, slots=True)
class Manifest:
    """A base: the volume at ``end_seq`` once records ``start_seq+1..end_seq`` are replayed
    over its chunks. ``objects`` are data object keys relative to the volume root."""

    volume_size: int
    chunk_size: int
    generation: str
    start_seq: int
    end_seq: int
    end_ts: int
    created_ns: int
    objects: tuple[str, ...]
    chunks: tuple[ChunkRef, ...]

    def __post_init__(self) -> None:
        # The key checks the generation, the seqs and end_ts.
        ManifestKey(self.generation, self.end_seq, self.start_seq, self.end_ts)
        for what, value in (("volume size", self.volume_size), ("created", self.created_ns)):
            if not 0 <= value <= U64_MAX:
                raise ArchiveFormatError(f"manifest {what} {value} is outside u64")
        size = self.chunk_size
        if size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
            raise ArchiveFormatError(f"chunk size {size} is no power of two in 64 KiB..64 MiB")
        if len(set(self.objects)) != len(self.objects):
            raise ArchiveFormatError("a data object listed twice")
        for obj in self.objects:
            if not isinstance(parse_key(obj), DataKey):
                raise ArchiveFormatError(f"{obj!r} is not a data object key")
        _check_chunks(self)

    @property
    def key(self) -> ManifestKey:
        return ManifestKey(self.generation, self.end_seq, self.start_seq, self.end_ts)

    @property
    def chunk_count(self) -> int:
        return -(-self.volume_size // self.chunk_size)

    def chunk_range(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk ``i`` in the volume."""
        if not 0 <= i < len(self.chunks):
            raise IndexError(f"chunk {i} of {len(self.chunks)}")
        offset = i * self.chunk_size
        return offset, min(self.chunk_size, self.volume_size - offset)


def _check_chunks(m: Manifest) -> None:
    count = len(m.chunks)
    if count != m.chunk_count:
        raise ArchiveFormatError(f"{count} chunks for a volume of {m.chunk_count}")
    n_objects = len(m.objects)
    last = count - 1
    tail = m.volume_size - last * m.chunk_size
    for i, (index, offset, stored_len, flags, digest) in enumerate(m.chunks):
        length = m.chunk_size if i < last else tail
        if len(digest) != DIGEST_SIZE:
            raise ArchiveFormatError(f"chunk {i}: digest of {len(digest)} bytes")
        if index == ZERO_CHUNK:
            if offset or stored_len or flags or digest != _zero_digest(length):
                raise ArchiveFormatError(f"chunk {i}: a zero chunk with a place or data")
            continue
        if not 0 <= index < n_objects:
            raise ArchiveFormatError(f"chunk {i} is in object {index} of {n_objects}")
        if not 0 <= offset <= U64_MAX - stored_len:
            raise ArchiveFormatError(f"chunk {i} at offset {offset}")
        if flags == 0:
            if stored_len != length:
                raise ArchiveFormatError(f"chunk {i}: raw, {stored_len} bytes for {length}")
        elif flags == FLAG_ZSTD:
            # Compressed only when it saves (MIN_SAVING): never as long as the raw bytes.
            if not 0 < stored_len < length:
                raise ArchiveFormatError(f"chunk {i}: zstd, {stored_len} bytes for {length}")
        else:
            raise ArchiveFormatError(f"chunk {i}: flags 0x{flags:x} are no codec")


def encode_manifest(m: Manifest) -> bytes:
    parts = [
        _HEADER.pack(
            MANIFEST_MAGIC,
            MANIFEST_VERSION,
            0,
            m.chunk_size,
            m.volume_size,
            m.start_seq,
            m.end_seq,
            m.end_ts,
            m.created_ns,
            len(m.objects),
            len(m.chunks),
            bytes.fromhex(m.generation),
            0,
        )
    ]
    for obj in m.objects:
        raw = obj.encode("utf-8")
        parts += (_OBJECT_LEN.pack(len(raw)), raw)
    pack = _CHUNK.pack
    parts.extend(pack(*ref) for ref in m.chunks)
    body = b"".join(parts)
    return body + _CRC.pack(crc32c(body))


def decode_manifest(b: Buffer, *, max_size: int = MAX_MANIFEST) -> Manifest:
    """A manifest's bytes, checked: size bound, CRC, header, counts against the bytes present
    (before any table is allocated) and then every chunk reference."""
    view = memoryview(b).cast("B")
    if len(view) > max_size:
        raise ArchiveFormatError(f"manifest of {len(view)} bytes, at most {max_size}")
    if len(view) < _HEADER.size + _CRC.size:
        raise ArchiveFormatError(f"manifest of {len(view)} bytes is shorter than its header")
    end = len(view) - _CRC.size
    (crc,) = _CRC.unpack_from(view, end)
    if crc32c(view[:end]) != crc:
        raise ArchiveFormatError("manifest CRC mismatch")
    (
        magic,
        version,
        flags,
        chunk_size,
        volume_size,
        start,
        end_seq,
        end_ts,
        created,
        n_objects,
        n_chunks,
        generation,
        reserved,
    ) = _HEADER.unpack_from(view)
    if magic != MANIFEST_MAGIC:
        raise ArchiveFormatError(f"bad manifest magic {magic!r}")
    if version != MANIFEST_VERSION:
        raise ArchiveFormatError(f"manifest version {version}, expected {MANIFEST_VERSION}")
    if flags or reserved:
        raise ArchiveFormatError(f"manifest flags 0x{flags:x}, reserved 0x{reserved:x}")
    pos = _HEADER.size
    if n_objects * _OBJECT_LEN.size + n_chunks * _CHUNK.size > end - pos:
        raise ArchiveFormatError(f"{n_objects} objects and {n_chunks} chunks overrun the bytes")
    objects: list[str] = []
    for _ in range(n_objects):
        if pos + _OBJECT_LEN.size > end:
            raise ArchiveFormatError("the object table overruns the manifest")
        (length,) = _OBJECT_LEN.unpack_from(view, pos)
        pos += _OBJECT_LEN.size
        if pos + length > end:
            raise ArchiveFormatError("an object key overruns the manifest")
        try:
            objects.append(str(view[pos : pos + length], "utf-8"))
        except UnicodeDecodeError:
            raise ArchiveFormatError("an object key that is not UTF-8") from None
        pos += length
    if end - pos != n_chunks * _CHUNK.size:
        raise ArchiveFormatError(
            f"{end - pos} bytes of chunk table for {n_chunks} entries of {_CHUNK.size}"
        )
    chunks = tuple(map(ChunkRef._make, _CHUNK.iter_unpack(view[pos:end])))
    return Manifest(
        volume_size=volume_size,
        chunk_size=chunk_size,
        generation=generation.hex(),
        start_seq=start,
        end_seq=end_seq,
        end_ts=end_ts,
        created_ns=created,
        objects=tuple(objects),
        chunks=chunks,
    )
