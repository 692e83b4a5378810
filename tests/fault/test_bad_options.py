"""Bad input during the handshake and option haggling, on a live unit.

Each case checks the exact answer the protocol calls for (an option error type, or a hang-up with
nothing sent), then that the same connection still works when the protocol says it must, and ends
with :meth:`Target.assert_healthy`: nothing was written and a fresh client is served.
"""

from __future__ import annotations

import struct

import pytest

from tests.fault.rawnbd import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    CMD_BLOCK_STATUS,
    CMD_READ,
    EINVAL,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_NAME,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_EXTENDED_HEADERS,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_SERVER,
    TX_HAS_FLAGS,
    KiB,
    MiB,
    OptionReply,
    RawNbd,
    info_request,
    meta_context_request,
    option,
    request,
    string,
)
from tests.fault.target import Target

pytestmark = pytest.mark.fault

MAX_OPTION_DATA = 64 * KiB  # the server's sane bound, above which it answers ERR_TOO_BIG
HARD_MAX_OPTION = 32 * MiB  # past this the length itself is absurd: hang up
MAX_NAME = 4096  # the protocol's limit on any string


def kinds(replies: list[OptionReply]) -> list[int]:
    return [r.reply for r in replies]


def assert_error_message(reply: OptionReply) -> None:
    """An error reply's data is a human-readable string: UTF-8, no NUL, at most 4096 bytes."""
    assert reply.is_error
    assert len(reply.data) <= MAX_NAME, len(reply.data)
    assert "\0" not in reply.data.decode()


def go_and_read(conn: RawNbd, target: Target) -> None:
    """The connection still completes GO and serves a READ: it survived what came before."""
    export = conn.go("vol")
    assert export.size == target.size
    assert conn.read(0, 4096, cookie=7) == bytes(4096)


# --- option lengths -------------------------------------------------------------------------------


def test_option_data_at_the_bound_is_read_and_over_it_is_too_big(target: Target) -> None:
    with target.connect() as conn:
        conn.handshake()
        # Exactly at the bound the data is read as usual (this option is simply unknown).
        [rep] = conn.ask(42, b"\xaa" * MAX_OPTION_DATA)
        assert rep.reply == REP_ERR_UNSUP
        # One byte over: refused as too big, its data skipped, the connection goes on.
        [rep] = conn.ask(OPT_GO, info_request("vol").ljust(MAX_OPTION_DATA + 1, b"\0"))
        assert (rep.option, rep.reply) == (OPT_GO, REP_ERR_TOO_BIG)
        assert_error_message(rep)
        go_and_read(conn, target)
    target.assert_healthy()


