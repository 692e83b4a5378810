"""A past point of a volume as a Store, without copying the volume: what a drill serves.

Reads are the current volume with the :class:`~blockmirror.history.overlay.Overlay` of the
before-images laid over it. The volume keeps changing (replication goes on): each change
captures its before-image *before* it reaches the volume and the drill hears of the new entry
at once (:meth:`DrillStore.entry_added`), so a read takes the volume's bytes first and then the
overlay: whatever changed meanwhile is covered by an entry by then.

A writable drill keeps its own writes in a sparse copy-on-write file (``cow``) and a set of the
ranges written; they are read back over everything else. The file is deleted on close: nothing
of a drill ever reaches the volume or its replica.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from blockmirror.history.log import HistoryLog
from blockmirror.history.overlay import Overlay
from blockmirror.history.restore import plan
from blockmirror.history.undo_format import HEADER_SIZE
from blockmirror.io.fileio import pread_all, pwritev_all
from blockmirror.store.base import Buffer, Capabilities, Extent, Store

__all__ = ["DrillStore"]


class DrillStore:
    """Point ``pos`` of ``history``'s volume, read-only or with a copy-on-write file."""

    def __init__(self, history: HistoryLog, volume: Store, pos: int, cow: Path | None) -> None:
        self.history = history
        self.volume = volume
        self.pos = pos
        self.size = volume.size
        self.path = cow if cow is not None else volume.path
        self.read_only = cow is None
        self.sync_error: OSError | None = None
        self._lock = threading.Lock()
        # Entry numbers are positions; where each before-image lies is looked up when read.
        self._segs: dict[int, tuple[int, int]] = {}
        self.overlay = Overlay()
        self._pending: list[tuple[int, int, int, int, int]] | None = []
        # On the event loop: listen from now on; :meth:`build` lays out what came before.
        self._undo = plan(history, pos)
        history.listeners.append(self.entry_added)
        self._cow_fd = -1
        self._written = Overlay()
        if cow is not None:
            self._cow_fd = os.open(cow, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(self._cow_fd, self.size)
        self.cow = cow

    def build(self) -> None:
        """Blocking (a thread): lay out the entries the history held at the start, then the
        ones that came meanwhile. Reads are served only after this."""
        undo = self._undo
        base = self.pos
        segs = {base + i: (undo.segs[i], undo.offs[i]) for i in range(len(undo))}
        overlay = Overlay.build((base + i, undo.voffs[i], undo.vlens[i]) for i in range(len(undo)))
        with self._lock:
            self._segs.update(segs)
            self.overlay = overlay
            pending, self._pending = self._pending or [], None
            for pos, seg, off, voff, vlen in pending:
                # One also in the snapshot is covered by itself (or an older one) already.
                self._segs.setdefault(pos, (seg, off))
                self.overlay.fill(pos, voff, vlen)

    # --- the history's news ---------------------------------------------------------------------

    def entry_added(self, pos: int, seg: int, off: int, voff: int, vlen: int) -> None:
        """A change is about to overwrite ``[voff, voff + vlen)``; its before-image is
        ``(seg, off)``. Called before the change reaches the volume (from any thread)."""
        with self._lock:
            if self._pending is not None:
                self._pending.append((pos, seg, off, voff, vlen))
                return
            self._segs[pos] = (seg, off)
            self.overlay.fill(pos, voff, vlen)

    # --- reading --------------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray(self.volume.pread(offset, length))
        with self._lock:
            pieces = self.overlay.lookup(offset, length)
            where = [self._segs[p.entry] for p in pieces]
            written = self._written.lookup(offset, length) if self._cow_fd >= 0 else []
        for piece, (seg, off) in zip(pieces, where, strict=True):
            a, b = piece.start - offset, piece.end - offset
            if off & 1:
                out[a:b] = bytes(b - a)
            else:
                start = off + HEADER_SIZE + (piece.start - piece.entry_start)
                out[a:b] = self.history.segments.read(seg, start, b - a)
        for piece in written:
            a, b = piece.start - offset, piece.end - offset
            out[a:b] = pread_all(self._cow_fd, b - a, piece.start)
        return bytes(out)

    def preadinto(self, offset: int, buf: memoryview | bytearray) -> None:
        view = memoryview(buf).cast("B")
        view[:] = self.pread(offset, len(view))

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length)]

    def capabilities(self) -> Capabilities:
        return Capabilities(trim=False, fast_zero=False, extents=False, read_only=self.read_only)

    def advise_willneed(self, offset: int, length: int) -> None:
        return None

    def read_cached(self, offset: int, buffers: Sequence[bytearray]) -> bool:
        return False  # a drill's reads go through its overlay: never skipped

    # --- a writable drill's own writes ----------------------------------------------------------

    def _check_writable(self) -> None:
        if self._cow_fd < 0:
            raise OSError(errno.EROFS, "a read-only drill")

    def pwrite(self, offset: int, data: Buffer) -> None:
        self.pwritev(offset, [data])

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._check_writable()
        pwritev_all(self._cow_fd, buffers, offset)
        length = sum(memoryview(b).nbytes for b in buffers)
        self._mark(offset, length)

    def _mark(self, offset: int, length: int) -> None:
        # The copy-on-write file holds the drill's bytes at their own offsets: only the
        # union of what was written matters.
        with self._lock:
            self._written.fill(0, offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        self._check_writable()
        pos = offset
        while pos < offset + length:
            n = min(8 << 20, offset + length - pos)
            pwritev_all(self._cow_fd, [bytes(n)], pos)
            pos += n
        self._mark(offset, length)

    def trim(self, offset: int, length: int) -> None:
        self._check_writable()  # the range keeps what it holds (trim is advisory)

    def flush(self) -> None:
        if self._cow_fd >= 0:
            os.fdatasync(self._cow_fd)

    def close(self) -> None:
        """Close, and delete a writable drill's copy-on-write file (its space is freed)."""
        if self.entry_added in self.history.listeners:
            self.history.listeners.remove(self.entry_added)
        if self._cow_fd >= 0:
            os.close(self._cow_fd)
            self._cow_fd = -1
        if self.cow is not None:
            with contextlib.suppress(FileNotFoundError):
                self.cow.unlink()
