"""Properties of the sans-I/O NBD codec and of option negotiation (no sockets, no unit).

- Framing does not depend on how the bytes arrive: a whole stream, the same stream byte by byte,
  and in random pieces decode to the same events; a trailing partial message is no event and no
  error.
- The reply encoders produce what a small independent parser, written here from the spec, reads
  back.
- Garbage never raises anything but ProtocolError, and negotiation never raises at all: every
  option gets an outcome whose reply bytes are well-formed option replies.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blockmirror.errors import ProtocolError
from blockmirror.frontend import nbd_protocol as p
from blockmirror.frontend.nbd_negotiation import ExportInfo, Negotiation, Outcome
from tests.fault import rawnbd as w  # the wire constants, written out independently

pytestmark = pytest.mark.fault

U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)

# --- generated valid streams ----------------------------------------------------------------------

# A normalised event: memoryview chunking differs with how bytes arrive, so WRITE data is joined.
Norm = tuple[object, ...]


def normalise(event: p.Event) -> Norm:
    if isinstance(event, p.Request):
        data = b"".join(bytes(v) for v in event.data)
        return (
            "request",
            event.flags,
            event.command,
            event.cookie,
            event.offset,
            event.length,
            data,
        )
    if isinstance(event, p.OptionRequest):
        return ("option", event.option, event.data)
    if isinstance(event, p.ClientFlags):
        return ("flags", event.flags)
    if isinstance(event, p.OversizedOption):
        return ("oversized-option", event.option, event.length)
    return ("oversized-write", event.flags, event.cookie, event.offset, event.length)


@dataclass(frozen=True)
class Item:
    """One message of a stream: its bytes and the event it must decode to."""

    wire: bytes
    event: Norm


@st.composite
def option_items(draw: st.DrawFn) -> Item:
    opt = draw(U32)
    data = draw(st.binary(max_size=300))
    return Item(w.option(opt, data), ("option", opt, data))


@st.composite
def request_items(draw: st.DrawFn) -> Item:
    command = draw(st.one_of(st.sampled_from(list(p.Cmd)), U16))
    flags, cookie, offset = draw(U16), draw(U64), draw(U64)
    if command == w.CMD_WRITE:
        data = draw(st.binary(max_size=600))
        length = len(data)
    else:
        data, length = b"", draw(U32)
    wire = w.request(command, offset, length, flags=flags, cookie=cookie, data=data)
    return Item(wire, ("request", flags, command, cookie, offset, length, data))


@dataclass(frozen=True)
class Stream:
    flags: int
    options: list[Item]
    requests: list[Item]

    @property
    def wire(self) -> bytes:
        return struct.pack(">I", self.flags) + b"".join(
            i.wire for i in self.options + self.requests
        )

    @property
    def events(self) -> list[Norm]:
        return [("flags", self.flags)] + [i.event for i in self.options + self.requests]


streams = st.builds(
    Stream,
    st.sampled_from([0, w.C_FIXED_NEWSTYLE, w.C_NO_ZEROES, w.C_FIXED_NEWSTYLE | w.C_NO_ZEROES]),
    st.lists(option_items(), max_size=6),
    st.lists(request_items(), max_size=12),
)


def decode(pieces: list[bytes], n_options: int) -> tuple[list[Norm], p.NbdServerCodec]:
    """Feed ``pieces`` one by one, taking events as a server would: after the client flags and
    ``n_options`` options it enters transmission (as a successful GO does), before decoding on."""
    codec = p.NbdServerCodec()
    events: list[Norm] = []
    for piece in pieces:
        codec.feed(piece)
        while (event := codec.next_event()) is not None:
            events.append(normalise(event))
            if len(events) == 1 + n_options:
                codec.start_transmission()
    return events, codec


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=150, deadline=None)
@given(streams, st.lists(st.integers(0, 10**6), max_size=30))
def test_events_do_not_depend_on_how_the_bytes_arrive(stream: Stream, cuts: list[int]) -> None:
    wire, n = stream.wire, len(stream.options)
    whole, _ = decode([wire], n)
    assert whole == stream.events
    bytewise, _ = decode([wire[i : i + 1] for i in range(len(wire))], n)
    assert bytewise == whole
    pieces, _ = decode(split(wire, cuts), n)
    assert pieces == whole


@settings(max_examples=150, deadline=None)
@given(streams, st.one_of(option_items(), request_items()), st.data())
def test_a_trailing_partial_message_is_no_event_and_no_error(
    stream: Stream, extra: Item, data: st.DataObject
) -> None:
    """A message cut anywhere short of its end yields None (more bytes needed), however the
    bytes came in; a WRITE cut inside its payload reports how much payload is still awaited."""
    in_transmission = extra.event[0] == "request"
    if not in_transmission:
        stream = Stream(stream.flags, stream.options, [])
    cut = data.draw(st.integers(1, len(extra.wire) - 1), label="cut")
    wire = stream.wire + extra.wire[:cut]
    n_options = len(stream.options) if in_transmission else len(stream.options) + 1
    for pieces in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        events, codec = decode(pieces, n_options)
        assert events == stream.events
        assert codec.next_event() is None
        assert codec.next_event() is None  # asking again changes nothing
        if in_transmission and extra.event[2] == w.CMD_WRITE and cut >= w.REQUEST_SIZE:
            length = extra.event[5]
            assert isinstance(length, int)
            assert codec.pending_write_bytes() == length - (cut - w.REQUEST_SIZE)


@settings(max_examples=20, deadline=None)
@given(
    st.integers(p.MAX_OPTION_DATA + 1, p.MAX_OPTION_DATA + 5000),
    st.integers(p.MAX_PAYLOAD + 1, p.MAX_PAYLOAD + 5000),
    U16,
    U64,
    st.lists(st.integers(0, 10**9), max_size=12),
)
def test_oversized_items_are_skipped_whole_however_they_arrive(
    option_length: int, write_length: int, flags: int, cookie: int, cuts: list[int]
) -> None:
    """An oversized option or WRITE is reported once, its data skipped, and the next message is
    read from exactly the right byte, whether the skipped data came with the header or later."""
    after_option = w.option(w.OPT_GO, w.info_request("vol"))
    after_write = w.request(w.CMD_READ, 0, 512, cookie=7)
    wire = (
        struct.pack(">I", 3)
        + w.option(w.OPT_INFO, b"\x5a" * option_length)
        + after_option
        + w.request(w.CMD_WRITE, 4096, write_length, flags=flags, cookie=cookie)
        + b"\x5a" * write_length
        + after_write
    )
    expected: list[Norm] = [
        ("flags", 3),
        ("oversized-option", w.OPT_INFO, option_length),
        ("option", w.OPT_GO, w.info_request("vol")),
        ("oversized-write", flags, cookie, 4096, write_length),
        ("request", 0, w.CMD_READ, 7, 0, 512, b""),
    ]
    for pieces in ([wire], split(wire, cuts)):
        events, codec = decode(pieces, 2)
        assert events == expected
        assert codec.buffered == 0


@pytest.mark.parametrize(
    ("phase", "header", "refused"),
    [
        ("options", w.option(1, length=p.HARD_MAX_OPTION), False),
        ("options", w.option(1, length=p.HARD_MAX_OPTION + 1), True),
        ("transmission", w.request(w.CMD_WRITE, 0, p.HARD_MAX_PAYLOAD), False),
        ("transmission", w.request(w.CMD_WRITE, 0, p.HARD_MAX_PAYLOAD + 1), True),
        ("transmission", w.request(w.CMD_WRITE, 0, 2**32 - 1), True),
        # Only a WRITE carries a payload: a huge READ length is the server's to refuse later.
        ("transmission", w.request(w.CMD_READ, 0, 2**32 - 1), False),
    ],
)
def test_hard_length_bounds_are_exact(phase: str, header: bytes, refused: bool) -> None:
    codec = p.NbdServerCodec()
    codec.feed(struct.pack(">I", 1))
    assert codec.next_event() == p.ClientFlags(1)
    if phase == "transmission":
        codec.start_transmission()
    codec.feed(header)
    if refused:
        with pytest.raises(ProtocolError):
            codec.next_event()
    else:
        assert codec.next_event() is not None


# --- garbage --------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["flags", "options", "transmission"]),
    st.binary(max_size=2000),
    st.lists(st.integers(0, 10**6), max_size=20),
)
def test_garbage_yields_events_or_protocol_error_only(
    start: str, garbage: bytes, cuts: list[int]
) -> None:
    codec = p.NbdServerCodec()
    if start != "flags":
        codec.feed(struct.pack(">I", 3))
        assert codec.next_event() == p.ClientFlags(3)
    if start == "transmission":
        codec.start_transmission()
    try:
        for piece in split(garbage, cuts):
            codec.feed(piece)
            while codec.next_event() is not None:
                pass
    except ProtocolError:
        return


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_option_payload_decoders_raise_only_protocol_error(data: bytes) -> None:
    for decoder in (p.decode_info_request, p.decode_meta_context_request, p.decode_export_name):
        with contextlib.suppress(ProtocolError):
            decoder(data)


# --- reply encoders against an independent parser -------------------------------------------------


class Reader:
    """Consumes big-endian fields from a byte string, failing on any shortfall or leftover."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "short"
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def end(self) -> None:
        assert self.pos == len(self.data), "trailing bytes"


