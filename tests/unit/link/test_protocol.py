"""The link codec: layout pinned to docs/link-protocol.md, round trips, every corruption caught.

Frames that the codec must refuse are built here with ``struct`` and ``crc32c`` directly, not
with the encoders under test, so a bug shared by encoder and decoder cannot hide itself.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from collections.abc import Sequence

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.errors import BlockmirrorError, ProtocolError
from blockmirror.journal.format import Buffer, Kind, RecordHeader, record_iov
from blockmirror.journal.lineage import Lineage
from blockmirror.link.protocol import (
    AUTH_NONE,
    AUTH_PSK,
    DIGEST_SIZE,
    FRAME_HEADER_SIZE,
    HANDSHAKE_FRAMES,
    MAGIC,
    MAX_CONFIG_TEXT,
    MAX_DIGESTS,
    MAX_JSON,
    MAX_PAYLOAD,
    MAX_SYNC_DATA,
    PROTOCOL_VERSION,
    Ack,
    AuthClient,
    AuthServer,
    DigestRequest,
    Digests,
    FrameType,
    Heartbeat,
    Hello,
    LinkCodec,
    Message,
    PeerConfig,
    Record,
    Records,
    Refuse,
    RefuseCode,
    Regions,
    SyncData,
    SyncDone,
    SyncStart,
    SyncZero,
    VersionError,
    Welcome,
    encode,
    encode_raw_records,
    encode_records,
)
from blockmirror.state import Role

# --- independent frame builders -------------------------------------------------------------------


def frame(
    frame_type: int,
    payload: bytes,
    *,
    magic: int = MAGIC,
    flags: int = 0,
    reserved: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame with any header fields and a CRC that is right for them."""
    n = len(payload) if length is None else length
    prefix = struct.pack("<IBBHI", magic, frame_type, flags, reserved, n)
    return prefix + struct.pack("<I", crc32c(payload, crc32c(prefix))) + payload


def header_only(frame_type: int, length: int) -> bytes:
    """The 16 header bytes of a frame announcing ``length`` payload bytes (CRC irrelevant)."""
    return struct.pack("<IBBHII", MAGIC, frame_type, 0, 0, length, 0)


def json_frame(frame_type: int, obj: object) -> bytes:
    return frame(frame_type, json.dumps(obj).encode())


def raw_record(kind: Kind, seq: int, payload: bytes = b"", **fields: int) -> bytes:
    length = fields.pop("length", len(payload) if kind == Kind.WRITE else 0)
    payload_len = len(payload) if kind != Kind.PADDING else fields.pop("payload_len", 0)
    header = RecordHeader(
        kind,
        seq,
        fields.get("timestamp_ns", 0),
        fields.get("offset", 0),
        length,
        fields.get("durable_seq", 0),
        payload_len,
    )
    return b"".join(bytes(b) for b in record_iov(header, (payload,) if payload else ()))


def join(buffers: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def decode(data: bytes, cuts: Sequence[int] = ()) -> list[Message]:
    """Feed ``data`` cut at ``cuts`` and collect every message, draining after each piece."""
    codec = LinkCodec()
    out: list[Message] = []
    start = 0
    for end in [*sorted(cuts), len(data)]:
        codec.feed(data[start:end])
        start = end
        out.extend(codec.events())
    return out


def refused(data: bytes) -> ProtocolError:
    codec = LinkCodec()
    codec.feed(data)
    with pytest.raises(ProtocolError) as info:
        while codec.next_event() is not None:
            pass
    return info.value


def assert_refused(data: bytes, pattern: str) -> ProtocolError:
    err = refused(data)
    assert re.search(pattern, str(err)), str(err)
    return err


# --- strategies -----------------------------------------------------------------------------------

U64 = st.integers(0, 2**64 - 1)
TEXT = st.text(max_size=24)
TOKEN = st.binary(min_size=32, max_size=32).map(bytes.hex)


def view(data: bytes) -> memoryview:
    return memoryview(data)


DATA = st.binary(max_size=64).map(view)
SENT_KINDS = [Kind.WRITE, Kind.ZERO, Kind.TRIM, Kind.FLUSH]

GENERATION_ID = st.binary(min_size=16, max_size=16).map(bytes.hex)
# Hypothesis text never holds lone surrogates, which the codec refuses.
GENERATION_UNIT = st.text(min_size=1, max_size=12)
SEQ = st.integers(1, 2**64 - 1)


@st.composite
def lineages(draw: st.DrawFn, unit: str | None = None, max_generations: int = 4) -> Lineage:
    """Lineages as the wire may carry them: unique ids, start_seq never going back (equal
    starts are two promotes with no write between them)."""
    ids = draw(st.lists(GENERATION_ID, unique=True, max_size=max_generations))
    starts = sorted(draw(st.lists(SEQ, min_size=len(ids), max_size=len(ids))))
    units = draw(st.lists(GENERATION_UNIT, min_size=len(ids), max_size=len(ids)))
    return Lineage(
        draw(TEXT) if unit is None else unit,
        draw(st.sampled_from(Role)),
        tuple(zip(ids, starts, units, strict=True)),
        draw(U64),
        draw(st.booleans()),
        draw(st.just(0) | U64),  # end_stamp: 0 (unknown) is left out on the wire
    )


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    unit = draw(TEXT)
    return Hello(
        PROTOCOL_VERSION,
        unit,
        draw(TEXT),
        draw(TEXT),
        draw(U64),
        draw(TOKEN),
        draw(st.sampled_from([AUTH_PSK, AUTH_NONE])),
        draw(st.none() | U64),
        draw(st.none() | st.just("chacha20-poly1305")),
        draw(lineages(unit)),
        draw(st.none() | TEXT),
        draw(st.booleans()),
    )


@st.composite
def welcomes(draw: st.DrawFn) -> Welcome:
    unit = draw(TEXT)
    return Welcome(
        PROTOCOL_VERSION,
        unit,
        draw(U64),
        draw(U64),
        draw(st.booleans()),
        draw(st.none() | TEXT),
        draw(st.none() | U64),
        draw(lineages(unit)),
        draw(st.integers(0, 1_000_000)),
        draw(st.booleans()),
    )


@st.composite
def refuses(draw: st.DrawFn) -> Refuse:
    code = draw(st.sampled_from([str(c) for c in RefuseCode]) | TEXT)
    return Refuse(
        code,
        draw(TEXT),
        draw(st.none() | lineages()),
        draw(st.none() | U64),
        draw(st.none() | U64),
    )


@st.composite
def regions_messages(draw: st.DrawFn) -> Regions:
    """1..8 regions, ordered and apart (touching allowed), somewhere in 0..2**64-1."""
    cuts = sorted(draw(st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=16, unique=True)))
    pairs = [(cuts[i], cuts[i + 1] - cuts[i]) for i in range(0, len(cuts) - 1, 2)]
    return Regions(tuple(pairs))


