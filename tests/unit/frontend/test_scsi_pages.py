"""What the target says about itself, read back with parsers written here from SPC-4/SBC-3."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror import __version__
from blockmirror.frontend import scsi_pages as p
from blockmirror.frontend.scsi_cdb import ModeSense
from blockmirror.frontend.scsi_pr import Nexus
from blockmirror.frontend.scsi_sense import ScsiError
from blockmirror.store.base import Extent

IDENT = p.Identity(volume_id="volume-7f3a")
GEOMETRY = p.Geometry(
    blocks=2048,
    block_size=512,
    max_transfer=65536,
    max_unmap=1 << 20,
    max_unmap_descriptors=256,
    unmap_granularity=8,
    max_write_same=65536,
    optimal_granularity=8,
)
NEXUS = Nexus("iqn.2026-01.org.example:host,i,0x23d000000001", "iqn.2026-01.org.bm:vol,t,0x0001", 3)


# --- independent parsers --------------------------------------------------------------------


def parse_standard_inquiry(data: bytes) -> dict[str, Any]:
    versions = [int.from_bytes(data[58 + 2 * i : 60 + 2 * i], "big") for i in range(8)]
    return {
        "qualifier": data[0] >> 5,
        "type": data[0] & 0x1F,
        "rmb": data[1] >> 7,
        "version": data[2],
        "hisup": (data[3] >> 4) & 1,
        "format": data[3] & 0x0F,
        "additional": data[4],
        "tpgs": (data[5] >> 4) & 3,
        "cmdque": (data[7] >> 1) & 1,
        "vendor": data[8:16].decode("ascii"),
        "product": data[16:32].decode("ascii"),
        "revision": data[32:36].decode("ascii"),
        "versions": [v for v in versions if v],
    }


def parse_vpd(data: bytes) -> tuple[int, bytes]:
    assert data[0] == 0x00  # peripheral qualifier 0, direct access
    length = int.from_bytes(data[2:4], "big")
    assert len(data) == 4 + length
    return data[1], data[4:]


def parse_designators(body: bytes) -> list[dict[str, Any]]:
    out = []
    at = 0
    while at < len(body):
        b0, b1, _, size = body[at : at + 4]
        out.append(
            {
                "protocol": b0 >> 4,
                "code_set": b0 & 0x0F,
                "piv": b1 >> 7,
                "association": (b1 >> 4) & 3,
                "type": b1 & 0x0F,
                "value": body[at + 4 : at + 4 + size],
            }
        )
        at += 4 + size
    assert at == len(body)
    return out


def parse_block_limits(body: bytes) -> dict[str, int]:
    assert len(body) == 0x3C
    names = (
        "wsnz",
        "max_caw",
        "opt_gran",
        "max_xfer",
        "opt_xfer",
        "max_prefetch",
        "max_unmap",
        "max_unmap_desc",
        "unmap_gran",
        "ugavalid_align",
        "max_ws",
    )
    return dict(zip(names, struct.unpack_from(">BBHIIIIIIIQ", body), strict=True))


def parse_mode(data: bytes, ten: bool) -> dict[str, Any]:
    if ten:
        length, medium, specific, longlba, _, bdl = struct.unpack_from(">HBBBBH", data)
        assert length == len(data) - 2
        at = 8
    else:
        length, medium, specific, bdl = struct.unpack_from(">BBBB", data)
        assert length == len(data) - 1
        longlba, at = 0, 4
    descriptor = data[at : at + bdl]
    at += bdl
    pages = {}
    while at < len(data):
        code, size = data[at] & 0x3F, data[at + 1]
        assert not data[at] & 0x40  # no subpage format
        pages[code] = data[at + 2 : at + 2 + size]
        at += 2 + size
    assert at == len(data)
    return {
        "wp": specific >> 7,
        "dpofua": (specific >> 4) & 1,
        "longlba": longlba,
        "descriptor": descriptor,
        "pages": pages,
        "medium": medium,
    }


# --- INQUIRY and VPD ------------------------------------------------------------------------


def test_standard_inquiry() -> None:
    data = p.standard_inquiry(IDENT)
    got = parse_standard_inquiry(data)
    assert got["additional"] == len(data) - 5
    assert (got["qualifier"], got["type"], got["rmb"]) == (0, 0, 0)
    assert got["version"] == 0x06  # SPC-4
    assert got["hisup"] == 1 and got["format"] == 2 and got["cmdque"] == 1
    assert got["tpgs"] == 0
    assert got["vendor"] == "BLKMIRR "
    assert got["product"].rstrip() == "blockmirror"
    assert __version__.startswith(got["revision"].rstrip())
    assert got["versions"] == [0x00A0, 0x0960, 0x0460, 0x04C0]  # SAM-5, iSCSI, SPC-4, SBC-3
    assert all(b == 0 or 0x20 <= b <= 0x7E for b in data[8:36])


def test_supported_vpd_pages_are_sorted_and_all_answer() -> None:
    code, body = parse_vpd(p.vpd_page(0x00, IDENT, GEOMETRY, None))
    assert code == 0x00
    assert list(body) == sorted(body)
    for page in body:
        assert parse_vpd(p.vpd_page(page, IDENT, GEOMETRY, NEXUS))[0] == page
    with pytest.raises(ScsiError):
        p.vpd_page(0x89, IDENT, GEOMETRY, None)


def test_unit_serial_number() -> None:
    _, body = parse_vpd(p.vpd_page(0x80, IDENT, GEOMETRY, None))
    assert body.decode("ascii") == IDENT.unit_serial
    assert body.isalnum()
    _, given_serial = parse_vpd(p.vpd_page(0x80, p.Identity("v", serial="SN-1"), GEOMETRY, None))
    assert given_serial == b"SN-1"


def test_device_identification_with_ports() -> None:
    _, body = parse_vpd(p.vpd_page(0x83, IDENT, GEOMETRY, NEXUS))
    ds = parse_designators(body)
    naa = next(d for d in ds if d["type"] == 3)
    assert (naa["association"], naa["code_set"], naa["piv"]) == (0, 1, 0)
    assert len(naa["value"]) == 16 and naa["value"][0] >> 4 == 6
    company = int.from_bytes(naa["value"][:4], "big") >> 4 & 0xFFFFFF
    assert company == p.DEFAULT_COMPANY_ID
    assert (company >> 16) & 0x03 == 0x02  # locally administered, not multicast
    t10 = next(d for d in ds if d["type"] == 1)
    assert t10["value"][:8] == b"BLKMIRR " and t10["code_set"] == 2
    rel = next(d for d in ds if d["type"] == 4)
    assert (rel["association"], rel["piv"], rel["protocol"]) == (1, 1, 5)
    assert int.from_bytes(rel["value"], "big") == 3
    names = {d["association"]: d["value"] for d in ds if d["type"] == 8}
    assert names[1].rstrip(b"\0") == NEXUS.target_port.encode()
    assert names[2].rstrip(b"\0") == b"iqn.2026-01.org.bm:vol"
    assert all(len(v) % 4 == 0 and v.endswith(b"\0") for v in names.values())


def test_device_identification_without_a_nexus_has_only_the_unit() -> None:
    _, body = parse_vpd(p.vpd_page(0x83, IDENT, GEOMETRY, None))
    assert {d["association"] for d in parse_designators(body)} == {0}


def test_naa_is_stable_and_per_volume() -> None:
    # Same identity (primary, replica, after a restart): same designator; another: another.
    assert p.naa_designator("volume-7f3a") == p.naa_designator("volume-7f3a")
    assert p.naa_designator("volume-7f3a") != p.naa_designator("volume-7f3b")
    assert p.naa_designator("x", 0x001122)[:4] != p.naa_designator("x")[:4]
    assert IDENT.unit_serial == p.Identity("volume-7f3a").unit_serial
    assert IDENT.unit_serial != p.Identity("volume-7f3b").unit_serial


def test_naa_derivation_is_pinned() -> None:
    # Written out once: the derivation must never change, or after an upgrade every host
    # would see every disk as a new one (multipath maps, cluster disks, udev by-id names).
    assert p.naa_designator("volume-7f3a").hex() == "6424d52796d36c72b306e10d6e89b1fc"


def test_block_limits() -> None:
    _, body = parse_vpd(p.vpd_page(0xB0, IDENT, GEOMETRY, None))
    got = parse_block_limits(body)
    assert got["wsnz"] == 1
    assert got["max_xfer"] == 65536 and got["max_ws"] == 65536
    assert got["max_unmap"] == 1 << 20 and got["max_unmap_desc"] == 256
    assert got["unmap_gran"] == 8 and got["ugavalid_align"] == 0x80000000
    assert got["opt_gran"] == 8 and got["max_caw"] == 0


def test_block_characteristics_and_provisioning() -> None:
    _, bdc = parse_vpd(p.vpd_page(0xB1, IDENT, GEOMETRY, None))
    assert int.from_bytes(bdc[0:2], "big") == 1  # non-rotating
    _, lbp = parse_vpd(p.vpd_page(0xB2, IDENT, GEOMETRY, None))
    assert len(lbp) == 4
    assert lbp[1] & 0xE0 == 0xE0  # LBPU, LBPWS, LBPWS10
    assert lbp[1] & 0x1C == 0 and lbp[1] & 0x02 == 0  # LBPRZ 0, no ANC_SUP
    assert lbp[2] & 0x07 == 2  # thin
    lbprz = _with(lbprz=True)
    assert parse_vpd(p.vpd_page(0xB2, IDENT, lbprz, None))[1][1] & 0x1C == 0x04


def _with(**changes: Any) -> p.Geometry:
    fields = {name: getattr(GEOMETRY, name) for name in p.Geometry.__dataclass_fields__}
    return p.Geometry(**{**fields, **changes})


# --- capacity, LUNs, mode pages -------------------------------------------------------------


def test_read_capacity() -> None:
    assert struct.unpack(">II", p.read_capacity_10(GEOMETRY)) == (2047, 512)
    big = _with(blocks=2**33)
    assert struct.unpack(">II", p.read_capacity_10(big)) == (0xFFFFFFFF, 512)
    data = p.read_capacity_16(_with(physical_exponent=3, lbprz=True))
    assert len(data) == 32
    last, size, prot, exp, flags = struct.unpack_from(">QIBBH", data)
    assert (last, size, prot, exp) == (2047, 512, 0, 3)
    assert flags >> 15 == 1 and (flags >> 14) & 1 == 1 and flags & 0x3FFF == 0


def test_report_luns() -> None:
    data = p.report_luns([0, 3, 300], 0x00)
    length = int.from_bytes(data[:4], "big")
    luns = [data[8 + i : 16 + i] for i in range(0, length, 8)]
    assert luns[0] == bytes(8)
    assert luns[1] == bytes((0, 3)) + bytes(6)
    assert luns[2] == bytes((0x40 | 1, 44)) + bytes(6)  # flat space: 300 = 0x12C
    assert p.report_luns([0], 0x01) == bytes(8)  # no well known logical units


@pytest.mark.parametrize("ten", [False, True])
@pytest.mark.parametrize("read_only", [False, True])
def test_mode_sense_all_pages(ten: bool, read_only: bool) -> None:
    cmd = ModeSense(0x3F, 0, 0, False, False, 255, ten)
    got = parse_mode(p.mode_sense(cmd, GEOMETRY, read_only=read_only), ten)
    assert got["wp"] == int(read_only) and got["dpofua"] == 1
    blocks, size = struct.unpack(">II", got["descriptor"])
    assert (blocks, size & 0xFFFFFF) == (2048, 512)
    assert sorted(got["pages"]) == [0x08, 0x0A]
    caching = got["pages"][0x08]
    assert len(caching) == 0x12 and caching[0] & 0x04  # WCE
    assert not caching[0] & 0x01  # RCD=0: reads are cached too
    control = got["pages"][0x0A]
    assert len(control) == 0x0A
    assert not control[0] & 0x04  # D_SENSE=0: fixed format sense
    assert control[1] >> 4 in (0, 1) and (control[1] >> 1) & 3 != 2  # QAM, QERR
    assert (control[2] >> 4) & 3 != 1  # UA_INTLCK_CTRL


def test_mode_sense_variants() -> None:
    long = parse_mode(
        p.mode_sense(ModeSense(0x08, 0, 0, False, True, 255, True), GEOMETRY, read_only=False), True
    )
    assert long["longlba"] == 1 and struct.unpack(">QII", long["descriptor"]) == (2048, 0, 512)
    dbd = parse_mode(
        p.mode_sense(ModeSense(0x0A, 0, 0, True, False, 255, False), GEOMETRY, read_only=False),
        False,
    )
    assert dbd["descriptor"] == b"" and list(dbd["pages"]) == [0x0A]
    changeable = parse_mode(
        p.mode_sense(ModeSense(0x08, 0xFF, 1, False, False, 255, False), GEOMETRY, read_only=False),
        False,
    )
    assert not any(changeable["pages"][0x08])  # nothing can be changed


@pytest.mark.parametrize(
    ("page", "subpage", "control", "asc", "field"),
    [(0x1C, 0, 0, 0x24, (2, 5)), (0x08, 0x01, 0, 0x24, (3, None)), (0x3F, 0, 3, 0x39, None)],
)
def test_mode_sense_refusals(
    page: int, subpage: int, control: int, asc: int, field: tuple[int, int | None] | None
) -> None:
    with pytest.raises(ScsiError) as info:
        p.mode_sense(
            ModeSense(page, subpage, control, False, False, 255, False), GEOMETRY, read_only=False
        )
    sense = info.value.sense
    assert sense is not None and sense.code.asc == asc
    if field is not None:
        assert sense.field is not None and (sense.field.byte, sense.field.bit) == field


# --- GET LBA STATUS -------------------------------------------------------------------------


def parse_lba_status(data: bytes) -> list[tuple[int, int, int]]:
    length = int.from_bytes(data[:4], "big")
    assert length == len(data) - 4 and (length - 4) % 16 == 0
    return [struct.unpack_from(">QIB", data, at) for at in range(8, len(data), 16)]


def test_lba_status_from_extents() -> None:
    extents = [Extent(4096), Extent(8192, hole=True, zero=True), Extent(1024, zero=True)]
    got = parse_lba_status(p.lba_status(10, extents, 512, 100))
    assert got == [(10, 8, 0), (18, 16, 1), (34, 2, 0)]


def test_lba_status_of_a_partial_hole_is_mapped() -> None:
    # The hole starts and ends inside blocks: only blocks it covers whole are deallocated.
    extents = [Extent(700), Extent(1400, hole=True), Extent(948)]
    assert parse_lba_status(p.lba_status(0, extents, 512, 10)) == [(0, 2, 0), (2, 2, 1), (4, 1, 0)]


def test_lba_status_always_describes_the_first_block() -> None:
    assert parse_lba_status(p.lba_status(5, [Extent(100, hole=True)], 512, 10)) == [(5, 1, 0)]
    many = [Extent(512, hole=bool(i % 2)) for i in range(10)]
    assert len(parse_lba_status(p.lba_status(0, many, 512, 3))) == 3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3000), st.booleans()), min_size=1, max_size=12),
    st.integers(0, 100),
    st.sampled_from((512, 4096)),
)
def test_lba_status_matches_a_block_by_block_model(
    runs: list[tuple[int, bool]], lba: int, block_size: int
) -> None:
    extents = [Extent(n, hole=h) for n, h in runs]
    total = sum(n for n, _ in runs)
    # The model: a byte map of holes, then each whole block deallocated iff all hole.
    holes = bytearray()
    for n, h in runs:
        holes += bytes((int(h),)) * n
    blocks = total // block_size
    model = [
        1 if all(holes[b * block_size : (b + 1) * block_size]) else 0 for b in range(blocks)
    ] or [0]
    got = parse_lba_status(p.lba_status(lba, extents, block_size, 10_000))
    expanded = []
    expect_lba = lba
    for first, count, status in got:
        assert first == expect_lba and count > 0
        expanded += [status] * count
        expect_lba += count
    assert expanded == model
    assert all(a[2] != b[2] for a, b in itertools.pairwise(got))  # runs are merged
