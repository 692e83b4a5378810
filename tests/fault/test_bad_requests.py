"""Bad requests in the transmission phase, on a live unit.

Every refused request must get exactly its error number (simple reply, or an ERROR chunk once
structured replies are negotiated), leave the volume untouched, and leave the connection in step:
the next request on the same connection is answered correctly. A WRITE's payload is consumed even
when the WRITE is refused, or the stream would be misread from there on.
"""

from __future__ import annotations

import struct

import pytest

from tests.fault.conftest import MakeTarget
from tests.fault.rawnbd import (
    CHUNK_BLOCK_STATUS,
    CHUNK_ERROR,
    CHUNK_FLAG_DONE,
    CHUNK_OFFSET_DATA,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    EPERM,
    INFO_BLOCK_SIZE,
    INFO_NAME,
    OPT_GO,
    OPT_SET_META_CONTEXT,
    REP_ACK,
    REP_META_CONTEXT,
    TX_READ_ONLY,
    TX_SEND_FUA,
    TX_SEND_TRIM,
    TX_SEND_WRITE_ZEROES,
    ChunkReply,
    KiB,
    MiB,
    RawNbd,
    SimpleReply,
    info_request,
    meta_context_request,
    option,
    parse_error_chunk,
    request,
)
from tests.fault.target import Target

pytestmark = pytest.mark.fault

MAX_PAYLOAD = 32 * MiB  # the largest request the server takes (advertised in INFO_BLOCK_SIZE)
HARD_MAX_PAYLOAD = 64 * MiB  # a WRITE past this is not worth reading: hang up
U64 = 2**64
BIT15 = 1 << 15
# A payload that cannot be mistaken for the sparse volume's zeros, should it ever land.
JUNK = b"\xde\xad\xbe\xef"