@st.composite
def records_messages(draw: st.DrawFn) -> Records:
    first = draw(st.integers(0, 2**64 - 8))
    specs = draw(
        st.lists(
            st.tuples(st.sampled_from(SENT_KINDS), st.binary(max_size=40), U64, U64, U64, U64),
            min_size=1,
            max_size=5,
        )
    )
    records = []
    for i, (kind, data, offset, length, timestamp_ns, durable_seq) in enumerate(specs):
        payload = data if kind == Kind.WRITE else b""
        n = len(payload) if kind == Kind.WRITE else length
        header = RecordHeader(kind, first + i, timestamp_ns, offset, n, durable_seq, len(payload))
        records.append(Record(header, memoryview(payload)))
    return Records(tuple(records))


@st.composite
def digest_requests(draw: st.DrawFn) -> DigestRequest:
    region = draw(st.integers(1, 2048)) * 512
    count = draw(st.integers(1, MAX_DIGESTS))
    offset = draw(st.integers(0, (2**64 - 1 - region * count) // 512)) * 512
    return DigestRequest(draw(U64), offset, region, count)


@st.composite
def digests_messages(draw: st.DrawFn) -> Digests:
    request = draw(digest_requests())
    # No more digests than the request's regions: its offset was drawn to fit those.
    count = draw(st.integers(1, min(8, request.count)))
    digests = tuple(
        draw(st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)) for _ in range(count)
    )
    return Digests(request.request_id, request.offset, request.region, draw(U64), digests)


messages: st.SearchStrategy[Message] = st.one_of(
    hellos(),
    st.builds(AuthServer, nonce=TOKEN, proof=TOKEN),
    st.builds(AuthClient, proof=TOKEN),
    welcomes(),
    refuses(),
    records_messages(),
    st.builds(Ack, durable_seq=U64, applied_seq=U64, sync_lsn=U64),
    st.builds(Heartbeat, sent_ns=U64, echo_ns=U64),
    st.builds(SyncStart, lsn=U64, full=st.booleans(), total_bytes=U64, as_of_seq=U64),
    st.builds(SyncData, lsn=U64, offset=U64, as_of_seq=U64, data=DATA),
    st.builds(SyncDone, lsn=U64, as_of_seq=U64),
    st.builds(SyncZero, lsn=U64, offset=U64, length=U64, as_of_seq=U64),
    regions_messages(),
    digest_requests(),
    digests_messages(),
    st.builds(
        PeerConfig,
        unit=st.text(min_size=1, max_size=40),
        config_version=U64,
        text=st.text(max_size=2000),
    ),
)

# A lineage for the examples below, as a Lineage of unit ``unit`` and as its JSON on the wire.
GEN_A = "a1" * 16


def lineage(unit: str, role: Role = Role.PRIMARY) -> Lineage:
    return Lineage(unit, role, ((GEN_A, 1, "site-a"),), 10, False)


LINEAGE = {
    "role": "primary",
    "generations": [[GEN_A, 1, "site-a"]],
    "end_seq": 10,
    "lost_tail": False,
}


# --- layout ---------------------------------------------------------------------------------------


def test_frame_header_layout_matches_the_doc() -> None:
    out = join(encode(Ack(1, 2, 3)))
    assert out[:4] == b"BMLK"
    assert out == frame(7, struct.pack("<QQQ", 1, 2, 3))
    assert len(out) == FRAME_HEADER_SIZE + 24


@pytest.mark.parametrize(
    ("message", "frame_type", "payload"),
    [
        (Heartbeat(5, 6), 8, struct.pack("<QQ", 5, 6)),
        (SyncStart(1, True, 2, 3), 9, struct.pack("<QBQQ", 1, 1, 2, 3)),
        (SyncStart(1, False, 2, 3), 9, struct.pack("<QBQQ", 1, 0, 2, 3)),
        (SyncData(1, 2, 3, memoryview(b"data")), 10, struct.pack("<QQQ", 1, 2, 3) + b"data"),
        (SyncDone(7, 8), 11, struct.pack("<QQ", 7, 8)),
        (SyncZero(1, 2, 3, 4), 12, struct.pack("<QQQQ", 1, 2, 3, 4)),
    ],
)
def test_binary_payload_layouts(message: Message, frame_type: int, payload: bytes) -> None:
    assert join(encode(message)) == frame(frame_type, payload)


def test_frame_types_are_numbered_as_documented() -> None:
    assert [(t.name, t.value) for t in FrameType] == [
        ("HELLO", 1),
        ("AUTH_SERVER", 2),
        ("AUTH_CLIENT", 3),
        ("WELCOME", 4),
        ("REFUSE", 5),
        ("RECORDS", 6),
        ("ACK", 7),
        ("HEARTBEAT", 8),
        ("SYNC_START", 9),
        ("SYNC_DATA", 10),
        ("SYNC_DONE", 11),
        ("SYNC_ZERO", 12),
        ("REGIONS", 14),
        ("DIGEST_REQUEST", 15),
        ("DIGESTS", 16),
        ("PEER_CONFIG", 17),
    ]


def test_json_payloads_are_plain_utf8_objects() -> None:
    hello = Hello(2, "site-a", "db", "j-1", 4096, "ab" * 32, AUTH_PSK, lineage=lineage("site-a"))
    out = join(encode(hello))
    assert out[4] == FrameType.HELLO
    assert json.loads(out[16:].decode("utf-8")) == {
        "protocol": 2,
        "unit": "site-a",
        "volume": "db",
        "volume_id": "j-1",
        "size": 4096,
        "nonce": "ab" * 32,
        "auth": "psk",
        "lineage": LINEAGE,
    }
    welcome = join(encode(Welcome(2, "site-b", 5, 4, False, None, None, lineage("site-b"))))
    assert json.loads(welcome[16:])["volume_id"] is None


def test_records_payload_is_journal_records_back_to_back() -> None:
    a = raw_record(Kind.WRITE, 10, b"hello", offset=4096)
    b = raw_record(Kind.FLUSH, 11)
    records = [
        (RecordHeader(Kind.WRITE, 10, 0, 4096, 5, 0, 5), [b"hello"]),
        (RecordHeader(Kind.FLUSH, 11, 0, 0, 0, 0, 0), []),
    ]
    assert join(encode_records(records)) == frame(6, a + b)


# --- round trips ----------------------------------------------------------------------------------


@given(messages)
def test_round_trip_whole_frame(message: Message) -> None:
    codec = LinkCodec()
    for part in encode(message):
        codec.feed(part)
    assert codec.next_event() == message
    assert codec.next_event() is None
    assert codec.buffered == 0
    assert codec.needed == FRAME_HEADER_SIZE


@given(st.lists(messages, min_size=1, max_size=4))
def test_round_trip_byte_by_byte(batch: list[Message]) -> None:
    frames = [join(encode(m)) for m in batch]
    data = b"".join(frames)
    ends = {sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))}
    codec = LinkCodec()
    out: list[Message] = []
    for i in range(len(data)):
        codec.feed(data[i : i + 1])
        got = list(codec.events())
        # A message appears exactly when the last byte of its frame arrives, never earlier.
        assert len(got) == (1 if i + 1 in ends else 0)
        out.extend(got)
    assert out == batch


