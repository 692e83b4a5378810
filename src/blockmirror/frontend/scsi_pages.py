"""What the SCSI target answers about itself: INQUIRY data, VPD pages, mode pages, READ
CAPACITY, REPORT LUNS and GET LBA STATUS parameter data (SPC-4, SBC-3), sans-I/O.

Every function returns the whole parameter data; the executor cuts it to the allocation length
(the length fields inside keep saying how much there was, so an initiator can ask again).

Identity. A logical unit is known to hosts (multipath, cluster software, udev's by-id names) by
the NAA designator of VPD page 83h. It is derived here from a *volume identity* string the
caller passes, and nothing else: the same string gives the same designator on a primary and its
replicas, across restarts and after a failover, so a host that reconnects to the new primary
finds the disk it had. The unit serial number (VPD page 80h) defaults to a digest of the same
string, for the same reason. The NAA is type 6 (IEEE Registered Extended): a 24-bit company
ID, then 100 bits of a BLAKE2b digest of the identity. The default company ID is a locally
administered one (the AAI quadrant of IEEE 802c, first octet x2h), which the IEEE never assigns
to a company, so it cannot collide with a vendor's designators; an operator with a registered
OUI/CID may pass it instead.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from blockmirror import __version__
from blockmirror.frontend.scsi_cdb import ModeSense
from blockmirror.frontend.scsi_pr import ISCSI_PROTOCOL_ID, Nexus
from blockmirror.frontend.scsi_sense import (
    SAVING_PARAMETERS_NOT_SUPPORTED,
    ScsiError,
    invalid_cdb,
)
from blockmirror.store.base import Extent

VENDOR = "BLKMIRR"
PRODUCT = "blockmirror"
# "0.1.0" -> "0.1": the field holds 4 characters.
REVISION = ".".join(__version__.split(".")[:2])[:4]
# Locally administered (first octet 42h: U/L set, I/G clear, the AAI quadrant); "BMR".
DEFAULT_COMPANY_ID = 0x424D52

# Version descriptors (SPC-4 table "version descriptor values"): SAM-5, iSCSI, SPC-4, SBC-3.
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)
SPC4_VERSION = 0x06

SUPPORTED_VPD = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
MODE_CACHING, MODE_CONTROL, MODE_ALL = 0x08, 0x0A, 0x3F
PROVISIONING_THIN = 0x2
LBA_MAPPED, LBA_DEALLOCATED = 0x0, 0x1

# Designation descriptor fields (SPC-4 7.8.6.1).
_BINARY, _ASCII, _UTF8 = 1, 2, 3
_T10_VENDOR_ID, _NAA, _RELATIVE_TARGET_PORT, _SCSI_NAME = 1, 3, 4, 8
_LU, _TARGET_PORT, _TARGET_DEVICE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the logical unit says it is. ``volume_id`` is the NAA source (see the module doc)."""

    volume_id: str
    serial: str = ""  # "" derives it from volume_id
    vendor: str = VENDOR
    product: str = PRODUCT
    revision: str = REVISION
    company_id: int = DEFAULT_COMPANY_ID

    @property
    def unit_serial(self) -> str:
        return self.serial or _digest(self.volume_id, b"serial")[:12].hex().upper()


@dataclass(frozen=True, slots=True)
class Geometry:
    """The logical unit's shape and limits, in logical blocks."""

    blocks: int
    block_size: int
    max_transfer: int
    max_unmap: int
    max_unmap_descriptors: int
    unmap_granularity: int
    max_write_same: int
    optimal_granularity: int
    physical_exponent: int = 0  # logical blocks per physical block, as a power of two
    lbprz: bool = False  # an unmapped block reads as zeros


def naa_designator(volume_id: str, company_id: int = DEFAULT_COMPANY_ID) -> bytes:
    """The 16-byte NAA type 6 designator of a volume identity."""
    vendor_bits = int.from_bytes(_digest(volume_id, b"naa"), "big") >> (128 - 100)
    value = 0x6 << 124 | (company_id & 0xFFFFFF) << 100 | vendor_bits
    return value.to_bytes(16, "big")


