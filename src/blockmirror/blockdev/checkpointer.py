"""Checkpoints and making room: what frees ring space, and when.

The :class:`Checkpointer` writes a checkpoint every ``interval`` seconds while records come in
or consumers acknowledge, early once the ring is half full, and on request (an operator control,
a sender, a stop). A checkpoint frees every record the volume and every journal-mode consumer no
longer need (docs/journal.md, "Freeing space"). When that is not enough, *making room* gives up
on the slowest consumer (``overflow = "track"``: its records become dirty bits and an alert is
raised) or waits for it to acknowledge (``overflow = "block"``). Host requests that found the
ring full wait here, in order, and are staged (by the write path's ``stage``) as room appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Literal

from blockmirror.alerts import AlertLog, HighWater
from blockmirror.blockdev.applier import Applier, Entry
from blockmirror.blockdev.durability import Durability, Failure
from blockmirror.journal.format import Kind, record_size
from blockmirror.journal.journal import Consumer, Journal
from blockmirror.state import ConsumerMode

__all__ = ["CHECKPOINT_INTERVAL", "EAGER_CHECKPOINT_FILL", "Checkpointer"]

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 1.0
# Start freeing space early, well before an append finds the ring full.
EAGER_CHECKPOINT_FILL = 0.5
# How long making room under ``overflow = "block"`` waits for an acknowledgement at a time.
ACK_WAIT = 0.5
# How long making room pauses when nothing could be freed (records still on their way to the
# volume), rather than spin on checkpoints.
IDLE_WAIT = 0.01


class Checkpointer:
    """Writes the journal's checkpoints and frees ring space for the write path.

    ``stage`` journals a waiting request's record and queues it for the volume once it fits;
    ``commit_quietly`` writes the staged batch (both are the write path's).
    """

    def __init__(
        self,
        journal: Journal,
        applier: Applier,
        loop: asyncio.AbstractEventLoop,
        *,
        failure: Failure,
        durability: Durability,
        alerts: AlertLog,
        high_water: float,
        overflow: Literal["track", "block"],
        stage: Callable[[Entry], None],
        commit_quietly: Callable[[], None],
        interval: float = CHECKPOINT_INTERVAL,
    ) -> None:
        self.journal = journal
        self._applier = applier
        self._loop = loop
        self._failure = failure
        self._durability = durability
        self._alerts = alerts
        self.high_water = HighWater(alerts, high_water)
        # Times the ring was full and a consumer went to dirty tracking (status, journal-full).
        self.overflows = 0
        self.interval = interval
        self._lock = asyncio.Lock()
        self._wanted = asyncio.Event()
        self._acked = asyncio.Event()
        self._dirty = False  # records appended since the last checkpoint
        self.task: asyncio.Task[None] | None = None
        self.count = 0
        self.overflow = overflow
        self._stage = stage
        self._commit_quietly = commit_quietly
        # Requests that found the ring full, staged in order once room is made.
        self.waiting: deque[Entry] = deque()
        self._making_room = False
        self.room_task: asyncio.Task[None] | None = None
        failure.listen(lambda exc, first: self.answer_waiting(exc))

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic checkpoints. Never raises."""
        self.task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        """Stop the periodic checkpoints (one in progress is cancelled).

        Raises what ended them early, if anything but an OSError did (which fails the write
        path instead): a DirtyMapError, say. CancelledError only when the caller is cancelled.
        """
        task = self.task
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                raise exc

    async def close_journal(self, *, clean: bool) -> None:
        """Write the final checkpoint and close the journal; ``clean``: nothing is left to
        replay. A failure of the journal's own storage is logged, not raised: its last durable
        checkpoint stands, and recovery at the next start works from what reached the disk."""
        async with self._lock:
            # The volume holds what was applied: records after it are replayed at the next start.
            try:
                await asyncio.to_thread(
                    self.journal.close, clean=clean, applied_seq=self._applier.applied_seq
                )
            except OSError as exc:
                log.error("journal %s: final checkpoint failed: %s", self.journal.path, exc)

    # --- what asks for a checkpoint -------------------------------------------------------------

    def appended(self) -> None:
        """Records were staged: a checkpoint is due, early if the ring fills. Never raises."""
        self._dirty = True
        journal = self.journal
        cap = journal.capacity
        self.high_water.update(journal.tail_lpos - journal.head_lpos, cap)
        if journal.used >= EAGER_CHECKPOINT_FILL * cap:
            self._wanted.set()

    def want(self) -> None:
        """Ask for a checkpoint soon (the periodic task writes it). Never raises."""
        self._wanted.set()

    def acknowledged(self) -> None:
        """A consumer acknowledged records: a checkpoint may free them. Never raises."""
        self._acked.set()

    async def _run(self) -> None:
        while True:
            await _wait(self._wanted, self.interval)
            self._wanted.clear()
            if self._dirty or self._acked.is_set():
                try:
                    await self.checkpoint()
                except OSError as exc:
                    self._failure.fail(exc)
                    return

    # --- checkpoints ----------------------------------------------------------------------------

    async def checkpoint(self, *, clean: bool = False, volume_durable: bool = False) -> None:
        """Free what the volume and every journal-mode consumer no longer need.

        A record is freed only once the volume's copy of it is durable, so the volume is synced
        first whenever the checkpoint would free a record applied since the last volume sync.
        (Freeing records that only the page cache held, and syncing the volume at the next
        FLUSH instead, lost flushed writes: a checkpoint racing with a FLUSH's journal sync
        freed a record the FLUSH had already decided needed no volume sync.)

        ``volume_durable``: sync the volume in any case, so the checkpoint says the volume
        holds every applied record and none is replayed at the next start (before the volume
        is written outside the journal, where a replayed older record would undo a newer write).

        Raises OSError (errno) when the volume sync or the checkpoint write fails (a failed
        volume sync also fails the write path), and DirtyMapError when a dirty map cannot be
        written.
        """
        async with self._lock:
            journal = self.journal
            target = self._applier.applied_seq
            last_freed = journal.keep_from(target) - 1
            if self._failure.error is None and (
                clean
                or volume_durable
                or (journal.head_seq <= last_freed and last_freed > journal.volume_durable_seq)
            ):
                await self._durability.sync_volume(target)
            await asyncio.to_thread(journal.sync_dirty_maps)
            cp = journal.checkpoint_state(applied_seq=target, clean=clean)
            await asyncio.to_thread(journal.write_checkpoint, cp)
            journal.checkpoint_written(cp)
            self.count += 1
            self._dirty = False

    # --- making room ----------------------------------------------------------------------------

    def _holders(self) -> list[Consumer]:
        """Journal-mode consumers that hold records the volume already has."""
        applied = self._applier.applied_seq
        return [
            c
            for c in self.journal.consumers.values()
            if c.mode == ConsumerMode.JOURNAL and c.acked_seq < applied
        ]

    def release_slowest(self) -> bool:
        """Switch the slowest consumer that holds records to dirty-map tracking, with an alert;
        False if none holds any. The next checkpoint frees its records. Never raises."""
        holders = self._holders()
        if not holders:
            return False
        slowest = min(holders, key=lambda c: c.acked_seq)
        self.journal.switch_to_tracking(slowest)
        self.overflows += 1
        self._alerts.alert(
            "consumer_tracking",
            f"consumer {slowest.name} fell behind the journal; tracking dirty regions",
        )
        return True

    def room_for(self, kind: Kind, length: int) -> bool:
        """Whether a request's records fit in the ring now. Never raises."""
        journal = self.journal
        if journal.enqueue_paused:
            return True
        if kind != Kind.WRITE:
            return journal.fits(0)
        # Simulate the placement of each piece a large write is split into.
        limit = journal.max_payload()
        tail = journal.tail_lpos
        for start in range(0, max(length, 1), limit):
            size = record_size(min(limit, length - start))
            tail = journal.ring.place(tail, size).new_tail
        return tail - journal.checkpoint_head_lpos <= journal.capacity

    def wait_for_room(self, entry: Entry) -> None:
        """Hold a request that does not fit (or arrived behind one that did not); it is staged,
        in order, once room is made. Never raises: a failure reaches ``entry.done``."""
        self.waiting.append(entry)
        if not self._making_room:
            self._making_room = True
            self.room_task = self._loop.create_task(self._make_room())

    def answer_waiting(self, exc: BaseException) -> None:
        """Every request waiting for room gets ``exc`` now and is dropped. Never raises."""
        waiting, self.waiting = self.waiting, deque()
        for entry in waiting:
            if entry.done is not None and not entry.done.done():
                entry.done.set_exception(exc)

    async def stop_making_room(self, timeout: float) -> None:
        """Let making room finish for at most ``timeout`` seconds, then stop it: a stop must not
        hang on room nobody will make (a peer that never acknowledges under ``overflow =
        "block"``). Never raises."""
        if self.room_task is not None:
            with contextlib.suppress(Exception, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.room_task), timeout)
            self.room_task.cancel()

    async def _make_room(self) -> None:
        try:
            while self.waiting and self._failure.error is None:
                first = self.waiting[0]
                if self.room_for(first.record.kind, first.record.length):
                    self.waiting.popleft()
                    self._stage(first)
                    self._commit_quietly()
                    continue
                # Let everything staged so far reach the volume, then free what we can.
                self._commit_quietly()
                await self._free_some(block=self.overflow == "block")
        except BaseException as exc:
            self._failure.fail(exc)
            raise
        finally:
            self._making_room = False

    async def _free_some(self, *, block: bool) -> None:
        """One step of freeing ring space: give up on the slowest consumer (or, with ``block``,
        wait a moment for it to acknowledge), then checkpoint."""
        if block:
            holding = bool(self._holders())
            if holding:
                self._acked.clear()
                await _wait(self._acked, ACK_WAIT)
        else:
            holding = self.release_slowest()
        head = self.journal.checkpoint_head_lpos
        await self.checkpoint()
        if self.journal.checkpoint_head_lpos == head and not holding:
            # Nothing could be freed yet (records still on their way to the volume): wait a
            # moment rather than spin on checkpoints.
            await asyncio.sleep(IDLE_WAIT)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds passed.

    Not ``asyncio.wait_for``: in Python 3.11 it loses a cancellation that arrives as its
    timeout expires, and a loop around it then never ends (a stop hung on the checkpointer).
    """
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
