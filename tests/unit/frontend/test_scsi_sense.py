"""Sense data as initiators parse it: fixed format (70h) and descriptor format (72h)."""

from __future__ import annotations

import pytest

from blockmirror.errors import BlockmirrorError, CommandError
from blockmirror.frontend import scsi_sense as s


def parse_fixed(data: bytes) -> dict[str, int | None]:
    """An independent reading of SPC-4 4.5.3 fixed-format sense data."""
    assert len(data) >= 18
    assert data[0] & 0x7F == 0x70
    sksv = data[15] & 0x80
    return {
        "valid": data[0] >> 7,
        "key": data[2] & 0x0F,
        "information": int.from_bytes(data[3:7], "big"),
        "additional_length": data[7],
        "asc": data[12],
        "ascq": data[13],
        "cd": (data[15] >> 6) & 1 if sksv else None,
        "bpv": (data[15] >> 3) & 1 if sksv else None,
        "bit": data[15] & 0x07 if sksv else None,
        "field": int.from_bytes(data[16:18], "big") if sksv else None,
    }


def test_fixed_format_without_extras() -> None:
    data = s.Sense(s.LBA_OUT_OF_RANGE).fixed()
    assert len(data) == s.FIXED_SENSE_SIZE
    got = parse_fixed(data)
    assert (got["key"], got["asc"], got["ascq"]) == (0x5, 0x21, 0x00)
    assert got["valid"] == 0 and got["information"] == 0
    assert got["additional_length"] == 10
    assert got["field"] is None


def test_field_pointer_in_cdb_with_a_bit() -> None:
    exc = s.invalid_cdb(1, 7, "RDPROTECT")
    assert exc.status is s.Status.CHECK_CONDITION
    assert exc.sense is not None
    got = parse_fixed(exc.sense.fixed())
    assert (got["key"], got["asc"], got["ascq"]) == (0x5, 0x24, 0x00)
    assert (got["cd"], got["bpv"], got["bit"], got["field"]) == (1, 1, 7, 1)


def test_field_pointer_in_parameter_list_without_a_bit() -> None:
    exc = s.invalid_parameter(300)
    assert exc.sense is not None
    got = parse_fixed(exc.sense.fixed())
    assert (got["asc"], got["ascq"]) == (0x26, 0x00)
    assert (got["cd"], got["bpv"], got["field"]) == (0, 0, 300)


def test_information_sets_valid() -> None:
    got = parse_fixed(s.Sense(s.MISCOMPARE_DURING_VERIFY, information=1234).fixed())
    assert got["valid"] == 1
    assert got["information"] == 1234
    assert got["key"] == 0xE


def test_descriptor_format_carries_the_same() -> None:
    sense = s.Sense(s.INVALID_FIELD_IN_CDB, 77, s.FieldPointer(True, 4, 1))
    data = sense.descriptor()
    assert data[0] == 0x72
    assert (data[1], data[2], data[3]) == (0x5, 0x24, 0x00)
    assert data[7] == len(data) - 8
    descriptors = {}
    at = 8
    while at < len(data):
        kind, size = data[at], data[at + 1]
        descriptors[kind] = data[at + 2 : at + 2 + size]
        at += 2 + size
    assert at == len(data)
    assert descriptors[0x00][0] & 0x80  # VALID
    assert int.from_bytes(descriptors[0x00][2:10], "big") == 77
    sks = descriptors[0x02][2:5]
    assert sks[0] == 0x80 | 0x40 | 0x08 | 1
    assert int.from_bytes(sks[1:3], "big") == 4


def test_descriptor_format_of_no_sense_is_the_header() -> None:
    assert s.Sense(s.NO_SENSE).descriptor() == bytes((0x72, 0, 0, 0, 0, 0, 0, 0))


def test_status_without_sense() -> None:
    exc = s.reservation_conflict()
    assert exc.status == 0x18 and exc.sense is None
    assert "reservation conflict" in str(exc)


def test_one_hierarchy() -> None:
    with pytest.raises(BlockmirrorError):
        raise s.ScsiError.check(s.WRITE_PROTECTED)
    assert issubclass(s.ScsiError, CommandError)
    assert str(s.ScsiError.check(s.WRITE_PROTECTED)) == "DATA_PROTECT 27/00"


@pytest.mark.parametrize(
    ("code", "key", "asc", "ascq"),
    [
        (s.INVALID_COMMAND_OPERATION_CODE, 0x5, 0x20, 0x00),
        (s.PARAMETER_LIST_LENGTH_ERROR, 0x5, 0x1A, 0x00),
        (s.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT, 0x5, 0x0E, 0x03),
        (s.LOGICAL_UNIT_NOT_SUPPORTED, 0x5, 0x25, 0x00),
        (s.WRITE_PROTECTED, 0x7, 0x27, 0x00),
        (s.SPACE_ALLOCATION_FAILED_WRITE_PROTECT, 0x7, 0x27, 0x07),
        (s.UNRECOVERED_READ_ERROR, 0x3, 0x11, 0x00),
        (s.WRITE_ERROR, 0x3, 0x0C, 0x00),
        (s.NOT_READY_CAUSE_NOT_REPORTABLE, 0x2, 0x04, 0x00),
        (s.POWER_ON_RESET_OCCURRED, 0x6, 0x29, 0x00),
        (s.BUS_DEVICE_RESET_OCCURRED, 0x6, 0x29, 0x03),
        (s.REGISTRATIONS_PREEMPTED, 0x6, 0x2A, 0x05),
    ],
)
def test_the_codes_we_answer_with(code: s.SenseCode, key: int, asc: int, ascq: int) -> None:
    got = parse_fixed(s.Sense(code).fixed())
    assert (got["key"], got["asc"], got["ascq"]) == (key, asc, ascq)
