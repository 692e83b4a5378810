"""SCSI command descriptor blocks decoded into typed commands (SPC-4, SBC-3), sans-I/O.

:func:`decode` takes the CDB bytes (an iSCSI command's 16-byte field, or longer: anything past
the command's own length is ignored) and returns one frozen dataclass per command, or raises
:class:`~blockmirror.frontend.scsi_sense.ScsiError`: INVALID COMMAND OPERATION CODE for a command
we do not implement, INVALID FIELD IN CDB with the byte and bit of the offending field for one
we do. What is checked here is what the CDB alone decides (reserved values, protection fields we
do not support, the control byte); what depends on the logical unit (capacity, the largest
transfer, the mode pages it has) is checked by the executor, which gets ``length_field`` to
point at when a transfer is too long.

:func:`data_out_length` and :func:`data_in_length` tell a transport up front how many bytes a
command moves, in and out, for a given block size.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from blockmirror.frontend.scsi_pr import PrInAction, PrOutAction
from blockmirror.frontend.scsi_sense import (
    INVALID_COMMAND_OPERATION_CODE,
    PARAMETER_LIST_LENGTH_ERROR,
    ScsiError,
    invalid_cdb,
)

Buffer = bytes | bytearray | memoryview

# A PERSISTENT RESERVE OUT parameter list without SPEC_I_PT or REGISTER AND MOVE is 24 bytes.
PR_OUT_PARAMETER_LENGTH = 24


class Opcode(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    VERIFY_12 = 0xAF


SA_READ_CAPACITY_16 = 0x10
SA_GET_LBA_STATUS = 0x12
REPORT_LUNS_SELECTS = frozenset({0x00, 0x01, 0x02})


@dataclass(frozen=True, slots=True)
class TestUnitReady:
    __test__: ClassVar[bool] = False  # not a pytest class, whatever its name says


@dataclass(frozen=True, slots=True)
class RequestSense:
    descriptor: bool
    allocation: int


@dataclass(frozen=True, slots=True)
class Inquiry:
    evpd: bool
    page: int
    allocation: int


@dataclass(frozen=True, slots=True)
class ReportLuns:
    select: int
    allocation: int


@dataclass(frozen=True, slots=True)
class ReadCapacity10:
    pass


@dataclass(frozen=True, slots=True)
class ReadCapacity16:
    allocation: int


@dataclass(frozen=True, slots=True)
class GetLbaStatus:
    lba: int
    allocation: int


@dataclass(frozen=True, slots=True)
class Read:
    lba: int
    blocks: int
    fua: bool
    dpo: bool
    length_field: int  # byte offset of TRANSFER LENGTH, for the field pointer


@dataclass(frozen=True, slots=True)
class Write:
    lba: int
    blocks: int
    fua: bool
    dpo: bool
    length_field: int


@dataclass(frozen=True, slots=True)
class WriteSame:
    lba: int
    blocks: int
    unmap: bool
    ndob: bool  # no data-out buffer: the block is zeros (WRITE SAME(16) only)
    length_field: int


@dataclass(frozen=True, slots=True)
class Unmap:
    parameter_length: int


@dataclass(frozen=True, slots=True)
class SynchronizeCache:
    lba: int
    blocks: int  # 0: to the end of the medium
    immed: bool


@dataclass(frozen=True, slots=True)
class Verify:
    lba: int
    blocks: int
    bytchk: int  # 0: medium only, 1: compare the data-out, 3: compare one block with each
    dpo: bool
    length_field: int


@dataclass(frozen=True, slots=True)
class ModeSense:
    page: int
    subpage: int
    control: int  # 0 current, 1 changeable, 2 default, 3 saved
    dbd: bool
    llbaa: bool
    allocation: int
    ten: bool  # MODE SENSE(10): the longer header


@dataclass(frozen=True, slots=True)
class StartStopUnit:
    immed: bool
    power_condition: int
    no_flush: bool
    loej: bool
    start: bool


@dataclass(frozen=True, slots=True)
class PersistentReserveIn:
    action: PrInAction
    allocation: int


@dataclass(frozen=True, slots=True)
class PersistentReserveOut:
    action: PrOutAction
    scope: int
    type: int
    parameter_length: int


Command = (
    TestUnitReady
    | RequestSense
    | Inquiry
    | ReportLuns
    | ReadCapacity10
    | ReadCapacity16
    | GetLbaStatus
    | Read
    | Write
    | WriteSame
    | Unmap
    | SynchronizeCache
    | Verify
    | ModeSense
    | StartStopUnit
    | PersistentReserveIn
    | PersistentReserveOut
)


def cdb_length(opcode: int) -> int:
    """The CDB length its group code gives (SPC-4 4.2.5.1); 0 for the variable or vendor ones."""
    return (6, 10, 10, 0, 16, 12, 0, 0)[opcode >> 5]


def decode(cdb: Buffer) -> Command:
    """The command ``cdb`` asks for. Raises ScsiError."""
    if not cdb:
        raise invalid_cdb(0, None, "empty CDB")
    opcode = cdb[0]
    decoder = _DECODERS.get(opcode)
    if decoder is None:
        raise ScsiError.check(INVALID_COMMAND_OPERATION_CODE, f"opcode {opcode:#04x}")
    size = cdb_length(opcode)
    if len(cdb) < size:
        raise invalid_cdb(len(cdb), None, f"a {size}-byte CDB cut to {len(cdb)} bytes")
    c = bytes(cdb[:size])
    control = c[size - 1]
    # NACA asks for ACA, which we do not support (SAM-5 5.9); LINK is obsolete.
    if control & 0x04:
        raise invalid_cdb(size - 1, 2, "NACA is not supported")
    if control & 0x01:
        raise invalid_cdb(size - 1, 0, "linked commands are not supported")
    return decoder(c)


def data_out_length(command: Command, block_size: int) -> int:
    """How many bytes of data-out ``command`` takes."""
    if isinstance(command, Write):
        return command.blocks * block_size
    if isinstance(command, WriteSame):
        return 0 if command.ndob else block_size
    if isinstance(command, Verify):
        if command.blocks == 0:
            return 0
        return {0: 0, 1: command.blocks * block_size, 3: block_size}[command.bytchk]
    if isinstance(command, Unmap | PersistentReserveOut):
        return command.parameter_length
    return 0


def data_in_length(command: Command, block_size: int) -> int:
    """The most data-in ``command`` may return (its allocation or transfer length)."""
    if isinstance(command, Read):
        return command.blocks * block_size
    if isinstance(command, ReadCapacity10):
        return 8
    if isinstance(command, RequestSense | Inquiry | ReportLuns | ReadCapacity16 | GetLbaStatus):
        return command.allocation
    if isinstance(command, ModeSense | PersistentReserveIn):
        return command.allocation
    return 0


# --- the decoders, one per opcode (c is exactly the CDB's own length) ---------------------------


def _u16(c: bytes, at: int) -> int:
    return int.from_bytes(c[at : at + 2], "big")


def _u32(c: bytes, at: int) -> int:
    return int.from_bytes(c[at : at + 4], "big")


def _u64(c: bytes, at: int) -> int:
    return int(struct.unpack_from(">Q", c, at)[0])


def _no_protection(c: bytes, what: str) -> None:
    # RDPROTECT / WRPROTECT / VRPROTECT (byte 1, bits 7-5): we format without protection
    # information, so any nonzero value is invalid (SBC-3 5.13).
    if c[1] & 0xE0:
        raise invalid_cdb(1, 7, f"{what} is not supported (no protection information)")


def _test_unit_ready(c: bytes) -> Command:
    return TestUnitReady()


def _request_sense(c: bytes) -> Command:
    return RequestSense(descriptor=bool(c[1] & 0x01), allocation=c[4])


def _inquiry(c: bytes) -> Command:
    if c[1] & 0x02:
        raise invalid_cdb(1, 1, "CMDDT is obsolete")
    evpd = bool(c[1] & 0x01)
    if not evpd and c[2]:
        raise invalid_cdb(2, None, "a page code without EVPD")
    return Inquiry(evpd=evpd, page=c[2], allocation=_u16(c, 3))


def _report_luns(c: bytes) -> Command:
    if c[2] not in REPORT_LUNS_SELECTS:
        raise invalid_cdb(2, None, f"SELECT REPORT {c[2]:#04x}")
    return ReportLuns(select=c[2], allocation=_u32(c, 6))


def _read_capacity_10(c: bytes) -> Command:
    if not c[8] & 0x01 and _u32(c, 2):
        raise invalid_cdb(2, None, "an LBA without PMI")
    return ReadCapacity10()


def _service_action_in(c: bytes) -> Command:
    action = c[1] & 0x1F
    if action == SA_READ_CAPACITY_16:
        if not c[14] & 0x01 and _u64(c, 2):
            raise invalid_cdb(2, None, "an LBA without PMI")
        return ReadCapacity16(allocation=_u32(c, 10))
    if action == SA_GET_LBA_STATUS:
        return GetLbaStatus(lba=_u64(c, 2), allocation=_u32(c, 10))
    raise invalid_cdb(1, 4, f"SERVICE ACTION IN(16) service action {action:#04x}")


def _read_6(c: bytes) -> Command:
    # A transfer length of 0 means 256 blocks in the 6-byte commands (SBC-3 5.15).
    lba = (c[1] & 0x1F) << 16 | _u16(c, 2)
    return Read(lba=lba, blocks=c[4] or 256, fua=False, dpo=False, length_field=4)


def _write_6(c: bytes) -> Command:
    lba = (c[1] & 0x1F) << 16 | _u16(c, 2)
    return Write(lba=lba, blocks=c[4] or 256, fua=False, dpo=False, length_field=4)


def _rw_flags(c: bytes, what: str) -> tuple[bool, bool]:
    _no_protection(c, what)
    return bool(c[1] & 0x08), bool(c[1] & 0x10)  # FUA, DPO (RARC and FUA_NV are hints)


# Where READ, WRITE and VERIFY(10/12/16) keep the LBA and the transfer length: (offset, size).
_LAYOUTS = {10: ((2, 4), (7, 2)), 12: ((2, 4), (6, 4)), 16: ((2, 8), (10, 4))}


def _lba_and_length(c: bytes) -> tuple[int, int, int]:
    (lba_at, lba_size), (len_at, len_size) = _LAYOUTS[len(c)]
    lba = int.from_bytes(c[lba_at : lba_at + lba_size], "big")
    return lba, int.from_bytes(c[len_at : len_at + len_size], "big"), len_at


def _read(c: bytes) -> Command:
    fua, dpo = _rw_flags(c, "RDPROTECT")
    lba, blocks, field = _lba_and_length(c)
    return Read(lba, blocks, fua, dpo, field)


def _write(c: bytes) -> Command:
    fua, dpo = _rw_flags(c, "WRPROTECT")
    lba, blocks, field = _lba_and_length(c)
    return Write(lba, blocks, fua, dpo, field)


def _write_same_flags(c: bytes) -> bool:
    _no_protection(c, "WRPROTECT")
    if c[1] & 0x10:
        raise invalid_cdb(1, 4, "ANCHOR is not supported")  # ANC_SUP=0 in VPD page B2h
    if c[1] & 0x06:
        raise invalid_cdb(1, 2 if c[1] & 0x04 else 1, "PBDATA and LBDATA are obsolete")
    return bool(c[1] & 0x08)


def _write_same_10(c: bytes) -> Command:
    unmap = _write_same_flags(c)
    return WriteSame(_u32(c, 2), _u16(c, 7), unmap, False, 7)


def _write_same_16(c: bytes) -> Command:
    unmap = _write_same_flags(c)
    return WriteSame(_u64(c, 2), _u32(c, 10), unmap, bool(c[1] & 0x01), 10)


def _unmap(c: bytes) -> Command:
    if c[1] & 0x01:
        raise invalid_cdb(1, 0, "ANCHOR is not supported")
    return Unmap(parameter_length=_u16(c, 7))


def _synchronize_cache_10(c: bytes) -> Command:
    return SynchronizeCache(_u32(c, 2), _u16(c, 7), bool(c[1] & 0x02))


def _synchronize_cache_16(c: bytes) -> Command:
    return SynchronizeCache(_u64(c, 2), _u32(c, 10), bool(c[1] & 0x02))


def _verify(c: bytes) -> Command:
    _no_protection(c, "VRPROTECT")
    bytchk = (c[1] >> 1) & 0x03
    if bytchk == 2:
        raise invalid_cdb(1, 2, "BYTCHK 10b is reserved")
    lba, blocks, field = _lba_and_length(c)
    return Verify(lba, blocks, bytchk, bool(c[1] & 0x10), field)


def _mode_sense_6(c: bytes) -> Command:
    return ModeSense(c[2] & 0x3F, c[3], c[2] >> 6, bool(c[1] & 0x08), False, c[4], False)


def _mode_sense_10(c: bytes) -> Command:
    dbd, llbaa = bool(c[1] & 0x08), bool(c[1] & 0x10)
    return ModeSense(c[2] & 0x3F, c[3], c[2] >> 6, dbd, llbaa, _u16(c, 7), True)


def _start_stop_unit(c: bytes) -> Command:
    return StartStopUnit(
        immed=bool(c[1] & 0x01),
        power_condition=c[4] >> 4,
        no_flush=bool(c[4] & 0x04),
        loej=bool(c[4] & 0x02),
        start=bool(c[4] & 0x01),
    )


def _persistent_reserve_in(c: bytes) -> Command:
    action = c[1] & 0x1F
    try:
        return PersistentReserveIn(PrInAction(action), _u16(c, 7))
    except ValueError:
        raise invalid_cdb(1, 4, f"PERSISTENT RESERVE IN service action {action:#04x}") from None


def _persistent_reserve_out(c: bytes) -> Command:
    action = c[1] & 0x1F
    try:
        pr_action = PrOutAction(action)
    except ValueError:
        raise invalid_cdb(1, 4, f"PERSISTENT RESERVE OUT service action {action:#04x}") from None
    length = _u32(c, 5)
    # Neither SPEC_I_PT nor REGISTER AND MOVE is supported, so every list is the basic one
    # (SPC-4 6.16.3); refusing here also spares the transport from soliciting a long one.
    if length != PR_OUT_PARAMETER_LENGTH:
        raise ScsiError.check(
            PARAMETER_LIST_LENGTH_ERROR, f"a {length}-byte PERSISTENT RESERVE OUT list"
        )
    return PersistentReserveOut(pr_action, c[2] >> 4, c[2] & 0x0F, length)


_DECODERS: dict[int, Callable[[bytes], Command]] = {
    Opcode.TEST_UNIT_READY: _test_unit_ready,
    Opcode.REQUEST_SENSE: _request_sense,
    Opcode.READ_6: _read_6,
    Opcode.WRITE_6: _write_6,
    Opcode.INQUIRY: _inquiry,
    Opcode.MODE_SENSE_6: _mode_sense_6,
    Opcode.START_STOP_UNIT: _start_stop_unit,
    Opcode.READ_CAPACITY_10: _read_capacity_10,
    Opcode.READ_10: _read,
    Opcode.WRITE_10: _write,
    Opcode.VERIFY_10: _verify,
    Opcode.SYNCHRONIZE_CACHE_10: _synchronize_cache_10,
    Opcode.WRITE_SAME_10: _write_same_10,
    Opcode.UNMAP: _unmap,
    Opcode.MODE_SENSE_10: _mode_sense_10,
    Opcode.PERSISTENT_RESERVE_IN: _persistent_reserve_in,
    Opcode.PERSISTENT_RESERVE_OUT: _persistent_reserve_out,
    Opcode.READ_16: _read,
    Opcode.WRITE_16: _write,
    Opcode.VERIFY_16: _verify,
    Opcode.SYNCHRONIZE_CACHE_16: _synchronize_cache_16,
    Opcode.WRITE_SAME_16: _write_same_16,
    Opcode.SERVICE_ACTION_IN_16: _service_action_in,
    Opcode.REPORT_LUNS: _report_luns,
    Opcode.READ_12: _read,
    Opcode.WRITE_12: _write,
    Opcode.VERIFY_12: _verify,
}
