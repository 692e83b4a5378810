"""The write path: the one seam between the block-device service and everything a write must go
through.

The service (:mod:`blockmirror.blockdev.service`) validates each host request, then hands every
write, write-zeroes, trim and flush to a :class:`WritePath`. The :class:`DirectWritePath` writes
the volume and makes it durable on request; the journaled write path
(:mod:`blockmirror.blockdev.journaled`), and through it the replication senders, sit behind this
same interface.

Hot-path convention: each method either completes synchronously and returns ``None``, or returns a
future the caller attaches its reply to. Returning ``None`` spares a scheduled callback per request,
which is most of the cost of a 4 KiB write in Python.

Errors: the synchronous part raises, and a returned future fails with, an :class:`OSError` with
the kernel's errno (ENOSPC, EIO, ...) or a :class:`~blockmirror.errors.BlockmirrorError`; a write
path that has failed for good raises whatever ended it for every later change (a
``VolumeError``, say). Callers must not assume any narrower type: the service turns *any*
exception into an errno for the host (EIO unless a better one is known), so none can drop a
host's connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from blockmirror.io.syncer import Syncer
from blockmirror.store.base import MAX_WRITE, Store
from blockmirror.store.volume import Volume

Buffer = bytes | bytearray | memoryview


class WritePath(Protocol):
    """What the export needs from whatever stands between it and the volume."""

    def write(
        self, offset: int, data: Sequence[Buffer], *, fua: bool
    ) -> asyncio.Future[None] | None:
        """Apply a write of the concatenated ``data`` at ``offset``; with ``fua``, durably."""

    def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool
    ) -> asyncio.Future[None] | None:
        """Make a range read as zeros; ``may_trim`` allows deallocating it."""

    def trim(self, offset: int, length: int, *, fua: bool) -> asyncio.Future[None] | None:
        """Advise that a range is no longer needed (its contents become unspecified)."""

    def flush(self) -> asyncio.Future[None] | None:
        """Make every write completed before this call durable."""

    def can_fast_zero(self) -> bool:
        """Whether write_zeroes is cheap (no data written), for NBD's FAST_ZERO flag."""

    def max_write(self) -> int:
        """The largest write accepted, fixed for the write path's life (the service reads it
        once and refuses a larger write with EINVAL before it gets here); never queued."""

    def commit(self) -> asyncio.Future[None] | None:
        """Finish the work of every request accepted since the last commit.

        A request method that returned None may defer its work (a batched journal append, then
        the volume write) until this call. Each front-end connection calls it (through the
        service's ReplyGate) after handing over all it read from one socket read, and must not
        send any reply produced since the previous commit before this returns, or before the
        returned future completes when it returns one.
        """


class DirectWritePath:
    """Writes straight to the volume. Durability comes from the volume's own sync.

    Writes go to the page cache synchronously on the event loop (a memcpy); only the syncs, and
    trims and zeroing (which may have to write real zeros on some stores), run in worker threads.
    Because every connection shares this object and the same file, one FLUSH covers writes
    acknowledged on every connection, which is what NBD's CAN_MULTI_CONN promises.
    """

    def __init__(self, volume: Volume | Store, loop: asyncio.AbstractEventLoop) -> None:
        self.volume = volume
        self._loop = loop
        self.syncer = Syncer(volume.flush, loop)

    def write(
        self, offset: int, data: Sequence[Buffer], *, fua: bool
    ) -> asyncio.Future[None] | None:
        if len(data) == 1:
            self.volume.pwrite(offset, data[0])
        else:
            self.volume.pwritev(offset, data)
        return self.syncer.sync() if fua else None

    def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool
    ) -> asyncio.Future[None] | None:
        done = self._loop.run_in_executor(
            None, lambda: self.volume.write_zeroes(offset, length, may_trim=may_trim)
        )
        return self._then_sync(done) if fua else done

    def trim(self, offset: int, length: int, *, fua: bool) -> asyncio.Future[None] | None:
        done = self._loop.run_in_executor(None, self.volume.trim, offset, length)
        return self._then_sync(done) if fua else done

    def flush(self) -> asyncio.Future[None] | None:
        return self.syncer.sync()

    def can_fast_zero(self) -> bool:
        if isinstance(self.volume, Volume):
            return self.volume.can_fast_zero()
        return self.volume.capabilities().fast_zero

    def max_write(self) -> int:
        return MAX_WRITE

    def commit(self) -> asyncio.Future[None] | None:
        return None  # every request completed when it was accepted

    def _then_sync(self, first: asyncio.Future[None]) -> asyncio.Future[None]:
        result: asyncio.Future[None] = self._loop.create_future()

        def after_first(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                if not result.done():
                    result.set_exception(f.exception() or asyncio.CancelledError())
                return
            self.syncer.sync().add_done_callback(after_sync)

        def after_sync(f: asyncio.Future[None]) -> None:
            if result.done():
                return
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            if exc is None:
                result.set_result(None)
            else:
                result.set_exception(exc)

        first.add_done_callback(after_first)
        return result


def split_buffers(data: Sequence[Buffer], limit: int) -> list[list[memoryview]]:
    """Cut a write's buffers into pieces of at most ``limit`` bytes, without copying."""
    pieces: list[list[memoryview]] = [[]]
    room = limit
    for buf in data:
        view = memoryview(buf).cast("B")
        while view.nbytes:
            if room == 0:
                pieces.append([])
                room = limit
            take = min(room, view.nbytes)
            pieces[-1].append(view[:take])
            view = view[take:]
            room -= take
    return pieces
