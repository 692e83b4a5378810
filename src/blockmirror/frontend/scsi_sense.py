"""SCSI status codes and sense data (SAM-5, SPC-4 section 4.5), sans-I/O.

A command that fails ends with a status (SAM-5 section 5.3) and, for CHECK CONDITION, sense data
saying why: a sense key, an additional sense code and qualifier (ASC/ASCQ), and optionally an
INFORMATION field (the offset of a VERIFY miscompare) and a sense-key-specific field pointer (the
byte and bit of the CDB or parameter list field that is wrong). :class:`ScsiError` carries all of
it from wherever the problem is found (the CDB decoder, the pages, the reservations, the
executor) to the one place that builds the answer.

Autosense is fixed format (response code 70h): the control mode page says D_SENSE=0, and every
initiator parses it. Descriptor format (72h) is produced only when REQUEST SENSE asks for it
(DESC=1). Only the codes blockmirror answers with are named here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

from blockmirror.errors import CommandError

FIXED_SENSE_SIZE = 18


class Status(enum.IntEnum):
    """SAM-5 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


class SenseCode(NamedTuple):
    """A sense key with its additional sense code and qualifier."""

    key: SenseKey
    asc: int
    ascq: int


_IR = SenseKey.ILLEGAL_REQUEST
_UA = SenseKey.UNIT_ATTENTION