texts = st.text(max_size=64)


def test_greeting() -> None:
    r = Reader(p.encode_greeting())
    assert (r.u64(), r.u64()) == (w.NBDMAGIC, w.IHAVEOPT)
    assert r.u16() == w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES
    r.end()


@given(U32, U32, st.binary(max_size=200))
def test_option_reply_round_trip(option: int, reply: int, data: bytes) -> None:
    r = Reader(p.encode_option_reply(option, reply, data))
    assert (r.u64(), r.u32(), r.u32(), r.u32()) == (w.OPTION_REPLY_MAGIC, option, reply, len(data))
    assert r.rest() == data


@given(U64, U16, st.tuples(U32, U32, U32))
def test_info_export_and_block_size_round_trip(
    size: int, flags: int, sizes: tuple[int, int, int]
) -> None:
    r = Reader(p.encode_info_export(size, flags))
    assert (r.u16(), r.u64(), r.u16()) == (w.INFO_EXPORT, size, flags)
    r.end()
    r = Reader(p.encode_info_block_size(*sizes))
    assert (r.u16(), r.u32(), r.u32(), r.u32()) == (w.INFO_BLOCK_SIZE, *sizes)
    r.end()


@given(texts, texts)
def test_info_name_and_description_round_trip(name: str, description: str) -> None:
    r = Reader(p.encode_info_name(name))
    assert r.u16() == w.INFO_NAME and r.rest().decode() == name
    r = Reader(p.encode_info_description(description))
    assert r.u16() == w.INFO_DESCRIPTION and r.rest().decode() == description


