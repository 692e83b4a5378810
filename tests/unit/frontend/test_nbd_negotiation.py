"""Option haggling, driven with option events only (no sockets)."""

from __future__ import annotations

import struct

import pytest

from blockmirror.frontend import nbd_protocol as p
from blockmirror.frontend.nbd_negotiation import (
    BASE_ALLOCATION_ID,
    ExportInfo,
    Negotiation,
    transmission_flags,
)

EXPORTS = {
    "db": ExportInfo("db", 1 << 30, "database disk"),
    "ro": ExportInfo("ro", 1 << 20, read_only=True),
}


def negotiation(*names: str) -> Negotiation:
    chosen = {n: EXPORTS[n] for n in (names or EXPORTS)}
    return Negotiation(chosen.get, lambda: list(chosen.values()))


def parse_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies with an independent parser: (option, reply type, data)."""
    out = []
    pos = 0
    while pos < len(raw):
        magic, option, reply, length = struct.unpack_from(">QIII", raw, pos)
        assert magic == p.OPTION_REPLY_MAGIC
        pos += 20
        out.append((option, reply, raw[pos : pos + length]))
        pos += length
    assert pos == len(raw)
    return out


def info_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def test_go_sends_export_info_block_size_name_then_ack() -> None:
    n = negotiation()
    out = n.handle(p.OptionRequest(p.Opt.GO, info_data("db", p.Info.BLOCK_SIZE, p.Info.NAME)))
    assert out.export == EXPORTS["db"]
    replies = parse_replies(out.reply)
    assert [r[1] for r in replies] == [p.Rep.INFO, p.Rep.INFO, p.Rep.INFO, p.Rep.ACK]
    kind, size, flags = struct.unpack(">HQH", replies[0][2])
    assert (kind, size) == (p.Info.EXPORT, 1 << 30)
    assert flags & p.TxFlag.HAS_FLAGS and flags & p.TxFlag.SEND_FLUSH
    assert flags & p.TxFlag.CAN_MULTI_CONN and not flags & p.TxFlag.READ_ONLY
    assert struct.unpack(">HIII", replies[1][2]) == (p.Info.BLOCK_SIZE, 1, 4096, 32 << 20)
    assert replies[2][2] == struct.pack(">H", p.Info.NAME) + b"db"


def test_info_does_not_choose_an_export() -> None:
    out = negotiation().handle(p.OptionRequest(p.Opt.INFO, info_data("db", p.Info.DESCRIPTION)))
    assert out.export is None and not out.close
    replies = parse_replies(out.reply)
    assert replies[1][2] == struct.pack(">H", p.Info.DESCRIPTION) + b"database disk"
    assert replies[-1][1] == p.Rep.ACK


def test_unknown_export_is_err_unknown_and_connection_stays() -> None:
    out = negotiation().handle(p.OptionRequest(p.Opt.GO, info_data("nope")))
    assert out.export is None and not out.close
    [(_, reply, message)] = parse_replies(out.reply)
    assert reply == p.Rep.ERR_UNKNOWN and b"nope" in message


def test_empty_name_means_the_only_export() -> None:
    assert negotiation("db").handle(p.OptionRequest(p.Opt.GO, info_data(""))).export is not None
    out = negotiation().handle(p.OptionRequest(p.Opt.GO, info_data("")))
    assert out.export is None  # two exports: no default


def test_export_name_unknown_closes_without_reply() -> None:
    out = negotiation().handle(p.OptionRequest(p.Opt.EXPORT_NAME, b"nope"))
    assert out.close and out.reply == b""


def test_export_name_reply_honours_no_zeroes() -> None:
    n = negotiation()
    out = n.handle(p.OptionRequest(p.Opt.EXPORT_NAME, b"db"))
    assert len(out.reply) == 10 + 124
    n = negotiation()
    n.client_flags = p.CLIENT_FLAG_FIXED_NEWSTYLE | p.CLIENT_FLAG_NO_ZEROES
    out = n.handle(p.OptionRequest(p.Opt.EXPORT_NAME, b"db"))
    assert len(out.reply) == 10 and out.export is not None


def test_list_names_every_export() -> None:
    replies = parse_replies(negotiation().handle(p.OptionRequest(p.Opt.LIST, b"")).reply)
    names = [r[2][4 : 4 + struct.unpack(">I", r[2][:4])[0]] for r in replies[:-1]]
    assert names == [b"db", b"ro"] and replies[-1][1] == p.Rep.ACK


def test_abort_acks_and_closes() -> None:
    out = negotiation().handle(p.OptionRequest(p.Opt.ABORT, b""))
    assert out.close and parse_replies(out.reply)[0][1] == p.Rep.ACK


@pytest.mark.parametrize("option", [42, p.Opt.EXTENDED_HEADERS, 0xFFFFFFFF])
def test_unknown_options_are_unsupported(option: int) -> None:
    out = negotiation().handle(p.OptionRequest(option, b"xyz"))
    assert not out.close and parse_replies(out.reply)[0][1] == p.Rep.ERR_UNSUP


def test_starttls_is_refused_by_policy() -> None:
    out = negotiation().handle(p.OptionRequest(p.Opt.STARTTLS, b""))
    assert parse_replies(out.reply)[0][1] == p.Rep.ERR_POLICY


def test_oversized_option_is_too_big() -> None:
    out = negotiation().handle(p.OversizedOption(p.Opt.GO, 1 << 20))
    assert parse_replies(out.reply)[0][1] == p.Rep.ERR_TOO_BIG and not out.close


def test_meta_context_needs_structured_replies() -> None:
    n = negotiation()
    out = n.handle(p.OptionRequest(p.Opt.SET_META_CONTEXT, meta_data("db", "base:allocation")))
    assert parse_replies(out.reply)[0][1] == p.Rep.ERR_INVALID
    assert n.meta_context_id is None


def test_set_meta_context_selects_base_allocation() -> None:
    n = negotiation()
    n.handle(p.OptionRequest(p.Opt.STRUCTURED_REPLY, b""))
    out = n.handle(p.OptionRequest(p.Opt.SET_META_CONTEXT, meta_data("db", "base:allocation")))
    replies = parse_replies(out.reply)
    assert replies[0][1] == p.Rep.META_CONTEXT
    assert replies[0][2] == struct.pack(">I", BASE_ALLOCATION_ID) + b"base:allocation"
    assert n.meta_context_id == BASE_ALLOCATION_ID
    # GO for another export drops the selection: contexts belong to the export they named.
    n.handle(p.OptionRequest(p.Opt.GO, info_data("ro")))
    assert n.meta_context_id is None


def test_list_meta_context_lists_base_allocation_and_unknown_query_lists_nothing() -> None:
    n = negotiation()
    n.handle(p.OptionRequest(p.Opt.STRUCTURED_REPLY, b""))
    listed = parse_replies(
        n.handle(p.OptionRequest(p.Opt.LIST_META_CONTEXT, meta_data("db"))).reply
    )
    assert [r[1] for r in listed] == [p.Rep.META_CONTEXT, p.Rep.ACK]
    none = parse_replies(
        n.handle(p.OptionRequest(p.Opt.LIST_META_CONTEXT, meta_data("db", "qemu:dirty"))).reply
    )
    assert [r[1] for r in none] == [p.Rep.ACK]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        struct.pack(">I", 10) + b"db",
        info_data("db")[:-1],
        info_data("db") + b"\x00",
        struct.pack(">I", 5000) + b"x" * 5000 + b"\x00\x00",
    ],
)
def test_malformed_go_is_err_invalid_and_connection_stays(data: bytes) -> None:
    out = negotiation().handle(p.OptionRequest(p.Opt.GO, data))
    assert not out.close and out.export is None
    assert parse_replies(out.reply)[0][1] == p.Rep.ERR_INVALID


def test_structured_reply_with_data_is_invalid() -> None:
    n = negotiation()
    out = n.handle(p.OptionRequest(p.Opt.STRUCTURED_REPLY, b"x"))
    assert parse_replies(out.reply)[0][1] == p.Rep.ERR_INVALID and not n.structured


def test_read_only_flags() -> None:
    flags = transmission_flags(EXPORTS["ro"], structured=False)
    assert flags & p.TxFlag.READ_ONLY
    assert not flags & (p.TxFlag.SEND_TRIM | p.TxFlag.SEND_WRITE_ZEROES | p.TxFlag.SEND_DF)
    assert transmission_flags(EXPORTS["db"], structured=True) & p.TxFlag.SEND_DF
