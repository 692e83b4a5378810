"""The journaled write path: every host write goes to the journal, then to the volume.

Requests are *accepted* synchronously (encoded into the current batch) and completed by
:meth:`JournalWritePath.commit`, which the export calls after handing over everything it read
from one socket read: one vectored journal write for the whole batch, then the volume writes in
sequence order, then the export may release the replies. Slow steps (syncs, dirty maps,
checkpoints, zeroing without fallocate) run in threads; while one is pending, volume writes queue
behind it so the volume always changes in journal order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from blockmirror.blockdev.ackmode import RemoteAck
from blockmirror.errors import BlockmirrorError, JournalError, WritePathError
from blockmirror.io.syncer import Syncer
from blockmirror.journal.format import Kind, record_size
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import Record
from blockmirror.store.volume import Volume

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
CHECKPOINT_INTERVAL = 1.0
# How long a stop waits for writes still waiting for room or for the volume.
CLOSE_WAIT = 3.0
# How often a volume write that failed (ENOSPC, EIO) is tried again.
STALL_RETRY = 1.0
# Start freeing space early, well before an append finds the ring full.
EAGER_CHECKPOINT_FILL = 0.5


class DiscardRangeError(WritePathError, ValueError):
    """A discard range the consumer's stream cannot honour."""


class JournalFullError(JournalError):
    """A journal could not be emptied for renumbering."""


@dataclass(slots=True)
class _Item:
    """One change waiting to be applied to the volume, in journal order."""

    kind: Kind
    offset: int
    length: int
    data: Sequence[Buffer] = ()
    may_trim: bool = False
    journaled: bool = True
    fua: bool = False
    done: asyncio.Future[None] | None = None
    # A host write made with enqueueing paused: peers learn of it only from their dirty maps.
    outside: bool = False


@dataclass(slots=True)
class _Waiting:
    """A request that found the journal full; staged once room is made."""

    kind: Kind
    offset: int
    length: int
    data: Sequence[Buffer]
    may_trim: bool
    fua: bool
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Alerts:
    high_water: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)