@given(texts, texts, U32)
def test_server_entry_and_meta_context_round_trip(name: str, description: str, ctx: int) -> None:
    r = Reader(p.encode_server_entry(name, description))
    n = r.u32()
    assert r.take(n).decode() == name and r.rest().decode() == description
    r = Reader(p.encode_meta_context(ctx, name))
    assert r.u32() == ctx and r.rest().decode() == name


@given(U64, U16, st.booleans())
def test_export_name_reply_round_trip(size: int, flags: int, no_zeroes: bool) -> None:
    r = Reader(p.encode_export_name_reply(size, flags, no_zeroes))
    assert (r.u64(), r.u16()) == (size, flags)
    assert r.rest() == (b"" if no_zeroes else bytes(124))


@given(U64, U32, U64, st.integers(1, 2**32 - 9))
def test_simple_and_read_reply_headers_round_trip(
    cookie: int, error: int, offset: int, length: int
) -> None:
    buf = bytearray(b"\xa5" * (w.SIMPLE_REPLY_SIZE + 64))
    p.pack_simple_reply_into(buf, cookie, error)
    assert buf[w.SIMPLE_REPLY_SIZE :] == b"\xa5" * 64  # the data that follows is left alone
    for raw in (p.encode_simple_reply(cookie, error), bytes(buf[: w.SIMPLE_REPLY_SIZE])):
        r = Reader(raw)
        assert (r.u32(), r.u32(), r.u64()) == (w.SIMPLE_REPLY_MAGIC, error, cookie)
        r.end()

    # A READ's structured reply header: one final OFFSET_DATA chunk covering offset + data.
    buf = bytearray(b"\xa5" * (w.CHUNK_HEADER_SIZE + 8 + 64))
    p.pack_read_chunk_into(buf, cookie, offset, 64)
    assert buf[w.CHUNK_HEADER_SIZE + 8 :] == b"\xa5" * 64
    for raw, data_length in [
        (p.encode_read_chunk_header(cookie, offset, length), length),
        (bytes(buf[: w.CHUNK_HEADER_SIZE + 8]), 64),
    ]:
        r = Reader(raw)
        assert (r.u32(), r.u16(), r.u16(), r.u64(), r.u32(), r.u64()) == (
            w.STRUCTURED_REPLY_MAGIC,
            w.CHUNK_FLAG_DONE,
            w.CHUNK_OFFSET_DATA,
            cookie,
            data_length + 8,
            offset,
        )
        r.end()


