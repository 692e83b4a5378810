"""The block-device service: one volume as every front end sees it.

A front end is two things: a codec that turns its wire bytes into requests and its replies back
into bytes (sans-I/O), and a thin asyncio adapter that moves those bytes and calls this service.
NBD is one (``frontend/nbd_*``); an iSCSI target is meant to be another, on this same service,
with nothing below the adapter repeated. What a request *means* is decided here, once:

- **Validation.** A range must be non-empty, lie inside ``[0, size)`` and be aligned to
  ``min_block``; a change is refused on a read-only device; a write carries at most
  ``max_write`` bytes (the write path's limit: a journal smaller than 32 MiB takes less); fast
  zeroing is refused when the write path cannot zero without writing. A refused request changes
  nothing. When a request breaks several rules, the first in this order wins: empty (EINVAL),
  out of range (ENOSPC for a change, EINVAL for a read), misaligned (EINVAL), read-only (EPERM),
  too big (EINVAL), not fast (ENOTSUP).
- **Dispatch** of read, write, write-zeroes (``may_trim``, ``fast``), trim, flush, cache (an
  advisory read-ahead) and extents. Reads come from the store here; every change goes to the
  :class:`~blockmirror.blockdev.writepath.WritePath` (the journal, then the volume).
- **Commit gating.** :class:`ReplyGate` keeps, per connection, the write path's ``commit()``
  contract: a success reply to a change accepted since the last commit may claim work the
  write path does only in ``commit()``, so it leaves after the commit, or after the future the
  commit returns, and becomes an error reply when the commit fails.
- **Allocation**, as neutral :class:`~blockmirror.store.base.Extent` runs (hole, zero); the front
  end translates them (NBD's base:allocation flags, SCSI's GET LBA STATUS descriptors).
- **Counters** of what was served (:class:`~blockmirror.counters.VolumeCounters`).

Errors are neutral too. Everything a request can fail with is a :class:`RequestError` whose
``code`` is an ``errno`` value (``errno.EINVAL``, ``ENOSPC``, ``EPERM``, ``ENOTSUP``, ``EIO``...),
never a protocol's number: NBD maps it to its error numbers, SCSI would map it to sense data.
The service raises RequestError from its methods, and :meth:`BlockDevice.failure` turns the
exception of a failed future (a FUA write, a flush, a commit) into one. *Any* failure of the write
path or the store becomes a RequestError, EIO unless a better errno is known: a write path that
failed for good (``JournalWritePath.failed`` holds whatever ended it, a ``VolumeError`` say)
refuses every change with EIO, and the connection and the unit stay up.

Hot-path convention, as the write path's: a change returns ``None`` when its success reply may be
produced at once (subject to the commit gate), or a future the reply waits for. The front end
calls :meth:`ReplyGate.commit` after handing over everything it read from one socket read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Sequence
from typing import NamedTuple

from blockmirror.blockdev.writepath import Buffer, WritePath
from blockmirror.counters import VolumeCounters
from blockmirror.errors import (
    BlockmirrorError,
    OutOfRangeError,
    ReadOnlyError,
    WritePathError,
)
from blockmirror.store.base import Extent, Store

log = logging.getLogger(__name__)

Pending = asyncio.Future[None] | None

# What a call into the write path or the store may end with and still be answered: anything.
# A write path that failed holds whatever ended it and raises it again for every later change
# (even a CancelledError from a task cancelled under it); letting one escape would drop the
# host's connection from inside a protocol callback instead of answering it.
_ANY_FAILURE = (Exception, asyncio.CancelledError)


class RequestError(WritePathError):
    """A host request refused or failed. ``code`` is an errno value, for the front end to map."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_code(exc: BaseException) -> int:
    """The errno that describes ``exc`` to a host: its own when it has one, else EIO."""
    if isinstance(exc, RequestError):
        return exc.code
    if isinstance(exc, OutOfRangeError):
        return errno.EINVAL
    if isinstance(exc, ReadOnlyError):
        return errno.EPERM
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