def test_too_big_option_is_refused_before_its_data_and_the_data_is_never_parsed(
    target: Target,
) -> None:
    """The refusal comes as soon as the header is in, and the skipped data is not interpreted,
    even when it is made of valid GO options (any one of them obeyed would start transmission
    and the final GO below would then be a bad request)."""
    skipped = option(OPT_GO, info_request("vol")) * (1 * MiB // 24)
    with target.connect() as conn:
        conn.handshake()
        conn.send(option(OPT_INFO, length=len(skipped)))
        assert kinds(conn.option_replies(OPT_INFO)) == [REP_ERR_TOO_BIG]
        conn.send(skipped)
        go_and_read(conn, target)
    target.assert_healthy()


def test_option_at_the_hard_bound_is_still_answered_too_big(target: Target) -> None:
    with target.connect() as conn:
        conn.handshake()
        conn.send(option(OPT_GO, length=HARD_MAX_OPTION))
        assert kinds(conn.option_replies(OPT_GO)) == [REP_ERR_TOO_BIG]
        conn.abort()  # sending 32 MiB to skip is not the point of this test
    target.assert_healthy()


@pytest.mark.parametrize("length", [HARD_MAX_OPTION + 1, 0xFFFFFFFF])
def test_absurd_option_length_closes_the_connection(target: Target, length: int) -> None:
    with target.connect() as conn:
        conn.handshake()
        conn.send(option(OPT_GO, length=length))
        assert conn.expect_closed() == b""
    target.assert_healthy()


# --- export names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [OPT_GO, OPT_INFO])
def test_export_name_over_4096_bytes_is_invalid_in_go_and_info(target: Target, opt: int) -> None:
    with target.connect() as conn:
        conn.handshake()
        [rep] = conn.ask(opt, info_request("v" * (MAX_NAME + 1)))
        assert rep.reply == REP_ERR_INVALID
        assert_error_message(rep)
        # A name of exactly 4096 bytes is legal, just not ours.
        [rep] = conn.ask(opt, info_request("v" * MAX_NAME, INFO_NAME))
        assert rep.reply == REP_ERR_UNKNOWN
        assert_error_message(rep)
        go_and_read(conn, target)
    target.assert_healthy()


@pytest.mark.parametrize("opt", [OPT_GO, OPT_INFO])
def test_unknown_export_in_go_and_info_is_err_unknown(target: Target, opt: int) -> None:
    with target.connect() as conn:
        conn.handshake()
        for name in ["nope", "VOL", "vol ", "vol\n", "\u00e9t\u00e9"]:
            [rep] = conn.ask(opt, info_request(name, INFO_BLOCK_SIZE))
            assert rep.reply == REP_ERR_UNKNOWN, name
            assert_error_message(rep)
        go_and_read(conn, target)
    target.assert_healthy()


@pytest.mark.parametrize(
    "data",
    [
        b"nope",  # unknown
        b"v" * (MAX_NAME + 1),  # over the string limit
        b"v" * (MAX_OPTION_DATA + 1),  # over the option bound: there is no TOO_BIG for it
        b"vol\0",  # NUL is not allowed in a string
        b"\xff\xfevol",  # not UTF-8
    ],
    ids=["unknown", "4097-bytes", "over-option-bound", "nul", "not-utf8"],
)
def test_refused_export_name_option_closes_without_a_reply(target: Target, data: bytes) -> None:
    """EXPORT_NAME has no error reply: the only correct refusal is to hang up, sending nothing
    (an option reply here would be read by the client as export size and flags)."""
    with target.connect() as conn:
        conn.handshake()
        conn.send(option(OPT_EXPORT_NAME, data))
        assert conn.expect_closed() == b""
    target.assert_healthy()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_accepted_reply_is_size_flags_and_padding(
    target: Target, no_zeroes: bool
) -> None:
    """The control for the refusals above: an accepted EXPORT_NAME answers in its own format."""
    with target.connect() as conn:
        conn.handshake(C_FIXED_NEWSTYLE | (C_NO_ZEROES if no_zeroes else 0))
        conn.send(option(OPT_EXPORT_NAME, b"vol"))
        size, flags = struct.unpack(">QH", conn.recv_exact(10))
        assert size == target.size and flags & TX_HAS_FLAGS
        if not no_zeroes:
            assert conn.recv_exact(124) == bytes(124)
        assert conn.read(4096, 512) == bytes(512)
    target.assert_healthy()


# --- handshake framing ----------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0x4, 0x8, 0x8000_0000, 0xFFFF_FFFF, C_FIXED_NEWSTYLE | 0x4])
def test_unknown_client_flags_drop_the_connection(target: Target, flags: int) -> None:
    with target.connect() as conn:
        conn.read_greeting()
        conn.send(struct.pack(">I", flags))
        assert conn.expect_closed() == b""
    target.assert_healthy()


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">QII", 0x49484156454F5055, OPT_GO, 0),  # IHAVEOPT + 1
        struct.pack(">QII", 0x4E42444D41474943, OPT_GO, 0),  # the server's own NBDMAGIC
        b"GET / HTTP/1.1\r\n\r\n",  # someone pointed a browser at the port
        bytes(16),
    ],
    ids=["ihaveopt+1", "nbdmagic", "http", "zeros"],
)
def test_bad_option_magic_drops_the_connection(target: Target, header: bytes) -> None:
    with target.connect() as conn:
        conn.handshake()
        [rep] = conn.ask(OPT_INFO, info_request("vol"))[-1:]  # a good option first
        assert rep.reply == REP_ACK
        conn.send(header)
        assert conn.expect_closed() == b""
    target.assert_healthy()


def test_transmission_request_during_option_haggling_drops_the_connection(
    target: Target,
) -> None:
    """A READ before any GO: its magic is not IHAVEOPT, so the option stream is broken."""
    with target.connect() as conn:
        conn.handshake()
        conn.send(request(CMD_READ, 0, 4096, cookie=1))
        assert conn.expect_closed() == b""
    target.assert_healthy()


def test_abort_is_acknowledged_then_closed(target: Target) -> None:
    with target.connect() as conn:
        conn.handshake()
        assert kinds(conn.ask(OPT_ABORT)) == [REP_ACK]
        assert conn.expect_closed() == b""
    target.assert_healthy()


# --- options we do not support --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opt", "data", "allowed"),
    [
        (42, b"", {REP_ERR_UNSUP}),
        (42, b"x" * 1000, {REP_ERR_UNSUP}),  # its data must be skipped, not parsed
        (4, b"", {REP_ERR_UNSUP}),  # the withdrawn PEEK_EXPORT
        (0, b"", {REP_ERR_UNSUP}),
        (0xFFFF_FFFF, b"\0" * 8, {REP_ERR_UNSUP}),
        (OPT_EXTENDED_HEADERS, b"", {REP_ERR_UNSUP}),
        (OPT_STARTTLS, b"", {REP_ERR_UNSUP, REP_ERR_POLICY}),
    ],
    ids=["42", "42-with-data", "peek-export", "zero", "max", "extended-headers", "starttls"],
)
def test_unsupported_option_is_refused_and_negotiation_continues(
    target: Target, opt: int, data: bytes, allowed: set[int]
) -> None:
    with target.connect() as conn:
        conn.handshake()
        [rep] = conn.ask(opt, data)
        assert rep.option == opt and rep.reply in allowed, hex(rep.reply)
        assert_error_message(rep)
        go_and_read(conn, target)
    target.assert_healthy()


