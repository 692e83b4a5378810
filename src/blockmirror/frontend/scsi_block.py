"""SBC-3 block commands on a :class:`Disk`: reads, verifies, writes, WRITE SAME, UNMAP,
SYNCHRONIZE CACHE, GET LBA STATUS, and how the disk's answers become SCSI results.

A :class:`Disk` is the subset of :class:`~blockmirror.blockdev.service.BlockDevice` a logical
unit needs, so every rule the service keeps (ranges, read-only, the largest write, commit
gating, errno-style errors) holds for SCSI as for NBD. :class:`BlockCommands` validates a
command whole (transfer limits, write protection, the LBA range, the data-out it carries; every
UNMAP descriptor) before it hands the first change to the disk, so a refused command changes
nothing.

What each change becomes on the disk: WRITE is one write (FUA passed on: its future completes
once the data is durable, invariant 2); SYNCHRONIZE CACHE and a stopping START STOP UNIT are a
flush, whose future completes once everything acknowledged before is durable; UNMAP is a trim
per descriptor (trim records in the journal); WRITE SAME of zeros is a zeroing (deallocating
allowed with UNMAP, or a trim when trimmed blocks read as zeros, LBPRZ), any other pattern one
write of the block repeated (bounded by MAXIMUM WRITE SAME LENGTH, the largest write).

Errors of the service map to sense data: EPERM/EROFS/EACCES (a read-only unit, a demoted
volume) are DATA PROTECT, WRITE PROTECTED; ENOSPC/EDQUOT of a change (the range was checked
first, so it is the volume that is full) are DATA PROTECT, SPACE ALLOCATION FAILED WRITE
PROTECT; EINVAL and EOPNOTSUPP are ILLEGAL REQUEST; anything else, EIO and a failed journal
included, is MEDIUM ERROR: UNRECOVERED READ ERROR for reads, WRITE ERROR for changes and flushes.
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from blockmirror.blockdev.service import Pending, RequestError
from blockmirror.frontend import scsi_cdb as c
from blockmirror.frontend import scsi_pages as pages
from blockmirror.frontend.scsi_pr import Nexus
from blockmirror.frontend.scsi_sense import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT,
    LBA_OUT_OF_RANGE,
    MISCOMPARE_DURING_VERIFY,
    PARAMETER_LIST_LENGTH_ERROR,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    WRITE_PROTECTED,
    ScsiError,
    Sense,
    SenseCode,
    Status,
    invalid_cdb,
    invalid_parameter,
)
from blockmirror.store.base import Extent

Buffer = bytes | bytearray | memoryview
DataOut = Buffer | Sequence[Buffer]

MAX_UNMAP_BYTES = 512 * 1024 * 1024  # per UNMAP command; hosts split larger discards
MAX_UNMAP_DESCRIPTORS = 256
MAX_LBA_STATUS_DESCRIPTORS = 1024
PATTERN_CHUNK = 1024 * 1024  # a WRITE SAME pattern is written as references to one chunk
PAGE = 4096  # the granularity the volume's page cache and hole punching work in


class Disk(Protocol):
    """What the unit needs of :class:`~blockmirror.blockdev.service.BlockDevice`."""

    size: int
    read_only: bool
    max_write: int
    min_block: int

    def read(self, offset: int, length: int) -> bytes: ...
    def read_done(self, length: int) -> None: ...
    def write(self, offset: int, length: int, data: Sequence[Buffer], *, fua: bool) -> Pending: ...
    def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> Pending: ...
    def trim(self, offset: int, length: int, *, fua: bool) -> Pending: ...
    def flush(self) -> Pending: ...
    def extents(self, offset: int, length: int) -> list[Extent]: ...
    def failure(self, exc: BaseException, what: str) -> RequestError: ...
    def answered_error(self) -> None: ...


class ScsiResult(NamedTuple):
    """How a command ended. ``sense`` is fixed-format sense data (CHECK CONDITION only)."""

    status: Status
    data_in: Buffer = b""
    sense: bytes = b""
    gated: bool = False  # a change only accepted: send after the ReplyGate's commit allows
    aborted: tuple[Nexus, ...] = ()  # PREEMPT AND ABORT: abort these nexuses' tasks


GOOD = ScsiResult(Status.GOOD)


def check_condition(code: SenseCode, *, information: int | None = None) -> ScsiResult:
    return ScsiResult(Status.CHECK_CONDITION, sense=Sense(code, information).fixed())


def geometry(
    disk: Disk, block_size: int, *, physical_exponent: int = 0, lbprz: bool = False
) -> pages.Geometry:
    """The shape and limits a disk has with ``block_size``-byte logical blocks."""
    if block_size < 512 or block_size & (block_size - 1) or block_size % disk.min_block:
        raise ValueError(f"block size {block_size} is not a power of two >= 512 the disk takes")
    if disk.size < block_size or disk.max_write < block_size:
        raise ValueError(f"a disk of {disk.size} bytes cannot have {block_size}-byte blocks")
    granule = max(1, PAGE // block_size)
    max_transfer = min(disk.max_write // block_size, 0xFFFFFFFF)
    return pages.Geometry(
        blocks=disk.size // block_size,
        block_size=block_size,
        max_transfer=max_transfer,
        max_unmap=min(MAX_UNMAP_BYTES // block_size, 0xFFFFFFFF),
        max_unmap_descriptors=MAX_UNMAP_DESCRIPTORS,
        unmap_granularity=granule,
        max_write_same=max_transfer,
        optimal_granularity=granule,
        physical_exponent=physical_exponent,
        lbprz=lbprz,
    )


class BlockCommands:
    """The block commands of one logical unit, on its disk."""

    def __init__(self, disk: Disk, geometry: pages.Geometry) -> None:
        self.disk = disk
        self.geometry = geometry
        self.block_size = geometry.block_size
        self._zero_block = bytes(geometry.block_size)

    def read(self, command: c.Read) -> ScsiResult:
        offset, length = self._extent(command.lba, command.blocks, command.length_field)
        if not length:
            return GOOD
        data = self._read_disk(offset, length)
        self.disk.read_done(length)
        return ScsiResult(Status.GOOD, data)

    def verify(self, command: c.Verify, data_out: DataOut) -> ScsiResult:
        offset, length = self._extent(command.lba, command.blocks, command.length_field)
        if not length:
            return GOOD
        if command.bytchk == 1:
            expected = joined(data_out, length)
        elif command.bytchk == 3:
            expected = joined(data_out, self.block_size) * command.blocks
        else:
            expected = b""
        actual = self._read_disk(offset, length)  # BYTCHK 0: that it reads is the check
        if expected and actual != expected:
            # INFORMATION: the offset of the first byte that differs (SBC-3 5.33).
            at = _first_difference(actual, expected)
            raise ScsiError.check(MISCOMPARE_DURING_VERIFY, f"at byte {at}", information=at)
        return GOOD

    def write(self, command: c.Write, data_out: DataOut) -> ScsiResult | asyncio.Future[ScsiResult]:
        self._bounded(command.blocks, command.length_field)
        self._writable()
        offset, length = self._extent(command.lba, command.blocks, command.length_field)
        # Less data-out than the CDB says (the initiator's Expected Data Transfer Length was
        # shorter): the whole blocks it carries are written, and the transport reports the
        # rest as an overflow (SAM-5 5.4.3, what libiscsi's residual tests and tgt expect);
        # a partial block cannot be written and is refused with nothing changed.
        available = _length(data_out)
        if available < length:
            if available % self.geometry.block_size:
                raise ScsiError.check(
                    INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT,
                    f"{available} bytes of data-out is not a whole number of blocks",
                )
            length = available
        if not length:
            return GOOD
        data = _buffers(data_out, length)
        write = functools.partial(self.disk.write, offset, length, data, fua=command.fua)
        return self._changes("write", [write])

    def write_same(
        self, command: c.WriteSame, data_out: DataOut
    ) -> ScsiResult | asyncio.Future[ScsiResult]:
        if command.blocks == 0:
            raise invalid_cdb(command.length_field, None, "WRITE SAME to the end (WSNZ=1)")
        if command.blocks > self.geometry.max_write_same:
            raise invalid_cdb(command.length_field, None, "longer than MAXIMUM WRITE SAME LENGTH")
        self._writable()
        offset, length = self._extent(command.lba, command.blocks, command.length_field)
        block = self._zero_block if command.ndob else joined(data_out, self.block_size)
        disk = self.disk
        change: Callable[[], Pending]
        if block == self._zero_block:
            if command.unmap and self.geometry.lbprz:
                # Trimmed blocks read as zeros here: a trim record is the whole change.
                change = functools.partial(disk.trim, offset, length, fua=False)
            else:
                # Zeros that may (UNMAP) or must not (no UNMAP) be deallocated; either reads
                # back as zeros, which a trim on a device would not promise.
                change = functools.partial(
                    disk.write_zeroes, offset, length, fua=False, may_trim=command.unmap
                )
        else:
            per = max(1, min(command.blocks, PATTERN_CHUNK // self.block_size))
            chunk = block * per
            whole, rest = divmod(command.blocks, per)
            buffers: list[Buffer] = [chunk] * whole
            if rest:
                buffers.append(memoryview(chunk)[: rest * self.block_size])
            change = functools.partial(disk.write, offset, length, buffers, fua=False)
        return self._changes("write same", [change])

    def unmap(self, command: c.Unmap, data_out: DataOut) -> ScsiResult | asyncio.Future[ScsiResult]:
        self._writable()
        if command.parameter_length == 0:
            return GOOD
        if command.parameter_length < 8:
            raise ScsiError.check(PARAMETER_LIST_LENGTH_ERROR, "an UNMAP list shorter than 8")
        data = joined(data_out, command.parameter_length)
        declared = int.from_bytes(data[2:4], "big")
        count = min(declared, len(data) - 8) // 16  # a partial last descriptor is ignored
        g = self.geometry
        if count > g.max_unmap_descriptors:
            raise invalid_parameter(2, None, f"{count} UNMAP descriptors")
        ranges: list[tuple[int, int]] = []
        total = 0
        # Every descriptor is checked before the first trim: a refused UNMAP changes nothing.
        for i in range(count):
            at = 8 + 16 * i
            lba = int.from_bytes(data[at : at + 8], "big")
            blocks = int.from_bytes(data[at + 8 : at + 12], "big")
            total += blocks
            if total > g.max_unmap:
                raise invalid_parameter(at + 8, None, "more than MAXIMUM UNMAP LBA COUNT")
            if lba + blocks > g.blocks:
                raise ScsiError.check(LBA_OUT_OF_RANGE, f"UNMAP {lba}+{blocks}")
            if blocks:
                ranges.append((lba * self.block_size, blocks * self.block_size))
        if not ranges:
            return GOOD
        trim = self.disk.trim
        return self._changes("unmap", [functools.partial(trim, o, n, fua=False) for o, n in ranges])

    def lba_status(self, command: c.GetLbaStatus) -> ScsiResult:
        g = self.geometry
        if command.lba >= g.blocks:
            raise ScsiError.check(LBA_OUT_OF_RANGE, f"GET LBA STATUS at {command.lba}")
        blocks = min(g.blocks - command.lba, 0xFFFFFFFF)
        try:
            extents = self.disk.extents(command.lba * g.block_size, blocks * g.block_size)
        except RequestError as exc:
            raise ScsiError.check(_read_sense(exc), str(exc)) from exc
        room = max(1, min(MAX_LBA_STATUS_DESCRIPTORS, (command.allocation - 8) // 16))
        data = pages.lba_status(command.lba, extents, g.block_size, room)
        return ScsiResult(Status.GOOD, data[: command.allocation])

    def synchronize_cache(
        self, command: c.SynchronizeCache
    ) -> ScsiResult | asyncio.Future[ScsiResult]:
        # IMMED is not honoured: status waits for durability either way, so a failed flush
        # is reported to the one who asked (SBC-3 allows a later status).
        self._in_range(command.lba, command.blocks)
        return self._changes("flush", [self.disk.flush], flush=True)

    def start_stop(self, command: c.StartStopUnit) -> ScsiResult | asyncio.Future[ScsiResult]:
        if command.loej:
            raise invalid_cdb(4, 1, "the medium is not removable")
        if command.power_condition:
            raise invalid_cdb(4, 7, "power conditions are not supported")
        if command.start or command.no_flush:
            return GOOD
        # A stop writes the cache out first (SBC-3 5.25); the unit keeps serving after it,
        # since other hosts may be using the volume and nothing here can spin down.
        return self._changes("flush", [self.disk.flush], flush=True)

    # --- changes and their completion -----------------------------------------------------------

    def _changes(
        self, what: str, calls: Sequence[Callable[[], Pending]], *, flush: bool = False
    ) -> ScsiResult | asyncio.Future[ScsiResult]:
        """Hand changes to the disk, in order; the result once every one is done.

        A change that returned None is only accepted (the write path may do it in its next
        commit): the result is then ``gated``. A flush returning None is done.
        """
        futures: list[asyncio.Future[None]] = []
        gated = False
        for call in calls:
            try:
                pending = call()
            except RequestError as exc:
                _consume_all(futures)
                raise ScsiError.check(change_sense(exc), str(exc)) from exc
            if pending is None:
                gated = not flush
            else:
                futures.append(pending)
        if not futures:
            return ScsiResult(Status.GOOD, gated=gated)
        result: asyncio.Future[ScsiResult] = futures[0].get_loop().create_future()
        left = [len(futures)]
        errors: list[RequestError] = []
        disk = self.disk

        def done(f: asyncio.Future[None]) -> None:
            left[0] -= 1
            exc = asyncio.CancelledError() if f.cancelled() else f.exception()
            if exc is not None:
                errors.append(disk.failure(exc, what))
            if left[0] == 0 and not result.done():
                if errors:
                    disk.answered_error()
                    result.set_result(check_condition(change_sense(errors[0])))
                else:
                    result.set_result(ScsiResult(Status.GOOD, gated=gated))

        # Callbacks, not a task: the write path's futures are never cancelled from here, even
        # when the transport drops ``result``, and every exception is retrieved.
        for f in futures:
            f.add_done_callback(done)
        return result

    # --- checks ---------------------------------------------------------------------------------

    def _bounded(self, blocks: int, field: int) -> None:
        if blocks > self.geometry.max_transfer:
            raise invalid_cdb(field, None, f"{blocks} blocks exceed MAXIMUM TRANSFER LENGTH")

    def _in_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.geometry.blocks:
            raise ScsiError.check(LBA_OUT_OF_RANGE, f"LBA {lba}+{blocks}")

    def _extent(self, lba: int, blocks: int, field: int) -> tuple[int, int]:
        self._bounded(blocks, field)
        self._in_range(lba, blocks)
        return lba * self.block_size, blocks * self.block_size

    def _writable(self) -> None:
        if self.disk.read_only:
            raise ScsiError.check(WRITE_PROTECTED, "the logical unit is read-only")

    def _read_disk(self, offset: int, length: int) -> bytes:
        try:
            return self.disk.read(offset, length)
        except RequestError as exc:
            raise ScsiError.check(_read_sense(exc), str(exc)) from exc


# --- helpers ------------------------------------------------------------------------------------


def error_result(exc: ScsiError) -> ScsiResult:
    """The result a refusal raised as ScsiError ends its command with."""
    sense = exc.sense.fixed() if exc.sense is not None else b""
    return ScsiResult(exc.status, sense=sense)


def change_sense(error: RequestError) -> SenseCode:
    """The sense of a change (or flush) the disk refused or failed."""
    code = error.code
    if code in (errno.EPERM, errno.EROFS, errno.EACCES):
        return WRITE_PROTECTED
    if code in (errno.ENOSPC, errno.EDQUOT):
        return SPACE_ALLOCATION_FAILED_WRITE_PROTECT
    if code in (errno.EINVAL, errno.EOPNOTSUPP):
        return INVALID_FIELD_IN_CDB
    return WRITE_ERROR


def _read_sense(error: RequestError) -> SenseCode:
    if error.code in (errno.EINVAL, errno.EOPNOTSUPP):
        return INVALID_FIELD_IN_CDB
    return UNRECOVERED_READ_ERROR


def _length(data_out: DataOut) -> int:
    if isinstance(data_out, bytes | bytearray | memoryview):
        return memoryview(data_out).nbytes
    return sum(memoryview(part).nbytes for part in data_out)


def _buffers(data_out: DataOut, need: int) -> list[Buffer]:
    """The first ``need`` bytes of ``data_out`` as buffers (no copy); too few is an error."""
    parts: Sequence[Buffer] = (
        [data_out] if isinstance(data_out, bytes | bytearray | memoryview) else data_out
    )
    out: list[Buffer] = []
    left = need
    for part in parts:
        if left == 0:
            break
        size = memoryview(part).nbytes
        if size <= left:
            out.append(part)
            left -= size
        else:
            out.append(memoryview(part).cast("B")[:left])
            left = 0
    if left:
        raise ScsiError.check(
            INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT,
            f"{need - left} bytes of data-out for a command that takes {need}",
        )
    return out


def joined(data_out: DataOut, need: int) -> bytes:
    return b"".join(_buffers(data_out, need))


def _first_difference(a: bytes, b: bytes, step: int = 65536) -> int:
    """The first offset where two equally long buffers differ (they do somewhere)."""
    at = 0
    while a[at : at + step] == b[at : at + step]:
        at += step
    return next(i for i in range(at, at + step) if a[i] != b[i])


def _consume_all(futures: list[asyncio.Future[None]]) -> None:
    # Changes already handed over when a later one was refused: their outcome is not the
    # command's (it fails with the refusal), but their exceptions must not go unretrieved.
    for f in futures:
        f.add_done_callback(lambda f: f.cancelled() or f.exception())