class JournalWritePath:
    def __init__(
        self,
        journal: Journal,
        volume: Volume,
        loop: asyncio.AbstractEventLoop,
        *,
        overflow: Literal["track", "block"] = "track",
        high_water: float = 0.8,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        on_alert: Callable[[str, str], None] | None = None,
    ) -> None:
        self.journal = journal
        self.volume = volume
        self._loop = loop
        self.overflow = overflow
        self.high_water = high_water
        self.checkpoint_interval = checkpoint_interval
        self._on_alert = on_alert
        self._queue: deque[_Item] = deque()
        self._blocked = False
        self._applied_index = 0  # items applied since start (for gates)
        self._queued_index = 0
        self._committed_index = 0  # _queued_index at the last commit
        self._gates: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._waiting: deque[_Waiting] = deque()
        self._making_room = False
        self._room_task: asyncio.Task[None] | None = None
        self._commit_scheduled = False
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._unjournaled_writes = False
        # Writes made outside the journal that reached the volume so far (a resync compares it
        # across a pass), and those still queued for it.
        self.unjournaled_count = 0
        self.unjournaled_pending = 0
        self.applied_seq = journal.next_seq - 1
        # Fatal: the journal or a volume sync failed. Writes are refused until a restart
        # replays the journal; reads go on.
        self.failed: BaseException | None = None
        # Transient: applying a journaled record to the volume failed (ENOSPC on a thin or
        # sparse volume, say). The record stays queued and in the journal and is retried; new
        # host writes are refused with the error meanwhile, so nothing waits for room that may
        # never come, and nothing journaled is ever skipped.
        self.stalled: OSError | None = None
        self.stalls = 0
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        self._retry_task: asyncio.Task[None] | None = None
        self._retrying = False
        self.stall_retry = STALL_RETRY
        self.alerts = _Alerts()
        self._journal_syncer = Syncer(self._sync_journal, loop)
        self._volume_syncer = Syncer(volume.flush, loop)
        self._checkpoint_lock = asyncio.Lock()
        self._checkpoint_wanted = asyncio.Event()
        self._acked = asyncio.Event()
        self._dirty_since_checkpoint = False
        self._task: asyncio.Task[None] | None = None
        self.checkpoints = 0
        # Set whenever records reach the volume: senders wait on it for more to stream.
        self.applied_event = asyncio.Event()
        # ack = "remote": host writes also wait for the peers (set by the unit).
        self.remote_ack: RemoteAck | None = None

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = self._loop.create_task(self._checkpointer())

    async def close(self) -> None:
        """Apply and sync everything, write a clean checkpoint, close the journal.

        A stop must not hang on a write that waits for room nobody will make (a peer that never
        acknowledges under ``overflow = "block"``): such waits are bounded, and a journal left
        with unapplied work is closed unclean, so recovery replays it.
        """
        if self._room_task is not None:
            with contextlib.suppress(Exception, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._room_task), CLOSE_WAIT)
            self._room_task.cancel()
        if self.failed is None and self.stalled is None:
            with contextlib.suppress(Exception, TimeoutError):
                # A failing journal write here only makes the close unclean, never skips it.
                gate = self.commit()
                if gate is not None:
                    await asyncio.wait_for(gate, CLOSE_WAIT)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._retry_task is not None:
            self._retry_task.cancel()
        clean = (
            self.failed is None and self.stalled is None and not self._queue and not self._waiting
        )
        async with self._checkpoint_lock:
            # The volume holds what was applied: records after it are replayed at the next start.
            try:
                await asyncio.to_thread(
                    self.journal.close, clean=clean, applied_seq=self.applied_seq
                )
            except OSError as exc:
                # The journal's own storage failed: its last durable checkpoint stands, and
                # recovery at the next start works from what reached the disk.
                log.error("journal %s: final checkpoint failed: %s", self.journal.path, exc)

    # --- the WritePath interface ----------------------------------------------------------------

    def write(
        self, offset: int, data: Sequence[Buffer], *, fua: bool
    ) -> asyncio.Future[None] | None:
        length = sum(memoryview(b).nbytes for b in data)
        return self._accept(Kind.WRITE, offset, length, data, False, fua)

    def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool
    ) -> asyncio.Future[None] | None:
        return self._accept(Kind.ZERO, offset, length, (), may_trim, fua)

    def trim(self, offset: int, length: int, *, fua: bool) -> asyncio.Future[None] | None:
        return self._accept(Kind.TRIM, offset, length, (), True, fua)

    def flush(self) -> asyncio.Future[None] | None:
        fut: asyncio.Future[None] = self._loop.create_future()
        if self.failed is not None:
            # Nothing since the failure can be made durable: say so now, never wait.
            fut.set_exception(self.failed)
            return fut
        self._flush_waiters.append(fut)
        self._schedule_commit()
        return fut

    def can_fast_zero(self) -> bool:
        return self.volume.can_fast_zero()

    def max_write(self) -> int:
        return self.journal.max_write()

    def commit(self) -> asyncio.Future[None] | None:
        """Write the batch, apply what can be applied; a future gates the batch's replies."""
        self._commit_scheduled = False
        if self.failed is not None:
            raise self.failed
        try:
            self.journal.write_batch()
        except OSError as exc:
            self._fail(exc)
            raise
        self._drain()
        if self._flush_waiters:
            waiters, self._flush_waiters = self._flush_waiters, []
            # Journaled records are durable once the journal is: a record is freed only after
            # the volume's copy is durable. Writes made outside the journal need the volume.
            self._durable_then(waiters, volume_too=self._unjournaled_writes)
        batch_items = self._queued_index > self._committed_index
        self._committed_index = self._queued_index
        if self._applied_index >= self._queued_index:
            return None
        if self.stalled is not None:
            if not batch_items:
                return None
            # Part of this batch could not reach the volume: its replies carry the error.
            failed: asyncio.Future[None] = self._loop.create_future()
            failed.set_exception(self.stalled)
            return failed
        gate: asyncio.Future[None] = self._loop.create_future()
        self._gates.append((self._queued_index, gate))
        return gate

    # --- accepting ------------------------------------------------------------------------------

    def _accept(
        self,
        kind: Kind,
        offset: int,
        length: int,
        data: Sequence[Buffer],
        may_trim: bool,
        fua: bool,
    ) -> asyncio.Future[None] | None:
        if self.failed is not None:
            raise self.failed
        if self.stalled is not None:
            raise self.stalled
        if kind == Kind.WRITE and length > self.journal.max_write():
            # It would wait for room that can never come: the journal is too small for it.
            raise OSError(
                errno.EINVAL,
                f"a write of {length} bytes exceeds the {self.journal.max_write()} bytes this "
                f"volume's journal ({self.journal.capacity} bytes of ring) can take at once",
            )
        if self._waiting or not self._room_for(kind, length):
            done: asyncio.Future[None] = self._loop.create_future()
            self._waiting.append(_Waiting(kind, offset, length, data, may_trim, fua, done))
            self._start_making_room()
            return done
        waits = fua or self.remote_ack is not None
        done_opt = self._loop.create_future() if waits else None
        self._stage(kind, offset, length, data, may_trim, fua, done_opt)
        self._schedule_commit()
        return done_opt

    def _room_for(self, kind: Kind, length: int) -> bool:
        if self.journal.enqueue_paused:
            return True
        if kind != Kind.WRITE:
            return self.journal.fits(0)
        # Simulate the placement of each piece a large write is split into.
        limit = self.journal.max_payload()
        tail = self.journal.tail_lpos
        for start in range(0, max(length, 1), limit):
            size = record_size(min(limit, length - start))
            tail = self.journal.ring.place(tail, size).new_tail
        return tail - self.journal.checkpoint_head_lpos <= self.journal.capacity

    def _stage(
        self,
        kind: Kind,
        offset: int,
        length: int,
        data: Sequence[Buffer],
        may_trim: bool,
        fua: bool,
        done: asyncio.Future[None] | None,
    ) -> None:
        journal = self.journal
        if journal.enqueue_paused:
            # Not journaled: every consumer must learn of it through its dirty map instead.
            journal.mark_dirty_everywhere(offset, length)
            self._unjournaled_writes = True
            self.unjournaled_pending += 1
            self._push(_Item(kind, offset, length, data, may_trim, False, fua, done, outside=True))
            return
        for consumer in journal.tracking_consumers():
            consumer.dirty.mark(offset, length)
        if kind == Kind.WRITE and length > journal.max_payload():
            pieces = _split(data, journal.max_payload())
            last = len(pieces) - 1
            pos = offset
            for i, piece in enumerate(pieces):
                n = sum(memoryview(b).nbytes for b in piece)
                journal.stage(Kind.WRITE, pos, n, piece)
                self._push(
                    _Item(
                        kind,
                        pos,
                        n,
                        piece,
                        False,
                        True,
                        fua and i == last,
                        done if i == last else None,
                    )
                )
                pos += n
        else:
            journal.stage(kind, offset, length, data)
            self._push(_Item(kind, offset, length, data, may_trim, True, fua, done))
        self._dirty_since_checkpoint = True
        self._check_fill()

    def _push(self, item: _Item) -> None:
        self._queue.append(item)
        self._queued_index += 1

    def _schedule_commit(self) -> None:
        # The export calls commit() itself; this covers callers that do not (tests, shutdown).
        if not self._commit_scheduled:
            self._commit_scheduled = True
            self._loop.call_soon(self._commit_soon)

    def _commit_soon(self) -> None:
        if self._commit_scheduled:
            with contextlib.suppress(Exception):
                self._commit_ignoring_result()

    def _commit_ignoring_result(self) -> None:
        """Commit for an internal caller that waits on something else; a failed gate is only
        of interest to the host's replies (there are none here), so it is consumed."""
        gate = self.commit()
        if gate is not None:
            gate.add_done_callback(_consume)

    # --- applying in order ----------------------------------------------------------------------

    def _drain(self) -> None:
        while self._queue and not self._blocked and self.stalled is None:
            if self.journal.dirty_pending():
                # A dirty bit is durable before the write it covers reaches the volume.
                self._block_on(self.journal.sync_dirty_maps)
                return
            item = self._queue[0]
            if item.kind != Kind.WRITE and not self.volume.can_fast_zero():
                self._block_on(lambda it=item: self._apply(it), then=self._applied_one)  # type: ignore[misc]
                return
            try:
                self._apply(item)
            except OSError as exc:
                self._stall(exc)
                return
            except BlockmirrorError as exc:
                self._fail(exc)
                return
            self._applied_one()
        self._release_gates()

    def _apply(self, item: _Item) -> None:
        if item.kind == Kind.WRITE:
            if len(item.data) == 1:
                self.volume.pwrite(item.offset, item.data[0])
            else:
                self.volume.pwritev(item.offset, item.data)
        elif item.kind == Kind.ZERO:
            self.volume.write_zeroes(item.offset, item.length, may_trim=item.may_trim)
        elif item.kind == Kind.TRIM:
            self.volume.trim(item.offset, item.length)

    def _applied_one(self) -> None:
        item = self._queue.popleft()
        self._applied_index += 1
        if item.outside:
            # Counted, and every consumer's generation moved, when the write *reaches* the
            # volume: a resync copy read between its dirty bit and now did not include it, and
            # its acknowledgement must not clear the bit (nor may that pass declare a prefix).
            self.unjournaled_pending -= 1
            self.unjournaled_count += 1
            for consumer in self.journal.consumers.values():
                consumer.generation += 1
        if item.journaled:
            self.applied_seq += 1
            self.applied_event.set()
        if item.done is not None:
            target = item.done
            if self.remote_ack is not None and item.journaled:
                # Local completion first, then every required peer must hold it too.
                target = self._loop.create_future()
                target.add_done_callback(
                    functools.partial(self._then_remote, item.done, self.applied_seq)
                )
            if item.fua:
                self._durable_then([target], volume_too=not item.journaled)
            elif not target.done():
                target.set_result(None)

    def _then_remote(
        self, outer: asyncio.Future[None], seq: int, local: asyncio.Future[None]
    ) -> None:
        if outer.done():
            return
        exc = local.exception() if not local.cancelled() else asyncio.CancelledError()
        if exc is not None:
            outer.set_exception(exc)
        elif self.remote_ack is not None:
            self.remote_ack.wait(seq, outer)
        else:
            outer.set_result(None)

    def _block_on(self, fn: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        self._blocked = True
        fut = self._loop.run_in_executor(None, fn)

        def finished(f: asyncio.Future[None]) -> None:
            self._blocked = False
            exc = f.exception()
            if isinstance(exc, OSError):
                self._stall(exc)
                return
            if exc is not None:
                self._fail(exc)
                return
            if then is not None:
                then()
            self._drain()

        fut.add_done_callback(finished)

    def _release_gates(self) -> None:
        while self._gates and self._gates[0][0] <= self._applied_index:
            _, gate = self._gates.popleft()
            if not gate.done():
                gate.set_result(None)

    def _durable_then(self, waiters: list[asyncio.Future[None]], *, volume_too: bool) -> None:
        journal_sync = self._journal_syncer.sync()
        parts: list[asyncio.Future[None]] = [journal_sync]
        if volume_too:
            parts.append(self._loop.create_task(self._sync_volume(self.applied_seq)))
        combined = asyncio.gather(*parts)

        def finished(f: asyncio.Future[list[None]]) -> None:
            exc = f.exception()
            if exc is not None and self.journal.io_error is not None:
                self._fail(exc)
            for waiter in waiters:
                if waiter.done():
                    continue
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

        combined.add_done_callback(finished)

    def _sync_journal(self) -> None:
        durable = self.journal.sync()
        self.journal.durable_seq = max(self.journal.durable_seq, durable)

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None and self.journal.io_error is not None:
            # The ring may have lost records the volume (and so a peer) already has, and no
            # checkpoint can be trusted to say so: every peer's dirty map says it instead.
            self.journal.mark_all_dirty()
            self._loop.run_in_executor(None, self.journal.sync_dirty_maps).add_done_callback(
                _consume
            )
        if self.failed is None:
            log.error("volume write path failed: %s", exc)
            self._alert(
                "volume_failed", f"writes refused until a restart replays the journal: {exc}"
            )
        self.failed = exc
        self._answer_all(exc)

    def _answer_all(self, exc: BaseException) -> None:
        """Every request waiting on the write path gets ``exc`` now: none waits for ever."""
        if self.failed is not None:
            waiters, self._flush_waiters = self._flush_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            self._unstalled.set()  # a secondary waiting for a stall to pass must see the failure
        for item in self._queue:
            if item.done is not None:
                if not item.done.done():
                    item.done.set_exception(exc)
                item.done = None
        for _, gate in self._gates:
            if not gate.done():
                gate.set_exception(exc)
        self._gates.clear()
        waiting, self._waiting = self._waiting, deque()
        for w in waiting:
            if not w.done.done():
                w.done.set_exception(exc)

    def _stall(self, exc: OSError) -> None:
        """A journaled record could not be applied: answer with the error, retry until it can."""
        first = self.stalled is None and not self._retrying
        self.stalled = exc
        self._unstalled.clear()
        if first:
            self.stalls += 1
            log.error("volume write failed, retrying: %s", exc)
            self._alert(
                "volume_write_failed",
                f"{self.volume.path}: {exc.strerror or exc}; host writes refused, journaled "
                "records kept and retried",
            )
        self._answer_all(exc)
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = self._loop.create_task(self._retry_stalled())

    async def _retry_stalled(self) -> None:
        while self.stalled is not None and self.failed is None:
            await asyncio.sleep(self.stall_retry)
            if self.failed is not None:
                return
            self.stalled = None
            self._retrying = True
            try:
                self._drain()  # stalls again if the volume still fails
            finally:
                self._retrying = False
            if self.stalled is None:
                log.warning("%s: volume writes succeed again; resuming", self.volume.path)
                self._alert("volume_write_resumed", f"{self.volume.path}: writes resumed")
                self._unstalled.set()
                self._checkpoint_wanted.set()

    # --- room, checkpoints, alerts --------------------------------------------------------------

    def _check_fill(self) -> None:
        used = self.journal.tail_lpos - self.journal.head_lpos
        cap = self.journal.capacity
        if used >= self.high_water * cap and not self.alerts.high_water:
            self.alerts.high_water = True
            self._alert("journal_high_water", f"journal is {used / cap:.0%} full")
        elif used < self.high_water * cap * 0.9 and self.alerts.high_water:
            self.alerts.high_water = False
        if self.journal.used >= EAGER_CHECKPOINT_FILL * cap:
            self._checkpoint_wanted.set()

    def alert(self, kind: str, message: str) -> None:
        """Record an alert for status (and the log); other components raise theirs here."""
        self._alert(kind, message)

    def _alert(self, kind: str, message: str) -> None:
        log.warning("%s: %s", self.journal.path.name, message)
        self.alerts.events.append({"kind": kind, "message": message})
        del self.alerts.events[:-20]
        if self._on_alert is not None:
            self._on_alert(kind, message)

    def _start_making_room(self) -> None:
        if not self._making_room:
            self._making_room = True
            self._room_task = self._loop.create_task(self._make_room())

    async def _make_room(self) -> None:
        try:
            while self._waiting and self.failed is None:
                first = self._waiting[0]
                if self._room_for(first.kind, first.length):
                    self._waiting.popleft()
                    self._stage(
                        first.kind,
                        first.offset,
                        first.length,
                        first.data,
                        first.may_trim,
                        first.fua,
                        first.done,
                    )
                    self._commit_ignoring_result()
                    continue
                # Let everything staged so far reach the volume, then free what we can.
                self._commit_ignoring_result()
                holders = [
                    c
                    for c in self.journal.consumers.values()
                    if c.mode == "journal" and c.acked_seq < self.applied_seq
                ]
                if holders and self.overflow == "track":
                    slowest = min(holders, key=lambda c: c.acked_seq)
                    self.journal.switch_to_tracking(slowest)
                    self._alert(
                        "consumer_tracking",
                        f"consumer {slowest.name} fell behind the journal; tracking dirty regions",
                    )
                elif holders:
                    self._acked.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._acked.wait(), 0.5)
                head = self.journal.checkpoint_head_lpos
                await self.checkpoint()
                if self.journal.checkpoint_head_lpos == head and not holders:
                    # Nothing could be freed yet (records still on their way to the volume):
                    # wait a moment rather than spin on checkpoints.
                    await asyncio.sleep(0.01)
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._making_room = False

    async def checkpoint(self, *, clean: bool = False) -> None:
        """Free what the volume and every journal-mode consumer no longer need.

        A record is freed only once the volume's copy of it is durable, so the volume is synced
        first whenever the checkpoint would free a record applied since the last volume sync.
        (Freeing records that only the page cache held, and syncing the volume at the next
        FLUSH instead, lost flushed writes: a checkpoint racing with a FLUSH's journal sync
        freed a record the FLUSH had already decided needed no volume sync.)
        """
        async with self._checkpoint_lock:
            journal = self.journal
            target = self.applied_seq
            last_freed = journal.keep_from(target) - 1
            if self.failed is None and (
                clean
                or (journal.head_seq <= last_freed and last_freed > journal.volume_durable_seq)
            ):
                await self._sync_volume(target)
            await asyncio.to_thread(journal.sync_dirty_maps)
            cp = journal.checkpoint_state(applied_seq=target, clean=clean)
            await asyncio.to_thread(journal.write_checkpoint, cp)
            journal.checkpoint_written(cp)
            self.checkpoints += 1
            self._dirty_since_checkpoint = False

    async def _sync_volume(self, target: int) -> None:
        """Sync the volume; afterwards it durably holds every record up to ``target``.

        A failed sync is fatal for the write path: the kernel may have dropped the pages it
        could not write and will not report that again, so no later sync of the volume proves
        anything. The journal keeps every record since the last good sync for the replay at
        the next start.
        """
        try:
            await self._volume_syncer.sync()
        except OSError as exc:
            self._fail(exc)
            raise
        self.journal.volume_durable_seq = max(self.journal.volume_durable_seq, target)

    async def _checkpointer(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._checkpoint_wanted.wait(), self.checkpoint_interval)
            self._checkpoint_wanted.clear()
            if self._dirty_since_checkpoint or self._acked.is_set():
                try:
                    await self.checkpoint()
                except OSError as exc:
                    self._fail(exc)
                    return

    # --- a secondary's side: records and resync data from a source -------------------------------

    async def append_replicated(self, records: Sequence[Record]) -> asyncio.Future[None]:
        """Journal records received from a source, keeping their numbers, times and origins.

        They are written to the ring and applied to the replica in order. Returns (once
        staged; only a full journal makes this wait) a future that completes when they are
        durable in the journal, which is when the source may be told so.
        """
        if self.failed is not None:
            raise self.failed
        for record in records:
            kind, offset, length = record.kind, record.offset, record.length
            while not self.journal.fits(length if kind == Kind.WRITE else 0):
                await self._free_space_for_records()
            for consumer in self.journal.tracking_consumers():
                consumer.dirty.mark(offset, length)
            data = record.data if kind == Kind.WRITE else ()
            self.journal.stage(
                kind,
                offset,
                length,
                data,
                seq=record.seq,
                timestamp_ns=record.timestamp_ns,
                origin=record.origin,
            )
            self._push(_Item(kind, offset, length, data, kind != Kind.WRITE, True, False, None))
        self._dirty_since_checkpoint = True
        self._commit_ignoring_result()
        self._check_fill()
        done: asyncio.Future[None] = self._loop.create_future()
        self._durable_then([done], volume_too=False)
        return done

    async def _free_space_for_records(self) -> None:
        if self.stalled is not None:
            # Nothing frees while the replica cannot be written: hold the link until it can.
            await self._unstalled.wait()
            if self.failed is not None:
                raise self.failed
            return
        gate = self.commit()
        if gate is not None:
            try:
                await gate
            except OSError:
                if self.failed is not None:
                    raise
                # The replica cannot take writes for now: hold the link until it can.
                await self._unstalled.wait()
                if self.failed is not None:
                    raise self.failed from None
                return
        holders = [
            c
            for c in self.journal.consumers.values()
            if c.mode == "journal" and c.acked_seq < self.applied_seq
        ]
        if holders:
            slowest = min(holders, key=lambda c: c.acked_seq)
            self.journal.switch_to_tracking(slowest)
            self._alert(
                "consumer_tracking",
                f"consumer {slowest.name} fell behind the journal; tracking dirty regions",
            )
        await self.checkpoint()

    def apply_resync(self, offset: int, length: int, data: Buffer | None) -> asyncio.Future[None]:
        """Write a region copied by a resync (``data`` None: zeros) in order with the records.

        It is not journaled (the source resends it if the copy is interrupted); every consumer
        of this unit learns of it through its dirty map. The future completes when the region
        is durable in the replica.
        """
        if self.failed is not None:
            raise self.failed
        for consumer in self.journal.consumers.values():
            if consumer.mode == "journal":
                # The replica changes outside the journal: a relayed peer must copy regions
                # again, and a copy of this region already in flight to it must not count.
                self.journal.switch_to_tracking(consumer)
        self.journal.mark_dirty_everywhere(offset, length)
        done: asyncio.Future[None] = self._loop.create_future()
        if data is None:
            item = _Item(Kind.ZERO, offset, length, (), True, False, True, done)
        else:
            item = _Item(Kind.WRITE, offset, length, (data,), False, False, True, done)
        self._push(item)
        self._commit_ignoring_result()
        return done

    async def rebase(self, next_seq: int) -> None:
        """Renumber an emptied journal so records from ``next_seq`` on can follow."""
        gate = self.commit()
        if gate is not None:
            await gate
        for consumer in self.journal.consumers.values():
            if consumer.mode == "journal":
                self.journal.switch_to_tracking(consumer)
        await self.checkpoint()
        if self.journal.records:
            raise JournalFullError("records are still held after a checkpoint; cannot renumber")
        await self._sync_volume(self.applied_seq)
        self.journal.rebase(next_seq)
        self.applied_seq = next_seq - 1
        await self.checkpoint()

    # --- consumers and operator controls ---------------------------------------------------------

    def acknowledge(self, name: str, seq: int) -> None:
        self.journal.acknowledge(name, seq)
        self._acked.set()
        if self.remote_ack is not None:
            self.remote_ack.acknowledge(name, seq)

    async def pause_enqueue(self, paused: bool) -> None:
        self._commit_ignoring_result()
        self.journal.enqueue_paused = paused
        await self.checkpoint()

    async def pause_consumer(self, name: str, paused: bool) -> None:
        self.journal.consumers[name].paused = paused
        await self.checkpoint()

    async def discard(self, name: str, first_seq: int, last_seq: int) -> int:
        """Turn a consumer's records in [first_seq, last_seq] into dirty bits; returns how many."""
        consumer = self.journal.consumers[name]
        count = 0
        if consumer.mode == "journal" and first_seq > consumer.acked_seq + 1:
            # A stream cannot skip records in its middle: discarding must start at the next
            # record the consumer would get, or the "discarded" records would still be sent.
            raise DiscardRangeError(
                f"consumer {name} has acknowledged up to {consumer.acked_seq}; a discard must "
                f"start at or before {consumer.acked_seq + 1}"
            )
        if consumer.mode == "journal":
            consumer.generation += 1  # bits set behind any copy in flight
            for rec in self.journal.records:
                if first_seq <= rec.seq <= last_seq and rec.seq > consumer.acked_seq:
                    if rec.kind != Kind.FLUSH:
                        consumer.dirty.mark(rec.offset, rec.length)
                    count += 1
            if first_seq <= consumer.acked_seq + 1 <= last_seq:
                consumer.acked_seq = min(last_seq, self.journal.next_seq - 1)
        await asyncio.to_thread(self.journal.sync_dirty_maps)
        await self.checkpoint()
        return count

    def condition(self) -> tuple[str, str] | None:
        """``(state, reason)`` when writes are not being taken, for the volume's status."""
        if self.failed is not None:
            return "failed", (
                f"writes refused after an I/O error ({self.failed}); restart the unit to "
                "replay the journal into the volume"
            )
        if self.stalled is not None:
            return "stalled", (
                f"writes to {self.volume.path} fail ({self.stalled.strerror or self.stalled}); "
                "host writes are refused and journaled records retried until they succeed"
            )
        return None

    def status(self) -> dict[str, object]:
        out = self.journal.status(self.high_water)
        out["checkpoints"] = self.checkpoints
        out["failed"] = str(self.failed) if self.failed is not None else None
        out["stalled"] = str(self.stalled) if self.stalled is not None else None
        out["stalls"] = self.stalls
        out["alerts"] = list(self.alerts.events)
        out["ack"] = self.remote_ack.status() if self.remote_ack is not None else {"mode": "local"}
        out["applied_seq"] = self.applied_seq
        out["volume_durable_seq"] = self.journal.volume_durable_seq
        return out


def _consume(f: asyncio.Future[None]) -> None:
    if not f.cancelled():
        f.exception()


def _split(data: Sequence[Buffer], limit: int) -> list[list[memoryview]]:
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
