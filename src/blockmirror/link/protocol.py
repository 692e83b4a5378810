"""The link wire format of docs/link-protocol.md, as a sans-I/O codec.

Bytes go in with :meth:`LinkCodec.feed`; messages come out of :meth:`LinkCodec.next_event`.
Frames are built by :func:`encode`, :func:`encode_records` and :func:`encode_raw_records`, which
return lists of buffers for ``writelines``/``writev``. Nothing here touches a socket or a loop.

Version 2 adds what failover needs (issue 9): each end's lineage
(:class:`~blockmirror.journal.lineage.Lineage`) in HELLO, WELCOME and REFUSE, the refusals of
direction (split brain, superseded, upstream, unrelated) and the REGIONS frame, which carries
the regions a secondary gave up to follow.

Bulk data is never copied by the codec on its own account. On the way out, record payloads and
resync data are handed back as the caller's buffers, with the frame CRC computed over them where
they lie. On the way in, a record payload is a view into the received frame: a frame that arrived
in one fed chunk is used in place, one that straddles chunks is joined once.

Every check that can be made on the 16-byte frame header is made as soon as it arrives, before
any payload is buffered: a peer cannot make us hold more than the announced, bounded length,
and a corrupted length for a fixed-size frame is caught at once instead of stalling the stream.

The header's flags byte says how a RECORDS or SYNC_DATA payload is compressed
(:mod:`blockmirror.link.compression`; docs/link-protocol.md, "The flags byte"). It is 0 on every
other frame, and on these too until the codec is told, after the handshake, which flags the
peer was offered (:meth:`LinkCodec.accept_flags`).

Why one module: the frame table (types and the lengths each may announce), the header checks,
every payload decoder and every encoder are one wire format that must change together: each
encoder runs its decoder's checks before anything is sent, and the decoder tables are asserted
against the frame table at import. Split, one frame type's rules would sit in three files.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from crc32c import crc32c

from blockmirror.errors import ProtocolError
from blockmirror.journal.format import (
    HEADER_SIZE,
    RECORD_ALIGN,
    Buffer,
    Kind,
    RecordError,
    RecordHeader,
    padding_bytes,
    record_iov,
    record_size,
    verify_record,
)
from blockmirror.journal.lineage import MAX_LINEAGE, Lineage
from blockmirror.link.auth import is_token
from blockmirror.link.compression import PREFIX_SIZE as _COMPRESSION_PREFIX
from blockmirror.link.compression import decompress
from blockmirror.state import Role

__all__ = [
    "AUTH_NONE",
    "AUTH_PSK",
    "DIGEST_SIZE",
    "FRAME_HEADER_SIZE",
    "HANDSHAKE_FRAMES",
    "MAGIC",
    "MAX_CONFIG_TEXT",
    "MAX_DIGESTS",
    "MAX_DIVERGED_FRAMES",
    "MAX_JSON",
    "MAX_PAYLOAD",
    "MAX_REGIONS",
    "MAX_SYNC_DATA",
    "MAX_UNIT_NAME",
    "PROTOCOL_VERSION",
    "Ack",
    "AuthClient",
    "AuthServer",
    "DigestRequest",
    "Digests",
    "FrameType",
    "Heartbeat",
    "Hello",
    "LinkCodec",
    "Message",
    "PeerConfig",
    "Record",
    "Records",
    "Refuse",
    "RefuseCode",
    "Regions",
    "SyncData",
    "SyncDone",
    "SyncStart",
    "SyncZero",
    "VersionError",
    "Welcome",
    "encode",
    "encode_compressed",
    "encode_raw_records",
    "encode_records",
    "regions_frames",
]

# --- constants ------------------------------------------------------------------------------------

# Little-endian, so the first four bytes on the wire read "BMLK" in a capture.
MAGIC: Final = 0x4B4C4D42
PROTOCOL_VERSION: Final = 2
FRAME_HEADER_SIZE: Final = 16
MAX_PAYLOAD: Final = 64 * 1024 * 1024
MAX_JSON: Final = 64 * 1024
MAX_CONFIG_TEXT: Final = 48 * 1024
"""The longest configuration text a PEER_CONFIG carries, in characters (JSON escaping must
still fit :data:`MAX_JSON`)."""

AUTH_PSK: Final = "psk"
AUTH_NONE: Final = "none"
_AUTH_METHODS: Final = frozenset({AUTH_PSK, AUTH_NONE})

_U64_MAX: Final = 2**64 - 1


class FrameType(enum.IntEnum):
    HELLO = 1
    AUTH_SERVER = 2
    AUTH_CLIENT = 3
    WELCOME = 4
    REFUSE = 5
    RECORDS = 6
    ACK = 7
    HEARTBEAT = 8
    SYNC_START = 9
    SYNC_DATA = 10
    SYNC_DONE = 11
    SYNC_ZERO = 12
    # 13 is the type byte of a sealed record's envelope (session_crypto), never a frame.
    REGIONS = 14
    # Online verify and checksum sync (issue 10): region digests.
    DIGEST_REQUEST = 15
    DIGESTS = 16
    # Configuration exchange (issue 11): each end's configuration, kept by the other.
    PEER_CONFIG = 17


class RefuseCode(enum.StrEnum):
    """The REFUSE codes of version 2. Decoding accepts any string: a newer peer may know more
    reasons, and a refusal ends the connection whatever its code."""

    VERSION = "version"
    AUTH = "auth"
    UNKNOWN_VOLUME = "unknown-volume"
    SIZE_MISMATCH = "size-mismatch"
    IDENTITY_MISMATCH = "identity-mismatch"
    BUSY = "busy"
    BAD_FRAME = "bad-frame"
    INTERNAL = "internal"
    # The secondary's journal cannot hold the largest record the source may send.
    JOURNAL_TOO_SMALL = "journal-too-small"
    # A pre-shared key without TLS needs sealed frames (session_crypto), and the peer does not
    # offer (or accept) them: an older peer, or a man in the middle who stripped the offer.
    CRYPTO_REQUIRED = "crypto-required"
    # A sealed frame failed to open: altered, forged, replayed, reordered or dropped.
    INTEGRITY = "integrity"
    # The refusals of direction (version 2; the REFUSE carries the refusing end's lineage).
    # Both ends took writes after their common point: nothing is copied either way.
    SPLIT_BRAIN = "split-brain"
    # The connecting end's line was superseded by a newer generation: it should follow.
    SUPERSEDED = "superseded"
    # The listener sends to the connecting end, not the other way round: its data is not behind.
    UPSTREAM = "upstream"
    # The two ends share no generation of the volume.
    UNRELATED = "unrelated"


class VersionError(ProtocolError):
    """A HELLO or WELCOME of another protocol version that this codec cannot read.

    Raised instead of a plain :class:`ProtocolError` so that the receiver answers REFUSE
    ``version`` rather than ``bad-frame``. A frame of another version that happens to carry every
    version-2 key decodes normally, with its ``protocol`` field as sent. A version-1 peer never
    sends ``lineage``, so its HELLO and WELCOME raise this.
    """

    def __init__(self, version: int, reason: str) -> None:
        self.version = version
        super().__init__(
            f"peer speaks link protocol version {version}, this unit speaks "
            f"{PROTOCOL_VERSION} ({reason})"
        )


# Bytes 0..12 of a frame header: what the CRC covers ahead of the payload.
_PREFIX = struct.Struct("<IBBHI")
_HEADER = struct.Struct("<IBBHII")
assert _PREFIX.size == 12 and _HEADER.size == FRAME_HEADER_SIZE

_ACK = struct.Struct("<QQQ")
_HEARTBEAT = struct.Struct("<QQ")
_SYNC_START = struct.Struct("<QBQQ")  # "<": no alignment padding, 25 bytes as on the wire
_SYNC_DATA = struct.Struct("<QQQ")
_SYNC_DONE = struct.Struct("<QQ")
_SYNC_ZERO = struct.Struct("<QQQQ")
_REGION = struct.Struct("<QQ")
_DIGEST_REQUEST = struct.Struct("<QQII")  # id, offset, region size, count
_DIGESTS = struct.Struct("<QQIIQ")  # id, offset, region size, count, applied seq
DIGEST_SIZE: Final = 16  # BLAKE2b-128 per region
MAX_DIGESTS: Final = 4096  # regions per request
assert _SYNC_START.size == 25

MAX_SYNC_DATA: Final = MAX_PAYLOAD - _SYNC_DATA.size
"""The most data one SYNC_DATA frame can carry."""

MAX_REGIONS: Final = 65536
"""The most (offset, length) pairs one REGIONS frame carries: 1 MiB of payload."""
_MAX_REGIONS_PAYLOAD: Final = MAX_REGIONS * _REGION.size

MAX_DIVERGED_FRAMES: Final = 1_000_000
"""The most REGIONS frames a WELCOME may announce (``diverged_frames``)."""

MAX_UNIT_NAME: Final = 255
"""The longest unit name a lineage's generation may carry, in characters."""