def junk(n: int) -> bytes:
    return (JUNK * (n // 4 + 1))[:n]


def on_disk(target: Target, offset: int, length: int) -> bytes:
    with open(target.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def still_in_step(conn: RawNbd, target: Target, cookie: int = 99) -> None:
    """The connection answers a READ with the right cookie and data: nothing before it was
    misframed (a refused WRITE's payload read as requests would break this)."""
    assert conn.read(0, 512, cookie=cookie) == on_disk(target, 0, 512)


def still_in_step_structured(conn: RawNbd, target: Target, cookie: int = 99) -> None:
    [chunk] = conn.call_structured(CMD_READ, 0, 512, cookie=cookie)
    assert (chunk.type, chunk.flags) == (CHUNK_OFFSET_DATA, CHUNK_FLAG_DONE)
    assert chunk.payload == struct.pack(">Q", 0) + on_disk(target, 0, 512)


def error_of(chunks: list[ChunkReply]) -> int:
    """The error number of a structured reply that must be one final ERROR chunk."""
    [chunk] = chunks
    assert chunk.flags & CHUNK_FLAG_DONE
    if chunk.type == CHUNK_ERROR and len(chunk.payload) > 6:
        error, message = parse_error_chunk(chunk)
        assert message, "an error chunk with a message length must carry the message"
        return error
    return chunk.error


# --- commands and flags ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [8, 9, 0x100, 0xFFFF])
def test_unknown_command_is_einval_and_the_connection_continues(
    target: Target, command: int
) -> None:
    with target.session() as conn:
        assert conn.call(command, 0, 4096, cookie=0xFEEDFACE_CAFEBEEF) == EINVAL
        still_in_step(conn, target)
    with target.session(structured=True) as conn:
        assert error_of(conn.call_structured(command, 0, 4096, cookie=5)) == EINVAL
        still_in_step_structured(conn, target)
    target.assert_healthy()


# Flags the protocol does not define for the command (or at all). FUA is not among them: the spec
# says a server advertising SEND_FUA MUST accept FUA on every command; see the next test.
BAD_FLAGS = [
    (CMD_READ, CMD_FLAG_REQ_ONE),
    (CMD_READ, CMD_FLAG_NO_HOLE),
    (CMD_READ, BIT15),
    (CMD_READ, 0xFFFF),
    (CMD_WRITE, CMD_FLAG_DF),
    (CMD_WRITE, CMD_FLAG_NO_HOLE),
    (CMD_WRITE, BIT15),
    (CMD_WRITE, 0xFFFF),
    (CMD_FLUSH, CMD_FLAG_REQ_ONE),
    (CMD_TRIM, CMD_FLAG_NO_HOLE),
    (CMD_TRIM, BIT15),
    (CMD_WRITE_ZEROES, CMD_FLAG_DF),
    (CMD_WRITE_ZEROES, BIT15),
    (CMD_CACHE, CMD_FLAG_NO_HOLE),
    (CMD_BLOCK_STATUS, CMD_FLAG_DF),
]


@pytest.mark.parametrize(("command", "flags"), BAD_FLAGS)
def test_flags_not_defined_for_the_command_are_einval(
    target: Target, command: int, flags: int
) -> None:
    length = 4096 if command != CMD_FLUSH else 0
    data = junk(length) if command == CMD_WRITE else b""
    with target.session() as conn:
        error = conn.call(command, 0, length, flags=flags, cookie=3, data=data)
        assert error == EINVAL
        still_in_step(
            conn, target
        )  # a refused WRITE's payload was consumed, not parsed as requests
    target.assert_healthy()


@pytest.mark.parametrize("command", [CMD_READ, CMD_FLUSH, CMD_CACHE])
def test_fua_is_accepted_on_commands_that_do_not_write(target: Target, command: int) -> None:
    """doc/proto.md: FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA has been
    negotiated, in which case the server MUST accept all commands with this bit set (even by
    ignoring the bit)"; existing clients are known to set it on other commands."""
    length = 4096 if command != CMD_FLUSH else 0
    with target.session() as conn:
        assert conn.export is not None and conn.export.flags & TX_SEND_FUA
        assert conn.call(command, 0, length, flags=CMD_FLAG_FUA, cookie=4) == 0
        still_in_step(conn, target)
    target.assert_healthy()


def test_df_flag_needs_structured_replies(target: Target) -> None:
    with target.session() as conn:
        assert conn.call(CMD_READ, 0, 4096, flags=CMD_FLAG_DF, cookie=1) == EINVAL
        still_in_step(conn, target)
    with target.session(structured=True) as conn:
        [chunk] = conn.call_structured(CMD_READ, 4096, 4096, flags=CMD_FLAG_DF, cookie=2)
        assert chunk.type == CHUNK_OFFSET_DATA
        assert chunk.payload == struct.pack(">Q", 4096) + bytes(4096)
    target.assert_healthy()


def test_block_status_without_a_negotiated_meta_context_is_einval(target: Target) -> None:
    with target.session() as conn:  # no structured replies at all
        assert conn.call(CMD_BLOCK_STATUS, 0, 4096, cookie=1) == EINVAL
        still_in_step(conn, target)
    with target.session(structured=True) as conn:  # structured, but no context selected
        assert error_of(conn.call_structured(CMD_BLOCK_STATUS, 0, 4096, cookie=2)) == EINVAL
        still_in_step_structured(conn, target)
    with target.connect() as conn:  # a context selected that matches nothing we have
        conn.handshake()
        conn.structured()
        replies = conn.ask(OPT_SET_META_CONTEXT, meta_context_request("vol", "x-nope:thing"))
        assert [r.reply for r in replies] == [REP_ACK]
        conn.go()
        assert error_of(conn.call_structured(CMD_BLOCK_STATUS, 0, 4096, cookie=3)) == EINVAL
    target.assert_healthy()


def test_block_status_with_base_allocation_control(target: Target) -> None:
    """The control for the refusals: with a context, REQ_ONE gives exactly one extent no longer
    than asked, under the id the server chose; past the end is still refused."""
    with target.connect() as conn:
        conn.handshake()
        conn.structured()
        replies = conn.ask(OPT_SET_META_CONTEXT, meta_context_request("vol", "base:allocation"))
        assert [r.reply for r in replies] == [REP_META_CONTEXT, REP_ACK]
        (context_id,) = struct.unpack_from(">I", replies[0].data)
        assert replies[0].data[4:] == b"base:allocation"
        conn.go()
        [chunk] = conn.call_structured(CMD_BLOCK_STATUS, 0, 4096, flags=CMD_FLAG_REQ_ONE, cookie=9)
        assert chunk.type == CHUNK_BLOCK_STATUS and chunk.flags & CHUNK_FLAG_DONE
        got_id, length, _state = struct.unpack(">III", chunk.payload)
        assert got_id == context_id and 0 < length <= 4096
        end = conn.call_structured(CMD_BLOCK_STATUS, target.size - 512, 1024, cookie=10)
        assert error_of(end) == EINVAL
    target.assert_healthy()


def test_requests_after_disc_are_ignored_and_the_connection_closes(target: Target) -> None:
    """DISC then more requests in the same segment: none may be answered or obeyed."""
    with target.session() as conn:
        conn.send(
            request(CMD_DISC)
            + request(CMD_READ, 0, 4096, cookie=1)
            + request(CMD_WRITE, 0, 4096, cookie=2, data=junk(4096))
            + request(CMD_FLUSH, cookie=3)
        )
        assert conn.expect_closed() == b""
    target.assert_healthy()


def test_disc_still_answers_requests_already_in_flight(target: Target) -> None:
    """WRITE_ZEROES runs in a worker thread; a DISC right behind it must not lose its reply."""
    with target.session() as conn:
        conn.send(request(CMD_WRITE_ZEROES, 0, 1 * MiB, cookie=8) + request(CMD_DISC))
        assert conn.read_simple_reply() == SimpleReply(0, 8)
        assert conn.expect_closed() == b""
    target.assert_healthy()


def test_option_during_transmission_drops_the_connection(target: Target) -> None:
    with target.session() as conn:
        # At least 28 bytes, a request header's worth, so the server has a magic to reject.
        conn.send(option(OPT_GO, info_request("vol", INFO_NAME, INFO_BLOCK_SIZE)))
        assert conn.expect_closed() == b""
    target.assert_healthy()


# --- ranges ---------------------------------------------------------------------------------------

SIZE = 8 * MiB  # the module target's volume


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (SIZE, 1),
        (SIZE - 4096, 8192),
        (SIZE + 4096, 4096),
        (U64 - 1, 1),
        (U64 - 512, 1024),  # wraps to 512 in 64-bit arithmetic
        (U64 - 4096, 0xFFFF_FFFF),
    ],
)
def test_read_past_the_end_is_einval(target: Target, offset: int, length: int) -> None:
    with target.session() as conn:
        assert conn.call(CMD_READ, offset, length, cookie=1) == EINVAL
        still_in_step(conn, target)
        assert len(conn.read(SIZE - 4096, 4096, cookie=2)) == 4096  # the last block is fine
    target.assert_healthy()


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (SIZE - 512, 1024),  # straddles the end: not even the part inside may be written
        (SIZE, 4096),
        (U64 - 4096, 8192),  # wraps to 4096 in 64-bit arithmetic
        (U64 - 1, 1),
    ],
)
def test_write_past_the_end_is_enospc_and_writes_nothing(
    target: Target, offset: int, length: int
) -> None:
    with target.session() as conn:
        assert conn.call(CMD_WRITE, offset, length, cookie=1, data=junk(length)) == ENOSPC
        assert conn.call(CMD_FLUSH, cookie=2) == 0
        still_in_step(conn, target)
    target.assert_healthy()


