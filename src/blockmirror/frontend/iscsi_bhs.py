"""The 48-byte basic header segment and the AHS of each iSCSI PDU (RFC 7143 sections 11.2-11.18).

Every BHS shares one frame: byte 0 the opcode (and I, the immediate bit), byte 1 the flags
(F first), bytes 2-3 opcode-specific, byte 4 TotalAHSLength in 4-byte words, bytes 5-7
DataSegmentLength, bytes 8-15 the LUN (or ISID and TSIH for a login), 16-19 the Initiator Task
Tag, then seven 32-bit words whose meaning depends on the opcode. :func:`pack_header` and
:func:`unpack_header` map each dataclass of :mod:`iscsi_pdu` onto that frame, opcode by
opcode, so that each can be read against its section of the RFC.

Encoding checks every field's range (a value that does not fit is a bug in the caller:
ValueError). Decoding ignores reserved bits and fields, as section 11.2 asks of a receiver, but
refuses reserved code values in defined fields and data segments where the RFC allows none,
with the Reject reason the RFC gives (:class:`IscsiPduError`).
"""

from __future__ import annotations

import struct

from blockmirror.errors import IscsiPduError
from blockmirror.frontend.iscsi_pdu import (
    R2T,
    RESERVED_TAG,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Opcode,
    Pdu,
    Reject,
    RejectReason,
    ScsiCommand,
    ScsiResponse,
    Segment,
    Snack,
    SnackType,
    TaskAttribute,
    TaskRequest,
    TaskResponse,
    TextRequest,
    TextResponse,
    payload,
    segment_length,
)

_BHS = struct.Struct(">BBBBIQI7I")
_WORDS = 7
_CDB_FIELD = 16  # the CDB field of a SCSI Command (bytes 32-47); longer CDBs go to an AHS
_AHS_HEAD = struct.Struct(">HB")
AHS_EXTENDED_CDB = 1
AHS_BIDI_READ_LENGTH = 2
_AHS_EXTENSIONS = range(60, 64)  # non-iSCSI extensions: skipped, never refused
_MAX_AHS_BYTES = 255 * 4
_ATTRIBUTES = frozenset(TaskAttribute)
_LOGOUT_REASONS = frozenset(LogoutReason)
_SNACK_TYPES = frozenset(SnackType)
_NO_DATA = frozenset(
    {
        Opcode.TASK_REQUEST,
        Opcode.LOGOUT_REQUEST,
        Opcode.SNACK,
        Opcode.TASK_RESPONSE,
        Opcode.LOGOUT_RESPONSE,
        Opcode.R2T,
    }
)

F_BIT = 0x80
I_BIT = 0x40

# Bytes 0 to 3, bytes 8-15 (LUN, or ISID and TSIH), the ITT, and words 20-47.
Fields = tuple[int, int, int, int, int, int, tuple[int, ...]]


def _fit(pdu: Pdu, name: str, value: int, bits: int) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{type(pdu).__name__}.{name} = {value}: outside 0..2**{bits}-1")
    return value


def _words(pdu: Pdu, *items: str | int) -> tuple[int, ...]:
    """Words 20-47: a name is the PDU's 32-bit field of that name; an int is a word already
    assembled (and checked) by the caller; missing words are reserved zeros."""
    values = tuple(
        _fit(pdu, item, getattr(pdu, item), 32) if isinstance(item, str) else item for item in items
    )
    return values + (0,) * (_WORDS - len(values))


_SEQ = ("stat_sn", "exp_cmd_sn", "max_cmd_sn")


def _op(pdu: Pdu, immediate: bool = False) -> int:
    return int(pdu.OPCODE) | (I_BIT if immediate else 0)


def _flags(*bits: tuple[bool, int]) -> int:
    return sum(bit for on, bit in bits if on)


def _login_flags(pdu: LoginRequest | LoginResponse) -> int:
    if pdu.transit and pdu.cont:
        raise ValueError(f"{type(pdu).__name__}: transit and cont are exclusive")
    stages = _fit(pdu, "csg", pdu.csg, 2) << 2 | _fit(pdu, "nsg", pdu.nsg, 2)
    return _flags((pdu.transit, F_BIT), (pdu.cont, 0x40)) | stages


