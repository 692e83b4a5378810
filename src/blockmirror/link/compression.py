"""Compression of a link's bulk frames (docs/link-protocol.md, "The flags byte"), sans-I/O.

A RECORDS or SYNC_DATA frame may carry its payload compressed; bit 0 of the frame header's
flags byte then says zstd. The compressed payload is the uncompressed length (u32, little
endian) followed by one zstd frame that states the same content size: the receiver checks the
announced length against the frame type's bound *before* it allocates anything, so a small
frame cannot expand into more than an uncompressed one may hold.

Each end lists what it can decode in its HELLO or WELCOME (``compression``); a sender
compresses only with a codec its peer listed, so a peer without compression (or an older unit
that does not know the key) gets plain frames and the link works as before.

A payload that does not shrink by at least :data:`MIN_SAVING` is sent as it is: random or
already-compressed data costs one attempt, never a larger frame.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import zstandard

from blockmirror.errors import ProtocolError
from blockmirror.journal.format import Buffer

__all__ = [
    "DECODABLE",
    "FLAG_ZSTD",
    "LEVELS",
    "Codec",
    "Compressor",
    "decompress",
    "negotiated",
]


class Codec(enum.StrEnum):
    NONE = "none"
    ZSTD = "zstd"


FLAG_ZSTD: Final = 0x01
FLAGS: Final = {Codec.ZSTD: FLAG_ZSTD}
# What this build decodes: the list a HELLO or WELCOME carries.
DECODABLE: Final = (Codec.ZSTD.value,)
LEVELS: Final = range(1, 20)  # zstd's regular levels (the "ultra" ones need large windows)
DEFAULT_LEVEL: Final = 3

_RAW_LEN: Final = struct.Struct("<I")
PREFIX_SIZE: Final = _RAW_LEN.size
# A compressed payload must save at least this share of the raw size, or the frame goes raw.
MIN_SAVING: Final = 1 / 32

# One decompressor per thread would be needed if two threads decoded at once; the receiving
# side decodes on its event loop only.
_DECOMPRESSOR: Final = zstandard.ZstdDecompressor()


def negotiated(wanted: Codec, peer_decodes: tuple[str, ...]) -> Codec:
    """The codec a sender uses: the configured one if the peer decodes it, else none."""
    return wanted if wanted is not Codec.NONE and wanted.value in peer_decodes else Codec.NONE


class Compressor:
    """Compresses bulk payloads for one link (one thread at a time: the sender's).

    Counts what it was given and what it produced, so that the CPU cost and the ratio can be
    shown and measured.
    """

    __slots__ = ("_zstd", "attempts", "codec", "level", "raw_in", "sent_raw")

    def __init__(self, codec: Codec, level: int = DEFAULT_LEVEL) -> None:
        if codec is not Codec.ZSTD:
            raise ValueError(f"no compressor for {codec}")
        if level not in LEVELS:
            raise ValueError(f"zstd level {level} is outside {LEVELS.start}..{LEVELS.stop - 1}")
        self.codec = codec
        self.level = level
        self._zstd = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self.attempts = 0
        self.raw_in = 0
        self.sent_raw = 0  # payloads that did not shrink enough and went as they were

    @property
    def flag(self) -> int:
        return FLAGS[self.codec]

    def compress(self, payload: Buffer) -> bytes | None:
        """The compressed payload (prefix included) of ``payload``, or None when it does not
        shrink enough to be worth it. Releases the GIL while zstd works (a worker thread may
        call it)."""
        raw = memoryview(payload).cast("B")
        size = raw.nbytes
        self.attempts += 1
        self.raw_in += size
        packed = self._zstd.compress(raw)
        if PREFIX_SIZE + len(packed) > size * (1 - MIN_SAVING):
            self.sent_raw += 1
            return None
        return _RAW_LEN.pack(size) + packed


def decompress(body: memoryview, flags: int, max_size: int) -> bytes:
    """The raw payload of a compressed frame body; raises :class:`ProtocolError` for a flag this
    build does not decode, a length over ``max_size``, or anything that is not exactly one zstd
    frame of the announced size."""
    if flags != FLAG_ZSTD:
        raise ProtocolError(f"compression flags 0x{flags:02x} are not a codec this unit decodes")
    if body.nbytes < PREFIX_SIZE + 1:
        raise ProtocolError(f"a compressed payload of {body.nbytes} bytes is too short")
    (size,) = _RAW_LEN.unpack(body[:PREFIX_SIZE])
    if size > max_size:
        raise ProtocolError(f"compressed payload expands to {size} bytes, at most {max_size}")
    data = body[PREFIX_SIZE:]
    try:
        stated = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"compressed payload: {exc}") from None
    if stated != size:
        raise ProtocolError(f"zstd frame states {stated} bytes, the frame announced {size}")
    try:
        raw = _DECOMPRESSOR.decompress(
            data, max_output_size=size, read_across_frames=False, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"compressed payload: {exc}") from None
    if len(raw) != size:
        raise ProtocolError(f"compressed payload expanded to {len(raw)} bytes, not {size}")
    return raw
