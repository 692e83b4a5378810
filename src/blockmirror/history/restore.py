"""Writing a full image of a volume as it was at a point: the current volume, then undo.

The volume keeps changing while it is copied (replication goes on, a host keeps writing), and
that is fine: every change captures its before-image *before* it reaches the volume, so once
the copy is done, writing back the before-images of every entry from the point to the newest
one — newest first — gives each byte the value it had at the point, whether the copy read it
before or after a later change. The entries needed are pinned for the whole restore, so expiry
cannot take them.
"""

from __future__ import annotations

import asyncio
import os
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from blockmirror.history.index import Point
from blockmirror.history.log import HistoryLog
from blockmirror.history.segments import Segments
from blockmirror.history.undo_format import HEADER_SIZE
from blockmirror.io.fileio import pwritev_all
from blockmirror.store.base import Store

__all__ = [
    "COPY_CHUNK",
    "RestoreResult",
    "UndoPlan",
    "apply_undo",
    "apply_undo_to",
    "copy_volume",
    "plan",
    "restore",
]

COPY_CHUNK = 8 << 20
_ZEROS = bytes(COPY_CHUNK)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    path: Path
    point: Point
    entries: int  # before-images written back
    seconds: float


@dataclass(frozen=True, slots=True)
class UndoPlan:
    """The entries to write back, oldest first (a snapshot of the index's columns)."""

    segs: array[int]
    offs: array[int]
    voffs: array[int]
    vlens: array[int]

    def __len__(self) -> int:
        return len(self.segs)


def plan(history: HistoryLog, pos: int) -> UndoPlan:
    """On the event loop: the entries from ``pos`` to the newest, copied out of the index."""
    index = history.index
    lo, hi = pos - index.base, index.end - index.base
    return UndoPlan(index.segs[lo:hi], index.offs[lo:hi], index.voffs[lo:hi], index.vlens[lo:hi])


def copy_volume(volume: Store, fd: int) -> None:
    """Blocking: copy every data extent of ``volume`` into ``fd`` (holes stay holes)."""
    size = volume.size
    at = 0
    for extent in volume.extents(0, size):
        if not (extent.hole or extent.zero):
            end = at + extent.length
            pos = at
            while pos < end:
                n = min(COPY_CHUNK, end - pos)
                pwritev_all(fd, [volume.pread(pos, n)], pos)
                pos += n
        at += extent.length


def apply_undo(segments: Segments, undo: UndoPlan, fd: int) -> None:
    """Blocking: write the before-images of ``undo`` into ``fd``, newest first."""
    for i in range(len(undo) - 1, -1, -1):
        off, voff, vlen = undo.offs[i], undo.voffs[i], undo.vlens[i]
        if off & 1:
            pos = voff
            while pos < voff + vlen:
                n = min(COPY_CHUNK, voff + vlen - pos)
                pwritev_all(fd, [memoryview(_ZEROS)[:n]], pos)
                pos += n
        else:
            pwritev_all(fd, [segments.read(undo.segs[i], off + HEADER_SIZE, vlen)], voff)


def apply_undo_to(segments: Segments, undo: UndoPlan, store: Store) -> None:
    """Blocking: write the before-images of ``undo`` into ``store`` (the volume itself, when
    a resync is rolled back), newest first."""
    for i in range(len(undo) - 1, -1, -1):
        off, voff, vlen = undo.offs[i], undo.voffs[i], undo.vlens[i]
        if off & 1:
            store.write_zeroes(voff, vlen, may_trim=False)
        else:
            store.pwrite(voff, segments.read(undo.segs[i], off + HEADER_SIZE, vlen))


def _create(path: Path, size: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


async def restore(history: HistoryLog, volume: Store, point: Point, path: Path) -> RestoreResult:
    """Write the image of ``volume`` at ``point`` to the new file ``path``.

    Raises FileExistsError when ``path`` exists (an image is never written over a file), and
    OSError when it cannot be written; a failed restore removes what it wrote.
    """
    started = time.monotonic()
    pin = history.pin(point.pos)
    try:
        fd = await asyncio.to_thread(_create, path, volume.size)
    except BaseException:
        history.unpin(pin)
        raise
    try:
        await asyncio.to_thread(copy_volume, volume, fd)
        undo = plan(history, point.pos)
        await asyncio.to_thread(apply_undo, history.segments, undo, fd)
        await asyncio.to_thread(os.fsync, fd)
    except BaseException:
        os.close(fd)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    finally:
        history.unpin(pin)
    os.close(fd)
    return RestoreResult(path, point, len(undo), time.monotonic() - started)