def _text_flags(pdu: TextRequest | TextResponse) -> int:
    if pdu.final and pdu.cont:
        raise ValueError(f"{type(pdu).__name__}: final and cont are exclusive")
    return _flags((pdu.final, F_BIT), (pdu.cont, 0x40))


def _isid_tsih(pdu: LoginRequest | LoginResponse) -> int:
    return _fit(pdu, "isid", pdu.isid, 48) << 16 | _fit(pdu, "tsih", pdu.tsih, 16)


def _high16(pdu: Pdu, name: str) -> int:
    return _fit(pdu, name, getattr(pdu, name), 16) << 16


def _byte(pdu: Pdu, name: str) -> int:
    return _fit(pdu, name, getattr(pdu, name), 8)


def _fields(pdu: Pdu) -> tuple[Fields, bytes]:
    """The BHS fields of ``pdu`` and its AHS bytes (empty but for long CDBs and bidi reads)."""
    match pdu:
        case NopOut():
            w = _words(pdu, "ttt", "cmd_sn", "exp_stat_sn")
            return (_op(pdu, pdu.immediate), F_BIT, 0, 0, pdu.lun, pdu.itt, w), b""
        case ScsiCommand():
            return _command_fields(pdu)
        case TaskRequest():
            flags = F_BIT | _fit(pdu, "function", pdu.function, 7)
            names = ("referenced_task_tag", "cmd_sn", "exp_stat_sn", "ref_cmd_sn", "exp_data_sn")
            w = _words(pdu, *names)
            return (_op(pdu, pdu.immediate), flags, 0, 0, pdu.lun, pdu.itt, w), b""
        case LoginRequest():
            w = _words(pdu, _high16(pdu, "cid"), "cmd_sn", "exp_stat_sn")
            b2, b3 = _byte(pdu, "version_max"), _byte(pdu, "version_min")
            # The I bit is always 1 on a Login Request (section 11.12).
            q = _isid_tsih(pdu)
            return (_op(pdu, True), _login_flags(pdu), b2, b3, q, pdu.itt, w), b""
        case TextRequest():
            w = _words(pdu, "ttt", "cmd_sn", "exp_stat_sn")
            return (_op(pdu, pdu.immediate), _text_flags(pdu), 0, 0, pdu.lun, pdu.itt, w), b""
        case DataOut():
            w = _words(pdu, "ttt", 0, "exp_stat_sn", 0, "data_sn", "buffer_offset")
            flags = F_BIT if pdu.final else 0
            return (_op(pdu), flags, 0, 0, pdu.lun, pdu.itt, w), b""
        case LogoutRequest():
            flags = F_BIT | _fit(pdu, "reason", pdu.reason, 7)
            w = _words(pdu, _high16(pdu, "cid"), "cmd_sn", "exp_stat_sn")
            return (_op(pdu, pdu.immediate), flags, 0, 0, 0, pdu.itt, w), b""
        case Snack():
            flags = F_BIT | _fit(pdu, "type", pdu.type, 4)
            w = _words(pdu, "ttt", 0, "exp_stat_sn", 0, 0, "beg_run", "run_length")
            return (_op(pdu), flags, 0, 0, pdu.lun, pdu.itt, w), b""
    return _target_fields(pdu), b""


def _command_fields(pdu: ScsiCommand) -> tuple[Fields, bytes]:
    if pdu.attribute not in _ATTRIBUTES:
        raise ValueError(f"ScsiCommand.attribute = {pdu.attribute}: reserved")
    if not 0 < len(pdu.cdb) < _CDB_FIELD + 0xFFFF:
        raise ValueError(f"ScsiCommand.cdb: {len(pdu.cdb)} bytes")
    flags = _flags((pdu.final, F_BIT), (pdu.read, 0x40), (pdu.write, 0x20)) | pdu.attribute
    ahs = b""
    if len(pdu.cdb) > _CDB_FIELD:
        ahs += _ahs(AHS_EXTENDED_CDB, b"\0" + pdu.cdb[_CDB_FIELD:])
    if pdu.bidi_read_length is not None:
        bidi = _fit(pdu, "bidi_read_length", pdu.bidi_read_length, 32)
        ahs += _ahs(AHS_BIDI_READ_LENGTH, b"\0" + struct.pack(">I", bidi))
    cdb = struct.unpack(">4I", pdu.cdb[:_CDB_FIELD].ljust(_CDB_FIELD, b"\0"))
    w = _words(pdu, "expected_length", "cmd_sn", "exp_stat_sn", *cdb)
    return (_op(pdu, pdu.immediate), flags, 0, 0, pdu.lun, pdu.itt, w), ahs