class BlockDevice:
    """One volume served to hosts: validation, dispatch, reads, extents and counters.

    ``store`` is read directly; every change goes through ``write_path``. ``max_write`` is read
    from the write path once, here: it is fixed for the write path's life (a journal changes
    size only offline). ``min_block`` must be a power of two; 1 (the default) accepts any byte
    range, as NBD clients expect of a file-backed export.
    """

    def __init__(
        self,
        name: str,
        store: Store,
        write_path: WritePath,
        *,
        read_only: bool = False,
        description: str = "",
        min_block: int = 1,
        counters: VolumeCounters | None = None,
    ) -> None:
        if min_block <= 0 or min_block & (min_block - 1):
            raise ValueError(f"min_block must be a power of two, got {min_block}")
        self.name = name
        self.store = store
        self.write_path = write_path
        self.read_only = read_only
        self.description = description
        self.min_block = min_block
        self.size = store.size
        self.max_write = write_path.max_write()
        self.counters = counters if counters is not None else VolumeCounters()
        self._misaligned = min_block - 1
        self._last_unexpected: BaseException | None = None

    def can_fast_zero(self) -> bool:
        """Whether write_zeroes(fast=True) is accepted (zeroing writes no data)."""
        return self.write_path.can_fast_zero()

    # --- reads ----------------------------------------------------------------------------------

    def check_read(self, offset: int, length: int) -> None:
        """Refuse a read (or cache, or extents) request that breaks a rule; do nothing else.

        For a front end that validates a read when it arrives and reads its data later, piece
        by piece, as the reply leaves (:meth:`read` checks again, cheaply).
        """
        end = offset + length
        if length <= 0 or offset < 0 or end > self.size or (offset | length) & self._misaligned:
            raise self._refusal(offset, length, change=False)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, from the store. Raises RequestError."""
        end = offset + length
        if length <= 0 or offset < 0 or end > self.size:
            # No alignment check: a piece of an aligned read need not be aligned.
            raise self._refusal(offset, length, change=False, aligned=False)
        try:
            return self.store.pread(offset, length)
        except _ANY_FAILURE as exc:
            raise self.failure(exc, "read") from exc

    def read_done(self, length: int) -> None:
        """Count one read of ``length`` bytes served whole (after its last piece left)."""
        self.counters.reads += 1
        self.counters.bytes_read += length

    def cache(self, offset: int, length: int) -> None:
        """Advise that a range will be read soon. Advisory: only validation can refuse it."""
        self.check_read(offset, length)
        try:
            self.store.advise_willneed(offset, length)
        except _ANY_FAILURE as exc:
            log.debug("%s: read-ahead hint failed: %s", self.name, exc)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The allocation of ``[offset, offset + length)``: runs in order, at least one.

        Fewer than the whole range may be described (the store bounds one answer); the
        caller asks again from where the answer ends.
        """
        self.check_read(offset, length)
        try:
            return self.store.extents(offset, length)
        except _ANY_FAILURE as exc:
            raise self.failure(exc, "extents") from exc

    # --- changes --------------------------------------------------------------------------------

    def write(self, offset: int, length: int, data: Sequence[Buffer], *, fua: bool) -> Pending:
        """Write the concatenated ``data`` (``length`` bytes in all) at ``offset``.

        With ``fua`` the returned future completes once the data is durable.
        """
        self._check_change(offset, length, bounded=True)
        try:
            pending = self.write_path.write(offset, data, fua=fua)
        except _ANY_FAILURE as exc:
            raise self.failure(exc, "write") from exc
        self.counters.writes += 1
        self.counters.bytes_written += length
        return pending

    def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> Pending:
        """Make the range read as zeros; ``may_trim`` allows deallocating it; ``fast`` refuses
        (ENOTSUP) rather than write zeros when the write path cannot zero cheaply."""
        self._check_change(offset, length, bounded=False)
        if fast and not self.write_path.can_fast_zero():
            raise RequestError(errno.ENOTSUP, "zeroing this volume is not fast")
        try:
            pending = self.write_path.write_zeroes(offset, length, fua=fua, may_trim=may_trim)
        except _ANY_FAILURE as exc:
            raise self.failure(exc, "write zeroes") from exc
        self.counters.zeroes += 1
        return pending

    def trim(self, offset: int, length: int, *, fua: bool) -> Pending:
        """The range is no longer needed (its contents become unspecified)."""
        self._check_change(offset, length, bounded=False)
        try:
            pending = self.write_path.trim(offset, length, fua=fua)
        except _ANY_FAILURE as exc:
            raise self.failure(exc, "trim") from exc
        self.counters.trims += 1
        return pending

    def flush(self) -> Pending:
        """Every change completed before this call becomes durable (on any connection)."""
        self.counters.flushes += 1
        try:
            return self.write_path.flush()
        except _ANY_FAILURE as exc:
            raise self.failure(exc, "flush") from exc

    def commit(self) -> Pending:
        """The write path's commit (see :class:`ReplyGate`, which front ends call instead)."""
        try:
            return self.write_path.commit()
        except _ANY_FAILURE as exc:
            raise self.failure(exc, "write") from exc

    # --- connections and errors -----------------------------------------------------------------

    def attach(self) -> None:
        """A host connection chose this device."""
        self.counters.connections += 1
        self.counters.connections_total += 1

    def detach(self) -> None:
        """A connection that chose this device is gone."""
        self.counters.connections -= 1

    def answered_error(self) -> None:
        """Count one request answered with an error (the front end's own refusals included)."""
        self.counters.errors += 1

    def failure(self, exc: BaseException, what: str) -> RequestError:
        """The RequestError a host hears for ``exc``, raised by or failing a call of ``what``."""
        if isinstance(exc, RequestError):
            return exc
        expected = isinstance(exc, OSError | BlockmirrorError | asyncio.CancelledError)
        if not expected and exc is not self._last_unexpected:
            # Not an I/O error nor one of ours: a bug somewhere below. The host hears EIO; the
            # log gets the traceback, once (a failed write path raises the same one again).
            self._last_unexpected = exc
            log.error("%s: %s failed unexpectedly", self.name, what, exc_info=exc)
        return RequestError(error_code(exc), f"{what} failed: {str(exc) or type(exc).__name__}")

    # --- validation -----------------------------------------------------------------------------

    def _check_change(self, offset: int, length: int, *, bounded: bool) -> None:
        end = offset + length
        if (
            length <= 0
            or offset < 0
            or end > self.size
            or (offset | length) & self._misaligned
            or self.read_only
            or (bounded and length > self.max_write)
        ):
            raise self._refusal(offset, length, change=True, bounded=bounded)

    def _refusal(
        self,
        offset: int,
        length: int,
        *,
        change: bool,
        aligned: bool = True,
        bounded: bool = True,
    ) -> RequestError:
        """Which rule a request broke (the slow path: only refusals get here)."""
        if length <= 0:
            return RequestError(errno.EINVAL, "zero-length request")
        if offset < 0 or offset + length > self.size:
            # A change past the end is "no space", as on a disk; a read there is invalid.
            return RequestError(
                errno.ENOSPC if change else errno.EINVAL,
                f"range {offset}+{length} is past the end ({self.size})",
            )
        if aligned and (offset | length) & self._misaligned:
            return RequestError(
                errno.EINVAL, f"range {offset}+{length} is not aligned to {self.min_block} bytes"
            )
        if change and self.read_only:
            return RequestError(errno.EPERM, "export is read-only")
        if change and bounded and length > self.max_write:
            return RequestError(
                errno.EINVAL,
                f"a write of {length} bytes exceeds the {self.max_write} bytes this volume "
                "takes at once",
            )
        raise AssertionError(f"no rule refuses {offset}+{length}")  # pragma: no cover