@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_round_trip_random_splits_with_partial_tail(
    batch: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(join(encode(m)) for m in batch)
    tail = join(encode(data.draw(messages, label="tail")))
    partial = tail[: data.draw(st.integers(0, len(tail) - 1), label="partial")]
    whole = stream + partial
    cuts = data.draw(st.lists(st.integers(0, len(whole)), max_size=8), label="cuts")
    codec = LinkCodec()
    out: list[Message] = []
    start = 0
    for end in [*sorted(cuts), len(whole)]:
        # Mixed buffer types, as transports and tests may hand them over.
        piece = whole[start:end]
        codec.feed(bytearray(piece) if end % 2 else memoryview(piece))
        start = end
        out.extend(codec.events())
    assert out == batch
    assert codec.next_event() is None
    assert codec.buffered == len(partial)
    assert codec.needed > 0


@given(records_messages())
def test_raw_records_round_trip(message: Records) -> None:
    raw = b"".join(join(record_iov(r.header, (r.payload,))) for r in message.records)
    parts = encode_raw_records(raw)
    assert parts[1] is raw  # only a header is prepended
    assert decode(join(parts)) == [message]
    assert join(parts) == join(encode(message))


def test_records_encoding_returns_the_callers_buffers() -> None:
    first, second = memoryview(b"abcdefghij"), bytearray(b"xyz")
    header = RecordHeader(Kind.WRITE, 1, 0, 0, 13, 0, 13)
    parts = encode_records([(header, [first, second])])
    assert any(p is first for p in parts)
    assert any(p is second for p in parts)
    [message] = decode(join(parts))
    assert isinstance(message, Records)
    assert bytes(message.records[0].payload) == b"abcdefghijxyz"
    assert (message.first_seq, message.last_seq) == (1, 1)


def test_sync_data_encoding_returns_the_data_buffer() -> None:
    data = memoryview(bytearray(b"region"))
    parts = encode(SyncData(1, 2, 3, data))
    assert parts[-1] is data
    assert decode(join(parts)) == [SyncData(1, 2, 3, memoryview(b"region"))]


def test_received_payloads_are_views_of_the_fed_buffer() -> None:
    chunk = join(
        encode_records(
            [
                (RecordHeader(Kind.WRITE, 5, 0, 0, 3, 0, 3), [b"abc"]),
                (RecordHeader(Kind.WRITE, 6, 0, 8, 9, 0, 9), [b"defghijkl"]),
            ]
        )
    ) + join(encode(SyncData(1, 0, 6, memoryview(b"region"))))
    codec = LinkCodec()
    codec.feed(chunk)
    records, sync = list(codec.events())
    assert isinstance(records, Records) and isinstance(sync, SyncData)
    for record in records.records:
        assert record.payload.obj is chunk
    assert sync.data.obj is chunk
    assert [bytes(r.payload) for r in records.records] == [b"abc", b"defghijkl"]
    assert records.records[1].seq == 6


def test_frames_straddling_chunks_are_joined_correctly() -> None:
    data = join(encode_records([(RecordHeader(Kind.WRITE, 1, 0, 0, 100, 0, 100), [bytes(100)])]))
    assert decode(data, cuts=[3, 17, 40, 90, 91]) == decode(data)


# --- corruption -----------------------------------------------------------------------------------


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def assert_detected(corrupted: bytes) -> None:
    """The codec never yields a message from ``corrupted``. A corrupted length can make it wait
    for more bytes; it must then refuse once those bytes have come."""
    codec = LinkCodec()
    codec.feed(corrupted)
    try:
        event = codec.next_event()
    except ProtocolError:
        return
    assert event is None
    assert codec.needed > 0
    codec.feed(bytes(codec.needed))
    with pytest.raises(ProtocolError):
        codec.next_event()


@pytest.mark.parametrize(
    "message",
    [
        Records((Record(RecordHeader(Kind.WRITE, 1, 0, 0, 3, 0, 3), memoryview(b"abc")),)),
        SyncData(1, 2, 3, memoryview(b"region")),
    ],
)
@pytest.mark.parametrize("bit", [5, 10, 25])  # bits clear in both lengths (72, 30)
def test_a_grown_length_is_caught_once_its_bytes_arrive(message: Message, bit: int) -> None:
    data = flip(join(encode(message)), 8 * 8 + bit)
    codec = LinkCodec()
    codec.feed(data)
    assert codec.next_event() is None
    assert codec.needed == 1 << bit
    codec.feed(bytes(codec.needed - 1))
    assert codec.next_event() is None  # nothing is decided, nor emitted, before the CRC
    codec.feed(b"\0")
    with pytest.raises(ProtocolError, match="CRC mismatch"):
        codec.next_event()


@settings(max_examples=40, deadline=None)
@given(messages)
def test_every_single_bit_flip_is_detected(message: Message) -> None:
    data = join(encode(message))
    for bit in range(len(data) * 8):
        assert_detected(flip(data, bit))


@settings(max_examples=40, deadline=None)
@given(records_messages())
def test_record_corruption_is_caught_even_under_a_valid_frame_crc(message: Records) -> None:
    payload = join(encode(message))[FRAME_HEADER_SIZE:]
    for bit in range(len(payload) * 8):
        # The frame CRC is recomputed over the damage: only the record checks remain.
        err = refused(frame(FrameType.RECORDS, flip(payload, bit)))
        assert str(err).startswith("RECORDS frame: ")


@given(st.binary(max_size=300))
def test_garbage_raises_only_protocol_error(data: bytes) -> None:
    codec = LinkCodec()
    codec.feed(data)
    with contextlib.suppress(ProtocolError):
        list(codec.events())


@given(st.integers(0, 255), st.binary(max_size=200))
def test_garbage_in_a_valid_frame_raises_only_protocol_error(
    frame_type: int, payload: bytes
) -> None:
    codec = LinkCodec()
    codec.feed(frame(frame_type, payload))
    with contextlib.suppress(ProtocolError):
        list(codec.events())


JSON_KEYS = [
    "protocol",
    "unit",
    "volume",
    "volume_id",
    "size",
    "nonce",
    "auth",
    "proof",
    "received_seq",
    "applied_seq",
    "consistent",
    "code",
    "message",
    "lineage",
    "source",
    "diverged_frames",
    "common_seq",
    "diverged_bytes",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | TOKEN,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@given(
    st.sampled_from(
        [
            FrameType.HELLO,
            FrameType.AUTH_SERVER,
            FrameType.AUTH_CLIENT,
            FrameType.WELCOME,
            FrameType.REFUSE,
        ]
    ),
    st.dictionaries(st.sampled_from(JSON_KEYS) | st.text(max_size=5), json_values),
)
def test_json_fuzz_raises_only_protocol_error(frame_type: FrameType, obj: object) -> None:
    codec = LinkCodec()
    codec.feed(json_frame(frame_type, obj))
    with contextlib.suppress(ProtocolError):
        list(codec.events())


def test_a_failed_codec_stays_failed() -> None:
    codec = LinkCodec()
    codec.feed(b"\0" * 16)
    with pytest.raises(ProtocolError) as first:
        codec.next_event()
    codec.feed(join(encode(Heartbeat(1, 2))))
    with pytest.raises(ProtocolError) as again:
        codec.next_event()
    assert again.value is first.value
    assert codec.buffered == 0


# --- header checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (frame(7, bytes(24), magic=0x4B4C4D43), "bad frame magic"),
        (frame(0, b""), "unknown frame type 0"),
        (frame(13, b""), "unknown frame type 13"),
        (frame(255, b""), "unknown frame type 255"),
        (frame(7, bytes(24), flags=1), "header flags 0x01"),
        (frame(7, bytes(24), reserved=0x100), "reserved 0x0100"),
    ],
)
def test_bad_headers_are_refused_on_the_header_alone(data: bytes, reason: str) -> None:
    codec = LinkCodec()
    codec.feed(data[:FRAME_HEADER_SIZE])
    with pytest.raises(ProtocolError, match=reason):
        codec.next_event()