def standard_inquiry(ident: Identity) -> bytes:
    """Standard INQUIRY data: direct access, SPC-4, HISUP, CmdQue, the version descriptors."""
    versions = b"".join(struct.pack(">H", v) for v in VERSION_DESCRIPTORS).ljust(16, b"\0")
    body = (
        _ascii(ident.vendor, 8)
        + _ascii(ident.product, 16)
        + _ascii(ident.revision, 4)
        + bytes(20)  # vendor specific
        + bytes(2)  # SPI-only fields, reserved
        + versions
    )
    # Byte 3: HISUP (LUNs are hierarchical) and response data format 2; byte 7: CMDQUE.
    head = struct.pack(">BBBBBBBB", 0x00, 0x00, SPC4_VERSION, 0x12, 3 + len(body), 0, 0, 0x02)
    return head + body


def vpd_page(page: int, ident: Identity, geometry: Geometry, nexus: Nexus | None) -> bytes:
    """One VPD page; INVALID FIELD IN CDB for one we do not have."""
    if page == 0x00:
        return _page(0x00, bytes(SUPPORTED_VPD))
    if page == 0x80:
        return _page(0x80, _ascii(ident.unit_serial, len(ident.unit_serial)))
    if page == 0x83:
        return _page(0x83, _designators(ident, nexus))
    if page == 0xB0:
        return _page(0xB0, _block_limits(geometry))
    if page == 0xB1:
        # Non-rotating medium (1), no nominal form factor: the volume is a file or a device.
        return _page(0xB1, struct.pack(">HBB", 0x0001, 0, 0).ljust(60, b"\0"))
    if page == 0xB2:
        # LBPU (UNMAP), LBPWS (WRITE SAME(16) with UNMAP), LBPWS10, LBPRZ; thin provisioning.
        flags = 0x80 | 0x40 | 0x20 | (0x04 if geometry.lbprz else 0)
        return _page(0xB2, struct.pack(">BBBB", 0, flags, PROVISIONING_THIN, 0))
    raise invalid_cdb(2, None, f"VPD page {page:#04x}")


def mode_sense(command: ModeSense, geometry: Geometry, *, read_only: bool) -> bytes:
    """MODE SENSE(6) or (10) parameter data: header, block descriptor unless DBD, pages."""
    if command.control == 3:
        raise ScsiError.check(SAVING_PARAMETERS_NOT_SUPPORTED, "no saved mode pages")
    changeable = command.control == 1
    if command.page == MODE_ALL:
        pages = _caching(changeable) + _control(changeable)
    elif command.page == MODE_CACHING:
        pages = _caching(changeable)
    elif command.page == MODE_CONTROL:
        pages = _control(changeable)
    else:
        raise invalid_cdb(2, 5, f"mode page {command.page:#04x}")
    # No page has subpages: subpage 0, or FFh ("and all its subpages"), is the same page.
    if command.subpage not in (0x00, 0xFF):
        raise invalid_cdb(3, None, f"mode subpage {command.subpage:#04x}")
    descriptor = b""
    if not command.dbd:
        blocks = 0 if changeable else geometry.blocks
        size = 0 if changeable else geometry.block_size
        if command.llbaa and command.ten:
            descriptor = struct.pack(">QII", blocks, 0, size)
        else:
            descriptor = struct.pack(">II", min(blocks, 0xFFFFFFFF), size & 0xFFFFFF)
    # Device-specific parameter: WP for a read-only unit; DPOFUA (FUA is honoured).
    specific = (0x80 if read_only else 0) | 0x10
    if command.ten:
        long_lba = 1 if len(descriptor) == 16 else 0
        size = 8 + len(descriptor) + len(pages)
        head = struct.pack(">HBBBBH", size - 2, 0, specific, long_lba, 0, len(descriptor))
    else:
        size = 4 + len(descriptor) + len(pages)
        head = struct.pack(">BBBB", size - 1, 0, specific, len(descriptor))
    return head + descriptor + pages


