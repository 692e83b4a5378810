"""Whole-buffer positional I/O: the short-read and short-write loops every store needs once."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

Buffer = bytes | bytearray | memoryview

# The kernel's limit on buffers per vectored call (UIO_MAXIOV, 1024 on Linux).
try:
    IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    IOV_MAX = 1024


def pwritev_all(fd: int, buffers: Sequence[Buffer], pos: int) -> None:
    """Write every buffer at ``pos``, in as few ``pwritev`` calls as the kernel allows."""
    views = [memoryview(b).cast("B") for b in buffers]
    i = 0
    while i < len(views):
        n = os.pwritev(fd, views[i : i + IOV_MAX], pos)
        if n <= 0:
            raise OSError(errno.EIO, "vectored write made no progress")
        pos += n
        # Skip what was written: whole buffers, then the head of a partly written one.
        while n:
            if n >= views[i].nbytes:
                n -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


def pread_all(fd: int, size: int, pos: int) -> bytes:
    """``size`` bytes from ``pos``; fewer only where the file ends."""
    data = os.pread(fd, size, pos)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size and data:
        data = os.pread(fd, size - got, pos + got)
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def sync_directory(path: Path) -> None:
    """fsync the directory ``path``: a file created or renamed in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