@pytest.mark.parametrize(
    ("frame_type", "length"),
    [
        (FrameType.RECORDS, MAX_PAYLOAD + 1),
        (FrameType.RECORDS, MAX_PAYLOAD + 8),
        (FrameType.RECORDS, 2**32 - 1),
        (FrameType.SYNC_DATA, MAX_PAYLOAD + 1),
        (FrameType.HELLO, MAX_JSON + 1),
        (FrameType.REFUSE, MAX_JSON + 1),
        (FrameType.RECORDS, 0),
        (FrameType.RECORDS, 56),
        (FrameType.RECORDS, 68),
        (FrameType.SYNC_DATA, 23),
        (FrameType.ACK, 23),
        (FrameType.ACK, 25),
        (FrameType.HEARTBEAT, 24),
        (FrameType.SYNC_START, 24),
        (FrameType.SYNC_DONE, 0),
        (FrameType.SYNC_ZERO, 40),
        (FrameType.REGIONS, 0),
        (FrameType.REGIONS, 8),
        (FrameType.REGIONS, 24),
        (FrameType.REGIONS, 1024 * 1024 + 16),
        (FrameType.REGIONS, MAX_PAYLOAD),
    ],
)
def test_impossible_lengths_are_refused_before_the_payload(frame_type: int, length: int) -> None:
    codec = LinkCodec()
    codec.feed(header_only(frame_type, length))
    with pytest.raises(ProtocolError, match=f"{length}"):
        codec.next_event()