# The smallest and largest payload each frame type may announce. Fixed-size frames have one
# length; RECORDS hold at least one record header. Checked on the header alone (see module doc).
_LENGTHS: Final[dict[int, tuple[int, int]]] = {
    FrameType.HELLO: (0, MAX_JSON),
    FrameType.AUTH_SERVER: (0, MAX_JSON),
    FrameType.AUTH_CLIENT: (0, MAX_JSON),
    FrameType.WELCOME: (0, MAX_JSON),
    FrameType.REFUSE: (0, MAX_JSON),
    FrameType.PEER_CONFIG: (0, MAX_JSON),
    FrameType.RECORDS: (HEADER_SIZE, MAX_PAYLOAD),
    FrameType.ACK: (_ACK.size, _ACK.size),
    FrameType.HEARTBEAT: (_HEARTBEAT.size, _HEARTBEAT.size),
    FrameType.SYNC_START: (_SYNC_START.size, _SYNC_START.size),
    FrameType.SYNC_DATA: (_SYNC_DATA.size, MAX_PAYLOAD),
    FrameType.SYNC_DONE: (_SYNC_DONE.size, _SYNC_DONE.size),
    FrameType.SYNC_ZERO: (_SYNC_ZERO.size, _SYNC_ZERO.size),
    FrameType.REGIONS: (_REGION.size, _MAX_REGIONS_PAYLOAD),
    FrameType.DIGEST_REQUEST: (_DIGEST_REQUEST.size, _DIGEST_REQUEST.size),
    FrameType.DIGESTS: (_DIGESTS.size + DIGEST_SIZE, _DIGESTS.size + MAX_DIGESTS * DIGEST_SIZE),
}
_NAMES: Final = {int(t): t.name for t in FrameType}

HANDSHAKE_FRAMES: Final = frozenset(
    {
        int(FrameType.HELLO),
        int(FrameType.AUTH_SERVER),
        int(FrameType.AUTH_CLIENT),
        int(FrameType.WELCOME),
        int(FrameType.REFUSE),
    }
)
"""What may arrive before a link is authenticated (see :meth:`LinkCodec.restrict`). REGIONS is
not among them: it follows the WELCOME, once the receiving source has lifted the restriction."""


def _prefix_crc(frame_type: int, length: int) -> int:
    return crc32c(_PREFIX.pack(MAGIC, frame_type, 0, 0, length))


# Fixed-size frames have a constant header prefix, so its CRC is computed once here rather than
# on every ACK and HEARTBEAT.
_FIXED_PREFIX_CRC: Final = {t: _prefix_crc(t, lo) for t, (lo, hi) in _LENGTHS.items() if lo == hi}
_SYNC_DATA_TYPE: Final = int(FrameType.SYNC_DATA)
_RECORDS_TYPE: Final = int(FrameType.RECORDS)
_REGIONS_TYPE: Final = int(FrameType.REGIONS)
# The frames whose payload may be compressed: the bulk data.
COMPRESSIBLE: Final = frozenset({_RECORDS_TYPE, _SYNC_DATA_TYPE})
COMPRESSED_MIN: Final = _COMPRESSION_PREFIX + 1  # the expanded length and one byte of codec data

# Zero fill after a record payload is at most RECORD_ALIGN - 1 bytes.
_ZERO_FILL: Final = bytes(RECORD_ALIGN)
# Looked up once: an enum attribute costs a class-dict walk in a loop run once per record.
_PADDING: Final = Kind.PADDING