def _target_fields(pdu: Pdu) -> Fields:
    match pdu:
        case NopIn():
            return _op(pdu), F_BIT, 0, 0, pdu.lun, pdu.itt, _words(pdu, "ttt", *_SEQ)
        case ScsiResponse():
            if (pdu.overflow and pdu.underflow) or (pdu.bidi_overflow and pdu.bidi_underflow):
                raise ValueError("ScsiResponse: overflow and underflow are exclusive")
            flags = F_BIT | _flags(
                (pdu.bidi_overflow, 0x10),
                (pdu.bidi_underflow, 0x08),
                (pdu.overflow, 0x04),
                (pdu.underflow, 0x02),
            )
            names = ("exp_data_sn", "bidi_residual_count", "residual_count")
            w = _words(pdu, "snack_tag", *_SEQ, *names)
            b2, b3 = _byte(pdu, "response"), _byte(pdu, "status")
            return _op(pdu), flags, b2, b3, 0, pdu.itt, w
        case TaskResponse():
            w = _words(pdu, 0, *_SEQ)
            return _op(pdu), F_BIT, _byte(pdu, "response"), 0, 0, pdu.itt, w
        case LoginResponse():
            status = _byte(pdu, "status_class") << 24 | _byte(pdu, "status_detail") << 16
            w = _words(pdu, 0, *_SEQ, status)
            b2, b3 = _byte(pdu, "version_max"), _byte(pdu, "version_active")
            return _op(pdu), _login_flags(pdu), b2, b3, _isid_tsih(pdu), pdu.itt, w
        case TextResponse():
            if pdu.final != (pdu.ttt == RESERVED_TAG):
                raise ValueError("TextResponse: ttt is RESERVED_TAG exactly when final")
            w = _words(pdu, "ttt", *_SEQ)
            return _op(pdu), _text_flags(pdu), 0, 0, pdu.lun, pdu.itt, w
        case DataIn():
            return _data_in_fields(pdu)
        case LogoutResponse():
            times = _high16(pdu, "time2wait") | _fit(pdu, "time2retain", pdu.time2retain, 16)
            w = _words(pdu, 0, *_SEQ, 0, times)
            return _op(pdu), F_BIT, _byte(pdu, "response"), 0, 0, pdu.itt, w
        case R2T():
            w = _words(pdu, "ttt", *_SEQ, "r2t_sn", "buffer_offset", "desired_length")
            return _op(pdu), F_BIT, 0, 0, pdu.lun, pdu.itt, w
        case AsyncMessage():
            event = (
                _byte(pdu, "event") << 24
                | _byte(pdu, "vcode") << 16
                | _fit(pdu, "parameter1", pdu.parameter1, 16)
            )
            params = _high16(pdu, "parameter2") | _fit(pdu, "parameter3", pdu.parameter3, 16)
            w = _words(pdu, 0, *_SEQ, event, params)
            return _op(pdu), F_BIT, 0, 0, pdu.lun, RESERVED_TAG, w
        case Reject():
            w = _words(pdu, 0, *_SEQ, "data_sn")
            return _op(pdu), F_BIT, _byte(pdu, "reason"), 0, 0, RESERVED_TAG, w
    raise TypeError(f"not an iSCSI PDU: {pdu!r}")