@pytest.mark.parametrize("frame_type", [FrameType.RECORDS, FrameType.SYNC_DATA])
def test_the_largest_frame_is_awaited(frame_type: int) -> None:
    codec = LinkCodec()
    codec.feed(header_only(frame_type, MAX_PAYLOAD))
    assert codec.next_event() is None
    assert codec.needed == MAX_PAYLOAD


def test_bad_crc_is_refused() -> None:
    data = bytearray(frame(FrameType.ACK, bytes(24)))
    data[12] ^= 0xFF
    assert_refused(bytes(data), "ACK frame of 24 bytes: CRC mismatch")


# --- JSON payloads --------------------------------------------------------------------------------

HELLO = {
    "protocol": 2,
    "unit": "site-a",
    "volume": "db",
    "volume_id": "j-1",
    "size": 1 << 30,
    "nonce": "0f" * 32,
    "auth": "none",
    "lineage": LINEAGE,
}


def with_(base: dict[str, object], **changes: object) -> dict[str, object]:
    return {**base, **changes}


def without(base: dict[str, object], key: str) -> dict[str, object]:
    return {k: v for k, v in base.items() if k != key}


def test_unknown_keys_are_ignored() -> None:
    [hello] = decode(json_frame(FrameType.HELLO, with_(HELLO, future={"x": [1, 2.5, None]})))
    assert hello == Hello(
        2, "site-a", "db", "j-1", 1 << 30, "0f" * 32, "none", lineage=lineage("site-a")
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not UTF-8 JSON"),
        (b"[]", "JSON list, not an object"),
        (b'"hello"', "JSON str, not an object"),
        (b"1", "JSON int, not an object"),
        (b"null", "JSON NoneType, not an object"),
        (b"\xff{}", "not UTF-8 JSON"),
        (json.dumps(HELLO).encode("utf-16"), "not UTF-8 JSON"),
        (b"\xef\xbb\xbf" + json.dumps(HELLO).encode(), "not UTF-8 JSON"),
        (json.dumps(HELLO).encode()[:-1], "not UTF-8 JSON"),
        (json.dumps(with_(HELLO, x=float("nan"))).encode(), "NaN is not JSON"),
        (json.dumps(with_(HELLO, x=float("inf"))).encode(), "Infinity is not JSON"),
        (b'{"unit": "a", "unit": "b"}', "duplicate key 'unit'"),
        (b'{"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "not UTF-8 JSON"),
        (b'{"x": ' + b"1" * 5000 + b"}", "not UTF-8 JSON"),
    ],
)
def test_malformed_json_is_refused(payload: bytes, reason: str) -> None:
    assert len(payload) <= MAX_JSON
    assert_refused(frame(FrameType.HELLO, payload), reason)