# --- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Source → secondary, first frame. ``nonce`` is 64 lowercase hex characters; ``auth`` is
    :data:`AUTH_PSK` or :data:`AUTH_NONE`."""

    protocol: int
    unit: str
    volume: str
    volume_id: str
    size: int
    nonce: str
    auth: str
    # The largest record payload the source may send (its own journal's limit); optional on
    # the wire: a source that does not say is checked record by record.
    max_record: int | None = None
    # The AEAD the source seals the session with after the handshake ("chacha20-poly1305"),
    # None (absent on the wire) for none; see docs/link-protocol.md, "Sealed sessions".
    crypto: str | None = None
    # What the source holds of the volume (required on the wire in version 2; its ``unit`` is
    # the HELLO's ``unit``, so the two must agree), and the unit it currently receives the
    # volume from (None: none, it is the primary or has no source).
    lineage: Lineage | None = None
    source: str | None = None
    # The source takes PEER_CONFIG frames (optional on the wire; absent: false).
    configs: bool = False
    # The compression codecs the source decodes (optional on the wire; absent: none).
    compression: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthServer:
    nonce: str
    proof: str
    # The secondary's answer to HELLO's ``crypto``: the same name when it seals too.
    crypto: str | None = None


@dataclass(frozen=True, slots=True)
class AuthClient:
    proof: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """The secondary accepts. ``volume_id`` is None for a replica that never received."""

    protocol: int
    unit: str
    received_seq: int
    applied_seq: int
    consistent: bool
    volume_id: str | None
    # The largest record payload the secondary's journal can hold; optional on the wire.
    max_record: int | None = None
    # The secondary's lineage (required on the wire in version 2; its ``unit`` is the
    # WELCOME's ``unit``).
    lineage: Lineage | None = None
    # How many REGIONS frames follow this WELCOME at once: the regions the secondary gave up
    # to follow this source (its records past the branch point), for the source's resync.
    diverged_frames: int = 0
    # The secondary takes PEER_CONFIG frames (optional on the wire; absent: false).
    configs: bool = False
    # The compression codecs the secondary decodes (optional on the wire; absent: none).
    compression: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Either end, once streaming, to a peer that said it takes them: this unit's configuration
    (its ``config_version`` and text), for the peer to keep (docs/link-protocol.md)."""

    unit: str
    config_version: int
    text: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Either side gives up; ``code`` is usually a :class:`RefuseCode`.

    A refusal of direction (split brain, superseded, upstream, unrelated) also carries the
    refusing end's ``lineage``, so that the connecting end can act on it; for a split brain,
    ``common_seq`` (the last record both lines share) and ``diverged_bytes`` (what the refusing
    end wrote past it). All three are optional: an older peer sends none of them.
    """

    code: str
    message: str
    lineage: Lineage | None = None
    common_seq: int | None = None
    diverged_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """One journal record of a RECORDS frame. ``payload`` is a view into the received frame
    (empty for write-zeroes, trim and flush), not a copy; it excludes the zero fill."""

    header: RecordHeader
    payload: memoryview

    @property
    def seq(self) -> int:
        return self.header.seq


@dataclass(frozen=True, slots=True)
class Records:
    """One or more records with consecutive sequence numbers, never padding."""

    records: tuple[Record, ...]

    @property
    def first_seq(self) -> int:
        return self.records[0].header.seq

    @property
    def last_seq(self) -> int:
        return self.records[-1].header.seq


@dataclass(frozen=True, slots=True)
class Ack:
    durable_seq: int
    applied_seq: int
    sync_lsn: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    sent_ns: int
    echo_ns: int


@dataclass(frozen=True, slots=True)
class SyncStart:
    lsn: int
    full: bool
    total_bytes: int
    as_of_seq: int


@dataclass(frozen=True, slots=True)
class SyncData:
    """One region of the source volume; ``data`` is a view into the received frame."""

    lsn: int
    offset: int
    as_of_seq: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class SyncDone:
    lsn: int
    as_of_seq: int


@dataclass(frozen=True, slots=True)
class SyncZero:
    """A region of the source volume that reads as zeroes: SYNC_DATA without the data, so a
    resync of a sparse or trimmed volume does not carry its holes over the link."""

    lsn: int
    offset: int
    length: int
    as_of_seq: int


@dataclass(frozen=True, slots=True)
class Regions:
    """Secondary → source, right after a WELCOME whose ``diverged_frames`` is not 0: regions
    of the volume, ``(offset, length)`` in bytes, that the secondary gave up to follow the
    source, which copies them in its resync. Strictly ordered, not overlapping, none empty;
    at most :data:`MAX_REGIONS` per frame (see :func:`regions_frames`)."""

    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """Source → secondary: the digests of ``count`` regions of ``region`` bytes from
    ``offset`` (the last one clipped at the end of the volume), taken once every record sent
    before this frame is applied (online verify, checksum sync)."""

    request_id: int
    offset: int
    region: int
    count: int


@dataclass(frozen=True, slots=True)
class Digests:
    """Secondary → source: the answer to a DIGEST_REQUEST; ``applied_seq`` is the newest
    record the replica held when it read them, ``digests`` BLAKE2b-128 of each region."""

    request_id: int
    offset: int
    region: int
    applied_seq: int
    digests: tuple[bytes, ...]


Message: TypeAlias = (
    Hello
    | AuthServer
    | AuthClient
    | Welcome
    | Refuse
    | Records
    | Ack
    | Heartbeat
    | SyncStart
    | SyncData
    | SyncDone
    | SyncZero
    | Regions
    | DigestRequest
    | Digests
    | PeerConfig
)


# --- JSON payloads --------------------------------------------------------------------------------

_JsonObject: TypeAlias = dict[str, object]


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> _JsonObject:
    # json.loads keeps the last of duplicate keys; two readers of the same bytes could then
    # disagree on a field, so a duplicate is refused outright.
    obj: _JsonObject = {}
    for key, value in pairs:
        if key in obj:
            raise ProtocolError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> object:
    raise ProtocolError(f"{name} is not JSON")


def _parse_json(payload: memoryview) -> _JsonObject:
    """A JSON object from UTF-8 bytes; anything else is a :class:`ProtocolError`."""
    try:
        # Decoded explicitly: json.loads(bytes) would also accept UTF-16 and UTF-32.
        text = str(payload, "utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and over-long integer literals;
        # RecursionError a deeply nested value (64 KiB of "[" is enough).
        raise ProtocolError(f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"payload is a JSON {type(obj).__name__}, not an object")
    return obj


def _missing(key: str) -> ProtocolError:
    return ProtocolError(f"missing key {key!r}")


# The _as_* checks take a value already found and ``what`` names it in the error (a key, or an
# element of a list); the _get_* ones find a key of an object first.


def _as_int(value: object, what: str, low: int = 0) -> int:
    # type() rather than isinstance(): JSON true/false arrive as bool, a subclass of int.
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an integer, not {type(value).__name__}")
    if not low <= value <= _U64_MAX:
        raise ProtocolError(f"{what} = {value} is outside {low}..2**64-1")
    return value


def _as_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string, not {type(value).__name__}")
    try:
        # A "\ud800" escape decodes to a lone surrogate that could not be encoded again (for a
        # proof, a log line or a file name) later; refuse it while it is still a protocol error.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{what} holds a lone surrogate") from None
    return value


def _as_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} must be a boolean, not {type(value).__name__}")
    return value


def _get_int(obj: _JsonObject, key: str) -> int:
    if key not in obj:
        raise _missing(key)
    return _as_int(obj[key], repr(key))


def _get_str(obj: _JsonObject, key: str) -> str:
    if key not in obj:
        raise _missing(key)
    return _as_str(obj[key], repr(key))


def _get_token(obj: _JsonObject, key: str) -> str:
    value = _get_str(obj, key)
    if not is_token(value):
        raise ProtocolError(f"{key!r} must be 64 lowercase hex characters")
    return value


def _get_bool(obj: _JsonObject, key: str) -> bool:
    if key not in obj:
        raise _missing(key)
    return _as_bool(obj[key], repr(key))


def _get_optional_bool(obj: _JsonObject, key: str) -> bool:
    if obj.get(key) is None:
        return False
    return _get_bool(obj, key)


def _get_optional_int(obj: _JsonObject, key: str) -> int | None:
    if obj.get(key) is None:
        return None
    return _get_int(obj, key)


def _get_optional_str(obj: _JsonObject, key: str) -> str | None:
    if obj.get(key) is None:
        return None
    return _get_str(obj, key)


MAX_CODECS: Final = 8
_MAX_CODEC_NAME: Final = 32


def _get_codecs(obj: _JsonObject, key: str) -> tuple[str, ...]:
    """A list of codec names (absent: none). Names this build does not know are kept: the
    sender picks from the list, and only picks what it has."""
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_CODECS:
        raise ProtocolError(f"{key!r} must be a list of at most {MAX_CODECS} codec names")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= _MAX_CODEC_NAME:
            raise ProtocolError(f"{key!r} holds {item!r}, not a codec name")
        if item in names:
            raise ProtocolError(f"{key!r} names {item!r} twice")
        names.append(item)
    return tuple(names)


# --- lineages (version 2) -------------------------------------------------------------------------

_ROLES: Final = {str(role): role for role in Role}
_HEX: Final = frozenset("0123456789abcdef")


def _generation_from(entry: object, what: str) -> tuple[str, int, str]:
    """One ``[id, start_seq, unit]`` of a lineage's ``generations``."""
    if not isinstance(entry, list) or len(entry) != 3:
        shape = f"a list of {len(entry)}" if isinstance(entry, list) else type(entry).__name__
        raise ProtocolError(f"{what} must be [id, start_seq, unit], not {shape}")
    raw_id, raw_start, raw_unit = entry
    gid = _as_str(raw_id, f"{what} id")
    if len(gid) != 32 or not _HEX.issuperset(gid):
        raise ProtocolError(f"{what} id must be 32 lowercase hex characters")
    # Sequence numbers start at 1: a generation begins with the first record it will write.
    start = _as_int(raw_start, f"{what} start_seq", 1)
    unit = _as_str(raw_unit, f"{what} unit")
    if not 1 <= len(unit) <= MAX_UNIT_NAME:
        raise ProtocolError(
            f"{what} unit is {len(unit)} characters long, expected 1..{MAX_UNIT_NAME}"
        )
    return gid, start, unit


