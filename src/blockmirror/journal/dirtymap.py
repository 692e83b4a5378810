"""A peer's persistent dirty map: one bit per volume region that may differ on that peer.

When a peer falls too far behind for the journal to hold its backlog, the primary stops keeping
records for it and instead remembers *where* the volume changed: a region's bit is set before a
write to it may reach the volume (invariant 4 of the design), and cleared once the region has been
copied to the peer. After a crash, the bits on disk are the resync's work list, so the file must
never hold fewer bits than the truth; holding more only costs an extra copy.

File layout (docs/journal.md, "Consumers, overflow and the dirty map"): a 4096-byte header page,
of which the first 64 bytes are meaningful, then the bitmap, padded to whole 4096-byte pages.
Bit ``r`` (region ``r``, volume bytes ``[r * region_size, (r + 1) * region_size)``) is bit
``r % 8`` (least significant first) of bitmap byte ``r // 8``. Keeping the bitmap page-aligned
means a page write touches exactly one filesystem block and never the header's.

The whole bitmap lives in memory as a ``bytearray``; changes are recorded as *pending* pages and
:meth:`DirtyMap.sync` writes just those pages, then ``fdatasync``s. Marks and clears are cheap and
run on the event loop; ``sync`` blocks and is meant to run in a worker thread, concurrently with
further marks (see :meth:`DirtyMap.sync` for how the two are kept apart).

Why one module: it is one concept, a bitmap and its file. Marks, clears, the pending-page
bookkeeping and the sync share one lock protocol over one ``bytearray``, and the queries scan
that same array. The 64-byte header codec is the only part that could stand alone, and it is a
few dozen lines.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from crc32c import crc32c

from blockmirror.errors import JournalError, OutOfRangeError
from blockmirror.io.closing import Closing
from blockmirror.io.fileio import pread_all, pwritev_all, sync_directory

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_REGION_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "PAGE_SIZE",
    "VERSION",
    "DirtyMap",
    "DirtyMapError",
    "bitmap_pages",
]

MAGIC = b"BMDIRTY1"
VERSION = 1
HEADER_SIZE = 64
PAGE_SIZE = 4096
DEFAULT_REGION_SIZE = 64 * 1024

# magic, version, bitmap offset, region size, volume size, region count, 20 reserved bytes; the
# CRC-32C of these 60 bytes follows at offset 60.
_HEADER = struct.Struct("<8sIIQQQ20x")
_CRC = struct.Struct("<I")
assert _HEADER.size + _CRC.size == HEADER_SIZE

_PAGE_SHIFT = 12  # bitmap byte index -> page index
_REGIONS_PER_PAGE_SHIFT = _PAGE_SHIFT + 3  # region index -> page index
assert 1 << _PAGE_SHIFT == PAGE_SIZE

# A misconfigured region size (say 512 bytes on a 100 TiB volume) would ask for gigabytes of RAM
# and a sync the size of the bitmap; refuse it up front with a message instead.
_MAX_BITMAP_BYTES = 1 << 30

_ZERO_PAGE = bytes(PAGE_SIZE)
_ONES_PAGE = b"\xff" * PAGE_SIZE
# Clean stretches are skipped this many bytes at a time by a memcmp (bytearray.startswith); only
# chunks that are not uniform are scanned byte by byte, by the regex engine, not by Python.
_SCAN_CHUNK = 64 * 1024
_ZERO_CHUNK = bytes(_SCAN_CHUNK)
_ONES_CHUNK = b"\xff" * _SCAN_CHUNK
_NONZERO = re.compile(rb"[^\x00]")
_NOT_ONES = re.compile(rb"[^\xff]")
_POPCOUNT_CHUNK = 1 << 20


def _byte_runs(value: int) -> tuple[tuple[int, int], ...]:
    """Runs of set bits in one byte, as (first bit, bit after the last), lowest first."""
    runs: list[tuple[int, int]] = []
    bit = 0
    while bit < 8:
        if value >> bit & 1:
            start = bit
            while bit < 8 and value >> bit & 1:
                bit += 1
            runs.append((start, bit))
        else:
            bit += 1
    return tuple(runs)


# dirty_regions visits each partly-set byte once and reads its runs from here.
_BYTE_RUNS = tuple(_byte_runs(v) for v in range(256))


class DirtyMapError(JournalError):
    """A dirty map file cannot be created, is not a valid dirty map, or does not fit the volume.

    Whoever opened it must not guess what differs: the safe fallback is a full resync.
    """


def _region_count(volume_size: int, region_size: int) -> int:
    return -(-volume_size // region_size)


def bitmap_pages(volume_size: int, region_size: int) -> int:
    """Number of 4096-byte bitmap pages for a volume (the file is one page more: the header)."""
    bits = _region_count(volume_size, region_size)
    return -(-bits // (PAGE_SIZE * 8))


def _check_geometry(path: Path, volume_size: int, region_size: int) -> None:
    if volume_size <= 0:
        raise DirtyMapError(f"{path}: volume_size must be positive, got {volume_size}")
    if region_size <= 0 or region_size & (region_size - 1):
        raise DirtyMapError(f"{path}: region_size must be a power of two, got {region_size}")
    nbytes = bitmap_pages(volume_size, region_size) * PAGE_SIZE
    if nbytes > _MAX_BITMAP_BYTES:
        raise DirtyMapError(
            f"{path}: a {region_size}-byte region size needs a {nbytes}-byte bitmap for a "
            f"{volume_size}-byte volume (at most {_MAX_BITMAP_BYTES}); choose larger regions"
        )


def _encode_header(volume_size: int, region_size: int) -> bytes:
    body = _HEADER.pack(
        MAGIC,
        VERSION,
        PAGE_SIZE,
        region_size,
        volume_size,
        _region_count(volume_size, region_size),
    )
    return body + _CRC.pack(crc32c(body))


class DirtyMap(Closing):
    """The dirty regions of one volume for one peer, kept in memory and in a file.

    Thread model: one thread (the event loop) calls :meth:`mark`, :meth:`clear` and the queries;
    :meth:`sync` may run in another thread at the same time. Mutations and the sync's snapshot
    share a lock; syncs are serialized among themselves by a second one.
    """

    path: Path
    volume_size: int
    region_size: int

    def __init__(
        self, path: Path, fd: int, *, volume_size: int, region_size: int, bits: bytearray
    ) -> None:
        self.path = path
        self.volume_size = volume_size
        self.region_size = region_size
        self._fd = fd
        self._regions = _region_count(volume_size, region_size)
        self._bits = bits
        # Bumped by every change of a bit: the region count is cached against it (status
        # asks for it every second per peer; a 10 TiB volume's map takes ~30 ms to count).
        self._changes = 0
        self._counted: tuple[int, int] | None = None
        # Volume bytes the last region covers beyond the end of the volume: dirty_bytes and
        # dirty_regions report volume bytes, so this overhang is subtracted / clipped.
        self._overhang = self._regions * region_size - volume_size
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        # Pages changed in memory since the last snapshot, and the subset of them that gained a
        # set bit: only the latter can make a caller's write wait (see mark).
        self._pending: set[int] = set()
        self._pending_sets: set[int] = set()
        # Pages a running sync is writing; not durable until it returns.
        self._inflight: list[int] = []
        self._inflight_sets: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        volume_size: int,
        region_size: int = DEFAULT_REGION_SIZE,
        all_dirty: bool = False,
    ) -> DirtyMap:
        """Create (or replace) the map file, durably, with every bit clear (or every bit set).

        The file is built under a temporary name and renamed over ``path``: a crash during
        creation leaves either the old map or the new one, never a half-written file that would
        turn an intact old map into an error. ``all_dirty`` makes the new map start with every
        region dirty in the same atomic step (a full resync that survives a crash at any point).
        """
        path = Path(path)
        _check_geometry(path, volume_size, region_size)
        nbytes = bitmap_pages(volume_size, region_size) * PAGE_SIZE
        bits = bytearray(nbytes)
        if all_dirty:
            full, rest = divmod(_region_count(volume_size, region_size), 8)
            bits[:full] = b"\xff" * full
            if rest:
                bits[full] = (1 << rest) - 1  # padding bits past the last region stay clear
        tmp = path.with_name(path.name + ".new")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DirtyMapError(f"{path}: cannot create {tmp.name}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, PAGE_SIZE + nbytes)
            try:
                # Reserve the blocks now: the map matters most when things already go wrong
                # (a peer lags, the journal is full), which is no time to meet ENOSPC in sync().
                os.posix_fallocate(fd, 0, PAGE_SIZE + nbytes)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
            header = _encode_header(volume_size, region_size)
            pwritev_all(fd, [header], 0)
            if all_dirty:
                pwritev_all(fd, [bits], PAGE_SIZE)
            os.fdatasync(fd)
            os.replace(tmp, path)
            sync_directory(path.parent)
        except BaseException as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise DirtyMapError(f"{path}: cannot create: {exc.strerror or exc}") from exc
            raise
        return cls(path, fd, volume_size=volume_size, region_size=region_size, bits=bits)

    @classmethod
    def open(
        cls, path: Path, *, volume_size: int, region_size: int = DEFAULT_REGION_SIZE
    ) -> DirtyMap:
        """Open an existing map, checking that it is intact and made for this volume geometry."""
        path = Path(path)
        _check_geometry(path, volume_size, region_size)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DirtyMapError(f"{path}: cannot open: {exc.strerror}") from exc
        try:
            bits = cls._load(path, fd, volume_size=volume_size, region_size=region_size)
            return cls(path, fd, volume_size=volume_size, region_size=region_size, bits=bits)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise DirtyMapError(f"{path}: cannot read: {exc.strerror or exc}") from exc
            raise

    @classmethod
    def open_or_all_dirty(
        cls, path: Path, *, volume_size: int, region_size: int = DEFAULT_REGION_SIZE
    ) -> tuple[DirtyMap, bool]:
        """Open an existing map; a damaged one cannot say what differs, so it is recreated
        with every region dirty (logged). Returns the map and whether it was damaged."""
        try:
            return cls.open(path, volume_size=volume_size, region_size=region_size), False
        except DirtyMapError as exc:
            log.error("%s; recreating it with every region dirty", exc)
            dirty = cls.create(
                path, volume_size=volume_size, region_size=region_size, all_dirty=True
            )
            return dirty, True

    @staticmethod
    def _load(path: Path, fd: int, *, volume_size: int, region_size: int) -> bytearray:
        raw = pread_all(fd, HEADER_SIZE, 0)
        if len(raw) < HEADER_SIZE:
            raise DirtyMapError(f"{path}: too short for a dirty map header ({len(raw)} bytes)")
        magic, version, bitmap_offset, f_region, f_volume, f_count = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise DirtyMapError(f"{path}: not a dirty map (magic {magic!r}, expected {MAGIC!r})")
        (crc,) = _CRC.unpack_from(raw, _HEADER.size)
        if crc != crc32c(raw[: _HEADER.size]):
            raise DirtyMapError(f"{path}: header checksum mismatch (header is corrupt)")
        if version != VERSION:
            raise DirtyMapError(f"{path}: dirty map version {version}, this build reads {VERSION}")
        if (
            bitmap_offset != PAGE_SIZE
            or f_region <= 0
            or f_count != _region_count(f_volume, f_region)
        ):
            raise DirtyMapError(
                f"{path}: inconsistent header (bitmap offset {bitmap_offset}, {f_count} regions "
                f"of {f_region} bytes for {f_volume} bytes)"
            )
        if f_volume != volume_size or f_region != region_size:
            raise DirtyMapError(
                f"{path}: made for a {f_volume}-byte volume with {f_region}-byte regions, "
                f"but the volume is {volume_size} bytes with {region_size}-byte regions"
            )
        nbytes = bitmap_pages(volume_size, region_size) * PAGE_SIZE
        file_size = os.fstat(fd).st_size
        if file_size != PAGE_SIZE + nbytes:
            raise DirtyMapError(
                f"{path}: file is {file_size} bytes, expected {PAGE_SIZE + nbytes} "
                f"(truncated or not ours)"
            )
        # One transient copy (bytes, then the bytearray the marks mutate), once per open.
        bits = bytearray(pread_all(fd, nbytes, PAGE_SIZE))
        if len(bits) != nbytes:
            # The size was checked just above: only a truncation behind our back gets here.
            raise OSError(errno.EIO, "dirty map file ended early")
        # Bits past the last region never mean anything; dropping any that corruption set keeps
        # the counts honest. (Corruption inside the used bits is undetectable here and can only
        # be survived by a full resync that something else decides on.)
        regions = _region_count(volume_size, region_size)
        last_byte, used = divmod(regions, 8)
        if used:
            bits[last_byte] &= (1 << used) - 1
            last_byte += 1
        if last_byte < nbytes:
            bits[last_byte:] = bytes(nbytes - last_byte)
        return bits

    def close(self, *, sync: bool = True) -> None:
        """Write what is pending (unless ``sync`` is false), then close the file.

        Waits for a sync running in another thread: closing the descriptor under it could let
        its late writes land in whatever file reuses the number. ``sync=False`` drops pending
        changes, which is safe: marks whose writes were allowed to proceed are already durable.
        """
        try:
            if sync and self._fd >= 0:
                self.sync()
        finally:
            with self._sync_lock, self._lock:
                if self._fd >= 0:
                    fd, self._fd = self._fd, -1
                    os.close(fd)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"{self.dirty_regions_count()} dirty"
        return (
            f"<DirtyMap {self.path} {self.volume_size} bytes / {self.region_size}-byte regions, "
            f"{state}>"
        )

    # -- bit operations -------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if self._fd < 0:
            raise DirtyMapError(f"{self.path}: dirty map is closed")
        if offset < 0 or length < 0 or offset + length > self.volume_size:
            raise OutOfRangeError(
                f"{self.path}: range [{offset}, {offset}+{length}) is outside the volume "
                f"of {self.volume_size} bytes"
            )

    def _set_range(self, first: int, end: int, *, value: bool) -> bool:
        """Set (or clear) the bits of regions ``[first, end)``; True if any bit changed.

        Changed pages are added to the pending sets. Caller holds ``_lock`` and has checked
        ``0 <= first < end <= regions``. The work is a couple of masked edge bytes plus, per page
        in between, a C-level count and a slice assignment: nothing per bit.
        """
        bits = self._bits
        changed_pages: list[int] = []

        def edge(index: int, mask: int) -> None:
            old = bits[index]
            new = old | mask if value else old & ~mask
            if new != old:
                bits[index] = new
                page = index >> _PAGE_SHIFT
                if not changed_pages or changed_pages[-1] != page:
                    changed_pages.append(page)

        first_byte, last_byte = first >> 3, (end - 1) >> 3
        head = (0xFF << (first & 7)) & 0xFF  # bits first..7 of the first byte
        tail = 0xFF >> (7 - ((end - 1) & 7))  # bits 0..(end-1) of the last byte
        if first_byte == last_byte:
            edge(first_byte, head & tail)
        else:
            edge(first_byte, head)
            lo, hi = first_byte + 1, last_byte  # whole bytes in between
            fill, fill_page = (0xFF, _ONES_PAGE) if value else (0x00, _ZERO_PAGE)
            fill_view = memoryview(fill_page)
            page = lo >> _PAGE_SHIFT
            while lo < hi:
                stop = min(hi, (page + 1) << _PAGE_SHIFT)
                # count() is a C loop and spares writing (and marking pending) unchanged pages.
                if bits.count(fill, lo, stop) != stop - lo:
                    bits[lo:stop] = fill_view[: stop - lo]
                    if not changed_pages or changed_pages[-1] != page:
                        changed_pages.append(page)
                lo = stop
                page += 1
            edge(last_byte, tail)
        if not changed_pages:
            return False
        self._changes += 1
        self._pending.update(changed_pages)
        if value:
            self._pending_sets.update(changed_pages)
        return True

    def mark(self, offset: int, length: int) -> bool:
        """Mark every region touched by volume bytes ``[offset, offset + length)`` dirty.

        Returns True when the caller must :meth:`sync` (a sync *started after* this call must
        complete) before the write this mark covers may reach the volume: some bit was newly set,
        or a covering bit was set by an earlier mark whose sync has not finished yet. False means
        every covering bit is already durable. The second case is why this is not merely "newly
        set": two writes to one region race, the first sets the bit, and the second must not
        overtake the first's sync. Page granularity makes the answer conservative (a pending
        page with other new bits also answers True), never unsafe.
        """
        self._check_range(offset, length)
        if length == 0:
            return False
        rs = self.region_size
        first, end = offset // rs, -(-(offset + length) // rs)
        with self._lock:
            if self._set_range(first, end, value=True):
                return True
            waiting = self._pending_sets | self._inflight_sets
            if not waiting:
                return False
            pages = range(
                first >> _REGIONS_PER_PAGE_SHIFT, ((end - 1) >> _REGIONS_PER_PAGE_SHIFT) + 1
            )
            return any(p in waiting for p in pages)

    def mark_all(self) -> bool:
        """Mark every region dirty (a full resync). Returns as :meth:`mark` does."""
        return self.mark(0, self.volume_size)

    def clear(self, offset: int, length: int) -> None:
        """Clear the regions that lie wholly inside volume bytes ``[offset, offset + length)``.

        A region only partly covered stays dirty: its other part was not said to be copied.
        The last region counts as wholly covered when the range reaches the end of the volume.

        Call only after the peer holds the regions' contents durably *and* no write to them
        happened after the copy read them; otherwise a write would be forgotten. (That ordering
        is the resync's job: this map cannot tell a copied write from a newer one.)

        Clearing needs no sync before anything: until the cleared page is written the file just
        has extra bits (an extra copy after a crash). A torn write of the page leaves each bit
        either old or new, and both are safe: old bits are a superset, new bits are the truth.
        """
        self._check_range(offset, length)
        rs = self.region_size
        first = -(-offset // rs)
        stop = offset + length
        end = self._regions if stop >= self.volume_size else stop // rs
        if first >= end:
            return
        with self._lock:
            self._set_range(first, end, value=False)

    def clear_all(self) -> None:
        """Clear every region: the peer holds everything (or a new full resync will say so)."""
        self.clear(0, self.volume_size)

    # -- durability -----------------------------------------------------------------------

    def pending(self) -> bool:
        """True while some change is not yet durable (pending, or being written by a sync)."""
        return bool(self._pending or self._inflight)

    def sync(self) -> None:
        """Write the pending pages and ``fdatasync``; blocks, so run it off the event loop.

        Marks may continue on another thread meanwhile. Under ``_lock`` the pending pages are
        snapshotted (their bytes copied) and the pending sets emptied; the snapshot is written
        without the lock. A bit set after the snapshot makes its page pending again, for the
        next sync; rewriting a page is idempotent. Syncs run one at a time (``_sync_lock``) so
        an older snapshot can never overwrite a newer one, and so that a sync returning means
        every change made before it was called is durable, including changes an earlier
        concurrent sync was still writing.

        If writing or ``fdatasync`` fails, the pages go back to pending and are rewritten from
        memory next time: after a failed fsync, Linux may have dropped the dirty pages from the
        page cache, so retrying the fsync alone would not prove anything reached the disk.
        """
        with self._sync_lock:
            with self._lock:
                if self._fd < 0:
                    raise DirtyMapError(f"{self.path}: dirty map is closed")
                if not self._pending:
                    return
                fd = self._fd
                pages = sorted(self._pending)
                self._inflight, self._inflight_sets = pages, self._pending_sets
                self._pending, self._pending_sets = set(), set()
                bits = self._bits
                snapshot = [bytes(bits[p << _PAGE_SHIFT : (p + 1) << _PAGE_SHIFT]) for p in pages]
            try:
                self._write_pages(fd, pages, snapshot)
                os.fdatasync(fd)
            except BaseException:
                with self._lock:
                    self._pending.update(pages)
                    self._pending_sets |= self._inflight_sets
                    self._inflight, self._inflight_sets = [], set()
                raise
            with self._lock:
                self._inflight, self._inflight_sets = [], set()

    @staticmethod
    def _write_pages(fd: int, pages: list[int], snapshot: list[bytes]) -> None:
        """Write ascending ``pages``, one pwritev per run of consecutive page numbers."""
        start = 0
        while start < len(pages):
            stop = start + 1
            while stop < len(pages) and pages[stop] == pages[stop - 1] + 1:
                stop += 1
            views = [memoryview(b) for b in snapshot[start:stop]]
            pwritev_all(fd, views, PAGE_SIZE + (pages[start] << _PAGE_SHIFT))
            start = stop

    # -- queries --------------------------------------------------------------------------

    def _find(self, pos: int, *, ones: bool) -> int:
        """First bitmap byte at or after ``pos`` that is not 0x00 (not 0xFF if ``ones``)."""
        bits = self._bits
        size = len(bits)
        chunk, pattern = (_ONES_CHUNK, _NOT_ONES) if ones else (_ZERO_CHUNK, _NONZERO)
        while pos < size:
            stop = min(size, (pos // _SCAN_CHUNK + 1) * _SCAN_CHUNK)
            # A whole aligned chunk is compared with memcmp; a 20 MiB clean bitmap takes ~300
            # comparisons. Only a chunk that differs is searched byte by byte.
            if stop - pos == _SCAN_CHUNK and bits.startswith(chunk, pos):
                pos = stop
                continue
            m = pattern.search(bits, pos, stop)
            if m is not None:
                return m.start()
            pos = stop
        return size

    def dirty_regions(self, start: int = 0, limit: int | None = None) -> Iterator[tuple[int, int]]:
        """Runs of consecutive dirty regions as ``(offset, length)`` in volume bytes.

        Begins at the region holding byte ``start`` (so a resync can resume from where it got
        to), merges adjacent dirty regions into one run and clips the last region to the
        volume's end. ``limit`` caps the number of runs yielded. The bitmap is read as the
        iteration goes, not snapshotted: regions marked or cleared meanwhile may or may not show.
        """
        if not 0 <= start <= self.volume_size:
            raise OutOfRangeError(
                f"{self.path}: start {start} is outside the volume of {self.volume_size} bytes"
            )
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        return self._runs(start // self.region_size, limit)

    def _runs(self, first_region: int, limit: int | None) -> Iterator[tuple[int, int]]:
        if limit == 0 or first_region >= self._regions:
            return
        bits = self._bits
        rs = self.region_size
        first_byte = first_region >> 3
        first_mask = (0xFF << (first_region & 7)) & 0xFF
        yielded = 0
        run_start = run_end = -1  # regions [run_start, run_end) form the run being built
        pos = first_byte
        while True:
            i = self._find(pos, ones=False)
            if i >= len(bits):
                break
            value = bits[i] & first_mask if i == first_byte else bits[i]
            if value == 0xFF:
                # A dirty stretch: find its end at memcmp speed too (mark_all, big writes).
                j = self._find(i + 1, ones=True)
                segments: tuple[tuple[int, int], ...] = ((0, (j - i) * 8),)
                pos = j
            else:
                segments = _BYTE_RUNS[value]
                pos = i + 1
            base = i * 8
            for lo, hi in segments:
                if base + lo == run_end:
                    run_end = base + hi
                    continue
                if run_start >= 0:
                    yield run_start * rs, min(run_end * rs, self.volume_size) - run_start * rs
                    yielded += 1
                    if yielded == limit:
                        return
                run_start, run_end = base + lo, base + hi
        if run_start >= 0:
            yield run_start * rs, min(run_end * rs, self.volume_size) - run_start * rs

    def dirty_regions_count(self) -> int:
        """Number of dirty regions."""
        changes = self._changes
        if self._counted is not None and self._counted[0] == changes:
            return self._counted[1]
        total = 0
        with memoryview(self._bits) as view:
            # int.bit_count over megabyte slices: C speed, and bounded temporary ints.
            for pos in range(0, view.nbytes, _POPCOUNT_CHUNK):
                total += int.from_bytes(view[pos : pos + _POPCOUNT_CHUNK], "little").bit_count()
        self._counted = (changes, total)
        return total

    def dirty_bytes(self) -> int:
        """Volume bytes in dirty regions (the last region counts only up to the volume's end)."""
        total = self.dirty_regions_count() * self.region_size
        last = self._regions - 1
        if self._overhang and self._bits[last >> 3] >> (last & 7) & 1:
            total -= self._overhang
        return total

    def is_clean(self) -> bool:
        """True when no region is dirty."""
        return self._find(0, ones=False) >= len(self._bits)