@pytest.mark.parametrize("key", list(HELLO))
def test_hello_missing_key_is_refused(key: str) -> None:
    err = refused(json_frame(FrameType.HELLO, without(HELLO, key)))
    assert f"missing key {key!r}" in str(err)
    assert not isinstance(err, VersionError)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("protocol", True, "must be an integer, not bool"),
        ("protocol", "1", "must be an integer, not str"),
        ("protocol", 1.0, "must be an integer, not float"),
        ("size", -1, "outside 0..2\\*\\*64-1"),
        ("size", 2**64, "outside 0..2\\*\\*64-1"),
        ("size", None, "must be an integer, not NoneType"),
        ("unit", 5, "must be a string, not int"),
        ("volume", ["db"], "must be a string, not list"),
        ("volume_id", None, "must be a string, not NoneType"),
        ("volume", "\ud800", "lone surrogate"),
        ("nonce", "0F" * 32, "64 lowercase hex"),
        ("nonce", "0f" * 31, "64 lowercase hex"),
        ("nonce", "0f" * 33, "64 lowercase hex"),
        ("nonce", "zz" * 32, "64 lowercase hex"),
        ("auth", "kerberos", "expected 'psk' or 'none'"),
        ("auth", None, "must be a string"),
    ],
)
def test_hello_mistyped_key_is_refused(key: str, value: object, reason: str) -> None:
    payload = json.dumps(with_(HELLO, **{key: value})).encode()
    assert_refused(frame(FrameType.HELLO, payload), reason)


def test_hello_of_another_version_is_reported_as_a_version_mismatch() -> None:
    # Readable as version 2: decoded, so the caller can answer REFUSE "version".
    [hello] = decode(json_frame(FrameType.HELLO, with_(HELLO, protocol=3)))
    assert isinstance(hello, Hello) and hello.protocol == 3
    # Not readable as version 2: a VersionError (a ProtocolError) that names the version.
    err = refused(json_frame(FrameType.HELLO, {"protocol": 3, "something": "else"}))
    assert isinstance(err, VersionError) and err.version == 3
    assert "version 3" in str(err)
    # Without an integer version there is nothing to say but "bad frame".
    assert not isinstance(refused(json_frame(FrameType.HELLO, {"protocol": "2"})), VersionError)


WELCOME = {
    "protocol": 2,
    "unit": "site-b",
    "received_seq": 10,
    "applied_seq": 9,
    "consistent": True,
    "volume_id": "j-1",
    "lineage": LINEAGE,
}


def test_welcome_volume_id_may_be_null_but_not_missing() -> None:
    [welcome] = decode(json_frame(FrameType.WELCOME, with_(WELCOME, volume_id=None)))
    assert welcome == Welcome(2, "site-b", 10, 9, True, None, None, lineage("site-b"))
    assert "missing key 'volume_id'" in str(
        refused(json_frame(FrameType.WELCOME, without(WELCOME, "volume_id")))
    )
    assert "must be a string" in str(
        refused(json_frame(FrameType.WELCOME, with_(WELCOME, volume_id=3)))
    )


@pytest.mark.parametrize(("value", "kind"), [(1, "int"), ("true", "str"), (None, "NoneType")])
def test_welcome_consistent_must_be_a_boolean(value: object, kind: str) -> None:
    err = refused(json_frame(FrameType.WELCOME, with_(WELCOME, consistent=value)))
    assert f"'consistent' must be a boolean, not {kind}" in str(err)


def test_welcome_of_another_version_is_reported_as_a_version_mismatch() -> None:
    err = refused(json_frame(FrameType.WELCOME, {"protocol": 3}))
    assert isinstance(err, VersionError) and err.version == 3


@pytest.mark.parametrize(
    ("frame_type", "obj", "reason"),
    [
        (FrameType.AUTH_SERVER, {"nonce": "00" * 32}, "missing key 'proof'"),
        (FrameType.AUTH_SERVER, {"nonce": "00" * 32, "proof": "00" * 16}, "'proof' must be 64"),
        (FrameType.AUTH_CLIENT, {}, "missing key 'proof'"),
        (FrameType.AUTH_CLIENT, {"proof": 0}, "must be a string"),
        (FrameType.REFUSE, {"code": "busy"}, "missing key 'message'"),
        (FrameType.REFUSE, {"code": 1, "message": ""}, "must be a string"),
    ],
)
def test_other_json_frames_check_their_keys(frame_type: int, obj: object, reason: str) -> None:
    assert_refused(json_frame(frame_type, obj), reason)


def test_refuse_accepts_codes_this_version_does_not_know() -> None:
    assert decode(json_frame(FrameType.REFUSE, {"code": "new-reason", "message": "m"})) == [
        Refuse("new-reason", "m")
    ]


# --- binary payloads ------------------------------------------------------------------------------