def _lineage_body(obj: _JsonObject, unit: str) -> Lineage:
    role_name = _get_str(obj, "role")
    role = _ROLES.get(role_name)
    if role is None:
        expected = ", ".join(repr(r) for r in _ROLES)
        raise ProtocolError(f"'role' is {role_name!r}, expected one of {expected}")
    if "generations" not in obj:
        raise _missing("generations")
    entries = obj["generations"]
    if not isinstance(entries, list):
        raise ProtocolError(f"'generations' must be a list, not {type(entries).__name__}")
    if len(entries) > MAX_LINEAGE:
        raise ProtocolError(f"'generations' holds {len(entries)} entries, at most {MAX_LINEAGE}")
    generations: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        generation = _generation_from(entry, f"generation {i}")
        gid, start, _ = generation
        # Ids are unique and starts never go back in a history this code writes
        # (journal/generations.py); a lineage that breaks either would make compare() find a
        # common point that is not one.
        if gid in seen:
            raise ProtocolError(f"generation {i} repeats id {gid}")
        if generations and start < generations[-1][1]:
            raise ProtocolError(
                f"generation {i} starts at seq {start}, before generation {i - 1} "
                f"(seq {generations[-1][1]})"
            )
        seen.add(gid)
        generations.append(generation)
    stamp = _get_optional_int(obj, "end_stamp")
    return Lineage(
        unit,
        role,
        tuple(generations),
        _get_int(obj, "end_seq"),
        _get_bool(obj, "lost_tail"),
        stamp or 0,
    )


def _get_lineage(obj: _JsonObject, key: str, unit: str) -> Lineage:
    """The lineage under ``key``; its unit is not on the wire inside it (it is the frame's
    ``unit``), so the caller supplies it."""
    if key not in obj:
        raise _missing(key)
    value = obj[key]
    if not isinstance(value, dict):
        raise ProtocolError(f"{key!r} must be an object, not {type(value).__name__}")
    try:
        return _lineage_body(value, unit)
    except ProtocolError as exc:
        raise ProtocolError(f"{key!r}: {exc}") from None


def _lineage_fields(lineage: Lineage) -> _JsonObject:
    return {
        "role": str(lineage.role),
        "generations": [list(g) for g in lineage.generations],
        "end_seq": lineage.end_seq,
        "lost_tail": lineage.lost_tail,
        **({"end_stamp": lineage.end_stamp} if lineage.end_stamp else {}),
    }


def _check_lineage_unit(frame: str, unit: str, lineage: Lineage | None) -> None:
    # The wire carries one unit name for both; a lineage of another unit cannot be sent as it is.
    if lineage is not None and lineage.unit != unit:
        raise ValueError(
            f"cannot encode {frame}: its lineage is unit {lineage.unit!r}, the frame's unit "
            f"is {unit!r}"
        )


# --- the JSON frames ------------------------------------------------------------------------------


def _hello_from(obj: _JsonObject) -> Hello:
    # The version is read first, so that a peer of another version whose HELLO this codec cannot
    # read is told "version" rather than "bad frame".
    protocol = _get_int(obj, "protocol")
    try:
        auth = _get_str(obj, "auth")
        if auth not in _AUTH_METHODS:
            raise ProtocolError(f"'auth' is {auth!r}, expected 'psk' or 'none'")
        unit = _get_str(obj, "unit")
        return Hello(
            protocol,
            unit,
            _get_str(obj, "volume"),
            _get_str(obj, "volume_id"),
            _get_int(obj, "size"),
            _get_token(obj, "nonce"),
            auth,
            _get_optional_int(obj, "max_record"),
            _get_optional_str(obj, "crypto"),
            # Required since version 2: without it the secondary cannot tell which way the
            # volume flows (a version-1 HELLO lacks it, and is refused "version" for that).
            _get_lineage(obj, "lineage", unit),
            _get_optional_str(obj, "source"),
            _get_optional_bool(obj, "configs"),
            _get_codecs(obj, "compression"),
        )
    except ProtocolError as exc:
        if protocol != PROTOCOL_VERSION:
            raise VersionError(protocol, str(exc)) from None
        raise


def _welcome_from(obj: _JsonObject) -> Welcome:
    protocol = _get_int(obj, "protocol")
    try:
        if "volume_id" not in obj:
            raise _missing("volume_id")
        volume_id = None if obj["volume_id"] is None else _get_str(obj, "volume_id")
        unit = _get_str(obj, "unit")
        diverged = _get_optional_int(obj, "diverged_frames") or 0
        if diverged > MAX_DIVERGED_FRAMES:
            raise ProtocolError(
                f"'diverged_frames' = {diverged} is more than {MAX_DIVERGED_FRAMES}"
            )
        return Welcome(
            protocol,
            unit,
            _get_int(obj, "received_seq"),
            _get_int(obj, "applied_seq"),
            _get_bool(obj, "consistent"),
            volume_id,
            _get_optional_int(obj, "max_record"),
            _get_lineage(obj, "lineage", unit),
            diverged,
            _get_optional_bool(obj, "configs"),
            _get_codecs(obj, "compression"),
        )
    except ProtocolError as exc:
        if protocol != PROTOCOL_VERSION:
            raise VersionError(protocol, str(exc)) from None
        raise