@given(U64, U16, st.binary(max_size=200), st.booleans())
def test_chunk_round_trip(cookie: int, kind: int, payload: bytes, done: bool) -> None:
    r = Reader(p.encode_chunk(cookie, kind, payload, done=done))
    assert (r.u32(), r.u16(), r.u16(), r.u64(), r.u32()) == (
        w.STRUCTURED_REPLY_MAGIC,
        w.CHUNK_FLAG_DONE if done else 0,
        kind,
        cookie,
        len(payload),
    )
    assert r.rest() == payload


@given(U64, st.integers(1, 2**32 - 1), st.text(max_size=3000))
@example(cookie=1, error=5, message="\u20ac" * 2000)  # 6000 bytes; 4096 falls inside a character
@example(cookie=1, error=5, message="x" * 5000)
def test_error_chunk_round_trip(cookie: int, error: int, message: str) -> None:
    """The message is a protocol string: at most 4096 bytes of valid UTF-8, cut if it must be."""
    r = Reader(p.encode_error_chunk(cookie, error, message))
    assert (r.u32(), r.u16(), r.u16(), r.u64()) == (
        w.STRUCTURED_REPLY_MAGIC,
        w.CHUNK_FLAG_DONE,
        w.CHUNK_ERROR,
        cookie,
    )
    length = r.u32()
    assert r.u32() == error
    msglen = r.u16()
    assert length == 6 + msglen and msglen <= 4096
    sent = r.rest().decode()  # must be valid UTF-8
    assert message.startswith(sent)
    if len(message.encode()) <= 4096:
        assert sent == message


@given(U64, U32, st.lists(st.tuples(U32, U32), min_size=1, max_size=50))
def test_block_status_chunk_round_trip(
    cookie: int, ctx: int, extents: list[tuple[int, int]]
) -> None:
    r = Reader(p.encode_block_status_chunk(cookie, ctx, extents))
    assert (r.u32(), r.u16(), r.u16(), r.u64()) == (
        w.STRUCTURED_REPLY_MAGIC,
        w.CHUNK_FLAG_DONE,
        w.CHUNK_BLOCK_STATUS,
        cookie,
    )
    assert r.u32() == 4 + 8 * len(extents)
    assert r.u32() == ctx
    assert [(r.u32(), r.u32()) for _ in extents] == extents
    r.end()


# --- negotiation never raises, and always answers in form -----------------------------------------

EXPORT = ExportInfo("vol", 8 << 20, "a test volume")
KNOWN_REPLIES = {w.REP_ACK, w.REP_SERVER, w.REP_INFO, w.REP_META_CONTEXT}
ERROR_REPLIES = {w.REP_ERR + n for n in range(1, 10)}


def names() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["vol", "", "nope", "v" * 4096]), st.text(max_size=40))


@st.composite
def option_requests(draw: st.DrawFn) -> p.OptionRequest | p.OversizedOption:
    opt = draw(st.one_of(st.sampled_from(list(p.Opt)), U32))
    kind = draw(st.sampled_from(["random", "info", "meta", "name", "empty", "oversized"]))
    if kind == "oversized":
        return p.OversizedOption(opt, draw(st.integers(p.MAX_OPTION_DATA + 1, p.HARD_MAX_OPTION)))
    if kind == "info":
        infos = draw(st.lists(st.one_of(st.sampled_from(list(p.Info)), U16), max_size=5))
        data = w.info_request(draw(names()), *infos)
    elif kind == "meta":
        queries = draw(st.lists(st.sampled_from(["base:allocation", "base:", "x-a:b", ""])))
        data = w.meta_context_request(draw(names()), *queries)
    elif kind == "name":
        data = draw(names()).encode()
    elif kind == "empty":
        data = b""
    else:
        data = draw(st.binary(max_size=200))
    if draw(st.booleans()):  # sometimes damage it
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=8))
    return p.OptionRequest(opt, data)