def test_sync_start_full_is_zero_or_one() -> None:
    assert decode(frame(FrameType.SYNC_START, struct.pack("<QBQQ", 1, 1, 2, 3))) == [
        SyncStart(1, True, 2, 3)
    ]
    assert_refused(frame(FrameType.SYNC_START, struct.pack("<QBQQ", 1, 2, 2, 3)), "full is 2")


def test_sync_data_may_be_empty() -> None:
    assert decode(frame(FrameType.SYNC_DATA, struct.pack("<QQQ", 1, 2, 3))) == [
        SyncData(1, 2, 3, memoryview(b""))
    ]


# --- RECORDS payloads -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (raw_record(Kind.WRITE, 1, b"a") + raw_record(Kind.WRITE, 3, b"b"), "seq 3 follows seq 1"),
        (
            raw_record(Kind.WRITE, 2, b"a") + raw_record(Kind.WRITE, 2, b"b"),
            "seq 2 follows seq 2, expected 3",
        ),
        (raw_record(Kind.FLUSH, 5) + raw_record(Kind.FLUSH, 4), "seq 4 follows seq 5"),
        (raw_record(Kind.PADDING, 1), "record 0 is padding"),
        (raw_record(Kind.FLUSH, 1) + raw_record(Kind.PADDING, 2), "record 1 is padding"),
        (raw_record(Kind.WRITE, 1, b"abc") + bytes(8), "8 bytes after record 1"),
        (raw_record(Kind.WRITE, 1, b"abc") + bytes(56), "56 bytes after record 1"),
        (raw_record(Kind.WRITE, 1, b"abc") + bytes(64), "record 1 at byte 72: bad magic"),
        (raw_record(Kind.WRITE, 1, b"abc") + b"\xff" * 64, "record 1 at byte 72: bad magic"),
        (raw_record(Kind.WRITE, 1, bytes(16))[:72], "truncated record seq 1"),
        (bytes(64), "record 0 at byte 0: bad magic"),
    ],
)
def test_bad_records_are_refused(payload: bytes, reason: str) -> None:
    assert_refused(frame(FrameType.RECORDS, payload), reason)


def test_non_zero_fill_is_refused() -> None:
    record = bytearray(raw_record(Kind.WRITE, 1, b"abc"))
    assert len(record) == 72
    record[-1] = 1  # the last fill byte: outside the record CRC
    assert_refused(frame(FrameType.RECORDS, bytes(record)), "seq 1 has non-zero fill")


def test_records_of_every_sent_kind_are_accepted() -> None:
    payload = b"".join(
        [
            raw_record(Kind.WRITE, 7, b"12345678", offset=512),
            raw_record(Kind.ZERO, 8, offset=0, length=1 << 20),
            raw_record(Kind.TRIM, 9, offset=4096, length=4096),
            raw_record(Kind.FLUSH, 10),
        ]
    )
    [message] = decode(frame(FrameType.RECORDS, payload))
    assert isinstance(message, Records)
    assert [r.header.kind for r in message.records] == SENT_KINDS
    assert [bytes(r.payload) for r in message.records] == [b"12345678", b"", b"", b""]
    assert message.records[1].header.length == 1 << 20


# --- encoder checks -------------------------------------------------------------------------------


def write(seq: int, data: bytes = b"x") -> tuple[RecordHeader, list[Buffer]]:
    return RecordHeader(Kind.WRITE, seq, 0, 0, len(data), 0, len(data)), [data]


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ([], "at least one record"),
        ([write(1), write(3)], "seq 3 where seq 2 belongs"),
        ([(RecordHeader(Kind.PADDING, 1, 0, 0, 0, 0, 0), [])], "padding"),
        ([(RecordHeader(Kind.WRITE, 1, 0, 0, 4, 0, 4), [b"abc"])], "payload parts hold 3"),
        ([(RecordHeader(Kind.WRITE, 1, 0, 0, MAX_PAYLOAD, 0, MAX_PAYLOAD), [])], "at most"),
    ],
)
def test_encode_records_refuses_what_the_decoder_would(
    records: list[tuple[RecordHeader, list[Buffer]]], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        encode_records(records)


@pytest.mark.parametrize("length", [0, 8, 60, 65, MAX_PAYLOAD + 8])
def test_encode_raw_records_refuses_impossible_lengths(length: int) -> None:
    with pytest.raises(ValueError, match="cannot be a RECORDS payload"):
        encode_raw_records(memoryview(bytes(length)))


A, B = lineage("a"), lineage("b")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (Hello(2, "a", "v", "id", 1, "short", AUTH_NONE, lineage=A), "'nonce' must be 64"),
        (Hello(2, "a", "v", "id", -1, "00" * 32, AUTH_NONE, lineage=A), "outside"),
        (Hello(2, "a", "v", "id", True, "00" * 32, AUTH_NONE, lineage=A), "not bool"),
        (Hello(2, "a", "v", "id", 1, "00" * 32, "maybe", lineage=A), "'psk' or 'none'"),
        (Hello(2, "a", "\udc80", "id", 1, "00" * 32, AUTH_NONE, lineage=A), "lone surrogate"),
        (Welcome(2, "b", 0, 0, 1, None, None, B), "must be a boolean"),  # type: ignore[arg-type]
        (AuthClient("AB" * 32), "'proof' must be 64"),
        (Refuse("internal", "x" * MAX_JSON), f"at most {MAX_JSON}"),
        (Ack(-1, 0, 0), "out of range"),
        (Heartbeat(2**64, 0), "out of range"),
        (SyncStart(0, True, 0, -5), "out of range"),
        (SyncZero(0, 0, 2**64, 0), "out of range"),
    ],
)
def test_encode_refuses_what_the_decoder_would(message: Message, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        encode(message)


def test_sync_data_is_bounded_by_the_frame() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_SYNC_DATA}"):
        encode(SyncData(0, 0, 0, memoryview(bytes(MAX_SYNC_DATA + 1))))