def test_options_with_forbidden_data_are_invalid(target: Target) -> None:
    """LIST and STRUCTURED_REPLY take no data; refusing them must not turn structured replies on
    (the READ in go_and_read expects a simple reply)."""
    with target.connect() as conn:
        conn.handshake()
        assert kinds(conn.ask(OPT_LIST, b"x")) == [REP_ERR_INVALID]
        assert kinds(conn.ask(OPT_STRUCTURED_REPLY, b"x")) == [REP_ERR_INVALID]
        listing = conn.ask(OPT_LIST)
        assert kinds(listing) == [REP_SERVER, REP_ACK]
        assert listing[0].data[:7] == string("vol")
        go_and_read(conn, target)
    target.assert_healthy()


# --- out of order and malformed -------------------------------------------------------------------


@pytest.mark.parametrize("opt", [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT])
def test_meta_context_before_structured_reply_is_invalid(target: Target, opt: int) -> None:
    with target.connect() as conn:
        conn.handshake()
        [rep] = conn.ask(opt, meta_context_request("vol", "base:allocation"))
        assert rep.reply == REP_ERR_INVALID
        assert_error_message(rep)
        go_and_read(conn, target)
        # Nothing was selected, so BLOCK_STATUS is refused (simple reply: no structured replies).
        assert conn.call(CMD_BLOCK_STATUS, 0, 4096, cookie=3) == EINVAL
    target.assert_healthy()


name_vol = string("vol")
MALFORMED_INFO = {
    "empty": b"",
    "length-truncated": b"\0\0",
    "name-truncated": struct.pack(">I", 10) + b"vol",
    "name-longer-than-option": struct.pack(">I", 0xFFFF_FFFF) + b"vol\0\0",
    "count-missing": name_vol,
    "count-truncated": name_vol + b"\0",
    "count-1-no-entry": name_vol + struct.pack(">H", 1),
    "count-2-one-entry": name_vol + struct.pack(">HH", 2, INFO_EXPORT),
    "count-0-trailing": name_vol + struct.pack(">HH", 0, INFO_EXPORT),
    "odd-trailing-byte": name_vol + struct.pack(">HH", 1, INFO_NAME) + b"\0",
    "count-max": name_vol + struct.pack(">H", 0xFFFF) + b"\0" * 8,
    "nul-in-name": string(b"v\0l") + b"\0\0",
    "not-utf8-name": string(b"\xc3\x28") + b"\0\0",
}


@pytest.mark.parametrize("opt", [OPT_GO, OPT_INFO])
def test_malformed_info_and_go_payloads_are_invalid_and_negotiation_continues(
    target: Target, opt: int
) -> None:
    with target.connect() as conn:
        conn.handshake()
        for what, data in MALFORMED_INFO.items():
            [rep] = conn.ask(opt, data)
            assert rep.reply == REP_ERR_INVALID, what
            assert_error_message(rep)
        # A duplicated info request is the client's mistake but not malformed: answered once.
        replies = conn.ask(OPT_INFO, info_request("vol", INFO_NAME, INFO_NAME))
        # Export, name, and the block sizes the target's 16 MiB journal sends unasked.
        assert kinds(replies) == [REP_INFO, REP_INFO, REP_INFO, REP_ACK]
        go_and_read(conn, target)
    target.assert_healthy()


MALFORMED_META = {
    "empty": b"",
    "count-missing": name_vol,
    "count-truncated": name_vol + b"\0\0",
    "count-too-large": name_vol + struct.pack(">I", 0xFFFF_FFFF),
    "count-2-one-query": name_vol + struct.pack(">I", 2) + string("base:allocation"),
    "query-truncated": name_vol + struct.pack(">II", 1, 100) + b"base:",
    "trailing": meta_context_request("vol", "base:allocation") + b"\0",
    "query-over-4096": meta_context_request("vol", "base:" + "a" * MAX_NAME),
}


@pytest.mark.parametrize("opt", [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT])
def test_malformed_meta_context_payloads_are_invalid(target: Target, opt: int) -> None:
    with target.connect() as conn:
        conn.handshake()
        conn.structured()
        for what, data in MALFORMED_META.items():
            [rep] = conn.ask(opt, data)
            assert rep.reply == REP_ERR_INVALID, what
            assert_error_message(rep)
        [rep] = conn.ask(opt, meta_context_request("nope", "base:allocation"))
        assert rep.reply == REP_ERR_UNKNOWN
        conn.go("vol")
    target.assert_healthy()
