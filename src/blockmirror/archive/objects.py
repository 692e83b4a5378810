"""The archive's object formats in one namespace (sans-I/O): ``from blockmirror.archive import
format as fmt``.

The codecs live in modules of their own, each one concept: keys.py (object keys and
ArchiveFormatError), claim.py (the writer's claim), segment_object.py (runs of journal records)
and base_image.py (chunks and manifests). The archive's I/O modules use them through this one
name; the Record and Codec types those signatures take are here too.
"""

from __future__ import annotations

from blockmirror.archive.base_image import (
    CHUNK_SIZE,
    DIGEST_SIZE,
    MAX_CHUNK_SIZE,
    MAX_MANIFEST,
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
from blockmirror.archive.claim import (
    MAX_CLAIM,
    PROBE_KEY,
    VOLUME_CLAIM_KEY,
    Claim,
    VolumeClaim,
    decode_claim,
    decode_volume_claim,
    encode_claim,
    encode_volume_claim,
)
from blockmirror.archive.keys import (
    ArchiveFormatError,
    ArchiveKey,
    BookmarkKey,
    ClaimKey,
    DataKey,
    ManifestKey,
    SegmentKey,
    check_generation,
    parse_key,
    quote_name,
    unquote_name,
)
from blockmirror.archive.segment_object import (
    MAX_RAW,
    SEGMENT_HEADER_SIZE,
    Segment,
    SegmentHeader,
    decode_segment,
    encode_segment,
    segment_header,
)
from blockmirror.journal.record import Record
from blockmirror.link.compression import Codec

__all__ = [
    "CHUNK_SIZE",
    "DIGEST_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_CLAIM",
    "MAX_MANIFEST",
    "MAX_RAW",
    "MIN_CHUNK_SIZE",
    "PROBE_KEY",
    "SEGMENT_HEADER_SIZE",
    "VOLUME_CLAIM_KEY",
    "ZERO_CHUNK",
    "ArchiveFormatError",
    "ArchiveKey",
    "BookmarkKey",
    "ChunkRef",
    "Claim",
    "ClaimKey",
    "Codec",
    "DataKey",
    "Manifest",
    "ManifestKey",
    "Record",
    "Segment",
    "SegmentHeader",
    "SegmentKey",
    "VolumeClaim",
    "check_generation",
    "chunk_digest",
    "decode_chunk",
    "decode_claim",
    "decode_manifest",
    "decode_segment",
    "decode_volume_claim",
    "encode_chunk",
    "encode_claim",
    "encode_manifest",
    "encode_segment",
    "encode_volume_claim",
    "parse_key",
    "quote_name",
    "segment_header",
    "unquote_name",
    "zero_ref",
]
