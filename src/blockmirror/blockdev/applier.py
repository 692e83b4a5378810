"""Ordered apply: every change reaches the volume in journal order, and its waiter hears of it.

The :class:`Applier` holds the queue of :class:`Entry` objects, one per change on its way to the
volume (a host write, a secondary's record, a region copied by a resync). Writes go to the page
cache on the event loop (a memcpy); a slow step (a dirty-map sync, zeroing without fallocate)
runs in a thread, and everything behind it waits, so the volume always changes in journal order.

A volume write that fails (ENOSPC on a thin or sparse volume, EIO) *stalls* the queue: the entry
stays queued and in the journal and is retried every ``stall_retry`` seconds; meanwhile every
request waiting on the queue gets the error, and new host writes are refused, so nothing waits
for room that may never come and nothing journaled is ever skipped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blockmirror.alerts import AlertLog
from blockmirror.blockdev.ackmode import RemoteAck
from blockmirror.blockdev.durability import Durability, Failure
from blockmirror.errors import BlockmirrorError
from blockmirror.history.capture import GROUP_BYTES, DisjointRanges
from blockmirror.history.log import HistoryLog
from blockmirror.journal.format import EXTENT_KINDS, Kind
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import Record
from blockmirror.store.base import Buffer, Store

__all__ = ["STALL_RETRY", "Applier", "Entry"]

# Changes that may cover a large range: applied (and captured) in a thread.
_RANGE_KINDS = frozenset({Kind.ZERO, Kind.TRIM})
# At most this many entries share one history sync.
_GROUP_ENTRIES = 1024
# Plain writes at the head of the queue adding up to this much may go to the volume in a worker
# thread (pwritev releases the GIL) while the event loop receives the next requests. Off (None)
# unless BLOCKMIRROR_THREAD_APPLY_MIN gives it in bytes (0: every write): on a two-core machine
# the hand-offs cost more CPU than the overlap saved (docs/benchmarks.md, issue 15), but a
# machine with cores to spare may gain. The crash suites run with it at 0.
_THREAD_APPLY_ENV = os.environ.get("BLOCKMIRROR_THREAD_APPLY_MIN")
THREAD_APPLY_MIN: int | None = int(_THREAD_APPLY_ENV) if _THREAD_APPLY_ENV else None
THREAD_APPLY_MAX = 16 * 1024 * 1024

log = logging.getLogger(__name__)

# How often a volume write that failed (ENOSPC, EIO) is tried again.
STALL_RETRY = 1.0


@dataclass(slots=True)
class Entry:
    """One change on its way to the volume, and what its completion owes.

    ``record`` is the change: for a journaled one the journal's own record (numbered, stamped
    and placed, as the journal's index holds it, so without data), and ``data`` the payload
    parts of a write. ``may_trim``: a zeroing may deallocate (the host allowed it). ``fua``:
    ``done`` completes only once the change is durable. ``done``: the future the request waits
    on (None: nobody waits). ``journaled``: the change is a journal record (it advances
    ``applied_seq``). ``outside``: a change made outside the journal (a host write while
    enqueueing is paused, or a region a resync copied here), which peers
    learn of from their dirty maps.
    """

    record: Record
    data: Sequence[Buffer] = ()
    may_trim: bool = False
    fua: bool = False
    done: asyncio.Future[None] | None = None
    journaled: bool = True
    outside: bool = False
    captured: bool = False  # its before-image is in the history (docs/history.md)
    from_ring: bool = False  # a delayed record: its payload is read back from the journal


class Applier:
    """Applies entries to the volume in the order they are pushed."""

    def __init__(
        self,
        journal: Journal,
        volume: Store,
        loop: asyncio.AbstractEventLoop,
        *,
        failure: Failure,
        durability: Durability,
        alerts: AlertLog,
        on_stalled: Callable[[OSError], None],
        on_resumed: Callable[[], None],
    ) -> None:
        self.journal = journal
        self.volume = volume
        self._loop = loop
        self._failure = failure
        self._durability = durability
        self._alerts = alerts
        # Whoever else holds waiting requests answers them with the error too.
        self._on_stalled = on_stalled
        self._on_resumed = on_resumed
        self.queue: deque[Entry] = deque()
        self._blocked = False  # a step runs in a thread; the queue waits behind it
        self.applied_index = 0  # entries applied since start (for gates)
        self.queued_index = 0
        self._gated_index = 0  # queued_index when the last gate was asked for
        self._gates: deque[tuple[int, asyncio.Future[None]]] = deque()
        # Every journal record up to this one is in the volume (its page cache): all of them
        # after the start-up replay, but a lagged replica's (replay_delay) newest wait.
        self.applied_seq = journal.applied_seq
        # Set whenever records reach the volume: senders wait on it for more to stream.
        self.applied_event = asyncio.Event()
        # Writes made outside the journal that reached the volume so far (a resync compares it
        # across a pass), and those still queued for it.
        self.unjournaled_count = 0
        self.unjournaled_pending = 0
        self.stalled: OSError | None = None
        self.stalls = 0
        self.unstalled = asyncio.Event()
        self.unstalled.set()
        self.retry_task: asyncio.Task[None] | None = None
        self._retrying = False
        self.stall_retry = STALL_RETRY
        # ack = "remote": journaled host writes also wait for the peers.
        self.remote_ack: RemoteAck | None = None
        # The volume's history: before-images of what each change overwrites.
        self.history: HistoryLog | None = None
        self._run_done = 0  # entries of the run in a thread written so far (_apply_run)
        self.thread_runs = 0  # runs of writes applied in a worker thread (status)
        failure.listen(lambda exc, first: self.answer_all(exc))

    @property
    def idle(self) -> bool:
        """Nothing accepted is still on its way to the volume: it holds the newest bytes."""
        return not self.queue and not self._blocked and self.stalled is None

    def push(self, entry: Entry) -> None:
        """Queue ``entry`` behind every earlier one (:meth:`drain` applies it). Never raises."""
        self.queue.append(entry)
        self.queued_index += 1

    def gate(self) -> asyncio.Future[None] | None:
        """A future that completes once every entry pushed so far is applied; None if they are.

        While the queue is stalled the entries pushed since the previous call cannot be applied:
        the future is then already failed with the volume's OSError (None if there are none).
        Never raises.
        """
        new_entries = self.queued_index > self._gated_index
        self._gated_index = self.queued_index
        if self.applied_index >= self.queued_index:
            return None
        if self.stalled is not None:
            if not new_entries:
                return None
            failed: asyncio.Future[None] = self._loop.create_future()
            failed.set_exception(self.stalled)
            return failed
        gate: asyncio.Future[None] = self._loop.create_future()
        self._gates.append((self.queued_index, gate))
        return gate

    # --- applying in order ----------------------------------------------------------------------

    def drain(self) -> None:
        """Apply what can be applied now, in order. Never raises: a volume's OSError stalls the
        queue, any other error of ours fails the write path."""
        queue = self.queue
        history = self.history
        # Whether changes are captured is decided between drains (a resync starts or ends on
        # the event loop, never inside one): once here, not per entry.
        capturing = history is not None and history.capturing
        while queue and not self._blocked and self.stalled is None:
            if self.journal.dirty_pending():
                # A dirty bit is durable before the write it covers reaches the volume.
                self._block_on(self.journal.sync_dirty_maps)
                return
            entry = queue[0]
            kind = entry.record.kind
            if capturing and not entry.captured:
                # Before-images are read and written in a thread, a group at a time: two
                # more copies of every write must not run on the event loop. On a secondary
                # (barrier) they are synced before any of the group is applied.
                self._block_on(functools.partial(self._capture_group, self._group()))
                return
            if entry.from_ring or (
                kind in _RANGE_KINDS and not self.volume.capabilities().fast_zero
            ):
                self._block_on(functools.partial(self._apply, entry), then=self._applied_one)
                return
            if kind == Kind.WRITE:
                run = self._write_run(capturing)
                if run:
                    self._run_done = 0
                    self.thread_runs += 1
                    self._block_on(
                        functools.partial(self._apply_run, run),
                        then=functools.partial(self._applied_run, len(run)),
                        before_error=self._applied_part_of_run,
                    )
                    return
            try:
                self._apply(entry)
            except OSError as exc:
                self._stall(exc)
                return
            except BlockmirrorError as exc:
                self._failure.fail(exc)
                return
            self._applied_one()
        self._release_gates()

    # --- before-images (docs/history.md) ---------------------------------------------------------

    def _group(self) -> list[Entry]:
        """The head entries whose before-images can be taken before any of them is applied:
        up to the first that overlaps an earlier one (its image must include that one)."""
        group: list[Entry] = []
        ranges = DisjointRanges()
        size = 0
        for entry in self.queue:
            rec = entry.record
            if rec.kind in EXTENT_KINDS and rec.length:
                if ranges.overlaps(rec.offset, rec.length) or size >= GROUP_BYTES:
                    break
                ranges.add(rec.offset, rec.length)
                size += rec.length
            group.append(entry)
            if len(group) >= _GROUP_ENTRIES:
                break
        return group

    def _capture(self, history: HistoryLog, entry: Entry, applied_seq: int) -> None:
        """Keep the before-image of ``entry`` (blocking). ``applied_seq``: the newest record
        applied before it. Raises OSError."""
        rec = entry.record
        entry.captured = True
        if rec.kind in EXTENT_KINDS and rec.length and history.capturing:
            try:
                history.capture(
                    self.volume,
                    rec.kind == Kind.WRITE,
                    rec.offset,
                    rec.length,
                    seq=rec.seq if entry.journaled else applied_seq,
                    time_ns=rec.timestamp_ns,
                    origin=rec.origin,
                    journaled=entry.journaled,
                )
            except OSError as exc:
                # The history's storage (or a read of the volume) failed: the history is
                # given up, never the write (the host is not held by its history).
                history.give_up(exc)

    def _capture_group(self, group: list[Entry]) -> None:
        """A thread: capture ``group``; with a barrier, durably before any of it is applied."""
        assert self.history is not None
        applied = self.applied_seq
        for entry in group:
            self._capture(self.history, entry, applied)
            if entry.journaled:
                applied = entry.record.seq
        if not self.history.barrier:
            return
        try:
            self.history.sync()
        except OSError as exc:
            self.history.give_up(exc)

    def _apply(self, entry: Entry) -> None:
        """Write one change to the volume. Raises OSError (errno) or the volume's VolumeError."""
        rec = entry.record
        if entry.from_ring:
            self.journal.apply_from_ring(rec)
        elif rec.kind == Kind.WRITE:
            if len(entry.data) == 1:
                self.volume.pwrite(rec.offset, entry.data[0])
            else:
                self.volume.pwritev(rec.offset, entry.data)
        elif rec.kind == Kind.ZERO:
            self.volume.write_zeroes(rec.offset, rec.length, may_trim=entry.may_trim)
        elif rec.kind == Kind.TRIM:
            self.volume.trim(rec.offset, rec.length)

    def _write_run(self, capturing: bool) -> list[Entry]:
        """The plain writes at the head of the queue (their before-images taken when the
        history captures), if they add up to THREAD_APPLY_MIN (at most THREAD_APPLY_MAX);
        else none."""
        least = THREAD_APPLY_MIN
        if least is None:
            return []
        run: list[Entry] = []
        total = 0
        for entry in self.queue:
            rec = entry.record
            if (
                rec.kind != Kind.WRITE
                or entry.from_ring
                or not entry.data
                or (capturing and not entry.captured)
            ):
                break
            run.append(entry)
            total += rec.length
            if total >= THREAD_APPLY_MAX:
                break
        return run if total >= least else []

    def _apply_run(self, run: list[Entry]) -> None:
        """A thread: write ``run`` to the volume in order. Raises what :meth:`_apply` raises;
        ``_run_done`` counts the entries written before that."""
        for entry in run:
            self._apply(entry)
            self._run_done += 1

    def _applied_run(self, count: int) -> None:
        for _ in range(count):
            self._applied_one()

    def _applied_part_of_run(self) -> None:
        """A run failed part way: what it wrote is applied; the failing entry stays at the head."""
        self._applied_run(self._run_done)

    def _applied_one(self) -> None:
        entry = self.queue.popleft()
        self.applied_index += 1
        if entry.outside:
            # Counted, and every consumer's generation moved, when the write *reaches* the
            # volume: a resync copy read between its dirty bit and now did not include it, and
            # its acknowledgement must not clear the bit (nor may that pass declare a prefix).
            self.unjournaled_pending -= 1
            self.unjournaled_count += 1
            for consumer in self.journal.consumers.values():
                consumer.generation += 1

        if entry.journaled:
            self.applied_seq += 1
            self.applied_event.set()
            history = self.history
            if history is not None:
                rec = entry.record
                if rec.kind == Kind.BOOKMARK and (entry.data or entry.from_ring):
                    raw = entry.data[0] if entry.data else self.journal.read_payload(rec)
                    name = bytes(raw).decode("utf-8", "replace")
                    try:
                        history.bookmark(name, self.applied_seq, rec.timestamp_ns, rec.origin)
                    except OSError as exc:
                        log.error("bookmark %r not kept in the history: %s", name, exc)
                else:
                    history.applied(self.applied_seq, rec.timestamp_ns)
        if entry.done is not None:
            target = entry.done
            if self.remote_ack is not None and entry.journaled:
                # Local completion first, then every required peer must hold it too.
                target = self._loop.create_future()
                target.add_done_callback(
                    functools.partial(self._then_remote, entry.done, self.applied_seq)
                )
            if entry.fua:
                volume_upto = None if entry.journaled else self.applied_seq
                self._durability.then([target], volume_upto=volume_upto)
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

    def _block_on(
        self,
        fn: Callable[[], None],
        then: Callable[[], None] | None = None,
        before_error: Callable[[], None] | None = None,
    ) -> None:
        """Run ``fn`` in a thread with the queue held behind it; then ``then`` and drain on.
        When ``fn`` raises, ``before_error`` runs before the stall or failure is handled."""
        self._blocked = True
        fut = self._loop.run_in_executor(None, fn)

        def finished(f: asyncio.Future[None]) -> None:
            self._blocked = False
            exc = f.exception()
            if exc is not None and before_error is not None:
                before_error()
            if isinstance(exc, OSError):
                self._stall(exc)
                return
            if exc is not None:
                self._failure.fail(exc)
                return
            if then is not None:
                then()
            self.drain()

        fut.add_done_callback(finished)

    def _release_gates(self) -> None:
        while self._gates and self._gates[0][0] <= self.applied_index:
            _, gate = self._gates.popleft()
            if not gate.done():
                gate.set_result(None)

    def answer_all(self, exc: BaseException) -> None:
        """Every request waiting on the queue gets ``exc`` now: none waits for ever.

        The entries stay queued (a journaled record is never skipped). Never raises.
        """
        if self._failure.error is not None:
            self.unstalled.set()  # a secondary waiting for a stall to pass must see the failure
        for entry in self.queue:
            if entry.done is not None:
                if not entry.done.done():
                    entry.done.set_exception(exc)
                entry.done = None
        for _, gate in self._gates:
            if not gate.done():
                gate.set_exception(exc)
        self._gates.clear()

    # --- stalls ---------------------------------------------------------------------------------

    def _stall(self, exc: OSError) -> None:
        """The head entry could not be applied: answer with the error, retry until it can."""
        first = self.stalled is None and not self._retrying
        self.stalled = exc
        self.unstalled.clear()
        if first:
            self.stalls += 1
            log.error("volume write failed, retrying: %s", exc)
            self._alerts.alert(
                "volume_write_failed",
                f"{self.volume.path}: {exc.strerror or exc}; host writes refused, journaled "
                "records kept and retried",
            )
        self.answer_all(exc)
        self._on_stalled(exc)
        if self.retry_task is None or self.retry_task.done():
            self.retry_task = self._loop.create_task(self._retry_stalled())

    async def _retry_stalled(self) -> None:
        while self.stalled is not None and self._failure.error is None:
            await asyncio.sleep(self.stall_retry)
            if self._failure.error is not None:
                return
            self.stalled = None
            self._retrying = True
            try:
                self.drain()  # stalls again if the volume still fails
            finally:
                self._retrying = False
            if self.stalled is None:
                log.warning("%s: volume writes succeed again; resuming", self.volume.path)
                self._alerts.alert("volume_write_resumed", f"{self.volume.path}: writes resumed")
                self.unstalled.set()
                self._on_resumed()

    def stop(self) -> None:
        """Stop retrying a stalled entry (the unit is stopping). Never raises."""
        if self.retry_task is not None:
            self.retry_task.cancel()
