"""The backing store of a volume: a regular file, a block device, or a region of either.

A region (``offset`` + ``size``) lets several volumes share one disk as partitions, so every
method checks its range against the volume before touching the descriptor: nothing outside
``[offset, offset + size)`` of the backing store is ever read or written.

This is the NBD server's hot path: data moves with pread/preadv/pwrite/pwritev on memoryviews,
never block by block. Bad ranges raise :class:`OutOfRangeError`, writes to a read-only volume
raise :class:`ReadOnlyError`, and I/O failures propagate as :class:`OSError` with the kernel's
errno intact, because the export must map ENOSPC, EIO, ... onto protocol error codes.

``close()`` must not race with in-flight calls: the descriptor number could be reused by the
next ``open`` anywhere in the process, and a late write would land in the wrong file.

Why one module: files, devices and regions are one store behind one range check, and what
trim, zeroing and the capabilities do depends on the fallocate modes and ioctls the calls have
learned the backing store supports; the device-only parts (sizes, the exclusive claim) are in
:mod:`blockmirror.store.device`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from blockmirror.errors import OutOfRangeError, ReadOnlyError, VolumeError
from blockmirror.io.closing import Closing
from blockmirror.io.fileio import pwritev_all
from blockmirror.store.base import DATA, MAX_EXTENTS, Capabilities, Extent
from blockmirror.store.device import (
    BLKDISCARD,
    BLKSSZGET,
    BLKZEROOUT,
    device_size,
    ioctl_range,
    open_claimed,
    release_claim,
    zeroes_natively,
)

__all__ = ["HOLE", "MAX_EXTENTS", "Volume", "backing_size"]

# A hole of a file: unallocated, and reads as zeros.
HOLE = Extent(0, hole=True, zero=True)

_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH = 0x02 | _FALLOC_KEEP_SIZE  # the kernel rejects PUNCH_HOLE without KEEP_SIZE
_FALLOC_ZERO = 0x10 | _FALLOC_KEEP_SIZE

_OFF_MAX = 2**63 - 1
# errnos by which filesystems and drivers say "this operation is not implemented here".
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY})

_ZERO_BLOCK = bytes(64 * 1024)
_ZEROS_PER_CALL = 128  # 8 MiB per pwritev when zeros must be written as data


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_libc_fallocate = _load_fallocate()


def _fallocate(fd: int, mode: int, pos: int, length: int) -> None:
    if _libc_fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    # ctypes calls get no automatic EINTR retry (PEP 475 covers only the os module).
    while _libc_fallocate(fd, mode, pos, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _probe_fallocate(directory: Path) -> dict[int, bool]:
    """Which hole/zero modes the filesystem of ``directory`` has, tried on an unnamed file.

    Probing the volume itself is unsafe: a concurrent write could land in the probed range.
    """
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return {}
    found: dict[int, bool] = {}
    try:
        os.ftruncate(fd, 8192)
        for mode in (_FALLOC_PUNCH, _FALLOC_ZERO):
            try:
                _fallocate(fd, mode, 0, 4096)
                found[mode] = True
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:
                    found[mode] = False
    except OSError:
        pass
    finally:
        os.close(fd)
    return found


def backing_size(path: Path) -> int | None:
    """Bytes in the file or block device at ``path``, or None when nothing is there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise VolumeError(f"{path}: cannot stat: {exc.strerror}") from exc
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        raise VolumeError(f"{path}: neither a regular file nor a block device")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        return device_size(fd)
    finally:
        os.close(fd)