def _auth_server_from(obj: _JsonObject) -> AuthServer:
    return AuthServer(
        _get_token(obj, "nonce"), _get_token(obj, "proof"), _get_optional_str(obj, "crypto")
    )


def _auth_client_from(obj: _JsonObject) -> AuthClient:
    return AuthClient(_get_token(obj, "proof"))


def _refuse_from(obj: _JsonObject) -> Refuse:
    # Everything past code and message is optional: a version-1 peer, or any refusal that is
    # not one of direction, sends neither. A lineage needs its unit, the REFUSE's `unit`.
    lineage = None
    if obj.get("lineage") is not None:
        lineage = _get_lineage(obj, "lineage", _get_str(obj, "unit"))
    return Refuse(
        _get_str(obj, "code"),
        _get_str(obj, "message"),
        lineage,
        _get_optional_int(obj, "common_seq"),
        _get_optional_int(obj, "diverged_bytes"),
    )


def _peer_config_from(obj: _JsonObject) -> PeerConfig:
    unit = _get_str(obj, "unit")
    if not 1 <= len(unit) <= MAX_UNIT_NAME:
        raise ProtocolError(f"'unit' must be 1 to {MAX_UNIT_NAME} characters")
    text = _get_str(obj, "text")
    if len(text) > MAX_CONFIG_TEXT:
        raise ProtocolError(f"'text' is over {MAX_CONFIG_TEXT} characters")
    return PeerConfig(unit, _get_int(obj, "config_version"), text)


_JSON_DECODERS: Final[dict[int, Callable[[_JsonObject], Message]]] = {
    FrameType.HELLO: _hello_from,
    FrameType.AUTH_SERVER: _auth_server_from,
    FrameType.AUTH_CLIENT: _auth_client_from,
    FrameType.WELCOME: _welcome_from,
    FrameType.REFUSE: _refuse_from,
    FrameType.PEER_CONFIG: _peer_config_from,
}


def _json_fields(message: Message) -> tuple[FrameType, _JsonObject]:
    match message:
        case Hello():
            _check_lineage_unit("HELLO", message.unit, message.lineage)
            hello: _JsonObject = {
                "protocol": message.protocol,
                "unit": message.unit,
                "volume": message.volume,
                "volume_id": message.volume_id,
                "size": message.size,
                "nonce": message.nonce,
                "auth": message.auth,
            }
            if message.max_record is not None:
                hello["max_record"] = message.max_record
            if message.crypto is not None:
                hello["crypto"] = message.crypto
            if message.lineage is not None:
                hello["lineage"] = _lineage_fields(message.lineage)
            if message.source is not None:
                hello["source"] = message.source
            if message.configs:
                hello["configs"] = True
            if message.compression:
                hello["compression"] = list(message.compression)
            return FrameType.HELLO, hello
        case AuthServer():
            server: _JsonObject = {"nonce": message.nonce, "proof": message.proof}
            if message.crypto is not None:
                server["crypto"] = message.crypto
            return FrameType.AUTH_SERVER, server
        case AuthClient():
            return FrameType.AUTH_CLIENT, {"proof": message.proof}
        case Welcome():
            _check_lineage_unit("WELCOME", message.unit, message.lineage)
            welcome: _JsonObject = {
                "protocol": message.protocol,
                "unit": message.unit,
                "received_seq": message.received_seq,
                "applied_seq": message.applied_seq,
                "consistent": message.consistent,
                "volume_id": message.volume_id,
            }
            if message.max_record is not None:
                welcome["max_record"] = message.max_record
            if message.lineage is not None:
                welcome["lineage"] = _lineage_fields(message.lineage)
            # Absent means 0; sent as it is otherwise (a bool or a negative number is then
            # refused by the decoder's checks, which encode runs).
            if message.diverged_frames != 0:
                welcome["diverged_frames"] = message.diverged_frames
            if message.configs:
                welcome["configs"] = True
            if message.compression:
                welcome["compression"] = list(message.compression)
            return FrameType.WELCOME, welcome
        case PeerConfig():
            return FrameType.PEER_CONFIG, {
                "unit": message.unit,
                "config_version": message.config_version,
                "text": message.text,
            }
        case Refuse():
            refuse: _JsonObject = {"code": message.code, "message": message.message}
            if message.lineage is not None:
                refuse["unit"] = message.lineage.unit
                refuse["lineage"] = _lineage_fields(message.lineage)
            if message.common_seq is not None:
                refuse["common_seq"] = message.common_seq
            if message.diverged_bytes is not None:
                refuse["diverged_bytes"] = message.diverged_bytes
            return FrameType.REFUSE, refuse
    raise TypeError(f"{type(message).__name__} is not a JSON link message")


# --- binary payloads ------------------------------------------------------------------------------


def _records_from(payload: memoryview) -> Records:
    """Split and verify the records of a RECORDS payload (see docs/link-protocol.md)."""
    end = len(payload)
    pos = 0
    records: list[Record] = []
    expected_seq = -1
    while pos < end:
        if end - pos < HEADER_SIZE:
            raise ProtocolError(
                f"{end - pos} bytes after record {len(records)}, too short for a record header"
            )
        start = pos + HEADER_SIZE
        try:
            # verify_record takes the payload from the rest of the frame and reads only
            # payload_len bytes of it: one header decode and CRC per record.
            header = verify_record(payload[pos:start], payload[start:])
        except RecordError as exc:
            raise ProtocolError(f"record {len(records)} at byte {pos}: {exc}") from None
        if header.kind is _PADDING:
            # Padding only exists to fill the end of a ring; it means nothing to a peer.
            raise ProtocolError(f"record {len(records)} is padding")
        if expected_seq >= 0 and header.seq != expected_seq:
            raise ProtocolError(
                f"record seq {header.seq} follows seq {expected_seq - 1}, expected {expected_seq}"
            )
        stop = start + header.payload_len
        fill = padding_bytes(header.payload_len)
        if stop + fill > end:
            # Only the fill can overrun (verify_record refused a short payload), and not while
            # the header check keeps RECORDS lengths aligned; kept so this function stands alone.
            raise ProtocolError(f"record seq {header.seq} overruns the frame")
        # The fill is outside the record CRC. The frame CRC only shows it arrived as sent; the
        # format says zero, and a sender bug must not pass junk to whatever copies records on.
        if fill and payload[stop : stop + fill] != _ZERO_FILL[:fill]:
            raise ProtocolError(f"record seq {header.seq} has non-zero fill")
        records.append(Record(header, payload[start:stop]))
        expected_seq = header.seq + 1
        pos = stop + fill
    return Records(tuple(records))


def _ack_from(payload: memoryview) -> Ack:
    return Ack(*_ACK.unpack(payload))


def _heartbeat_from(payload: memoryview) -> Heartbeat:
    return Heartbeat(*_HEARTBEAT.unpack(payload))


