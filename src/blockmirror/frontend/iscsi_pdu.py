"""iSCSI PDUs as typed values (RFC 7143 section 11), both directions, and serial numbers.

One frozen dataclass per opcode a target meets: what an initiator sends (NOP-Out, SCSI
Command, Task Management Function Request, Login, Text, SCSI Data-Out, Logout, SNACK) and what
a target answers (NOP-In, SCSI Response, Task Management Response, Login, Text, SCSI Data-In,
Logout, R2T, Asynchronous Message, Reject). Fields keep the RFC's names in snake case; every
keyword has a default but the ones that identify the PDU, so a reply is built by naming what
matters. The byte layout is :mod:`iscsi_bhs`; framing, digests and the stream reader are
:mod:`iscsi_framing`.

The data segment is a tuple of buffers. A received PDU's are views of the bytes the socket
delivered (no copy: a SCSI write goes to one vectored write); a PDU to send may carry any
buffers, which the encoder hands on without copying. :func:`payload` joins them when a copy is
wanted (login and text keys, which are small).

The numbers a target stamps on each PDU as it goes out (StatSN, ExpCmdSN, MaxCmdSN) default to
0 so that the layer building a reply need not know them: the connection sets them with
:func:`dataclasses.replace` in sending order (their arithmetic is :mod:`iscsi_serial`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar

Buffer = bytes | bytearray | memoryview
Segment = tuple[Buffer, ...]

BHS_SIZE = 48
DIGEST_SIZE = 4
# "Reserved" tag value: an ITT or TTT that names no task (RFC 7143 section 11.2.1.8).
RESERVED_TAG = 0xFFFFFFFF
# The largest data segment a PDU can announce (24 bits), whatever was negotiated.
MAX_SEGMENT = (1 << 24) - 1
# During login, before MaxRecvDataSegmentLength applies, each side takes 8192 bytes per PDU.
LOGIN_SEGMENT = 8192


class Opcode(enum.IntEnum):
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class RejectReason(enum.IntEnum):
    """Reason codes of a Reject PDU (section 11.17.1); 0x01 and 0x0b are never sent."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class Stage(enum.IntEnum):
    """CSG and NSG of a login (section 11.12.3); 2 is reserved."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class TaskAttribute(enum.IntEnum):
    """ATTR of a SCSI Command (section 11.3.1.2); 5 to 7 are reserved."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class TaskFunction(enum.IntEnum):
    """Task management functions (section 11.5.1). A PDU keeps the raw number: an unknown one
    is answered "function not supported" by the SCSI layer, not refused as a frame."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TaskResponseCode(enum.IntEnum):
    COMPLETE = 0
    NO_SUCH_TASK = 1
    NO_SUCH_LUN = 2
    TASK_ALLEGIANT = 3
    NO_REASSIGNMENT = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class LogoutReason(enum.IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


class LogoutResponseCode(enum.IntEnum):
    CLOSED = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class SnackType(enum.IntEnum):
    DATA_R2T = 0
    STATUS = 1
    DATA_ACK = 2
    RDATA = 3


class ScsiResponseCode(enum.IntEnum):
    COMMAND_COMPLETED = 0x00
    TARGET_FAILURE = 0x01


class AsyncEvent(enum.IntEnum):
    SCSI_EVENT = 0
    LOGOUT_REQUEST = 1
    DROP_CONNECTION = 2
    DROP_ALL_CONNECTIONS = 3
    RENEGOTIATE = 4
    VENDOR = 255


def payload(data: Segment) -> bytes:
    """The data segment as one bytes object (a copy; for small segments such as text)."""
    if len(data) == 1 and isinstance(data[0], bytes):
        return data[0]
    return b"".join(data)


def segment_length(data: Segment) -> int:
    return sum(memoryview(b).nbytes for b in data)


def sense_segment(sense: bytes) -> bytes:
    """A SCSI Response's data segment for ``sense``: SenseLength (2 bytes), then the sense."""
    return struct.pack(">H", len(sense)) + sense


# --- initiator to target --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NopOut:
    OPCODE: ClassVar[Opcode] = Opcode.NOP_OUT
    itt: int = RESERVED_TAG  # RESERVED_TAG: no NOP-In wanted (an answer to the target's ping)
    ttt: int = RESERVED_TAG  # the target's ping being answered, or RESERVED_TAG
    lun: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    immediate: bool = False
    data: Segment = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiCommand:
    OPCODE: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    itt: int
    cdb: bytes  # 16 bytes and more; longer CDBs travel in an Extended CDB AHS
    lun: int = 0
    expected_length: int = 0  # Expected Data Transfer Length
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    read: bool = False
    write: bool = False
    final: bool = True  # no unsolicited Data-Out follows
    attribute: int = TaskAttribute.SIMPLE
    immediate: bool = False
    bidi_read_length: int | None = None  # Bidirectional Read Expected Data-Transfer Length AHS
    data: Segment = ()  # immediate data


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRequest:
    OPCODE: ClassVar[Opcode] = Opcode.TASK_REQUEST
    itt: int
    function: int  # TaskFunction, kept raw
    referenced_task_tag: int = RESERVED_TAG
    lun: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    ref_cmd_sn: int = 0
    exp_data_sn: int = 0
    immediate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginRequest:
    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    isid: int  # 48 bits
    itt: int = 0
    tsih: int = 0  # 0: a new session; otherwise the session a connection joins
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    csg: int = Stage.SECURITY  # raw: 2 is reserved and refused by the login, not the frame
    nsg: int = Stage.SECURITY
    transit: bool = False
    cont: bool = False
    version_max: int = 0
    version_min: int = 0
    data: Segment = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TextRequest:
    OPCODE: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    itt: int
    ttt: int = RESERVED_TAG  # RESERVED_TAG: a new request; else continues the target's answer
    lun: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    final: bool = True
    cont: bool = False
    immediate: bool = False
    data: Segment = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DataOut:
    OPCODE: ClassVar[Opcode] = Opcode.DATA_OUT
    itt: int
    ttt: int = RESERVED_TAG  # the R2T's tag, or RESERVED_TAG for unsolicited data
    lun: int = 0
    exp_stat_sn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0
    final: bool = True
    data: Segment = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LogoutRequest:
    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    itt: int
    reason: int = LogoutReason.CLOSE_SESSION
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    immediate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Snack:
    """Decoded so that it can be refused: at ErrorRecoveryLevel 0 the answer is a Reject
    (PROTOCOL_ERROR); retransmission is not offered."""

    OPCODE: ClassVar[Opcode] = Opcode.SNACK
    itt: int
    type: int = SnackType.DATA_R2T
    ttt: int = RESERVED_TAG  # the SNACK Tag for DataACK and R-Data SNACKs
    lun: int = 0
    exp_stat_sn: int = 0
    beg_run: int = 0
    run_length: int = 0