def read_capacity_10(geometry: Geometry) -> bytes:
    # Past 2^32 - 1 blocks the answer is FFFFFFFFh: "ask READ CAPACITY(16)".
    return struct.pack(">II", min(geometry.blocks - 1, 0xFFFFFFFF), geometry.block_size)


def read_capacity_16(geometry: Geometry) -> bytes:
    # LBPME: thin provisioned (UNMAP and GET LBA STATUS work); LBPRZ as the unit says.
    flags = 0x8000 | (0x4000 if geometry.lbprz else 0)
    head = struct.pack(
        ">QIBBH",
        geometry.blocks - 1,
        geometry.block_size,
        0,
        geometry.physical_exponent & 0x0F,
        flags,
    )
    return head + bytes(16)


def report_luns(luns: Sequence[int], select: int) -> bytes:
    """REPORT LUNS parameter data. We have no well known logical units (SELECT REPORT 01h)."""
    listed = [] if select == 0x01 else sorted(set(luns))
    return struct.pack(">II", 8 * len(listed), 0) + b"".join(encode_lun(n) for n in listed)


def encode_lun(lun: int) -> bytes:
    """An 8-byte LUN (SAM-5 4.7): peripheral addressing below 256, flat space to 16383."""
    if lun < 256:
        return bytes((0x00, lun)) + bytes(6)
    if lun < 0x4000:
        return bytes((0x40 | lun >> 8, lun & 0xFF)) + bytes(6)
    raise ValueError(f"LUN {lun} needs more than flat space addressing")


