"""Block devices under a volume: their size, their sector, how they zero, the exclusive claim.

The ioctls here are Linux's (``<linux/fs.h>``). :func:`open_claimed` opens a device with
``O_EXCL``, which Linux turns into an exclusive claim (see there); the volume store
(:mod:`blockmirror.store.volume`) is its only user.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from pathlib import Path

from blockmirror.errors import VolumeError

__all__ = [
    "BLKDISCARD",
    "BLKSSZGET",
    "BLKZEROOUT",
    "device_size",
    "ioctl_range",
    "open_claimed",
    "release_claim",
    "zeroes_natively",
]

BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272


def ioctl_range(fd: int, request: int, pos: int, length: int) -> None:
    arg = struct.pack("=QQ", pos, length)
    while True:
        try:
            fcntl.ioctl(fd, request, arg)
            return
        except InterruptedError:
            continue


def device_size(fd: int) -> int:
    try:
        (size,) = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))
        return int(size)
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def zeroes_natively(rdev: int) -> bool:
    # A device with a WRITE ZEROES command (or a loop device over a file that can punch) zeroes
    # without transferring data; otherwise the kernel's BLKZEROOUT writes zero pages itself.
    node = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    queue = node / "queue" if (node / "queue").exists() else node.resolve().parent / "queue"
    try:
        return int((queue / "write_zeroes_max_bytes").read_text()) > 0
    except (OSError, ValueError):
        return False


# Block devices are opened with O_EXCL, which Linux turns into an exclusive claim: while a unit
# holds a device nobody can mount it or claim it (a second unit, mkfs, ...), and a device that is
# mounted or claimed already is refused. Volumes of one unit may share a device (regions of one
# disk): the first open claims it, the others share that open file (a dup, or a plain open when
# it needs write access the claim lacks), and the claim ends with the last of them.
_claims: dict[int, list[int]] = {}  # st_rdev -> [claiming fd, its access mode, users]
_claims_lock = threading.Lock()


def open_claimed(path: Path, flags: int, rdev: int) -> int:
    with _claims_lock:
        claim = _claims.get(rdev)
        if claim is None:
            try:
                fd = os.open(path, flags | os.O_EXCL)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise VolumeError(
                        f"{path}: the block device is in use (mounted, or held by another "
                        "program or unit); blockmirror must be its only user"
                    ) from exc
                raise VolumeError(f"{path}: cannot open exclusively: {exc.strerror}") from exc
            claim = _claims[rdev] = [fd, flags & os.O_ACCMODE, 0]
        try:
            if claim[1] == os.O_RDWR or flags & os.O_ACCMODE == os.O_RDONLY:
                fd = os.dup(claim[0])
            else:
                fd = os.open(path, flags)
        except OSError as exc:
            _drop_claim(rdev)
            raise VolumeError(f"{path}: cannot open: {exc.strerror}") from exc
        claim[2] += 1
        return fd


def _drop_claim(rdev: int) -> None:
    """One user fewer of a claimed device; the claim ends with the last (caller holds the lock)."""
    claim = _claims.get(rdev)
    if claim is None:
        return
    claim[2] -= 1
    if claim[2] <= 0:
        del _claims[rdev]
        os.close(claim[0])


def release_claim(rdev: int) -> None:
    with _claims_lock:
        _drop_claim(rdev)