def _sync_start_from(payload: memoryview) -> SyncStart:
    lsn, full, total_bytes, as_of_seq = _SYNC_START.unpack(payload)
    if full > 1:
        raise ProtocolError(f"full is {full}, expected 0 or 1")
    return SyncStart(lsn, full == 1, total_bytes, as_of_seq)


def _sync_data_from(payload: memoryview) -> SyncData:
    lsn, offset, as_of_seq = _SYNC_DATA.unpack_from(payload)
    return SyncData(lsn, offset, as_of_seq, payload[_SYNC_DATA.size :])


def _sync_done_from(payload: memoryview) -> SyncDone:
    return SyncDone(*_SYNC_DONE.unpack(payload))


def _sync_zero_from(payload: memoryview) -> SyncZero:
    return SyncZero(*_SYNC_ZERO.unpack(payload))


def _regions_from(payload: memoryview) -> Regions:
    # The header check keeps the length a multiple of 16; checked again so this stands alone.
    if len(payload) % _REGION.size:
        raise ProtocolError(f"{len(payload)} bytes are not whole (offset, length) pairs")
    extents: list[tuple[int, int]] = []
    end = 0  # where the previous region ends
    for i, (offset, length) in enumerate(_REGION.iter_unpack(payload)):
        if length == 0:
            raise ProtocolError(f"region {i} at offset {offset} is empty")
        if offset + length > _U64_MAX:
            raise ProtocolError(f"region {i} ({offset} + {length} bytes) ends past 2**64-1")
        # In order and apart: the source marks them in a dirty map as they come, and a peer
        # that sends a region twice or out of order is not doing what it says.
        if offset < end:
            raise ProtocolError(
                f"region {i} at offset {offset} starts before the end of region {i - 1} ({end})"
            )
        extents.append((offset, length))
        end = offset + length
    return Regions(tuple(extents))


def _digest_request_from(payload: memoryview) -> DigestRequest:
    request_id, offset, region, count = _DIGEST_REQUEST.unpack(payload)
    _check_digest_span(offset, region, count)
    return DigestRequest(request_id, offset, region, count)


def _digests_from(payload: memoryview) -> Digests:
    request_id, offset, region, count, applied = _DIGESTS.unpack_from(payload)
    _check_digest_span(offset, region, count)
    body = payload[_DIGESTS.size :]
    if len(body) != count * DIGEST_SIZE:
        raise ProtocolError(f"DIGESTS announces {count} digests but carries {len(body)} bytes")
    digests = tuple(bytes(body[i : i + DIGEST_SIZE]) for i in range(0, len(body), DIGEST_SIZE))
    return Digests(request_id, offset, region, applied, digests)


def _check_digest_span(offset: int, region: int, count: int) -> None:
    if not 1 <= count <= MAX_DIGESTS:
        raise ProtocolError(f"{count} regions asked for; 1 to {MAX_DIGESTS} allowed")
    if region == 0 or region % 512:
        raise ProtocolError(f"a region of {region} bytes is not a positive multiple of 512")
    if offset % 512 or offset + region * count > _U64_MAX:
        raise ProtocolError(f"regions from {offset} ({count} of {region} bytes) are out of range")


def _json_decoder(frame_type: int) -> Callable[[memoryview], Message]:
    decode_object = _JSON_DECODERS[frame_type]

    def decode(payload: memoryview) -> Message:
        return decode_object(_parse_json(payload))

    return decode


_DECODERS: Final[dict[int, Callable[[memoryview], Message]]] = {
    **{t: _json_decoder(t) for t in _JSON_DECODERS},
    FrameType.RECORDS: _records_from,
    FrameType.ACK: _ack_from,
    FrameType.HEARTBEAT: _heartbeat_from,
    FrameType.SYNC_START: _sync_start_from,
    FrameType.SYNC_DATA: _sync_data_from,
    FrameType.SYNC_DONE: _sync_done_from,
    FrameType.SYNC_ZERO: _sync_zero_from,
    FrameType.REGIONS: _regions_from,
    FrameType.DIGEST_REQUEST: _digest_request_from,
    FrameType.DIGESTS: _digests_from,
}
assert _DECODERS.keys() == _LENGTHS.keys() == set(FrameType)


# --- the input side -------------------------------------------------------------------------------


class _Chunks:
    """Received bytes as a queue of views of the fed buffers (nothing is copied on feed)."""

    __slots__ = ("_queue", "size")

    def __init__(self) -> None:
        self._queue: deque[memoryview] = deque()
        self.size = 0

    def append(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if view:
            self._queue.append(view)
            self.size += len(view)

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes (``n <= size``): a slice of one fed buffer when they lie in
        one, otherwise one joined copy."""
        if n == 0:
            return memoryview(b"")
        self.size -= n
        first = self._queue[0]
        if len(first) >= n:
            if len(first) == n:
                self._queue.popleft()
            else:
                self._queue[0] = first[n:]
            return first[:n]
        parts = []
        need = n
        while need:
            first = self._queue.popleft()
            if len(first) > need:
                self._queue.appendleft(first[need:])
                first = first[:need]
            parts.append(first)
            need -= len(first)
        return memoryview(b"".join(parts))


class LinkCodec:
    """Frames one direction of a link's byte stream into messages.

    The same codec serves both ends: which messages are acceptable at which point of the
    handshake is the caller's business. A malformed frame raises :class:`ProtocolError` (a
    :class:`VersionError` for a HELLO/WELCOME of another version); the stream cannot be
    re-synchronised after that, so the codec stays failed and raises the same error again.

    :meth:`feed` keeps references to the buffers it is given, and messages hold views into
    them: a caller must not modify a buffer after feeding it (``bytes`` from a transport are
    immutable, so the usual case is safe).
    """

    __slots__ = ("_allowed", "_chunks", "_error", "_flags", "_max_payload", "_pending")

    def __init__(self) -> None:
        self._allowed: frozenset[int] | None = None
        self._max_payload = MAX_PAYLOAD
        self._flags = 0  # the compression flags bulk frames may carry (accept_flags)
        self._chunks = _Chunks()
        # (frame type, payload length, CRC of the header prefix, CRC from the header, flags)
        # once a frame header has been read and its payload is awaited.
        self._pending: tuple[int, int, int, int, int] | None = None
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet consumed by a message (a parsed header included)."""
        return self._chunks.size + (0 if self._pending is None else FRAME_HEADER_SIZE)

    @property
    def needed(self) -> int:
        """Bytes still missing before the frame in progress (or the next header) is whole."""
        want = FRAME_HEADER_SIZE if self._pending is None else self._pending[1]
        return max(0, want - self._chunks.size)

    def restrict(self, types: frozenset[int] | None, max_payload: int = MAX_PAYLOAD) -> None:
        """Accept only frames of ``types`` (None: every type) with payloads of at most
        ``max_payload`` bytes, from the next frame header on.

        Checked on the header alone, like every other header check: before a link is
        authenticated the receiver accepts only handshake frames of at most 64 KiB, so a peer
        that announces a 64 MiB frame is refused before any of it is buffered.
        """
        self._allowed = types
        self._max_payload = max_payload

    def accept_flags(self, flags: int) -> None:
        """Let RECORDS and SYNC_DATA frames carry these compression flags from the next frame
        header on (the codecs this end offered in its handshake frame). 0: none."""
        self._flags = flags

    def feed(self, data: Buffer) -> None:
        """Add received bytes. Ignored once the codec has failed."""
        if self._error is None:
            self._chunks.append(data)

    def next_event(self) -> Message | None:
        """The next whole message, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            self._chunks = _Chunks()  # drop the rest: nothing after a bad frame is trusted
            raise

    def events(self) -> Iterator[Message]:
        """Every whole message buffered so far, in order."""
        while (message := self.next_event()) is not None:
            yield message

    def _next(self) -> Message | None:
        chunks = self._chunks
        if self._pending is None:
            if chunks.size < FRAME_HEADER_SIZE:
                return None
            self._pending = _check_header(
                chunks.take(FRAME_HEADER_SIZE), self._allowed, self._max_payload, self._flags
            )
        frame_type, length, crc, stored, flags = self._pending
        if chunks.size < length:
            return None
        self._pending = None
        payload = chunks.take(length)
        crc = crc32c(payload, crc)
        if crc != stored:
            raise ProtocolError(
                f"{_NAMES[frame_type]} frame of {length} bytes: CRC mismatch "
                f"(stored 0x{stored:08x}, computed 0x{crc:08x})"
            )
        try:
            if flags:
                payload = _expand(frame_type, payload, flags)
            return _DECODERS[frame_type](payload)
        except ProtocolError as exc:
            if isinstance(exc, VersionError):
                raise
            raise ProtocolError(f"{_NAMES[frame_type]} frame: {exc}") from None


def _expand(frame_type: int, body: memoryview, flags: int) -> memoryview:
    """A compressed payload, decompressed and held to its frame type's rules."""
    raw = memoryview(decompress(body, flags, _LENGTHS[frame_type][1]))
    if not _LENGTHS[frame_type][0] <= raw.nbytes:
        raise ProtocolError(f"compressed payload expands to only {raw.nbytes} bytes")
    if frame_type == _RECORDS_TYPE and raw.nbytes % RECORD_ALIGN:
        raise ProtocolError(f"records of {raw.nbytes} bytes are not a multiple of {RECORD_ALIGN}")
    return raw