NO_SENSE = SenseCode(SenseKey.NO_SENSE, 0x00, 0x00)
# ILLEGAL REQUEST: the command was refused before it changed anything.
INVALID_COMMAND_OPERATION_CODE = SenseCode(_IR, 0x20, 0x00)
LBA_OUT_OF_RANGE = SenseCode(_IR, 0x21, 0x00)
INVALID_FIELD_IN_CDB = SenseCode(_IR, 0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = SenseCode(_IR, 0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = SenseCode(_IR, 0x26, 0x00)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = SenseCode(_IR, 0x26, 0x04)
PARAMETER_LIST_LENGTH_ERROR = SenseCode(_IR, 0x1A, 0x00)
# The initiator's expected transfer length is shorter than the command needs (SPC-4 4.5.6).
INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT = SenseCode(_IR, 0x0E, 0x03)
SAVING_PARAMETERS_NOT_SUPPORTED = SenseCode(_IR, 0x39, 0x00)
INSUFFICIENT_REGISTRATION_RESOURCES = SenseCode(_IR, 0x55, 0x04)
# DATA PROTECT: a read-only logical unit, or a thin volume whose space ran out (SBC-3 4.7.3.6).
WRITE_PROTECTED = SenseCode(SenseKey.DATA_PROTECT, 0x27, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = SenseCode(SenseKey.DATA_PROTECT, 0x27, 0x07)
# MEDIUM ERROR: the store or the journal failed under the command.
UNRECOVERED_READ_ERROR = SenseCode(SenseKey.MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR = SenseCode(SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
MISCOMPARE_DURING_VERIFY = SenseCode(SenseKey.MISCOMPARE, 0x1D, 0x00)
INTERNAL_TARGET_FAILURE = SenseCode(SenseKey.HARDWARE_ERROR, 0x44, 0x00)
# NOT READY: the logical unit exists but cannot serve media access now.
NOT_READY_CAUSE_NOT_REPORTABLE = SenseCode(SenseKey.NOT_READY, 0x04, 0x00)
NOT_READY_BECOMING_READY = SenseCode(SenseKey.NOT_READY, 0x04, 0x01)
# UNIT ATTENTION: something happened that the initiator must hear about once.
POWER_ON_RESET_OCCURRED = SenseCode(_UA, 0x29, 0x00)
POWER_ON_OCCURRED = SenseCode(_UA, 0x29, 0x01)
BUS_DEVICE_RESET_OCCURRED = SenseCode(_UA, 0x29, 0x03)
I_T_NEXUS_LOSS_OCCURRED = SenseCode(_UA, 0x29, 0x07)
MODE_PARAMETERS_CHANGED = SenseCode(_UA, 0x2A, 0x01)
RESERVATIONS_PREEMPTED = SenseCode(_UA, 0x2A, 0x03)
RESERVATIONS_RELEASED = SenseCode(_UA, 0x2A, 0x04)
REGISTRATIONS_PREEMPTED = SenseCode(_UA, 0x2A, 0x05)
CAPACITY_DATA_HAS_CHANGED = SenseCode(_UA, 0x2A, 0x09)
REPORTED_LUNS_DATA_HAS_CHANGED = SenseCode(_UA, 0x3F, 0x0E)


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Which field is wrong (SPC-4 4.5.2.4.2): ``in_cdb`` (C/D bit) or in the parameter list,
    its ``byte``, and its most significant ``bit`` when the field is not whole bytes."""

    in_cdb: bool
    byte: int
    bit: int | None = None

    def encode(self) -> bytes:
        """The three sense-key-specific bytes, SKSV set."""
        flags = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            flags |= 0x08 | (self.bit & 0x07)
        return struct.pack(">BH", flags, self.byte & 0xFFFF)


@dataclass(frozen=True, slots=True)
class Sense:
    """Sense data of one CHECK CONDITION."""

    code: SenseCode
    information: int | None = None
    field: FieldPointer | None = None

    def fixed(self) -> bytes:
        """Fixed format, current error (response code 70h; 18 bytes)."""
        valid = 0x80 if self.information is not None else 0
        info = (self.information or 0) & 0xFFFFFFFF
        sks = self.field.encode() if self.field is not None else b"\0\0\0"
        return (
            struct.pack(
                ">BBBIBIBBB",
                0x70 | valid,
                0,
                self.code.key,
                info,
                FIXED_SENSE_SIZE - 8,
                0,
                self.code.asc,
                self.code.ascq,
                0,
            )
            + sks
        )

    def descriptor(self) -> bytes:
        """Descriptor format, current error (response code 72h)."""
        body = b""
        if self.information is not None:
            body += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, self.information)
        if self.field is not None:
            body += struct.pack(">BBBB", 0x02, 0x06, 0, 0) + self.field.encode() + b"\0"
        head = struct.pack(
            ">BBBBBBBB", 0x72, self.code.key, self.code.asc, self.code.ascq, 0, 0, 0, len(body)
        )
        return head + body


class ScsiError(CommandError):
    """A command ends with ``status`` (CHECK CONDITION with ``sense``, or a status that carries
    none, such as RESERVATION CONFLICT or BUSY)."""

    def __init__(self, status: Status, sense: Sense | None = None, message: str = "") -> None:
        super().__init__(message or _describe(status, sense))
        self.status = status
        self.sense = sense

    @classmethod
    def check(
        cls,
        code: SenseCode,
        message: str = "",
        *,
        information: int | None = None,
        field: FieldPointer | None = None,
    ) -> ScsiError:
        return cls(Status.CHECK_CONDITION, Sense(code, information, field), message)


def invalid_cdb(byte: int, bit: int | None = None, message: str = "") -> ScsiError:
    """ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at the field."""
    return ScsiError.check(INVALID_FIELD_IN_CDB, message, field=FieldPointer(True, byte, bit))


def invalid_parameter(byte: int, bit: int | None = None, message: str = "") -> ScsiError:
    """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing at the field."""
    return ScsiError.check(
        INVALID_FIELD_IN_PARAMETER_LIST, message, field=FieldPointer(False, byte, bit)
    )


def reservation_conflict(message: str = "") -> ScsiError:
    return ScsiError(Status.RESERVATION_CONFLICT, None, message or "reservation conflict")


def _describe(status: Status, sense: Sense | None) -> str:
    if sense is None:
        return status.name.lower().replace("_", " ")
    code = sense.code
    return f"{code.key.name} {code.asc:02X}/{code.ascq:02X}"