class Volume(Closing):
    """An open backing store; all offsets are relative to the volume's region."""

    path: Path
    size: int
    offset: int
    read_only: bool
    kind: Literal["file", "block"]
    # The device claimed for this volume (see _open_block_device); released on close.
    _claimed: int | None = None
    sync_error: OSError | None

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        kind: Literal["file", "block"],
        size: int,
        offset: int,
        read_only: bool,
        sector: int = 1,
        fast_zero_device: bool = False,
    ) -> None:
        self.path = path
        self.size = size
        self.offset = offset
        self.read_only = read_only
        self.kind = kind
        self._fd = fd
        self._sector = sector
        self._fast_zero_device = fast_zero_device
        # fallocate modes / ioctls by what we learned about them; absent means "not tried yet".
        self._supported: dict[int, bool] = {}
        # The first failed sync, kept: every later flush fails with it (see flush).
        self.sync_error: OSError | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        size: int,
        offset: int = 0,
        read_only: bool = False,
        create: bool = True,
    ) -> Volume:
        path = Path(path)
        if size <= 0:
            raise VolumeError(f"{path}: size must be positive, got {size}")
        if offset < 0:
            raise VolumeError(f"{path}: offset must not be negative, got {offset}")
        if offset + size > _OFF_MAX:
            raise VolumeError(f"{path}: offset + size exceeds the largest file position")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise VolumeError(f"{path}: cannot stat: {exc.strerror}") from exc

        created = False
        claimed: int | None = None  # the device claimed, for a block device
        if st is None:
            if not create:
                raise VolumeError(f"{path}: does not exist and create is off")
            if read_only:
                raise VolumeError(f"{path}: does not exist, and a read-only volume is not created")
            try:
                # 0o600: a disk image holds the host's data, whoever's umask this is.
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return cls.open(path, size=size, offset=offset, read_only=False, create=False)
            except OSError as exc:
                raise VolumeError(f"{path}: cannot create: {exc.strerror}") from exc
            created = True
        else:
            if stat.S_ISDIR(st.st_mode):
                raise VolumeError(f"{path}: is a directory")
            # Checked before open: opening a FIFO would block and a char device could be a tty.
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise VolumeError(f"{path}: neither a regular file nor a block device")
            if stat.S_ISBLK(st.st_mode):
                fd = open_claimed(path, flags, st.st_rdev)
                claimed = st.st_rdev
            else:
                try:
                    fd = os.open(path, flags)
                except OSError as exc:
                    how = "read-only" if read_only else "read-write"
                    raise VolumeError(f"{path}: cannot open {how}: {exc.strerror}") from exc
        try:
            if created:
                os.ftruncate(fd, offset + size)  # sparse: no blocks until written
            vol = cls._from_fd(path, fd, size=size, offset=offset, read_only=read_only)
            vol._claimed = claimed
            return vol
        except BaseException as exc:
            os.close(fd)
            if claimed is not None:
                release_claim(claimed)
            if created:
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise VolumeError(f"{path}: {exc.strerror or exc}") from exc
            raise

    @classmethod
    def _from_fd(cls, path: Path, fd: int, *, size: int, offset: int, read_only: bool) -> Volume:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            capacity = st.st_size
            if offset + size > capacity:
                raise VolumeError(
                    f"{path}: region [{offset}, {offset + size}) ends past the end of the "
                    f"file ({capacity} bytes); existing files are never extended"
                )
            vol = cls(path, fd, kind="file", size=size, offset=offset, read_only=read_only)
            if not read_only:
                vol._supported.update(_probe_fallocate(path.parent))
            return vol
        if not stat.S_ISBLK(st.st_mode):
            raise VolumeError(f"{path}: neither a regular file nor a block device")
        capacity = device_size(fd)
        if offset + size > capacity:
            raise VolumeError(
                f"{path}: region [{offset}, {offset + size}) ends past the end of the "
                f"device ({capacity} bytes)"
            )
        try:
            sector = int.from_bytes(fcntl.ioctl(fd, BLKSSZGET, bytes(4)), "little")
        except OSError:
            sector = 512
        return cls(
            path,
            fd,
            kind="block",
            size=size,
            offset=offset,
            read_only=read_only,
            sector=max(sector, 1),
            fast_zero_device=zeroes_natively(st.st_rdev),
        )

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<Volume {self.kind} {self.path} [{self.offset}+{self.size}] {mode}>"

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            if self._claimed is not None:
                claimed, self._claimed = self._claimed, None
                release_claim(claimed)

    # -- range checks ---------------------------------------------------------------------

    def _locate(self, offset: int, length: int) -> tuple[int, int]:
        """(fd, absolute position) for a range, or raise before anything is touched."""
        if self._fd < 0:
            raise VolumeError(f"{self.path}: volume is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"{self.path}: range [{offset}, {offset}+{length}) is outside the volume "
                f"of {self.size} bytes"
            )
        return self._fd, self.offset + offset

    def _locate_for_write(self, offset: int, length: int) -> tuple[int, int]:
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: volume is read-only")
        return self._locate(offset, length)

    # -- data -----------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        fd, pos = self._locate(offset, length)
        data = os.pread(fd, length, pos)
        if len(data) == length:
            return data
        buf = bytearray(length)
        buf[: len(data)] = data
        _read_fully(fd, pos + len(data), memoryview(buf)[len(data) :])
        return bytes(buf)

    def advise_willneed(self, offset: int, length: int) -> None:
        """Start reading a range into the page cache (NBD CACHE); returns at once."""
        fd, pos = self._locate(offset, length)
        os.posix_fadvise(fd, pos, length, os.POSIX_FADV_WILLNEED)

    def preadinto(self, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        fd, pos = self._locate(offset, view.nbytes)
        _read_fully(fd, pos, view)

    def read_cached(self, offset: int, buffers: Sequence[bytearray]) -> bool:
        # RWF_NOWAIT: the kernel answers from the page cache or says EAGAIN; a short read means
        # part of the range was not cached. Either way nothing waited for the disk.
        length = sum(len(b) for b in buffers)
        fd, pos = self._locate(offset, length)
        try:
            return os.preadv(fd, buffers, pos, os.RWF_NOWAIT) == length
        except OSError:
            return False  # EAGAIN, or a file system without RWF_NOWAIT (EOPNOTSUPP)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        fd, pos = self._locate_for_write(offset, view.nbytes)
        while len(view):
            n = os.pwrite(fd, view, pos)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.path}: write made no progress")
            view = view[n:]
            pos += n

    def pwritev(self, offset: int, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
        fd, pos = self._locate_for_write(offset, sum(v.nbytes for v in views))
        pwritev_all(fd, views, pos)

    def flush(self) -> None:
        if self._fd < 0:
            raise VolumeError(f"{self.path}: volume is closed")
        if self.sync_error is not None:
            # After a failed sync the kernel may have dropped the pages it could not write,
            # and reports that only once: no later sync of this file proves anything.
            raise OSError(
                self.sync_error.errno or errno.EIO,
                f"an earlier sync of this volume failed ({self.sync_error.strerror}); "
                "nothing is durable until the unit restarts and replays its journal",
                str(self.path),
            )
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self.sync_error = exc
            raise

    # -- deallocation and zeroing ---------------------------------------------------------

    def _try(self, op: int, fd: int, pos: int, length: int) -> bool:
        """Run a fallocate mode (files) or range ioctl (devices); False if not supported."""
        if self._supported.get(op) is False:
            return False
        try:
            if self.kind == "file":
                _fallocate(fd, op, pos, length)
            else:
                ioctl_range(fd, op, pos, length)
        except OSError as exc:
            # EBUSY: the kernel could not claim a device another holder has (say a mounted
            # partition of the disk we hold a region of); this call falls back, later ones retry.
            if exc.errno == errno.EBUSY and self.kind == "block":
                return False
            if exc.errno not in _UNSUPPORTED:
                raise
            self._supported[op] = False
            return False
        self._supported[op] = True
        return True

    def _sector_span(self, pos: int, length: int) -> tuple[int, int]:
        # The block layer rejects ranges not aligned to the logical sector: shrink inward.
        start = -(-pos // self._sector) * self._sector
        end = (pos + length) // self._sector * self._sector
        return start, max(start, end)

    def trim(self, offset: int, length: int) -> None:
        """Advisory deallocation: afterwards the range's content is unspecified.

        Files read zeros from punched holes; devices may return anything after a discard.
        Unsupported or misaligned pieces are silently left as they were.
        """
        fd, pos = self._locate_for_write(offset, length)
        if length == 0:
            return
        if self.kind == "file":
            self._try(_FALLOC_PUNCH, fd, pos, length)
            return
        start, end = self._sector_span(pos, length)
        if end > start:
            self._try(BLKDISCARD, fd, start, end - start)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        """Make the range read as zeros, without writing data where the store allows it."""
        fd, pos = self._locate_for_write(offset, length)
        if length == 0:
            return
        if self.kind == "block":
            # BLKZEROOUT never unmaps (NOUNMAP), so may_trim has nothing to add on devices.
            start, end = self._sector_span(pos, length)
            if end > start and self._try(BLKZEROOUT, fd, start, end - start):
                _write_zeros(fd, pos, start - pos)
                _write_zeros(fd, end, pos + length - end)
            else:
                _write_zeros(fd, pos, length)
            return
        if may_trim and self._try(_FALLOC_PUNCH, fd, pos, length):
            return
        if self._try(_FALLOC_ZERO, fd, pos, length):
            return
        # tmpfs and some others punch but cannot ZERO_RANGE: punch, then allocate again so
        # a caller who forbade holes still gets allocated (zero-filled) blocks.
        if self._try(_FALLOC_PUNCH, fd, pos, length):
            self._try(_FALLOC_KEEP_SIZE, fd, pos, length)
            return
        _write_zeros(fd, pos, length)

    def can_fast_zero(self) -> bool:
        """Whether write_zeroes avoids writing data; NBD's FAST_ZERO must fail fast otherwise."""
        if self.read_only:
            return False
        if self.kind == "block":
            return self._fast_zero_device and self._supported.get(BLKZEROOUT) is not False
        # Unknown (the probe could not run and nothing was tried yet) answers False: a client
        # told "no" falls back to writing zeros, one told a wrong "yes" waits on a slow write.
        return bool(self._supported.get(_FALLOC_ZERO) or self._supported.get(_FALLOC_PUNCH))

    # -- allocation map -------------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        """See :meth:`Store.extents`. A block device reports all data; in a file, ``SEEK_DATA``
        and ``SEEK_HOLE`` find the holes, and a hole past the end of the file is one."""
        fd, pos = self._locate(offset, length)
        end = pos + length
        if length == 0:
            return []
        if self.kind == "block":
            return [DATA._replace(length=length)]
        extents: list[Extent] = []
        while pos < end and len(extents) < MAX_EXTENTS:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data from pos to end of file
                    extents.append(DATA._replace(length=end - pos))
                    break
                data = end
            if data > pos:
                extents.append(HOLE._replace(length=data - pos))
                pos = data
                continue
            try:
                hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            except OSError:
                hole = end  # e.g. truncated concurrently; calling it data is always safe
            if hole > pos:  # hole == pos only if a punch raced us; look again
                extents.append(DATA._replace(length=hole - pos))
                pos = hole
        return extents

    def capabilities(self) -> Capabilities:
        return Capabilities(
            trim=not self.read_only,
            fast_zero=self.can_fast_zero(),
            extents=self.kind == "file",
            read_only=self.read_only,
        )


def _read_fully(fd: int, pos: int, view: memoryview) -> None:
    while len(view):
        n = os.preadv(fd, [view], pos)
        if n == 0:
            # Past the end of a file shorter than the region (truncated behind our back):
            # like a hole, it reads as zeros.
            view[:] = bytes(len(view))
            return
        view = view[n:]
        pos += n


def _write_zeros(fd: int, pos: int, length: int) -> None:
    chunk = len(_ZERO_BLOCK)
    whole = memoryview(_ZERO_BLOCK)
    while length > 0:
        step = min(length, chunk * _ZEROS_PER_CALL)
        full, rest = divmod(step, chunk)
        views = [whole] * full
        if rest:
            views.append(whole[:rest])
        pwritev_all(fd, views, pos)
        pos += step
        length -= step