class Commit(NamedTuple):
    """What one commit decided for the replies a connection produced since the one before.

    ``acks`` maps ``id(reply)`` to the tag (NBD cookie, iSCSI task tag) of each change's success
    reply it covers. ``pending``: hold every reply until it completes, then ask
    :meth:`ReplyGate.outcome`. ``error``: the commit failed at once; each ack must become an
    error reply with it.
    """

    acks: dict[int, int]
    pending: asyncio.Future[None] | None
    error: RequestError | None


class ReplyGate:
    """Commit gating for one front-end connection.

    A change whose method returned ``None`` is not done yet: the write path may stage it (a
    batched journal append) and do it in ``commit()``. The front end registers the success
    reply it made for such a change with :meth:`ack`, queues it among its other replies, and
    once per batch of requests (one socket read) calls :meth:`commit`: with no pending future
    the replies may go out (after turning the acks into errors if the commit failed); with one,
    every reply queued so far is held, in order, until it completes. Replies produced after
    the commit are not held by it.
    """

    __slots__ = ("_acks", "device")

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self._acks: dict[int, int] = {}

    def ack(self, reply: object, tag: int) -> None:
        """``reply`` answers a change with success; it becomes true only at the next commit.

        The reply object must stay queued (alive) until then: it is known by its identity.
        """
        self._acks[id(reply)] = tag

    @property
    def waiting(self) -> bool:
        """Whether acks wait for a commit."""
        return bool(self._acks)

    def commit(self) -> Commit:
        acks, self._acks = self._acks, {}
        try:
            pending = self.device.commit()
        except RequestError as exc:
            return Commit(acks, None, exc)
        return Commit(acks, pending, None)

    def outcome(self, commit: Commit) -> RequestError | None:
        """After ``commit.pending`` completed: None, or the error its acks must become."""
        pending = commit.pending
        if pending is None:
            return commit.error
        if pending.cancelled():
            return self.device.failure(asyncio.CancelledError(), "write")
        exc = pending.exception()
        return None if exc is None else self.device.failure(exc, "write")