def _check_header(
    header: memoryview,
    allowed: frozenset[int] | None = None,
    max_payload: int = MAX_PAYLOAD,
    accepted_flags: int = 0,
) -> tuple[int, int, int, int, int]:
    """Validate a frame header; returns (type, length, CRC of bytes 0..12, stored CRC, flags)."""
    magic, frame_type, flags, reserved, length, stored = _HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic 0x{magic:08x}, expected 0x{MAGIC:08x}")
    bounds = _LENGTHS.get(frame_type)
    if bounds is None:
        raise ProtocolError(f"unknown frame type {frame_type}")
    name = _NAMES[frame_type]
    # flags: compression, on bulk frames only, and only what this end offered.
    if reserved or (flags and (frame_type not in COMPRESSIBLE or flags & ~accepted_flags)):
        raise ProtocolError(
            f"{name} frame: header flags 0x{flags:02x} (reserved 0x{reserved:04x}) are not "
            "what this link negotiated"
        )
    if allowed is not None and frame_type not in allowed:
        raise ProtocolError(f"{name} frame is not allowed here (before authentication)")
    lo, hi = bounds
    if flags:
        # A compressed payload may be shorter than any plain one; its expanded size is held
        # to the frame type's bounds once known (_expand), before it is decoded.
        lo = COMPRESSED_MIN
    hi = min(hi, max(lo, max_payload))
    if not lo <= length <= hi:
        if lo == hi:
            raise ProtocolError(f"{name} frame announces {length} payload bytes, expected {lo}")
        raise ProtocolError(f"{name} frame announces {length} payload bytes, allowed {lo}..{hi}")
    # Records are 8-byte aligned, so a RECORDS payload is too; a corrupted length is then more
    # often caught here, before we wait for bytes that will never belong to this frame.
    if frame_type == _RECORDS_TYPE and length % RECORD_ALIGN and not flags:
        raise ProtocolError(f"RECORDS frame length {length} is not a multiple of {RECORD_ALIGN}")
    # Likewise REGIONS: whole 16-byte pairs only.
    if frame_type == _REGIONS_TYPE and length % _REGION.size:
        raise ProtocolError(f"REGIONS frame length {length} is not a multiple of {_REGION.size}")
    return frame_type, length, crc32c(header[:12]), stored, flags


# --- encoders -------------------------------------------------------------------------------------


def _header(frame_type: int, length: int, parts: Sequence[Buffer]) -> bytes:
    crc = _prefix_crc(frame_type, length)
    for part in parts:
        crc = crc32c(part, crc)
    return _HEADER.pack(MAGIC, frame_type, 0, 0, length, crc)


def encode_compressed(frame_type: int, body: bytes, flags: int) -> list[Buffer]:
    """A RECORDS or SYNC_DATA frame whose payload is ``body``, compressed as ``flags`` says
    (:meth:`blockmirror.link.compression.Compressor.compress` made it). The frame CRC covers the
    compressed bytes: corruption is caught before anything is decompressed."""
    if frame_type not in COMPRESSIBLE or not 0 < flags < 256:
        raise ValueError(f"frame type {frame_type} with flags {flags} cannot be compressed")
    if not 0 < len(body) <= MAX_PAYLOAD:
        raise ValueError(f"a compressed payload of {len(body)} bytes")
    prefix = _PREFIX.pack(MAGIC, frame_type, flags, 0, len(body))
    crc = crc32c(body, crc32c(prefix))
    return [_HEADER.pack(MAGIC, frame_type, flags, 0, len(body), crc), body]


def _fixed_frame(frame_type: int, payload: bytes) -> list[Buffer]:
    crc = crc32c(payload, _FIXED_PREFIX_CRC[frame_type])
    return [_HEADER.pack(MAGIC, frame_type, 0, 0, len(payload), crc) + payload]


def _pack(codec: struct.Struct, *values: int) -> bytes:
    try:
        return codec.pack(*values)
    except struct.error as exc:
        raise ValueError(f"link message field out of range: {exc}") from None