@pytest.mark.parametrize("command", [CMD_TRIM, CMD_WRITE_ZEROES])
@pytest.mark.parametrize(("offset", "length"), [(SIZE - 4096, 8192), (SIZE, 1), (U64 - 4096, 8192)])
def test_trim_and_write_zeroes_past_the_end_are_enospc(
    target: Target, command: int, offset: int, length: int
) -> None:
    with target.session() as conn:
        # Data at the end, so that a zeroing that ignored the bound would show in the hash.
        assert conn.call(CMD_WRITE, SIZE - 8192, 8192, cookie=1, data=junk(8192)) == 0
        assert conn.call(CMD_FLUSH, cookie=2) == 0
        target.rebase()
        assert conn.call(command, offset, length, cookie=3) == ENOSPC
        assert conn.call(command, offset, length, flags=CMD_FLAG_FUA, cookie=4) == ENOSPC
        assert conn.call(CMD_FLUSH, cookie=5) == 0
        still_in_step(conn, target)
    target.assert_healthy()


@pytest.mark.parametrize("command", [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES])
def test_zero_length_request_is_einval_without_disconnect(target: Target, command: int) -> None:
    with target.session() as conn:
        assert conn.call(command, 4096, 0, cookie=1) == EINVAL
        still_in_step(conn, target)
    target.assert_healthy()


