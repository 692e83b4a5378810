"""iSCSI basic header segments, byte by byte, against the figures of RFC 7143 section 11 (a round
trip alone would not see a field written and read at the same wrong place)."""

from __future__ import annotations

import struct

from blockmirror.frontend import iscsi_pdu as p
from blockmirror.frontend.iscsi_framing import encode_bytes


def fields(raw: bytes, *spec: tuple[int, str]) -> tuple[int, ...]:
    return tuple(struct.unpack_from(">" + fmt, raw, off)[0] for off, fmt in spec)


def test_scsi_command_layout_and_extended_cdb_ahs() -> None:
    cdb = bytes(range(1, 21))  # 20 bytes: 16 in the BHS, 4 in an Extended CDB AHS
    raw = encode_bytes(
        p.ScsiCommand(
            itt=0x11223344, cdb=cdb, lun=0x0001000000000000, expected_length=4096, cmd_sn=7,
            exp_stat_sn=9, write=True, final=True, attribute=p.TaskAttribute.ORDERED,
            immediate=True, data=(b"abcde",),
        )
    )  # fmt: skip
    assert raw[0] == 0x41 and raw[1] == 0x80 | 0x20 | 2
    assert raw[4] == 2 and raw[5:8] == b"\0\0\x05"  # AHS: 2 words; DataSegmentLength 5
    assert fields(raw, (8, "Q"), (16, "I"), (20, "I"), (24, "I"), (28, "I")) == (
        0x0001000000000000, 0x11223344, 4096, 7, 9,
    )  # fmt: skip
    assert raw[32:48] == cdb[:16]
    # AHSLength = CDB length - 15, AHSType 1, a reserved byte, the rest of the CDB, padding.
    assert raw[48:56] == b"\x00\x05\x01\x00" + cdb[16:20]
    assert raw[56:61] == b"abcde" and raw[61:64] == b"\0\0\0"


def test_login_request_and_response_layout() -> None:
    req = encode_bytes(
        p.LoginRequest(
            isid=0x800000001234, tsih=0x55, cid=3, itt=0xA, cmd_sn=0x10, exp_stat_sn=0x20,
            csg=1, nsg=3, transit=True,
        )
    )  # fmt: skip
    assert req[:4] == bytes([0x43, 0x80 | 1 << 2 | 3, 0, 0])
    assert req[8:14] == bytes.fromhex("800000001234") and req[14:16] == b"\0\x55"
    assert fields(req, (16, "I"), (20, "H"), (24, "I"), (28, "I")) == (0xA, 3, 0x10, 0x20)
    resp = encode_bytes(
        p.LoginResponse(
            isid=0x800000001234, tsih=0x55, itt=0xA, csg=0, nsg=1, cont=True, status_class=2,
            status_detail=1, stat_sn=5, exp_cmd_sn=6, max_cmd_sn=7,
        )
    )  # fmt: skip
    assert resp[:2] == bytes([0x23, 0x40 | 0 << 2 | 1])
    assert fields(resp, (24, "I"), (28, "I"), (32, "I")) == (5, 6, 7)
    assert resp[36:38] == b"\x02\x01"


def test_target_pdu_layouts() -> None:
    r2t = encode_bytes(
        p.R2T(
            itt=1, ttt=2, r2t_sn=3, buffer_offset=4, desired_length=5, lun=6, stat_sn=7,
            exp_cmd_sn=8, max_cmd_sn=9,
        )
    )  # fmt: skip
    assert r2t[:2] == b"\x31\x80"
    assert fields(r2t, *((o, "I") for o in range(16, 48, 4))) == (1, 2, 7, 8, 9, 3, 4, 5)
    assert fields(r2t, (8, "Q")) == (6,)
    din = encode_bytes(
        p.DataIn(
            itt=1, data_sn=2, buffer_offset=3, status=0x02, underflow=True, residual_count=4,
            stat_sn=5, exp_cmd_sn=6, max_cmd_sn=7, data=(b"xyz",),
        )
    )  # fmt: skip
    assert din[:4] == bytes([0x25, 0x80 | 0x02 | 0x01, 0, 0x02])
    assert fields(din, (24, "I"), (36, "I"), (40, "I"), (44, "I")) == (5, 2, 3, 4)
    resp = encode_bytes(
        p.ScsiResponse(itt=9, status=2, response=1, overflow=True, residual_count=8)
    )
    assert resp[:4] == bytes([0x21, 0x80 | 0x04, 1, 2]) and fields(resp, (44, "I")) == (8,)
    logout = encode_bytes(p.LogoutResponse(itt=1, response=2, time2wait=3, time2retain=4))
    assert logout[2] == 2 and logout[40:44] == b"\0\x03\0\x04"
    amsg = encode_bytes(p.AsyncMessage(event=1, vcode=2, parameter1=3, parameter2=4, parameter3=5))
    assert fields(amsg, (16, "I")) == (p.RESERVED_TAG,)
    assert amsg[36:44] == bytes([1, 2, 0, 3, 0, 4, 0, 5])
    header = bytes(range(48))
    rej = encode_bytes(p.Reject(reason=p.RejectReason.PROTOCOL_ERROR, header=header))
    assert rej[2] == 4 and rej[5:8] == b"\0\0\x30" and rej[48:] == header


def test_initiator_pdu_layouts() -> None:
    logout = encode_bytes(p.LogoutRequest(itt=1, reason=1, cid=7, cmd_sn=2, immediate=True))
    assert logout[:2] == bytes([0x46, 0x81]) and fields(logout, (20, "H"), (24, "I")) == (7, 2)
    tmf = encode_bytes(p.TaskRequest(itt=1, function=1, referenced_task_tag=5, ref_cmd_sn=6))
    assert tmf[1] == 0x81 and fields(tmf, (20, "I"), (32, "I")) == (5, 6)
    dout = encode_bytes(
        p.DataOut(itt=1, ttt=2, exp_stat_sn=3, data_sn=4, buffer_offset=5, data=(b"a",))
    )
    assert dout[:2] == b"\x05\x80"
    assert fields(dout, (20, "I"), (28, "I"), (36, "I"), (40, "I")) == (2, 3, 4, 5)
    snack = encode_bytes(p.Snack(itt=1, type=p.SnackType.STATUS, beg_run=3, run_length=4))
    assert snack[1] == 0x81 and fields(snack, (40, "I"), (44, "I")) == (3, 4)