def _nbytes(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def encode(message: Message) -> list[Buffer]:
    """The buffers of one frame carrying ``message``, for ``writelines``/``writev``.

    Small frames (REGIONS included) are one ``bytes``; RECORDS and SYNC_DATA return their data
    buffers as given, after the header. Raises :class:`ValueError` for a message the decoder
    would refuse (a field out of range, a malformed nonce, a JSON payload over
    :data:`MAX_JSON`, unordered regions, ...).
    """
    match message:
        case Records():
            return encode_records([(r.header, (r.payload,)) for r in message.records])
        case Ack():
            body = _pack(_ACK, message.durable_seq, message.applied_seq, message.sync_lsn)
            return _fixed_frame(FrameType.ACK, body)
        case SyncData():
            size = _nbytes(message.data)
            if size > MAX_SYNC_DATA:
                raise ValueError(f"SYNC_DATA of {size} bytes, at most {MAX_SYNC_DATA}")
            prefix = _pack(_SYNC_DATA, message.lsn, message.offset, message.as_of_seq)
            parts: list[Buffer] = [prefix, message.data] if size else [prefix]
            head = _header(_SYNC_DATA_TYPE, len(prefix) + size, parts)
            # The small prefix rides with the header; the data stays where the caller has it.
            return [head + prefix, message.data] if size else [head + prefix]
        case Heartbeat():
            body = _pack(_HEARTBEAT, message.sent_ns, message.echo_ns)
            return _fixed_frame(FrameType.HEARTBEAT, body)
        case SyncStart():
            body = _pack(
                _SYNC_START,
                message.lsn,
                int(message.full),
                message.total_bytes,
                message.as_of_seq,
            )
            return _fixed_frame(FrameType.SYNC_START, body)
        case SyncDone():
            return _fixed_frame(
                FrameType.SYNC_DONE, _pack(_SYNC_DONE, message.lsn, message.as_of_seq)
            )
        case SyncZero():
            body = _pack(_SYNC_ZERO, message.lsn, message.offset, message.length, message.as_of_seq)
            return _fixed_frame(FrameType.SYNC_ZERO, body)
        case Regions():
            return _encode_regions(message)
        case DigestRequest():
            body = _pack(
                _DIGEST_REQUEST, message.request_id, message.offset, message.region, message.count
            )
            _as_encodable(_digest_request_from, body)
            return _fixed_frame(FrameType.DIGEST_REQUEST, body)
        case Digests():
            head = _pack(
                _DIGESTS,
                message.request_id,
                message.offset,
                message.region,
                len(message.digests),
                message.applied_seq,
            )
            payload = head + b"".join(message.digests)
            _as_encodable(_digests_from, payload)
            return [_header(int(FrameType.DIGESTS), len(payload), (payload,)) + payload]
    return _encode_json(message)


def _as_encodable(decoder: Callable[[memoryview], Message], payload: bytes) -> None:
    """Run the decoder's checks on a frame about to be sent (ValueError, as the JSON frames)."""
    try:
        decoder(memoryview(payload))
    except (ProtocolError, struct.error) as exc:
        raise ValueError(f"cannot encode: {exc}") from None


def _encode_regions(message: Regions) -> list[Buffer]:
    count = len(message.extents)
    if not 1 <= count <= MAX_REGIONS:
        raise ValueError(f"a REGIONS frame holds 1..{MAX_REGIONS} regions, not {count}")
    payload = b"".join(_pack(_REGION, offset, length) for offset, length in message.extents)
    # The decoder's checks (empty, overflowing, unordered or overlapping regions), as for the
    # JSON frames; a REGIONS frame is sent once per handshake at most.
    try:
        _regions_from(memoryview(payload))
    except ProtocolError as exc:
        raise ValueError(f"cannot encode REGIONS: {exc}") from None
    return [_header(_REGIONS_TYPE, len(payload), (payload,)) + payload]


def regions_frames(extents: Iterable[tuple[int, int]]) -> list[Regions]:
    """The REGIONS frames that carry ``extents`` (``(offset, length)`` pairs), in order.

    Extents are sorted and merged first, touching and overlapping ones into one (what the
    source copies is their union either way), and empty ones dropped; each frame then holds
    at most :data:`MAX_REGIONS`. No extents, no frames: the WELCOME's ``diverged_frames`` is
    the length of the list. Raises :class:`ValueError` for a negative offset or length, or a
    region that ends past 2**64-1.
    """
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if offset < 0 or length < 0 or offset + length > _U64_MAX:
            raise ValueError(f"region {offset} + {length} bytes is outside 0..2**64-1")
        if length == 0:
            continue
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            start, size = merged[-1]
            merged[-1] = (start, max(size, offset + length - start))
        else:
            merged.append((offset, length))
    return [Regions(tuple(merged[i : i + MAX_REGIONS])) for i in range(0, len(merged), MAX_REGIONS)]


def _encode_json(message: Message) -> list[Buffer]:
    frame_type, fields = _json_fields(message)
    # Run the decoder's own checks on the fields, so that nothing is sent that the peer must
    # refuse (a bool where an int belongs, a malformed nonce, a lone surrogate, ...). Handshake
    # frames are rare; the cost does not matter.
    try:
        _JSON_DECODERS[frame_type](fields)
    except ProtocolError as exc:
        raise ValueError(f"cannot encode {frame_type.name}: {exc}") from None
    payload = json.dumps(fields, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8"
    )
    if len(payload) > MAX_JSON:
        raise ValueError(f"{frame_type.name} payload is {len(payload)} bytes, at most {MAX_JSON}")
    return [_header(frame_type, len(payload), (payload,)) + payload]


def encode_records(records: Sequence[tuple[RecordHeader, Sequence[Buffer]]]) -> list[Buffer]:
    """A RECORDS frame from record headers and their payload parts (see ``format.record_iov``).

    The payload parts are returned as given (not copied); the record CRCs and the frame CRC are
    computed over them where they lie. Raises :class:`ValueError` for no records, a padding
    record, sequence numbers that are not consecutive, parts that do not match their header,
    or a frame over :data:`MAX_PAYLOAD`.
    """
    if not records:
        raise ValueError("a RECORDS frame holds at least one record")
    length = 0
    expected_seq = records[0][0].seq
    for header, _parts in records:
        if header.kind == Kind.PADDING:
            raise ValueError(f"record seq {header.seq} is padding, which is never sent")
        if header.seq != expected_seq:
            raise ValueError(f"record seq {header.seq} where seq {expected_seq} belongs")
        expected_seq += 1
        length += record_size(header.payload_len)
    # Before any CRC is computed: an oversized batch is refused cheaply.
    if length > MAX_PAYLOAD:
        raise ValueError(f"RECORDS frame of {length} bytes, at most {MAX_PAYLOAD}")
    iov: list[Buffer] = []
    for header, parts in records:
        iov.extend(record_iov(header, parts))
    return [_header(_RECORDS_TYPE, length, iov), *iov]


def encode_raw_records(raw: Buffer) -> list[Buffer]:
    """A RECORDS frame around records already in journal format (a run read from the ring).

    Only the frame header is built: the caller guarantees that ``raw`` is whole, consecutive,
    non-padding records (the receiver verifies every one and refuses the frame otherwise).
    Raises :class:`ValueError` for a length no RECORDS frame can have.
    """
    length = _nbytes(raw)
    if not HEADER_SIZE <= length <= MAX_PAYLOAD or length % RECORD_ALIGN:
        raise ValueError(
            f"{length} bytes cannot be a RECORDS payload (a multiple of {RECORD_ALIGN} "
            f"in {HEADER_SIZE}..{MAX_PAYLOAD})"
        )
    return [_header(_RECORDS_TYPE, length, (raw,)), raw]
