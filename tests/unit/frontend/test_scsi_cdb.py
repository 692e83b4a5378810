"""CDB decoding: valid CDBs (built by an encoder written here from SPC-4/SBC-3) round-trip; any
bytes give a typed command or a ScsiError, never anything else; bad fields are pointed at."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.frontend import scsi_cdb as c
from blockmirror.frontend.scsi_pr import PrInAction, PrOutAction
from blockmirror.frontend.scsi_sense import FieldPointer, ScsiError

# --- an independent encoder -------------------------------------------------------------------

_RW = {  # opcodes by (kind, size)
    ("read", 10): 0x28,
    ("read", 12): 0xA8,
    ("read", 16): 0x88,
    ("write", 10): 0x2A,
    ("write", 12): 0xAA,
    ("write", 16): 0x8A,
    ("verify", 10): 0x2F,
    ("verify", 12): 0xAF,
    ("verify", 16): 0x8F,
}


def _lba_len(size: int, lba: int, blocks: int) -> bytes:
    """Bytes 2.. of a 10/12/16-byte READ/WRITE/VERIFY, up to (not including) the control."""
    if size == 10:
        return struct.pack(">IBH", lba, 0, blocks)
    if size == 12:
        return struct.pack(">IIB", lba, blocks, 0)
    return struct.pack(">QIB", lba, blocks, 0)


def encode(cmd: c.Command, size: int = 0) -> bytes:
    """A CDB for ``cmd`` (``size`` picks among the 6/10/12/16-byte forms)."""
    if isinstance(cmd, c.TestUnitReady):
        return bytes(6)
    if isinstance(cmd, c.RequestSense):
        return bytes((0x03, int(cmd.descriptor), 0, 0, cmd.allocation, 0))
    if isinstance(cmd, c.Inquiry):
        return struct.pack(">BBBHB", 0x12, int(cmd.evpd), cmd.page, cmd.allocation, 0)
    if isinstance(cmd, c.ReportLuns):
        return struct.pack(">BBBBBBIBB", 0xA0, 0, cmd.select, 0, 0, 0, cmd.allocation, 0, 0)
    if isinstance(cmd, c.ReadCapacity10):
        return bytes((0x25,)) + bytes(9)
    if isinstance(cmd, c.ReadCapacity16):
        return struct.pack(">BBQIBB", 0x9E, 0x10, 0, cmd.allocation, 0, 0)
    if isinstance(cmd, c.GetLbaStatus):
        return struct.pack(">BBQIBB", 0x9E, 0x12, cmd.lba, cmd.allocation, 0, 0)
    if isinstance(cmd, c.Read | c.Write) and size == 6:
        op = 0x08 if isinstance(cmd, c.Read) else 0x0A
        lba = cmd.lba.to_bytes(3, "big")
        return bytes((op, lba[0], lba[1], lba[2], cmd.blocks & 0xFF, 0))
    if isinstance(cmd, c.Read | c.Write):
        kind = "read" if isinstance(cmd, c.Read) else "write"
        flags = (0x08 if cmd.fua else 0) | (0x10 if cmd.dpo else 0)
        return bytes((_RW[kind, size], flags)) + _lba_len(size, cmd.lba, cmd.blocks) + b"\0"
    if isinstance(cmd, c.Verify):
        flags = cmd.bytchk << 1 | (0x10 if cmd.dpo else 0)
        return bytes((_RW["verify", size], flags)) + _lba_len(size, cmd.lba, cmd.blocks) + b"\0"
    if isinstance(cmd, c.WriteSame):
        flags = (0x08 if cmd.unmap else 0) | (0x01 if cmd.ndob else 0)
        if size == 10:
            return struct.pack(">BBIBHB", 0x41, flags, cmd.lba, 0, cmd.blocks, 0)
        return struct.pack(">BBQIBB", 0x93, flags, cmd.lba, cmd.blocks, 0, 0)
    if isinstance(cmd, c.Unmap):
        return struct.pack(">BBIBHB", 0x42, 0, 0, 0, cmd.parameter_length, 0)
    if isinstance(cmd, c.SynchronizeCache):
        flags = 0x02 if cmd.immed else 0
        if size == 10:
            return struct.pack(">BBIBHB", 0x35, flags, cmd.lba, 0, cmd.blocks, 0)
        return struct.pack(">BBQIBB", 0x91, flags, cmd.lba, cmd.blocks, 0, 0)
    if isinstance(cmd, c.ModeSense):
        page = cmd.control << 6 | cmd.page
        flags = (0x08 if cmd.dbd else 0) | (0x10 if cmd.llbaa else 0)
        if cmd.ten:
            return struct.pack(
                ">BBBBBBBHB", 0x5A, flags, page, cmd.subpage, 0, 0, 0, cmd.allocation, 0
            )
        return bytes((0x1A, flags, page, cmd.subpage, cmd.allocation, 0))
    if isinstance(cmd, c.StartStopUnit):
        b4 = cmd.power_condition << 4 | cmd.no_flush << 2 | cmd.loej << 1 | cmd.start
        return bytes((0x1B, int(cmd.immed), 0, 0, b4, 0))
    if isinstance(cmd, c.PersistentReserveIn):
        return struct.pack(">BBBBBBBHB", 0x5E, cmd.action, 0, 0, 0, 0, 0, cmd.allocation, 0)
    if isinstance(cmd, c.PersistentReserveOut):
        scope_type = cmd.scope << 4 | cmd.type
        return struct.pack(">BBBBBIB", 0x5F, cmd.action, scope_type, 0, 0, cmd.parameter_length, 0)
    raise AssertionError(cmd)


# --- strategies of valid commands, with the CDB size each is encoded in -----------------------

u8, u16, u32, u64 = (st.integers(0, 2**n - 1) for n in (8, 16, 32, 64))
_LEN_FIELD = {10: 7, 12: 6, 16: 10}
_LBA_MAX = {10: 2**32 - 1, 12: 2**32 - 1, 16: 2**64 - 1}
_LEN_MAX = {10: 2**16 - 1, 12: 2**32 - 1, 16: 2**32 - 1}


@st.composite
def rw(draw: st.DrawFn) -> tuple[c.Command, int]:
    size = draw(st.sampled_from((6, 10, 12, 16)))
    read = draw(st.booleans())
    if size == 6:
        lba, blocks, fua, dpo, field = (
            draw(st.integers(0, 2**21 - 1)),
            draw(st.integers(1, 256)),
            False,
            False,
            4,
        )
    else:
        lba, blocks = draw(st.integers(0, _LBA_MAX[size])), draw(st.integers(0, _LEN_MAX[size]))
        fua, dpo, field = draw(st.booleans()), draw(st.booleans()), _LEN_FIELD[size]
    if read:
        return c.Read(lba, blocks, fua, dpo, field), size
    return c.Write(lba, blocks, fua, dpo, field), size


@st.composite
def verify(draw: st.DrawFn) -> tuple[c.Command, int]:
    size = draw(st.sampled_from((10, 12, 16)))
    lba = draw(st.integers(0, _LBA_MAX[size]))
    blocks = draw(st.integers(0, _LEN_MAX[size]))
    bytchk = draw(st.sampled_from((0, 1, 3)))
    return c.Verify(lba, blocks, bytchk, draw(st.booleans()), _LEN_FIELD[size]), size


@st.composite
def ranged(draw: st.DrawFn) -> tuple[c.Command, int]:
    size = draw(st.sampled_from((10, 16)))
    lba = draw(st.integers(0, _LBA_MAX[size]))
    blocks = draw(st.integers(0, _LEN_MAX[size]))
    if draw(st.booleans()):
        ndob = size == 16 and draw(st.booleans())
        return c.WriteSame(lba, blocks, draw(st.booleans()), ndob, _LEN_FIELD[size]), size
    return c.SynchronizeCache(lba, blocks, draw(st.booleans())), size


@st.composite
def mode_sense(draw: st.DrawFn) -> tuple[c.Command, int]:
    ten = draw(st.booleans())
    return c.ModeSense(
        page=draw(st.integers(0, 63)),
        subpage=draw(u8),
        control=draw(st.integers(0, 3)),
        dbd=draw(st.booleans()),
        llbaa=ten and draw(st.booleans()),
        allocation=draw(u16 if ten else u8),
        ten=ten,
    ), 0


@st.composite
def inquiry(draw: st.DrawFn) -> tuple[c.Command, int]:
    evpd = draw(st.booleans())
    return c.Inquiry(evpd, draw(u8) if evpd else 0, draw(u16)), 0


simple = st.one_of(
    st.just(c.TestUnitReady()),
    st.just(c.ReadCapacity10()),
    st.builds(c.RequestSense, st.booleans(), u8),
    st.builds(c.ReportLuns, st.sampled_from((0, 1, 2)), u32),
    st.builds(c.ReadCapacity16, u32),
    st.builds(c.GetLbaStatus, u64, u32),
    st.builds(c.Unmap, u16),
    st.builds(
        c.StartStopUnit,
        st.booleans(),
        st.integers(0, 15),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    st.builds(c.PersistentReserveIn, st.sampled_from(PrInAction), u16),
    st.builds(
        c.PersistentReserveOut,
        st.sampled_from(PrOutAction),
        st.integers(0, 15),
        st.integers(0, 15),
        st.just(24),
    ),
).map(lambda cmd: (cmd, 0))

commands = st.one_of(simple, rw(), verify(), ranged(), mode_sense(), inquiry())


@settings(max_examples=600, deadline=None)
@given(commands, st.binary(max_size=16))
def test_valid_cdbs_round_trip(case: tuple[c.Command, int], tail: bytes) -> None:
    cmd, size = case
    cdb = encode(cmd, size)
    assert len(cdb) == c.cdb_length(cdb[0])
    # An iSCSI CDB field is 16 bytes: whatever follows the command's own length is ignored.
    assert c.decode(cdb + tail) == cmd
    assert c.decode(memoryview(cdb)) == cmd


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=20))
def test_any_bytes_give_a_command_or_a_scsi_error(cdb: bytes) -> None:
    try:
        cmd = c.decode(cdb)
    except ScsiError as exc:
        assert exc.status == 0x02
        assert exc.sense is not None
    else:
        assert isinstance(cmd, c.Command)
        assert c.data_out_length(cmd, 512) >= 0
        assert c.data_in_length(cmd, 512) >= 0


@given(st.integers(0, 255))
def test_every_opcode_is_decoded_or_refused_as_unknown(opcode: int) -> None:
    cdb = bytes((opcode,)) + bytes(15)
    try:
        c.decode(cdb)
    except ScsiError as exc:
        assert exc.sense is not None
        known = opcode in {int(o) for o in c.Opcode}
        # A known opcode with an all-zero CDB may be refused for a field, never as unknown.
        assert (exc.sense.code.asc == 0x20) == (not known)


def pointer(cdb: bytes) -> FieldPointer | None:
    with pytest.raises(ScsiError) as info:
        c.decode(cdb)
    sense = info.value.sense
    assert sense is not None and sense.code.asc == 0x24, sense
    return sense.field


@pytest.mark.parametrize(
    ("cdb", "byte", "bit"),
    [
        (bytes((0x28, 0x20)) + bytes(8), 1, 7),  # READ(10) RDPROTECT
        (bytes((0x8A, 0xE0)) + bytes(14), 1, 7),  # WRITE(16) WRPROTECT
        (bytes((0x2F, 0x04)) + bytes(8), 1, 2),  # VERIFY(10) BYTCHK 10b
        (bytes((0x12, 0x00, 0x83, 0, 0xFF, 0)), 2, None),  # INQUIRY page without EVPD
        (bytes((0x12, 0x02, 0, 0, 0xFF, 0)), 1, 1),  # INQUIRY CMDDT
        (bytes((0x9E, 0x11)) + bytes(14), 1, 4),  # SERVICE ACTION IN, unknown action
        (bytes((0x5E, 0x04)) + bytes(8), 1, 4),  # PR IN service action 4
        (bytes((0x5F, 0x07, 0, 0, 0, 0, 0, 0, 24, 0)), 1, 4),  # REGISTER AND MOVE
        (bytes((0xA0, 0, 0x03)) + bytes(9), 2, None),  # REPORT LUNS select 3
        (bytes((0x41, 0x10)) + bytes(8), 1, 4),  # WRITE SAME ANCHOR
        (bytes((0x41, 0x04)) + bytes(8), 1, 2),  # WRITE SAME PBDATA
        (bytes((0x42, 0x01)) + bytes(8), 1, 0),  # UNMAP ANCHOR
        (bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0)), 2, None),  # READ CAPACITY LBA without PMI
        (bytes((0x00, 0, 0, 0, 0, 0x04)), 5, 2),  # NACA in the control byte
        (bytes((0x28,)) + bytes(8) + b"\x01", 9, 0),  # LINK in the control byte
    ],
)
def test_invalid_fields_are_pointed_at(cdb: bytes, byte: int, bit: int | None) -> None:
    assert pointer(cdb) == FieldPointer(True, byte, bit)


def test_unknown_and_short_cdbs() -> None:
    with pytest.raises(ScsiError) as info:
        c.decode(bytes((0xC0,)) + bytes(15))
    assert info.value.sense is not None and info.value.sense.code.asc == 0x20
    with pytest.raises(ScsiError):
        c.decode(b"")
    with pytest.raises(ScsiError):
        c.decode(bytes((0x88,)) + bytes(9))  # READ(16) cut to 10 bytes


def test_pr_out_parameter_list_length_must_be_24() -> None:
    with pytest.raises(ScsiError) as info:
        c.decode(bytes((0x5F, 0, 0, 0, 0, 0, 0, 0, 25, 0)))
    assert info.value.sense is not None
    assert (info.value.sense.code.asc, info.value.sense.code.ascq) == (0x1A, 0x00)


def test_six_byte_transfer_length_zero_is_256_blocks() -> None:
    assert c.decode(bytes((0x08, 0, 0, 1, 0, 0))) == c.Read(1, 256, False, False, 4)


@pytest.mark.parametrize(
    ("cmd", "out", "into"),
    [
        (c.Write(0, 8, False, False, 7), 8 * 512, 0),
        (c.Read(0, 8, False, False, 7), 0, 8 * 512),
        (c.WriteSame(0, 100, False, False, 7), 512, 0),
        (c.WriteSame(0, 100, True, True, 10), 0, 0),
        (c.Verify(0, 4, 0, False, 7), 0, 0),
        (c.Verify(0, 4, 1, False, 7), 4 * 512, 0),
        (c.Verify(0, 4, 3, False, 7), 512, 0),
        (c.Verify(0, 0, 3, False, 7), 0, 0),
        (c.Unmap(24), 24, 0),
        (c.Inquiry(True, 0x83, 255), 0, 255),
        (c.ReadCapacity10(), 0, 8),
        (c.ModeSense(0x3F, 0, 0, False, False, 192, True), 0, 192),
        (c.PersistentReserveOut(PrOutAction.REGISTER, 0, 0, 24), 24, 0),
        (c.TestUnitReady(), 0, 0),
    ],
)
def test_transfer_sizes(cmd: c.Command, out: int, into: int) -> None:
    assert c.data_out_length(cmd, 512) == out
    assert c.data_in_length(cmd, 512) == into