def _data_in_fields(pdu: DataIn) -> Fields:
    has_status = pdu.status is not None
    if has_status and not pdu.final:
        raise ValueError("DataIn: a status (S) rides only on the final Data-In")
    if (pdu.overflow or pdu.underflow) and not has_status:
        raise ValueError("DataIn: overflow/underflow are meaningful only with a status")
    if pdu.overflow and pdu.underflow:
        raise ValueError("DataIn: overflow and underflow are exclusive")
    flags = _flags(
        (pdu.final, F_BIT),
        (pdu.acknowledge, 0x40),
        (pdu.overflow, 0x04),
        (pdu.underflow, 0x02),
        (has_status, 0x01),
    )
    status = _fit(pdu, "status", pdu.status, 8) if pdu.status is not None else 0
    # StatSN is reserved without a status: sent as 0, so that a connection may stamp every
    # outgoing PDU alike.
    stat_sn = _fit(pdu, "stat_sn", pdu.stat_sn, 32) if has_status else 0
    names = ("data_sn", "buffer_offset", "residual_count")
    w = _words(pdu, "ttt", stat_sn, "exp_cmd_sn", "max_cmd_sn", *names)
    return _op(pdu), flags, 0, status, pdu.lun, pdu.itt, w


def _ahs(ahs_type: int, specific: bytes) -> bytes:
    raw = _AHS_HEAD.pack(len(specific), ahs_type) + specific
    return raw + bytes(-len(raw) % 4)


def data_of(pdu: Pdu) -> Segment:
    """The data segment ``pdu`` carries (a Reject's is the rejected header)."""
    if isinstance(pdu, Reject):
        return (pdu.header,)
    data: Segment = getattr(pdu, "data", ())
    return data