# --- sizes (a 64 MiB volume, so that 32 MiB requests are in range) -------------------------------


def test_read_over_the_maximum_is_einval_or_eoverflow(make_target: MakeTarget) -> None:
    target = make_target(size=64 * MiB)
    with target.session() as conn:
        assert conn.call(CMD_READ, 0, MAX_PAYLOAD + 1, cookie=1) == EINVAL
        assert conn.call(CMD_READ, 0, 0xFFFF_FFFF, cookie=2) == EINVAL
        assert len(conn.read(0, MAX_PAYLOAD, cookie=3)) == MAX_PAYLOAD  # the maximum itself
    with target.session(structured=True) as conn:
        error = error_of(conn.call_structured(CMD_READ, 0, MAX_PAYLOAD + 1, cookie=4))
        assert error == EOVERFLOW
        error = error_of(conn.call_structured(CMD_READ, 0, MAX_PAYLOAD + 1, flags=CMD_FLAG_DF))
        assert error == EOVERFLOW
        still_in_step_structured(conn, target)
    target.assert_healthy()


def test_write_over_the_maximum_is_discarded_with_einval(make_target: MakeTarget) -> None:
    """Up to 64 MiB the payload is read and thrown away so the stream stays in step."""
    target = make_target(size=64 * MiB)
    with target.session() as conn:
        length = MAX_PAYLOAD + 1
        conn.send_request(CMD_WRITE, 0, length, cookie=1)
        # The refusal may come before the payload is sent: read it first, then send the payload
        # in pieces, as a client streaming from disk would.
        assert conn.read_simple_reply() == SimpleReply(EINVAL, 1)
        payload = junk(length)
        for start in range(0, length, 4 * MiB):
            conn.send(payload[start : start + 4 * MiB])
        still_in_step(conn, target, cookie=2)
        assert conn.call(CMD_FLUSH, cookie=3) == 0
    target.assert_healthy()


@pytest.mark.parametrize("length", [HARD_MAX_PAYLOAD + 1, 0xFFFF_FFFF])
def test_write_announcing_past_the_hard_bound_closes(make_target: MakeTarget, length: int) -> None:
    target = make_target(size=64 * MiB)
    with target.session() as conn:
        conn.send(request(CMD_WRITE, 0, length, cookie=1) + junk(64 * KiB))
        assert conn.expect_closed() == b""
    target.assert_healthy()


# --- a read-only volume ---------------------------------------------------------------------------


def test_read_only_volume_refuses_every_change_with_eperm(make_target: MakeTarget) -> None:
    target = make_target(read_only=True)
    with target.connect() as conn:
        conn.handshake()
        export = conn.go()
        assert export.flags & TX_READ_ONLY
        assert not export.flags & (TX_SEND_TRIM | TX_SEND_WRITE_ZEROES)
        changes = [
            (CMD_WRITE, 0),
            (CMD_WRITE, CMD_FLAG_FUA),
            (CMD_TRIM, 0),
            (CMD_WRITE_ZEROES, 0),
            (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE),
            (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO),
        ]
        for cookie, (command, flags) in enumerate(changes, start=1):
            data = junk(4096) if command == CMD_WRITE else b""
            error = conn.call(command, 4096, 4096, flags=flags, cookie=cookie, data=data)
            assert error == EPERM, (command, flags)
        assert conn.call(CMD_FLUSH, cookie=100) == 0
        with open(target.image, "rb") as f:
            expected = f.read(4096)
        assert conn.read(0, 4096, cookie=101) == expected
    with target.session(structured=True) as conn:
        chunks = conn.call_structured(CMD_WRITE, 0, 512, cookie=7, data=junk(512))
        assert error_of(chunks) == EPERM
    target.assert_healthy()