def test_errors_belong_to_the_hierarchy() -> None:
    assert issubclass(VersionError, ProtocolError)
    assert issubclass(ProtocolError, BlockmirrorError)


# --- before authentication: handshake frames only, 64 KiB at most (issue 7, point 14) -------------


def test_a_restricted_codec_refuses_a_huge_frame_from_its_header() -> None:
    codec = LinkCodec()
    codec.restrict(HANDSHAKE_FRAMES, MAX_JSON)
    header = struct.pack("<IBBHII", MAGIC, FrameType.RECORDS, 0, 0, 64 * 1024 * 1024, 0)
    codec.feed(header)
    with pytest.raises(ProtocolError, match="not allowed here"):
        codec.next_event()


def test_a_restricted_codec_refuses_an_over_long_handshake_frame() -> None:
    codec = LinkCodec()
    codec.restrict(HANDSHAKE_FRAMES, 1024)
    codec.feed(struct.pack("<IBBHII", MAGIC, FrameType.HELLO, 0, 0, 4096, 0))
    with pytest.raises(ProtocolError, match=r"allowed 0\.\.1024"):
        codec.next_event()


def test_lifting_the_restriction_applies_from_the_next_frame() -> None:
    hello = Hello(2, "site-a", "db", "j-1", 4096, "ab" * 32, AUTH_NONE, lineage=lineage("site-a"))
    records = Records((Record(RecordHeader(Kind.FLUSH, 1, 0, 0, 0, 0, 0), memoryview(b"")),))
    codec = LinkCodec()
    codec.restrict(HANDSHAKE_FRAMES, MAX_JSON)
    codec.feed(join(encode(hello)) + join(encode(records)))
    assert codec.next_event() == hello
    codec.restrict(None)
    event = codec.next_event()
    assert isinstance(event, Records) and event.first_seq == 1


# --- the record size limit in the handshake (issue 7, point 7) ------------------------------------


A_SITE, B_SITE = lineage("site-a"), lineage("site-b")


def test_max_record_is_optional_in_hello_and_welcome() -> None:
    hello = Hello(
        2, "site-a", "db", "j-1", 4096, "ab" * 32, AUTH_NONE, 4 * 1024 * 1024, None, A_SITE
    )
    welcome = Welcome(2, "site-b", 5, 4, True, "j-1", 524224, B_SITE)
    for message in (hello, welcome):
        out = join(encode(message))
        assert json.loads(out[16:])["max_record"] == message.max_record
        assert decode(out) == [message]
    # Without it (an older peer), nothing is sent and None comes back.
    plain = Welcome(2, "site-b", 5, 4, True, "j-1", lineage=B_SITE)
    out = join(encode(plain))
    assert "max_record" not in json.loads(out[16:])
    assert decode(out) == [plain]


def test_max_record_must_be_an_integer() -> None:
    body = json.dumps(
        {
            "protocol": 2,
            "unit": "b",
            "received_seq": 0,
            "applied_seq": 0,
            "consistent": False,
            "volume_id": None,
            "lineage": LINEAGE,
            "max_record": "big",
        }
    ).encode()
    with pytest.raises(ProtocolError, match="'max_record' must be an integer"):
        decode(frame(FrameType.WELCOME, body))


def test_journal_too_small_is_a_refusal_code() -> None:
    assert str(RefuseCode.JOURNAL_TOO_SMALL) == "journal-too-small"


def test_digest_frames_refuse_what_they_cannot_mean() -> None:
    with pytest.raises(ValueError, match="regions asked for"):
        encode(DigestRequest(1, 0, 65536, 0))
    with pytest.raises(ValueError, match="multiple of 512"):
        encode(DigestRequest(1, 0, 1000, 1))
    with pytest.raises(ValueError, match="out of range"):
        encode(DigestRequest(1, 2**64 - 512, 65536, 4))
    bad = frame(FrameType.DIGESTS, struct.pack("<QQIIQ", 1, 0, 512, 2, 0) + bytes(DIGEST_SIZE))
    assert_refused(bad, "announces 2 digests")


def test_peer_config_bounds() -> None:
    big = PeerConfig("site-a", 1, "x" * (MAX_CONFIG_TEXT + 1))
    with pytest.raises(ValueError, match="over"):
        encode(big)
    with pytest.raises(ValueError, match="unit"):
        encode(PeerConfig("", 1, "[unit]"))
    ok = PeerConfig("site-a", 3, '[unit]\nname = "site-a"\n' + "é" * 100)
    assert decode(join(encode(ok))) == [ok]