def pack_header(pdu: Pdu) -> tuple[bytes, Segment]:
    """The BHS and AHS of ``pdu`` as one bytes object, and its data segment (not copied)."""
    (b0, b1, b2, b3, q, itt, w), ahs = _fields(pdu)
    data = data_of(pdu)
    length = segment_length(data)
    if length >= 1 << 24:
        raise ValueError(f"{type(pdu).__name__}: data segment of {length} bytes")
    if len(ahs) > _MAX_AHS_BYTES:
        raise ValueError(f"{type(pdu).__name__}: {len(ahs)} bytes of AHS")
    _fit(pdu, "lun", q, 64)
    _fit(pdu, "itt", itt, 32)
    lengths = (len(ahs) // 4) << 24 | length
    return _BHS.pack(b0, b1, b2, b3, lengths, q, itt, *w) + ahs, data


# --- decoding ---------------------------------------------------------------------------------


def header_lengths(bhs: bytes | memoryview) -> tuple[int, int]:
    """TotalAHSLength in bytes and DataSegmentLength, from the first 8 bytes of a BHS."""
    (lengths,) = struct.unpack_from(">I", bhs, 4)
    return (lengths >> 24) * 4, lengths & 0xFFFFFF


def _refuse(bhs: bytes, reason: RejectReason, message: str) -> IscsiPduError:
    return IscsiPduError(message, reject_reason=reason, header=bhs)


def unpack_header(bhs: bytes, ahs: bytes, data: Segment) -> Pdu:
    """The PDU whose BHS is ``bhs`` (48 bytes), with its AHS and its data segment.

    The opcode must be one :mod:`iscsi_pdu` knows (the framing layer has checked the
    direction). Raises :class:`IscsiPduError` with the Reject reason for reserved code values
    and for data where the opcode carries none.
    """
    b0, b1, b2, b3, _lengths, q, itt, *w = _BHS.unpack(bhs)
    opcode = Opcode(b0 & 0x3F)
    immediate = bool(b0 & I_BIT)
    final = bool(b1 & F_BIT)
    if opcode in _NO_DATA and data:
        raise _refuse(bhs, RejectReason.PROTOCOL_ERROR, f"{opcode.name} with a data segment")
    match opcode:
        case Opcode.NOP_OUT:
            return NopOut(
                itt=itt, ttt=w[0], lun=q, cmd_sn=w[1], exp_stat_sn=w[2], immediate=immediate,
                data=data,
            )  # fmt: skip
        case Opcode.SCSI_COMMAND:
            return _unpack_command(bhs, ahs, data)
        case Opcode.TASK_REQUEST:
            return TaskRequest(
                itt=itt, function=b1 & 0x7F, referenced_task_tag=w[0], lun=q, cmd_sn=w[1],
                exp_stat_sn=w[2], ref_cmd_sn=w[3], exp_data_sn=w[4], immediate=immediate,
            )  # fmt: skip
        case Opcode.LOGIN_REQUEST:
            return LoginRequest(
                isid=q >> 16, tsih=q & 0xFFFF, itt=itt, cid=w[0] >> 16, cmd_sn=w[1],
                exp_stat_sn=w[2], csg=(b1 >> 2) & 3, nsg=b1 & 3, transit=final,
                cont=bool(b1 & 0x40), version_max=b2, version_min=b3, data=data,
            )  # fmt: skip
        case Opcode.TEXT_REQUEST:
            return TextRequest(
                itt=itt, ttt=w[0], lun=q, cmd_sn=w[1], exp_stat_sn=w[2], final=final,
                cont=bool(b1 & 0x40), immediate=immediate, data=data,
            )  # fmt: skip
        case Opcode.DATA_OUT:
            return DataOut(
                itt=itt, ttt=w[0], lun=q, exp_stat_sn=w[2], data_sn=w[4], buffer_offset=w[5],
                final=final, data=data,
            )  # fmt: skip
        case Opcode.LOGOUT_REQUEST:
            if b1 & 0x7F not in _LOGOUT_REASONS:
                raise _refuse(bhs, RejectReason.PROTOCOL_ERROR, f"logout reason {b1 & 0x7F}")
            return LogoutRequest(
                itt=itt, reason=b1 & 0x7F, cid=w[0] >> 16, cmd_sn=w[1], exp_stat_sn=w[2],
                immediate=immediate,
            )  # fmt: skip
        case Opcode.SNACK:
            if b1 & 0x0F not in _SNACK_TYPES:
                raise _refuse(bhs, RejectReason.PROTOCOL_ERROR, f"SNACK type {b1 & 0x0F}")
            return Snack(
                itt=itt, type=b1 & 0x0F, ttt=w[0], lun=q, exp_stat_sn=w[2], beg_run=w[5],
                run_length=w[6],
            )  # fmt: skip
    return _unpack_target(opcode, bhs, data)


def _unpack_target(opcode: Opcode, bhs: bytes, data: Segment) -> Pdu:
    _b0, b1, b2, b3, _lengths, q, itt, *w = _BHS.unpack(bhs)
    final = bool(b1 & F_BIT)
    seq = {"stat_sn": w[1], "exp_cmd_sn": w[2], "max_cmd_sn": w[3]}
    match opcode:
        case Opcode.NOP_IN:
            return NopIn(itt=itt, ttt=w[0], lun=q, data=data, **seq)
        case Opcode.SCSI_RESPONSE:
            return ScsiResponse(
                itt=itt, status=b3, response=b2, bidi_overflow=bool(b1 & 0x10),
                bidi_underflow=bool(b1 & 0x08), overflow=bool(b1 & 0x04),
                underflow=bool(b1 & 0x02), snack_tag=w[0], exp_data_sn=w[4],
                bidi_residual_count=w[5], residual_count=w[6], data=data, **seq,
            )  # fmt: skip
        case Opcode.TASK_RESPONSE:
            return TaskResponse(itt=itt, response=b2, **seq)
        case Opcode.LOGIN_RESPONSE:
            return LoginResponse(
                isid=q >> 16, tsih=q & 0xFFFF, itt=itt, csg=(b1 >> 2) & 3, nsg=b1 & 3,
                transit=final, cont=bool(b1 & 0x40), version_max=b2, version_active=b3,
                status_class=w[4] >> 24, status_detail=(w[4] >> 16) & 0xFF, data=data, **seq,
            )  # fmt: skip
        case Opcode.TEXT_RESPONSE:
            return TextResponse(
                itt=itt, ttt=w[0], lun=q, final=final, cont=bool(b1 & 0x40), data=data, **seq
            )
        case Opcode.DATA_IN:
            has_status = bool(b1 & 0x01)
            seq["stat_sn"] = w[1] if has_status else 0
            return DataIn(
                itt=itt, ttt=w[0], lun=q, data_sn=w[4], buffer_offset=w[5], final=final,
                acknowledge=bool(b1 & 0x40), status=b3 if has_status else None,
                overflow=bool(b1 & 0x04), underflow=bool(b1 & 0x02), residual_count=w[6],
                data=data, **seq,
            )  # fmt: skip
        case Opcode.LOGOUT_RESPONSE:
            return LogoutResponse(
                itt=itt, response=b2, time2wait=w[5] >> 16, time2retain=w[5] & 0xFFFF, **seq
            )
        case Opcode.R2T:
            return R2T(
                itt=itt, ttt=w[0], r2t_sn=w[4], buffer_offset=w[5], desired_length=w[6], lun=q,
                **seq,
            )  # fmt: skip
        case Opcode.ASYNC_MESSAGE:
            return AsyncMessage(
                event=w[4] >> 24, vcode=(w[4] >> 16) & 0xFF, parameter1=w[4] & 0xFFFF,
                parameter2=w[5] >> 16, parameter3=w[5] & 0xFFFF, lun=q, data=data, **seq,
            )  # fmt: skip
        case Opcode.REJECT:
            return Reject(reason=b2, header=payload(data), data_sn=w[4], **seq)
    raise _refuse(bhs, RejectReason.COMMAND_NOT_SUPPORTED, f"opcode {opcode:#04x}")


def _unpack_command(bhs: bytes, ahs: bytes, data: Segment) -> ScsiCommand:
    b0, b1, _b2, _b3, _lengths, q, itt, *w = _BHS.unpack(bhs)
    attribute = b1 & 0x07
    if attribute not in _ATTRIBUTES:
        raise _refuse(bhs, RejectReason.PROTOCOL_ERROR, f"reserved task attribute {attribute}")
    extended, bidi = _unpack_ahs(bhs, ahs)
    return ScsiCommand(
        itt=itt, cdb=bhs[32:48] + extended, lun=q, expected_length=w[0], cmd_sn=w[1],
        exp_stat_sn=w[2], read=bool(b1 & 0x40), write=bool(b1 & 0x20), final=bool(b1 & F_BIT),
        attribute=attribute, immediate=bool(b0 & I_BIT), bidi_read_length=bidi, data=data,
    )  # fmt: skip


def _unpack_ahs(bhs: bytes, ahs: bytes) -> tuple[bytes, int | None]:
    """The Extended CDB bytes and the bidirectional read length a command's AHS carries."""
    extended: bytes | None = None
    bidi: int | None = None
    pos = 0
    while pos < len(ahs):
        if pos + _AHS_HEAD.size > len(ahs):
            raise _refuse(bhs, RejectReason.PROTOCOL_ERROR, "AHS header truncated")
        length, ahs_type = _AHS_HEAD.unpack_from(ahs, pos)
        start = pos + _AHS_HEAD.size
        end = start + length
        padded = pos + ((_AHS_HEAD.size + length + 3) & ~3)
        if padded > len(ahs):
            raise _refuse(bhs, RejectReason.PROTOCOL_ERROR, "AHS longer than TotalAHSLength")
        specific = ahs[start:end]
        if ahs_type == AHS_EXTENDED_CDB:
            # One reserved byte, then the CDB bytes beyond the 16 of the BHS.
            if extended is not None or length < 2:
                raise _refuse(bhs, RejectReason.INVALID_PDU_FIELD, "bad Extended CDB AHS")
            extended = specific[1:]
        elif ahs_type == AHS_BIDI_READ_LENGTH:
            if bidi is not None or length != 5:
                raise _refuse(bhs, RejectReason.INVALID_PDU_FIELD, "bad bidirectional AHS")
            (bidi,) = struct.unpack(">I", specific[1:5])
        elif ahs_type not in _AHS_EXTENSIONS:
            raise _refuse(bhs, RejectReason.PROTOCOL_ERROR, f"reserved AHS type {ahs_type}")
        pos = padded
    return extended or b"", bidi
