"""The iSCSI PDU codec: round trips of every PDU through arbitrary splits of the stream, with and
without digests; bounds, and the refusals with their reasons. Byte layouts: test_iscsi_bhs."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.errors import IscsiPduError
from blockmirror.frontend import iscsi_pdu as p
from blockmirror.frontend.iscsi_framing import (
    NO_DIGESTS,
    Digests,
    PduReader,
    digest,
    encode,
    encode_bytes,
    header_of,
)

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)
DATA = st.lists(st.binary(max_size=40), max_size=3).map(tuple)
STAGE = st.sampled_from([0, 1, 3])


def _exclusive() -> st.SearchStrategy[tuple[bool, bool]]:
    return st.sampled_from([(False, False), (True, False), (False, True)])


@st.composite
def login_request(draw: st.DrawFn) -> p.LoginRequest:
    transit, cont = draw(_exclusive())
    return p.LoginRequest(
        isid=draw(st.integers(0, (1 << 48) - 1)), itt=draw(U32), tsih=draw(U16), cid=draw(U16),
        cmd_sn=draw(U32), exp_stat_sn=draw(U32), csg=draw(STAGE), nsg=draw(STAGE),
        transit=transit, cont=cont, version_max=draw(U8), version_min=draw(U8), data=draw(DATA),
    )  # fmt: skip


@st.composite
def login_response(draw: st.DrawFn) -> p.LoginResponse:
    transit, cont = draw(_exclusive())
    return p.LoginResponse(
        isid=draw(st.integers(0, (1 << 48) - 1)), itt=draw(U32), tsih=draw(U16),
        csg=draw(STAGE), nsg=draw(STAGE), transit=transit, cont=cont, version_max=draw(U8),
        version_active=draw(U8), status_class=draw(U8), status_detail=draw(U8),
        stat_sn=draw(U32), exp_cmd_sn=draw(U32), max_cmd_sn=draw(U32), data=draw(DATA),
    )  # fmt: skip


@st.composite
def text_request(draw: st.DrawFn) -> p.TextRequest:
    final, cont = draw(_exclusive())
    return p.TextRequest(
        itt=draw(U32), ttt=draw(U32), lun=draw(U64), cmd_sn=draw(U32), exp_stat_sn=draw(U32),
        final=final, cont=cont, immediate=draw(st.booleans()), data=draw(DATA),
    )  # fmt: skip


@st.composite
def text_response(draw: st.DrawFn) -> p.TextResponse:
    final, cont = draw(_exclusive())
    ttt = p.RESERVED_TAG if final else draw(st.integers(0, p.RESERVED_TAG - 1))
    return p.TextResponse(
        itt=draw(U32), ttt=ttt, lun=draw(U64), final=final, cont=cont, stat_sn=draw(U32),
        exp_cmd_sn=draw(U32), max_cmd_sn=draw(U32), data=draw(DATA),
    )  # fmt: skip


@st.composite
def scsi_response(draw: st.DrawFn) -> p.ScsiResponse:
    overflow, underflow = draw(_exclusive())
    bidi_overflow, bidi_underflow = draw(_exclusive())
    return p.ScsiResponse(
        itt=draw(U32), status=draw(U8), response=draw(U8), overflow=overflow,
        underflow=underflow, bidi_overflow=bidi_overflow, bidi_underflow=bidi_underflow,
        residual_count=draw(U32), bidi_residual_count=draw(U32), snack_tag=draw(U32),
        exp_data_sn=draw(U32), stat_sn=draw(U32), exp_cmd_sn=draw(U32), max_cmd_sn=draw(U32),
        data=draw(DATA),
    )  # fmt: skip


@st.composite
def data_in(draw: st.DrawFn) -> p.DataIn:
    status = draw(st.none() | U8)
    final = True if status is not None else draw(st.booleans())
    overflow, underflow = draw(_exclusive()) if status is not None else (False, False)
    return p.DataIn(
        itt=draw(U32), ttt=draw(U32), lun=draw(U64), data_sn=draw(U32),
        buffer_offset=draw(U32), final=final, acknowledge=draw(st.booleans()), status=status,
        overflow=overflow, underflow=underflow, residual_count=draw(U32),
        stat_sn=draw(U32) if status is not None else 0, exp_cmd_sn=draw(U32),
        max_cmd_sn=draw(U32), data=draw(DATA),
    )  # fmt: skip


INITIATOR_PDUS: st.SearchStrategy[p.InitiatorPdu] = st.one_of(
    st.builds(
        p.NopOut, itt=U32, ttt=U32, lun=U64, cmd_sn=U32, exp_stat_sn=U32,
        immediate=st.booleans(), data=DATA,
    ),
    st.builds(
        p.ScsiCommand, itt=U32, cdb=st.binary(min_size=16, max_size=300), lun=U64,
        expected_length=U32, cmd_sn=U32, exp_stat_sn=U32, read=st.booleans(),
        write=st.booleans(), final=st.booleans(), attribute=st.sampled_from(list(p.TaskAttribute)),
        immediate=st.booleans(), bidi_read_length=st.none() | U32, data=DATA,
    ),
    st.builds(
        p.TaskRequest, itt=U32, function=st.integers(0, 127), referenced_task_tag=U32, lun=U64,
        cmd_sn=U32, exp_stat_sn=U32, ref_cmd_sn=U32, exp_data_sn=U32, immediate=st.booleans(),
    ),
    login_request(),
    text_request(),
    st.builds(
        p.DataOut, itt=U32, ttt=U32, lun=U64, exp_stat_sn=U32, data_sn=U32, buffer_offset=U32,
        final=st.booleans(), data=DATA,
    ),
    st.builds(
        p.LogoutRequest, itt=U32, reason=st.sampled_from(list(p.LogoutReason)), cid=U16,
        cmd_sn=U32, exp_stat_sn=U32, immediate=st.booleans(),
    ),
    st.builds(
        p.Snack, itt=U32, type=st.sampled_from(list(p.SnackType)), ttt=U32, lun=U64,
        exp_stat_sn=U32, beg_run=U32, run_length=U32,
    ),
)  # fmt: skip
TARGET_PDUS: st.SearchStrategy[p.TargetPdu] = st.one_of(
    st.builds(
        p.NopIn, itt=U32, ttt=U32, lun=U64, stat_sn=U32, exp_cmd_sn=U32, max_cmd_sn=U32,
        data=DATA,
    ),
    scsi_response(),
    st.builds(
        p.TaskResponse, itt=U32, response=U8, stat_sn=U32, exp_cmd_sn=U32, max_cmd_sn=U32
    ),
    login_response(),
    text_response(),
    data_in(),
    st.builds(
        p.LogoutResponse, itt=U32, response=U8, time2wait=U16, time2retain=U16, stat_sn=U32,
        exp_cmd_sn=U32, max_cmd_sn=U32,
    ),
    st.builds(
        p.R2T, itt=U32, ttt=U32, r2t_sn=U32, buffer_offset=U32, desired_length=U32, lun=U64,
        stat_sn=U32, exp_cmd_sn=U32, max_cmd_sn=U32,
    ),
    st.builds(
        p.AsyncMessage, event=U8, vcode=U8, parameter1=U16, parameter2=U16, parameter3=U16,
        lun=U64, stat_sn=U32, exp_cmd_sn=U32, max_cmd_sn=U32, data=DATA,
    ),
    st.builds(
        p.Reject, reason=U8, header=st.binary(min_size=48, max_size=48), data_sn=U32,
        stat_sn=U32, exp_cmd_sn=U32, max_cmd_sn=U32,
    ),
)  # fmt: skip
DIGESTS = st.builds(Digests, header=st.booleans(), data=st.booleans())


def normal(pdu: p.Pdu) -> p.Pdu:
    """``pdu`` with its data segment as one bytes object (received data arrives as views)."""
    if isinstance(pdu, p.Reject) or not hasattr(pdu, "data"):
        return pdu
    joined = p.payload(pdu.data)
    return dataclasses.replace(pdu, data=(joined,) if joined else ())  # type: ignore[arg-type]


def read_all(reader: PduReader, raw: bytes, cuts: list[int]) -> list[p.Pdu]:
    out = []
    bounds = [0, *sorted(c % (len(raw) + 1) for c in cuts), len(raw)]
    for start, end in itertools.pairwise(bounds):
        reader.feed(raw[start:end])
        while (pdu := reader.next_pdu()) is not None:
            out.append(pdu)
    assert not reader.mid_pdu
    return out


# --- round trips ----------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    pdus=st.lists(INITIATOR_PDUS, min_size=1, max_size=6),
    digests=DIGESTS,
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_initiator_pdus_round_trip_through_any_split(
    pdus: list[p.InitiatorPdu], digests: Digests, cuts: list[int]
) -> None:
    raw = b"".join(encode_bytes(pdu, digests) for pdu in pdus)
    assert len(raw) % 4 == 0
    reader = PduReader(digests=digests, max_data_segment=p.MAX_SEGMENT)
    assert [normal(x) for x in read_all(reader, raw, cuts)] == [normal(x) for x in pdus]


@settings(max_examples=300)
@given(
    pdus=st.lists(TARGET_PDUS, min_size=1, max_size=6),
    digests=DIGESTS,
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_target_pdus_round_trip_through_any_split(
    pdus: list[p.TargetPdu], digests: Digests, cuts: list[int]
) -> None:
    raw = b"".join(encode_bytes(pdu, digests) for pdu in pdus)
    reader = PduReader(from_initiator=False, digests=digests, max_data_segment=p.MAX_SEGMENT)
    assert [normal(x) for x in read_all(reader, raw, cuts)] == [normal(x) for x in pdus]


def test_encoding_hands_data_buffers_on_and_decoding_gives_views_of_the_input() -> None:
    buf = bytearray(b"immediate data!")  # 15 bytes: one byte of padding
    out = encode(p.ScsiCommand(itt=1, cdb=bytes(16), write=True, data=(buf,)))
    assert out[1] is buf and out[2] == b"\0"
    raw = b"".join(out)
    fed = bytes(raw)
    reader = PduReader()
    reader.feed(fed)
    pdu = reader.next_pdu()
    assert isinstance(pdu, p.ScsiCommand)
    assert all(isinstance(v, memoryview) and v.obj is fed for v in pdu.data)
    assert p.payload(pdu.data) == bytes(buf)


# --- digests ----------------------------------------------------------------------------------


def test_crc32c_goes_on_the_wire_low_byte_first() -> None:
    # RFC 3720 appendix B.4, as bytes on the wire.
    assert digest([bytes(32)]) == bytes.fromhex("aa36918a")
    assert digest([b"\xff" * 32]) == bytes.fromhex("43aba862")
    assert digest([bytes(range(32))]) == bytes.fromhex("4e79dd46")
    assert digest([bytes(range(31, -1, -1))]) == bytes.fromhex("5cdb3f11")
    assert digest([b"1234", b"56789"]) == digest([b"123456789"])


def test_data_digest_covers_data_and_padding() -> None:
    raw = encode_bytes(p.NopOut(itt=1, data=(b"abcdef",)), Digests(data=True))
    assert len(raw) == 48 + 8 + 4
    assert raw[-4:] == digest([b"abcdef\0\0"])
    header_only = encode_bytes(p.NopOut(itt=1), Digests(header=True, data=True))
    assert len(header_only) == 52 and header_only[48:] == digest([header_only[:48]])


def test_a_header_digest_error_closes_for_good() -> None:
    digests = Digests(header=True)
    raw = bytearray(encode_bytes(p.NopOut(itt=1), digests))
    raw[20] ^= 1
    reader = PduReader(digests=digests)
    reader.feed(bytes(raw) + encode_bytes(p.NopOut(itt=2), digests))
    for _ in range(2):
        with pytest.raises(IscsiPduError) as info:
            reader.next_pdu()
        assert info.value.close and info.value.reject_reason is None


def test_a_data_digest_error_is_rejected_and_the_stream_goes_on() -> None:
    digests = Digests(header=True, data=True)
    raw = bytearray(encode_bytes(p.NopOut(itt=1, data=(b"ping",)), digests))
    raw[52] ^= 0x20  # the first data byte
    reader = PduReader(digests=digests)
    reader.feed(bytes(raw) + encode_bytes(p.NopOut(itt=2), digests))
    with pytest.raises(IscsiPduError) as info:
        reader.next_pdu()
    assert info.value.reject_reason == p.RejectReason.DATA_DIGEST_ERROR
    assert info.value.header == bytes(raw[:48]) and not info.value.close
    nop = reader.next_pdu()
    assert isinstance(nop, p.NopOut) and nop.itt == 2


def test_digests_switch_between_two_pdus() -> None:
    reader = PduReader()
    first = encode_bytes(p.LoginRequest(isid=1, transit=True, nsg=3, csg=1))
    after = encode_bytes(p.NopOut(itt=5, data=(b"x",)), Digests(True, True))
    reader.feed(first + after)  # both in one read: the second must wait for the switch
    assert isinstance(reader.next_pdu(), p.LoginRequest)
    reader.digests = Digests(True, True)
    nop = reader.next_pdu()
    assert isinstance(nop, p.NopOut) and p.payload(nop.data) == b"x"


# --- bounds and refusals ----------------------------------------------------------------------


def test_a_data_segment_over_the_bound_is_rejected_and_skipped_unbuffered() -> None:
    reader = PduReader(max_data_segment=8192)
    big = encode_bytes(p.TextRequest(itt=1, data=(bytes(9000),)))
    reader.feed(big[:100])
    with pytest.raises(IscsiPduError) as info:
        reader.next_pdu()
    assert info.value.reject_reason == p.RejectReason.PROTOCOL_ERROR
    assert reader.buffered == 0 and reader.mid_pdu
    for i in range(100, len(big), 1000):
        reader.feed(big[i : i + 1000])
        assert reader.next_pdu() is None and reader.buffered == 0
    reader.feed(encode_bytes(p.NopOut(itt=3)))
    nop = reader.next_pdu()
    assert isinstance(nop, p.NopOut) and nop.itt == 3
    # Exactly at the bound is fine.
    reader.feed(encode_bytes(p.TextRequest(itt=2, data=(bytes(8192),))))
    assert isinstance(reader.next_pdu(), p.TextRequest)


def raw_pdu(byte0: int, byte1: int = 0x80, *, data: bytes = b"", ahs: bytes = b"") -> bytes:
    header = bytearray(48)
    header[0], header[1] = byte0, byte1
    struct.pack_into(">I", header, 4, (len(ahs) // 4) << 24 | len(data))
    return bytes(header) + ahs + data + bytes(-len(data) % 4)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(raw_pdu(0x1C), p.RejectReason.COMMAND_NOT_SUPPORTED, id="vendor specific"),
        pytest.param(raw_pdu(0x07), p.RejectReason.COMMAND_NOT_SUPPORTED, id="reserved"),
        pytest.param(
            raw_pdu(0x21), p.RejectReason.PROTOCOL_ERROR, id="a target opcode from an initiator"
        ),
        pytest.param(
            raw_pdu(0x06, 0x80 | 5), p.RejectReason.PROTOCOL_ERROR, id="reserved logout reason"
        ),
        pytest.param(
            raw_pdu(0x10, 0x80 | 9), p.RejectReason.PROTOCOL_ERROR, id="reserved SNACK type"
        ),
        pytest.param(
            raw_pdu(0x01, 0x80 | 6), p.RejectReason.PROTOCOL_ERROR, id="reserved task attribute"
        ),
        pytest.param(
            raw_pdu(0x02, 0x81, data=b"x"), p.RejectReason.PROTOCOL_ERROR, id="TMF with data"
        ),
        pytest.param(
            raw_pdu(0x01, ahs=b"\x00\x01\x07\x00"), p.RejectReason.PROTOCOL_ERROR, id="AHS type 7"
        ),
        pytest.param(
            raw_pdu(0x01, ahs=b"\x00\x01\x01\x00"), p.RejectReason.INVALID_PDU_FIELD, id="no CDB"
        ),
        pytest.param(
            raw_pdu(0x01, ahs=b"\x00\x09\x01\x00"), p.RejectReason.PROTOCOL_ERROR, id="overlong"
        ),
        pytest.param(
            raw_pdu(0x01, ahs=b"\x00\x01\x02\x00"), p.RejectReason.INVALID_PDU_FIELD, id="bidi len"
        ),
    ],
)
def test_malformed_pdus_are_refused_with_the_right_reason(raw: bytes, reason: int) -> None:
    reader = PduReader()
    reader.feed(raw + encode_bytes(p.NopOut(itt=7)))
    with pytest.raises(IscsiPduError) as info:
        reader.next_pdu()
    assert info.value.reject_reason == reason and info.value.header == raw[:48]
    nop = reader.next_pdu()  # the refused PDU was consumed whole
    assert isinstance(nop, p.NopOut) and nop.itt == 7


def test_vendor_and_extension_ahs_are_skipped() -> None:
    raw = raw_pdu(0x01, ahs=b"\x00\x01\x3c\x00")  # type 60: a non-iSCSI extension
    reader = PduReader()
    reader.feed(raw)
    cmd = reader.next_pdu()
    assert isinstance(cmd, p.ScsiCommand) and cmd.cdb == bytes(16)


@pytest.mark.parametrize(
    "pdu",
    [
        p.NopOut(itt=1 << 32),
        p.NopOut(itt=1, lun=1 << 64),
        p.LoginRequest(isid=1 << 48),
        p.LoginRequest(isid=1, cid=1 << 16),
        p.LoginRequest(isid=1, csg=4),
        p.LoginRequest(isid=1, transit=True, cont=True),
        p.TextRequest(itt=1, final=True, cont=True),
        p.TextResponse(itt=1, ttt=5, final=True),
        p.ScsiResponse(itt=1, status=256),
        p.ScsiResponse(itt=1, overflow=True, underflow=True),
        p.DataIn(itt=1, status=0, final=False),
        p.DataIn(itt=1, underflow=True),
        p.ScsiCommand(itt=1, cdb=b""),
        p.ScsiCommand(itt=1, cdb=bytes(16), attribute=5),
        p.TaskRequest(itt=1, function=128),
        p.LogoutResponse(itt=1, time2wait=1 << 16),
        p.AsyncMessage(event=256),
    ],
)
def test_fields_out_of_range_are_refused_on_encode(pdu: p.Pdu) -> None:
    with pytest.raises(ValueError):
        encode(pdu)


def test_a_data_segment_too_long_for_24_bits_is_refused_on_encode() -> None:
    with pytest.raises(ValueError, match="data segment"):
        encode(p.DataIn(itt=1, data=(memoryview(bytes(1 << 24)),)))


def test_no_digest_without_data() -> None:
    assert len(encode_bytes(p.NopOut(itt=1), Digests(data=True))) == 48
    assert encode(p.NopOut(itt=1), NO_DIGESTS) == [encode_bytes(p.NopOut(itt=1))]


def test_header_of_a_decoded_pdu_is_its_received_header() -> None:
    raw = encode_bytes(p.TextRequest(itt=5, ttt=6, cmd_sn=7, data=(b"SendTargets=All\0",)))
    reader = PduReader()
    reader.feed(raw)
    pdu = reader.next_pdu()
    assert pdu is not None and header_of(pdu) == raw[:48]