def check_outcome(
    event: p.OptionRequest | p.OversizedOption, outcome: Outcome, negotiation: Negotiation
) -> int | None:
    """The reply bytes parse as this option's replies, ending as the spec requires; returns the
    final reply type (None for EXPORT_NAME, which has no option-reply framing)."""
    assert isinstance(outcome, Outcome)
    option = event.option
    if isinstance(event, p.OversizedOption) and option != w.OPT_EXPORT_NAME:
        # Whatever the option, its data was never read: refused as too big, and that is all.
        assert not outcome.close and outcome.export is None
        [(reply, _)] = parse_option_replies(option, outcome.reply)
        assert reply == w.REP_ERR_TOO_BIG
        return reply
    if option == w.OPT_EXPORT_NAME:
        # Either the export's details, or a silent close: there is no error reply to send.
        if outcome.export is None:
            assert outcome.close and outcome.reply == b""
        else:
            r = Reader(outcome.reply)
            assert r.u64() == EXPORT.size and r.u16() & w.TX_HAS_FLAGS
            assert r.rest() in (b"", bytes(124))
        return None
    replies = parse_option_replies(option, outcome.reply)
    assert replies, "every option but EXPORT_NAME gets at least one reply"
    *leading, (final, final_data) = replies
    assert final == w.REP_ACK or final in ERROR_REPLIES, hex(final)
    for reply, data in leading:
        assert reply in KNOWN_REPLIES - {w.REP_ACK}, hex(reply)
        check_reply_data(reply, data)
    if final in ERROR_REPLIES:
        # An error message is a protocol string: UTF-8, no NUL, at most 4096 bytes.
        assert len(final_data) <= 4096
        assert "\0" not in final_data.decode()
        assert outcome.export is None
    else:
        assert final_data == b""
    if outcome.export is not None:
        assert option == w.OPT_GO and final == w.REP_ACK
        infos = [d for rep, d in leading if rep == w.REP_INFO]
        assert any(d[:2] == b"\0\0" for d in infos), "GO must send INFO_EXPORT"
    if option == w.OPT_ABORT:
        assert outcome.close and final == w.REP_ACK
    else:
        assert not outcome.close, f"option {option} closed the connection"
    if option in (w.OPT_SET_META_CONTEXT, w.OPT_LIST_META_CONTEXT) and not negotiation.structured:
        assert final == w.REP_ERR_INVALID
    return final


def parse_option_replies(option: int, raw: bytes) -> list[tuple[int, bytes]]:
    """(reply type, data) of each option reply in ``raw``, which must hold nothing else."""
    r = Reader(raw)
    replies = []
    while r.pos < len(r.data):
        assert (r.u64(), r.u32()) == (w.OPTION_REPLY_MAGIC, option)
        reply = r.u32()
        replies.append((reply, r.take(r.u32())))
    return replies


def check_reply_data(reply: int, data: bytes) -> None:
    r = Reader(data)
    if reply == w.REP_INFO:
        kind = r.u16()
        if kind == w.INFO_EXPORT:
            assert r.u64() == EXPORT.size and r.u16() & w.TX_HAS_FLAGS
            r.end()
        elif kind == w.INFO_BLOCK_SIZE:
            minimum, preferred, maximum = r.u32(), r.u32(), r.u32()
            assert 1 <= minimum <= preferred <= maximum
            r.end()
        else:
            r.rest().decode()
    elif reply == w.REP_SERVER:
        n = r.u32()
        assert r.take(n).decode() == "vol"
        r.rest().decode()
    elif reply == w.REP_META_CONTEXT:
        r.u32()
        assert r.rest().decode() == "base:allocation"


@settings(max_examples=400, deadline=None)
@given(st.lists(option_requests(), min_size=1, max_size=8))
def test_negotiation_answers_every_option_in_form(
    events: list[p.OptionRequest | p.OversizedOption],
) -> None:
    negotiation = Negotiation(lambda name: EXPORT if name == "vol" else None, lambda: [EXPORT])
    for event in events:
        was_structured = negotiation.structured
        outcome = negotiation.handle(event)
        final = check_outcome(event, outcome, negotiation)
        if event.option == w.OPT_STRUCTURED_REPLY:
            # Only an acknowledged STRUCTURED_REPLY turns structured replies on.
            assert negotiation.structured == (was_structured or final == w.REP_ACK)
        else:
            assert negotiation.structured == was_structured
        if outcome.close or outcome.export is not None:
            break  # the connection closes or enters transmission: no more options