def lba_status(lba: int, extents: Iterable[Extent], block_size: int, max_descriptors: int) -> bytes:
    """GET LBA STATUS parameter data from the extents that start at block ``lba``.

    A block is deallocated only when a hole covers it whole; one that holds any data, or
    allocated zeros, is mapped. Runs are merged, and at least one descriptor (the one for
    ``lba``) is returned.
    """
    runs: list[tuple[int, int, int]] = []  # (first block, end block, status)

    def add(first: int, end: int, status: int) -> None:
        if end <= first:
            return
        if runs and runs[-1][1] == first and runs[-1][2] == status:
            runs[-1] = (runs[-1][0], end, status)
        else:
            runs.append((first, end, status))

    pos = lba * block_size
    done = lba  # blocks before this one are in runs
    for start, end, hole in _merged(pos, extents):
        pos = end
        if hole:
            first, last = -(-start // block_size), end // block_size
            if last > first:
                add(done, first, LBA_MAPPED)
                add(first, last, LBA_DEALLOCATED)
                done = last
    add(done, max(pos // block_size, lba + (0 if runs else 1)), LBA_MAPPED)
    descriptors = b""
    count = 0
    for start, end, status in runs:
        first = start
        while first < end and count < max_descriptors:
            n = min(end - first, 0xFFFFFFFF)
            descriptors += struct.pack(">QIB3x", first, n, status)
            first += n
            count += 1
    return struct.pack(">II", 4 + len(descriptors), 0) + descriptors


# --- pieces ---------------------------------------------------------------------------------


def _digest(volume_id: str, purpose: bytes) -> bytes:
    # Keyed by purpose so that the serial number and the NAA are independent digests.
    return hashlib.blake2b(
        volume_id.encode(), digest_size=16, person=b"bm-scsi-" + purpose
    ).digest()


def _ascii(text: str, size: int) -> bytes:
    """Printable ASCII (SPC-4 4.3.1), left-aligned and padded with spaces."""
    clean = "".join(c if " " <= c <= "~" else "_" for c in text)
    return clean.encode("ascii")[:size].ljust(size, b" ")


def _page(code: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0x00, code, len(body)) + body


def _designator(protocol: int, code_set: int, piv_assoc_type: int, value: bytes) -> bytes:
    return struct.pack(">BBBB", protocol << 4 | code_set, piv_assoc_type, 0, len(value)) + value


def _name_string(name: str) -> bytes:
    """A SCSI name string designator value: UTF-8, NUL-terminated, padded to 4 bytes."""
    raw = name.encode("utf-8", "replace")[:251] + b"\0"
    return raw.ljust(-(-len(raw) // 4) * 4, b"\0")


def _designators(ident: Identity, nexus: Nexus | None) -> bytes:
    naa = naa_designator(ident.volume_id, ident.company_id)
    t10 = _ascii(ident.vendor, 8) + _ascii(ident.unit_serial, len(ident.unit_serial))
    out = _designator(0, _BINARY, _LU << 4 | _NAA, naa)
    out += _designator(0, _ASCII, _LU << 4 | _T10_VENDOR_ID, t10[:255])
    if nexus is not None:
        # Target port and target device: protocol-specific, so PIV=1 and the iSCSI protocol.
        piv = 0x80
        port = struct.pack(">HH", 0, nexus.relative_port & 0xFFFF)
        out += _designator(
            ISCSI_PROTOCOL_ID, _BINARY, piv | _TARGET_PORT << 4 | _RELATIVE_TARGET_PORT, port
        )
        out += _designator(
            ISCSI_PROTOCOL_ID,
            _UTF8,
            piv | _TARGET_PORT << 4 | _SCSI_NAME,
            _name_string(nexus.target_port),
        )
        device = nexus.target_port.partition(",t,")[0]
        out += _designator(
            ISCSI_PROTOCOL_ID, _UTF8, piv | _TARGET_DEVICE << 4 | _SCSI_NAME, _name_string(device)
        )
    return out


def _block_limits(g: Geometry) -> bytes:
    return struct.pack(
        ">BBHIIIIIIIQ",
        0x01,  # WSNZ: WRITE SAME of 0 blocks ("to the end") is refused
        0,  # no COMPARE AND WRITE
        g.optimal_granularity,
        g.max_transfer,
        0,  # no optimal transfer length: mkfs reads it as a stripe width
        0,  # no PRE-FETCH
        g.max_unmap,
        g.max_unmap_descriptors,
        g.unmap_granularity,
        0x80000000,  # UGAVALID, alignment 0
        g.max_write_same,
    ).ljust(60, b"\0")


def _caching(changeable: bool) -> bytes:
    # WCE=1: writes acknowledged without FUA sit in a volatile cache (the journal's batch and
    # the page cache) until SYNCHRONIZE CACHE or a FUA write makes them durable. Nothing is
    # changeable (no MODE SELECT), so the changeable mask is all zeros.
    flags = 0 if changeable else 0x04
    return struct.pack(">BBB", MODE_CACHING, 0x12, flags).ljust(20, b"\0")


def _control(changeable: bool) -> bytes:
    if changeable:
        return struct.pack(">BB", MODE_CONTROL, 0x0A).ljust(12, b"\0")
    # GLTSD (no log pages to save); queue algorithm modifier 1: commands of the SIMPLE task
    # attribute may complete in any order (they do: a FUA write waits, a read does not);
    # D_SENSE=0 (fixed format sense); TAS=0; UA_INTLCK_CTRL=0 (a reported UA is cleared).
    return struct.pack(">BBBBBBHHH", MODE_CONTROL, 0x0A, 0x02, 0x10, 0, 0, 0, 0, 0)


def _merged(pos: int, extents: Iterable[Extent]) -> list[tuple[int, int, bool]]:
    """Byte ranges from ``pos``, with neighbours of the same hole state joined."""
    out: list[tuple[int, int, bool]] = []
    for e in extents:
        if e.length <= 0:
            continue
        end = pos + e.length
        if out and out[-1][2] == e.hole:
            out[-1] = (out[-1][0], end, e.hole)
        else:
            out.append((pos, end, e.hole))
        pos = end
    return out
