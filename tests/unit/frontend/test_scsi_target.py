"""The logical unit around the block commands: information commands, sizing and residuals,
unit attentions, not ready, unknown LUNs, reservations through CDBs, and that any command gets
an answer."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.frontend import scsi_sense as s
from blockmirror.frontend.scsi_target import (
    Residual,
    Transfer,
    answer_unknown_lun,
    residual,
)
from tests.unit.frontend.scsi_memory_disk import (
    BS,
    INQUIRY,
    REQUEST_SENSE,
    TUR,
    A,
    B,
    MemoryDisk,
    good,
    pr_out,
    read10,
    run,
    sense_of,
    unit,
    write10,
)

# --- information commands -------------------------------------------------------------------


def test_inquiry_capacity_and_allocation_lengths() -> None:
    lu, _ = unit()
    std = good(run(lu, INQUIRY)).data_in
    assert std[0] == 0 and std[2] == 6
    assert len(good(run(lu, bytes((0x12, 0, 0, 0, 5, 0)))).data_in) == 5
    # SPC-3 and later take a 16-bit allocation length: 511 and 512 give the same data.
    assert (
        run(lu, bytes((0x12, 0, 0, 1, 255, 0))).data_in
        == run(lu, bytes((0x12, 0, 0, 2, 0, 0))).data_in
    )
    rc10 = good(run(lu, bytes((0x25,)) + bytes(9))).data_in
    assert struct.unpack(">II", rc10) == (1023, BS)
    rc16 = good(run(lu, struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))).data_in
    assert struct.unpack_from(">QI", rc16) == (1023, BS) and rc16[14] & 0x80  # LBPME
    for alloc in range(16):
        assert (
            len(good(run(lu, struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0))).data_in) == alloc
        )
    b0 = good(run(lu, bytes((0x12, 1, 0xB0, 0, 255, 0)))).data_in
    assert int.from_bytes(b0[8:12], "big") == 64  # MAXIMUM TRANSFER LENGTH = max_write
    luns = good(run(lu, struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 255, 0, 0))).data_in
    assert luns == struct.pack(">II", 8, 0) + bytes(8)


def test_unknown_opcode_and_bad_fields() -> None:
    lu, disk = unit()
    assert sense_of(run(lu, bytes((0xC1,)) + bytes(15))) == (0x5, 0x20, 0x00)
    assert sense_of(run(lu, bytes((0x12, 0, 0x80, 0, 255, 0)))) == (0x5, 0x24, 0x00)
    assert disk.errors == 2


# --- sizing and residuals -------------------------------------------------------------------


def test_transfer_and_residual() -> None:
    lu, _ = unit()
    assert lu.transfer(write10(0, 8)) == Transfer(8 * BS, 0)
    assert lu.transfer(read10(0, 8)) == Transfer(0, 8 * BS)
    assert lu.transfer(pr_out(0, 0)[0]) == Transfer(24, 0)
    assert lu.transfer(bytes((0xC1,)) + bytes(15)) == Transfer(0, 0)
    assert residual(10000, BS) == Residual(10000 - BS, 0)  # libiscsi's READ10 residual cases
    assert residual(200, BS) == Residual(0, BS - 200)
    assert residual(0, BS) == Residual(0, BS)
    assert residual(BS, BS) == Residual(0, 0)


# --- unit attentions, not ready, unknown LUNs -----------------------------------------------


def test_reset_reaches_every_other_nexus_once() -> None:
    lu, _ = unit()
    good(run(lu, TUR, nexus=A))
    good(run(lu, TUR, nexus=B))
    lu.reset(by=A)
    good(run(lu, TUR, nexus=A))
    good(run(lu, INQUIRY, nexus=B))  # INQUIRY neither reports nor clears it
    assert sense_of(run(lu, read10(0, 1), nexus=B)) == (0x6, 0x29, 0x03)
    good(run(lu, read10(0, 1), nexus=B))


def test_request_sense_returns_and_clears_the_attention() -> None:
    lu, _ = unit()
    lu.nexus_lost(A)
    data = good(run(lu, REQUEST_SENSE)).data_in
    assert (data[0], data[2], data[12], data[13]) == (0x70, 0x6, 0x29, 0x07)
    data = good(run(lu, REQUEST_SENSE)).data_in
    assert (data[2], data[12]) == (0, 0)  # NO SENSE
    lu.notify(s.CAPACITY_DATA_HAS_CHANGED)
    descriptor = good(run(lu, bytes((0x03, 1, 0, 0, 252, 0)))).data_in
    assert descriptor[:4] == bytes((0x72, 0x6, 0x2A, 0x09))


def test_notify_skips_the_one_who_caused_it() -> None:
    lu, _ = unit()
    good(run(lu, TUR, nexus=A))
    good(run(lu, TUR, nexus=B))
    lu.notify(s.MODE_PARAMETERS_CHANGED, but=A)
    good(run(lu, TUR, nexus=A))
    assert sense_of(run(lu, TUR, nexus=B)) == (0x6, 0x2A, 0x01)
    good(run(lu, TUR, nexus=B))


def test_not_ready_refuses_media_access_only() -> None:
    lu, _ = unit()
    lu.not_ready = s.NOT_READY_BECOMING_READY
    assert sense_of(run(lu, TUR)) == (0x2, 0x04, 0x01)
    assert sense_of(run(lu, read10(0, 1))) == (0x2, 0x04, 0x01)
    good(run(lu, INQUIRY))
    assert good(run(lu, REQUEST_SENSE)).data_in[2] == 0x2
    lu.not_ready = None
    good(run(lu, TUR))


def test_unknown_lun() -> None:
    assert answer_unknown_lun(INQUIRY, [0]).data_in[0] == 0x7F
    luns = answer_unknown_lun(struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, 64, 0, 0), [0, 1])
    assert int.from_bytes(luns.data_in[:4], "big") == 16
    assert sense_of(answer_unknown_lun(TUR, [0])) == (0x5, 0x25, 0x00)
    assert answer_unknown_lun(REQUEST_SENSE, [0]).data_in[12] == 0x25


def test_a_bug_below_is_a_hardware_error_not_an_exception() -> None:
    lu, disk = unit()

    def broken(offset: int, length: int) -> bytes:
        raise ZeroDivisionError

    disk.read = broken  # type: ignore[method-assign]
    assert sense_of(run(lu, read10(0, 1))) == (0x4, 0x44, 0x00)


# --- reservations through CDBs --------------------------------------------------------------


def test_reservations_through_commands() -> None:
    lu, _ = unit()
    good(run(lu, *pr_out(0x06, 0, 0xAA), nexus=A))  # REGISTER AND IGNORE
    good(run(lu, *pr_out(0x06, 0, 0xBB), nexus=B))
    good(run(lu, *pr_out(0x01, 0xAA, 0, 0x3), nexus=A))  # RESERVE, Exclusive Access
    assert run(lu, read10(0, 1), nexus=B).status == s.Status.RESERVATION_CONFLICT
    assert run(lu, write10(0, 1), bytes(BS), nexus=B).status == s.Status.RESERVATION_CONFLICT
    good(run(lu, INQUIRY, nexus=B))
    good(run(lu, TUR, nexus=B))
    good(run(lu, write10(0, 1), bytes(BS), nexus=A))
    keys = good(run(lu, struct.pack(">BBBBBBBHB", 0x5E, 0, 0, 0, 0, 0, 0, 100, 0))).data_in
    assert keys[4:8] == struct.pack(">I", 16)
    # B preempts and aborts A: A's tasks are the transport's to abort; A hears of it.
    result = good(run(lu, *pr_out(0x05, 0xBB, 0xAA, 0x1), nexus=B))
    assert result.aborted == (A,)
    assert sense_of(run(lu, TUR, nexus=A)) == (0x6, 0x2A, 0x05)
    assert run(lu, write10(0, 1), bytes(BS), nexus=A).status == s.Status.RESERVATION_CONFLICT
    good(run(lu, read10(0, 1), nexus=A))  # Write Exclusive: reads are shared
    short = run(lu, pr_out(0x00, 0xBB)[0], b"\0" * 10, nexus=B)
    assert sense_of(short) == (0x5, 0x0E, 0x03)


# --- any command, any bytes: an answer, never an exception ----------------------------------

_opcodes = st.sampled_from(
    [
        0x00,
        0x03,
        0x08,
        0x0A,
        0x12,
        0x1A,
        0x1B,
        0x25,
        0x28,
        0x2A,
        0x2F,
        0x35,
        0x41,
        0x42,
        0x5A,
        0x5E,
        0x5F,
        0x88,
        0x8A,
        0x8F,
        0x91,
        0x93,
        0x9E,
        0xA0,
        0xA8,
        0xAA,
        0xAF,
        0xC0,
    ]
)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_opcodes, st.binary(min_size=15, max_size=15), st.binary(max_size=2048), st.booleans())
def test_random_commands_always_get_an_answer(
    opcode: int, rest: bytes, data: bytes, read_only: bool
) -> None:
    lu, disk = unit(MemoryDisk(size=64 * BS, max_write=16 * BS))
    disk.read_only = read_only
    before = bytes(disk.data)
    result = run(lu, bytes((opcode,)) + rest, data, nexus=A if read_only else B)
    assert result.status in (
        s.Status.GOOD,
        s.Status.CHECK_CONDITION,
        s.Status.RESERVATION_CONFLICT,
    )
    if result.status == s.Status.CHECK_CONDITION:
        assert result.sense[0] == 0x70 or result.sense[0] == 0xF0
        assert result.sense[2] & 0x0F != 0x4  # never HARDWARE ERROR: no bug was hit
        assert bytes(disk.data) == before  # a refused command changed nothing
    if read_only:
        assert bytes(disk.data) == before