# --- target to initiator --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NopIn:
    OPCODE: ClassVar[Opcode] = Opcode.NOP_IN
    itt: int = RESERVED_TAG  # the NOP-Out answered; RESERVED_TAG for the target's own ping
    ttt: int = RESERVED_TAG  # our ping's tag (an answer is wanted), else RESERVED_TAG
    lun: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data: Segment = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiResponse:
    OPCODE: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    itt: int
    status: int = 0  # SCSI status (GOOD 0x00, CHECK CONDITION 0x02, ...)
    response: int = ScsiResponseCode.COMMAND_COMPLETED
    overflow: bool = False  # O: residual_count is what did not fit
    underflow: bool = False  # U: residual_count is what was not transferred
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    residual_count: int = 0
    bidi_residual_count: int = 0
    snack_tag: int = 0
    exp_data_sn: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data: Segment = ()  # sense_segment(sense) on CHECK CONDITION


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskResponse:
    OPCODE: ClassVar[Opcode] = Opcode.TASK_RESPONSE
    itt: int
    response: int = TaskResponseCode.COMPLETE
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginResponse:
    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    isid: int
    itt: int = 0
    tsih: int = 0
    csg: int = Stage.SECURITY
    nsg: int = Stage.SECURITY
    transit: bool = False
    cont: bool = False
    version_max: int = 0
    version_active: int = 0
    status_class: int = 0
    status_detail: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data: Segment = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TextResponse:
    OPCODE: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    itt: int
    ttt: int = RESERVED_TAG  # RESERVED_TAG exactly when final
    lun: int = 0
    final: bool = True
    cont: bool = False
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data: Segment = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DataIn:
    OPCODE: ClassVar[Opcode] = Opcode.DATA_IN
    itt: int
    ttt: int = RESERVED_TAG  # a tag only when acknowledgement (A) is asked, at ERL > 0
    lun: int = 0
    data_sn: int = 0
    buffer_offset: int = 0
    final: bool = True
    acknowledge: bool = False
    status: int | None = None  # S: the SCSI status rides on the last Data-In (final too)
    overflow: bool = False
    underflow: bool = False
    residual_count: int = 0
    stat_sn: int = 0  # meaningful only with a status
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data: Segment = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LogoutResponse:
    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    itt: int
    response: int = LogoutResponseCode.CLOSED
    time2wait: int = 0
    time2retain: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class R2T:
    OPCODE: ClassVar[Opcode] = Opcode.R2T
    itt: int
    ttt: int
    r2t_sn: int = 0
    buffer_offset: int = 0
    desired_length: int = 0  # Desired Data Transfer Length
    lun: int = 0
    stat_sn: int = 0  # not advanced by an R2T: the current StatSN
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncMessage:
    OPCODE: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    event: int
    vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    lun: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data: Segment = ()  # sense data for a SCSI event


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    OPCODE: ClassVar[Opcode] = Opcode.REJECT
    reason: int
    header: bytes  # the rejected PDU's basic header segment (48 bytes); the data segment
    data_sn: int = 0  # DataSN/R2TSN, when a data or R2T SNACK is rejected
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0


InitiatorPdu = (
    NopOut
    | ScsiCommand
    | TaskRequest
    | LoginRequest
    | TextRequest
    | DataOut
    | LogoutRequest
    | Snack
)
TargetPdu = (
    NopIn
    | ScsiResponse
    | TaskResponse
    | LoginResponse
    | TextResponse
    | DataIn
    | LogoutResponse
    | R2T
    | AsyncMessage
    | Reject
)
Pdu = InitiatorPdu | TargetPdu

INITIATOR_OPCODES = frozenset(
    {
        Opcode.NOP_OUT,
        Opcode.SCSI_COMMAND,
        Opcode.TASK_REQUEST,
        Opcode.LOGIN_REQUEST,
        Opcode.TEXT_REQUEST,
        Opcode.DATA_OUT,
        Opcode.LOGOUT_REQUEST,
        Opcode.SNACK,
    }
)
TARGET_OPCODES = frozenset(set(Opcode) - INITIATOR_OPCODES)
