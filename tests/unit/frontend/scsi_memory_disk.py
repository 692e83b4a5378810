"""An in-memory Disk (the subset of BlockDevice a SCSI logical unit uses) and CDB builders,
for the unit tests of frontend/scsi_block and frontend/scsi_target."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any

from blockmirror.blockdev.service import Pending, RequestError, error_code
from blockmirror.frontend.scsi_pages import Identity
from blockmirror.frontend.scsi_pr import Nexus
from blockmirror.frontend.scsi_sense import Status
from blockmirror.frontend.scsi_target import ScsiLogicalUnit, ScsiResult
from blockmirror.store.base import Extent

Buffer = bytes | bytearray | memoryview
BS = 512
SIZE = 1024 * BS
A = Nexus("iqn.2026-01.org.example:a,i,0x000000000001", "iqn.t:vol,t,0x0001")
B = Nexus("iqn.2026-01.org.example:b,i,0x000000000002", "iqn.t:vol,t,0x0001")


class MemoryDisk:
    """The Disk protocol in memory. ``mode``: "done" (changes complete at once and return
    None, like the direct write path), "staged" (None, to be committed later; FUA and flush
    return futures), "future" (every change returns a future the test settles)."""

    def __init__(self, size: int = SIZE, *, max_write: int = 64 * BS, mode: str = "done") -> None:
        self.size = size
        self.read_only = False
        self.max_write = max_write
        self.min_block = 1
        self.mode = mode
        self.data = bytearray(size)
        self.mapped = bytearray(b"\1") * (size // BS)
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, int] = {}  # method -> errno it raises
        self.futures: list[asyncio.Future[None]] = []
        self.errors = 0

    def _check(self, what: str) -> None:
        code = self.fail.get(what)
        if code is not None:
            raise RequestError(code, f"{what} failed")

    def _pending(self, wait: bool) -> Pending:
        if self.mode == "future" or (wait and self.mode != "done"):
            f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.futures.append(f)
            return f
        return None

    def read(self, offset: int, length: int) -> bytes:
        self._check("read")
        assert offset >= 0 and offset + length <= self.size
        return bytes(self.data[offset : offset + length])

    def read_done(self, length: int) -> None:
        self.calls.append(("read_done", length))

    def write(self, offset: int, length: int, data: Sequence[Buffer], *, fua: bool) -> Pending:
        self._check("write")
        joined = b"".join(bytes(b) for b in data)
        assert len(joined) == length and offset + length <= self.size
        self.data[offset : offset + length] = joined
        self._map(offset, length, True)
        self.calls.append(("write", offset, length, fua))
        return self._pending(fua)

    def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> Pending:
        self._check("write_zeroes")
        self.data[offset : offset + length] = bytes(length)
        self._map(offset, length, not may_trim)
        self.calls.append(("write_zeroes", offset, length, may_trim))
        return self._pending(fua)

    def trim(self, offset: int, length: int, *, fua: bool) -> Pending:
        self._check("trim")
        self.data[offset : offset + length] = bytes(length)
        self._map(offset, length, False)
        self.calls.append(("trim", offset, length))
        return self._pending(fua)

    def flush(self) -> Pending:
        self._check("flush")
        self.calls.append(("flush",))
        return self._pending(True)

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check("extents")
        out: list[Extent] = []
        for b in range(offset // BS, (offset + length) // BS):
            hole = not self.mapped[b]
            if out and out[-1].hole == hole:
                out[-1] = Extent(out[-1].length + BS, hole, hole)
            else:
                out.append(Extent(BS, hole, hole))
        return out

    def failure(self, exc: BaseException, what: str) -> RequestError:
        return exc if isinstance(exc, RequestError) else RequestError(error_code(exc), what)

    def answered_error(self) -> None:
        self.errors += 1

    def _map(self, offset: int, length: int, mapped: bool) -> None:
        for b in range(offset // BS, (offset + length) // BS):
            self.mapped[b] = mapped

    def settle(self, exc: BaseException | None = None) -> None:
        for f in self.futures:
            if not f.done():
                if exc is None:
                    f.set_result(None)
                else:
                    f.set_exception(exc)


def unit(disk: MemoryDisk | None = None, **kw: Any) -> tuple[ScsiLogicalUnit, MemoryDisk]:
    disk = disk if disk is not None else MemoryDisk()
    return ScsiLogicalUnit(disk, Identity("vol-1"), **kw), disk


def run(lu: ScsiLogicalUnit, cdb: bytes, data: Any = b"", nexus: Nexus = A) -> ScsiResult:
    result = lu.submit(nexus, cdb, data)
    assert isinstance(result, ScsiResult), "expected an answer at once"
    return result


def sense_of(result: ScsiResult) -> tuple[int, int, int]:
    assert result.status == Status.CHECK_CONDITION
    return result.sense[2] & 0x0F, result.sense[12], result.sense[13]


def good(result: ScsiResult) -> ScsiResult:
    assert result.status == Status.GOOD, result
    return result


# --- CDB builders ---------------------------------------------------------------------------


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write10(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def write_same16(lba: int, blocks: int, *, unmap: bool = False, ndob: bool = False) -> bytes:
    flags = (0x08 if unmap else 0) | (0x01 if ndob else 0)
    return struct.pack(">BBQIBB", 0x93, flags, lba, blocks, 0, 0)


def unmap(length: int) -> bytes:
    return struct.pack(">BBIBHB", 0x42, 0, 0, 0, length, 0)


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QII", lba, n, 0) for lba, n in ranges)
    return struct.pack(">HHI", len(body) + 6, len(body), 0) + body


def verify10(lba: int, blocks: int, bytchk: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2F, bytchk << 1, lba, 0, blocks, 0)


SYNC10 = bytes((0x35,)) + bytes(9)
TUR = bytes(6)
INQUIRY = bytes((0x12, 0, 0, 0, 255, 0))
REQUEST_SENSE = bytes((0x03, 0, 0, 0, 252, 0))


def lba_status(lba: int, alloc: int = 1024) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def pr_out(action: int, key: int, service_key: int = 0, pr_type: int = 0) -> tuple[bytes, bytes]:
    cdb = struct.pack(">BBBBBIB", 0x5F, action, pr_type, 0, 0, 24, 0)
    return cdb, struct.pack(">QQ8x", key, service_key)
