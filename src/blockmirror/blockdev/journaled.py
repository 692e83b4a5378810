"""The journaled write path: every host write goes to the journal, then to the volume.

Requests are *accepted* synchronously (encoded into the current batch) and completed by
:meth:`JournalWritePath.commit`, which the export calls after handing over everything it read
from one socket read: one vectored journal write for the whole batch (group commit), then the
volume writes in sequence order, then the export may release the replies.

:class:`JournalWritePath` is the composition root of the parts, each with one job:

- accepting host requests and the group commit: here;
- ordered apply to the volume, stalls and retries: :mod:`~blockmirror.blockdev.applier`;
- checkpoints and making room in the ring: :mod:`~blockmirror.blockdev.checkpointer`;
- a secondary's apply of received records and resync data: :mod:`~blockmirror.blockdev.replica`;
- the operator's controls: :mod:`~blockmirror.blockdev.journal_controls` (:attr:`controls`);
- syncs and the fatal failure they share: :mod:`~blockmirror.blockdev.durability`;
- alerts: :mod:`blockmirror.alerts`.

What the methods raise: the write path's fatal failure once there is one (:attr:`failed`, the
OSError or JournalError that ended it, or whatever else a part met), the volume's OSError while
it is stalled (:attr:`stalled`), and OSError with an errno for a request it refuses (EINVAL for
a write larger than :meth:`max_write`). Failed futures carry the same kinds of error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Sequence
from typing import Literal

from blockmirror.alerts import AlertLog, OnAlert
from blockmirror.blockdev.ackmode import RemoteAck
from blockmirror.blockdev.applier import Applier, Entry
from blockmirror.blockdev.checkpointer import CHECKPOINT_INTERVAL, Checkpointer
from blockmirror.blockdev.durability import Durability, Failure, consume
from blockmirror.blockdev.journal_controls import DiscardRangeError, JournalControls
from blockmirror.blockdev.replica import JournalFullError, ReplicaApply
from blockmirror.blockdev.unchanged import UnchangedFilter
from blockmirror.blockdev.writepath import Buffer, split_buffers
from blockmirror.history.log import HistoryLog
from blockmirror.journal.format import Kind
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import Record
from blockmirror.state import VolumeState
from blockmirror.store.base import Store

__all__ = ["DiscardRangeError", "JournalFullError", "JournalWritePath"]


# How long a stop waits for writes still waiting for room or for the volume.
CLOSE_WAIT = 3.0

Pending = asyncio.Future[None] | None


class JournalWritePath:
    """The :class:`~blockmirror.blockdev.writepath.WritePath` of a journaled volume, and what
    the link's sender and receiver call on either end."""

    def __init__(
        self,
        journal: Journal,
        volume: Store,
        loop: asyncio.AbstractEventLoop,
        *,
        overflow: Literal["track", "block"] = "track",
        high_water: float = 0.8,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        on_alert: OnAlert | None = None,
    ) -> None:
        self.journal = journal
        self.volume = volume
        self._loop = loop
        self.alerts = AlertLog(journal.path.name, on_alert)
        # Fatal: the journal or a volume sync failed. Writes are refused until a restart
        # replays the journal; reads go on.
        self._failure = Failure()
        self._durability = Durability(journal, volume, loop, self._failure, self.alerts)
        self.applier = Applier(
            journal,
            volume,
            loop,
            failure=self._failure,
            durability=self._durability,
            alerts=self.alerts,
            on_stalled=self._stalled,
            on_resumed=self._resumed,
        )
        self.checkpointer = Checkpointer(
            journal,
            self.applier,
            loop,
            failure=self._failure,
            durability=self._durability,
            alerts=self.alerts,
            high_water=high_water,
            overflow=overflow,
            stage=self._stage_waiting,
            commit_quietly=self._commit_quietly,
            interval=checkpoint_interval,
        )
        self.replica = ReplicaApply(
            journal,
            self.applier,
            self.checkpointer,
            loop,
            failure=self._failure,
            durability=self._durability,
            commit=self.commit,
            commit_quietly=self._commit_quietly,
        )
        self.controls = JournalControls(
            journal,
            self.checkpointer,
            self.applier,
            loop,
            failure=self._failure,
            durability=self._durability,
            commit_quietly=self._commit_quietly,
        )
        self.bookmark = self.controls.bookmark
        # Everyone's checkpoint, and a secondary's receiver's calls: the parts' own methods
        # (their docstrings say what they raise).
        self.checkpoint = self.checkpointer.checkpoint
        self.append_replicated = self.replica.append_replicated
        self.apply_resync = self.replica.apply_resync
        self.rebase = self.replica.rebase
        # skip_unchanged: a rewrite of what the volume holds is a no-op (blockdev/unchanged).
        self.unchanged = UnchangedFilter(volume, self.applier, self.checkpointer)
        self._commit_scheduled = False
        # A host write went to the volume outside the journal: a FLUSH must sync the volume.
        self._unjournaled_writes = False

    # --- what the link and the daemon read: the parts' state (documented where it lives) ------

    @property
    def failed(self) -> BaseException | None:
        return self._failure.error

    @property
    def stalled(self) -> OSError | None:
        return self.applier.stalled

    @property
    def stall_retry(self) -> float:
        return self.applier.stall_retry

    @stall_retry.setter
    def stall_retry(self, seconds: float) -> None:
        self.applier.stall_retry = seconds

    @property
    def applied_seq(self) -> int:
        return self.applier.applied_seq

    @property
    def applied_event(self) -> asyncio.Event:
        return self.applier.applied_event

    @property
    def unjournaled_count(self) -> int:
        return self.applier.unjournaled_count

    @property
    def unjournaled_pending(self) -> int:
        return self.applier.unjournaled_pending

    @property
    def remote_ack(self) -> RemoteAck | None:
        return self.applier.remote_ack

    @remote_ack.setter
    def remote_ack(self, remote: RemoteAck | None) -> None:
        self.applier.remote_ack = remote

    @property
    def checkpoints(self) -> int:
        return self.checkpointer.count

    # The background tasks, for tests that simulate a crash by cancelling them.
    @property
    def _task(self) -> asyncio.Task[None] | None:
        return self.checkpointer.task

    @property
    def _retry_task(self) -> asyncio.Task[None] | None:
        return self.applier.retry_task

    @property
    def _room_task(self) -> asyncio.Task[None] | None:
        return self.checkpointer.room_task

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic checkpoints. Never raises."""
        self.checkpointer.start()

    async def close(self) -> None:
        """Apply and sync everything, write a clean checkpoint, close the journal.

        A stop must not hang on a write that waits for room nobody will make (a peer that never
        acknowledges under ``overflow = "block"``): such waits are bounded, and a journal left
        with unapplied work is closed unclean, so recovery replays it. What fails here only
        makes the close unclean (and is logged); raises only what :meth:`Checkpointer.stop`
        raises.
        """
        await self.checkpointer.stop_making_room(CLOSE_WAIT)
        if self.failed is None and self.stalled is None:
            with contextlib.suppress(Exception, TimeoutError):
                # A failing journal write here only makes the close unclean, never skips it.
                gate = self.commit()
                if gate is not None:
                    await asyncio.wait_for(gate, CLOSE_WAIT)
        await self.checkpointer.stop()
        self.applier.stop()
        clean = (
            self.failed is None
            and self.stalled is None
            and not self.applier.queue
            and not self.checkpointer.waiting
        )
        await self.checkpointer.close_journal(clean=clean)

    # --- history (docs/history.md) ---------------------------------------------------------------

    @property
    def history(self) -> HistoryLog | None:
        return self.applier.history

    @history.setter
    def history(self, history: HistoryLog | None) -> None:
        self.applier.history = history
        self._durability.history = history
        self.replica.history = history

    # --- the WritePath interface ----------------------------------------------------------------

    def write(self, offset: int, data: Sequence[Buffer], *, fua: bool) -> Pending:
        """Accept a write of the concatenated ``data``; with ``fua`` its future completes once
        it is durable. Raises the write path's failure, the volume's OSError while it is
        stalled, and OSError(EINVAL) for a write larger than :meth:`max_write`."""
        if len(data) == 1:
            length = memoryview(data[0]).nbytes
        else:
            length = sum(memoryview(b).nbytes for b in data)
        if (
            self.unchanged.enabled
            and self._failure.error is None
            and self.applier.stalled is None
            and self.unchanged.unchanged(offset, length, data)
        ):
            return self.flush() if fua else None
        return self._accept(Kind.WRITE, offset, length, data, False, fua)

    def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> Pending:
        """Accept a zeroing of a range; raises as :meth:`write`."""
        return self._accept(Kind.ZERO, offset, length, (), may_trim, fua)

    def trim(self, offset: int, length: int, *, fua: bool) -> Pending:
        """Accept a trim of a range; raises as :meth:`write`."""
        return self._accept(Kind.TRIM, offset, length, (), True, fua)

    def flush(self) -> Pending:
        """A future that completes once everything accepted before is durable. Never raises:
        after a failure the future carries it at once (nothing since can be made durable)."""
        fut = self._durability.flush()
        if not fut.done():
            self._schedule_commit()
        return fut

    def can_fast_zero(self) -> bool:
        """Whether zeroing the volume writes no data. Never raises."""
        return self.volume.capabilities().fast_zero

    def max_write(self) -> int:
        """The largest write this journal takes at once. Never raises."""
        return self.journal.max_write()

    def commit(self) -> Pending:
        """Write the batch, apply what can be applied; a future gates the batch's replies.

        Raises the write path's failure (also one that applying the batch just caused), or the
        ring's OSError (which fails the write path). While the volume is stalled, the returned
        future is already failed with its OSError.
        """
        self._commit_scheduled = False
        if self.failed is not None:
            raise self.failed
        try:
            self.journal.write_batch()
        except OSError as exc:
            self._failure.fail(exc)
            raise
        applier = self.applier
        applier.drain()
        if self.failed is not None:
            # Applying failed the path for good (a store error that is not an OSError): every
            # waiter has been answered, and a gate made now would never be.
            raise self.failed
        # Journaled records are durable once the journal is: a record is freed only after the
        # volume's copy is durable. Writes made outside the journal need the volume.
        upto = applier.applied_seq if self._unjournaled_writes else None
        self._durability.release_flushes(volume_upto=upto)
        return applier.gate()

    # --- accepting ------------------------------------------------------------------------------

    def _accept(
        self,
        kind: Kind,
        offset: int,
        length: int,
        data: Sequence[Buffer],
        may_trim: bool,
        fua: bool,
    ) -> Pending:
        if self._failure.error is not None:
            raise self._failure.error
        applier = self.applier
        if applier.stalled is not None:
            raise applier.stalled
        journal = self.journal
        if kind == Kind.WRITE and length > journal.max_write():
            # It would wait for room that can never come: the journal is too small for it.
            raise OSError(
                errno.EINVAL,
                f"a write of {length} bytes exceeds the {journal.max_write()} bytes this "
                f"volume's journal ({journal.capacity} bytes of ring) can take at once",
            )
        checkpointer = self.checkpointer
        if checkpointer.waiting or not checkpointer.room_for(kind, length):
            done: asyncio.Future[None] = self._loop.create_future()
            record = Record(kind=kind, offset=offset, length=length)
            checkpointer.wait_for_room(Entry(record, data, may_trim, fua, done))
            return done
        waits = fua or applier.remote_ack is not None
        done_opt = self._loop.create_future() if waits else None
        self._stage(kind, offset, length, data, may_trim, fua, done_opt)
        self._schedule_commit()
        return done_opt

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
        """Journal a request (staged for the next batch) and queue it for the volume.

        The hot path: one :class:`Entry` per request, around the record the journal made.
        """
        journal, applier = self.journal, self.applier
        if journal.enqueue_paused:
            # Not journaled: every consumer must learn of it through its dirty map instead.
            journal.mark_dirty_everywhere(offset, length)
            self._unjournaled_writes = True
            applier.unjournaled_pending += 1
            record = Record(kind=kind, offset=offset, length=length)
            applier.push(Entry(record, data, may_trim, fua, done, False, True))
            return
        for consumer in journal.tracking_consumers():
            consumer.dirty.mark(offset, length)
        if kind == Kind.WRITE and length > journal.max_payload():
            self._stage_pieces(offset, data, fua, done)
        else:
            applier.push(
                Entry(journal.stage(kind, offset, length, data), data, may_trim, fua, done)
            )
        self.checkpointer.appended()

    def _stage_waiting(self, entry: Entry) -> None:
        """Stage a request that waited for room (the checkpointer calls this once it fits)."""
        rec = entry.record
        self._stage(
            rec.kind, rec.offset, rec.length, entry.data, entry.may_trim, entry.fua, entry.done
        )

    def _stage_pieces(
        self, offset: int, data: Sequence[Buffer], fua: bool, done: asyncio.Future[None] | None
    ) -> None:
        """A write larger than one record's payload, as several records; the last carries the
        request's completion."""
        journal, applier = self.journal, self.applier
        pieces = split_buffers(data, journal.max_payload())
        last = len(pieces) - 1
        pos = offset
        for i, piece in enumerate(pieces):
            n = sum(memoryview(b).nbytes for b in piece)
            rec = journal.stage(Kind.WRITE, pos, n, piece)
            if i == last:
                applier.push(Entry(rec, piece, fua=fua, done=done))
            else:
                applier.push(Entry(rec, piece))
            pos += n

    def _schedule_commit(self) -> None:
        # The export calls commit() itself; this covers callers that do not (tests, shutdown).
        if not self._commit_scheduled:
            self._commit_scheduled = True
            self._loop.call_soon(self._commit_soon)

    def _commit_soon(self) -> None:
        if self._commit_scheduled:
            with contextlib.suppress(Exception):
                self._commit_quietly()

    def _commit_quietly(self) -> None:
        """Commit for an internal caller that waits on something else; a failed gate is only
        of interest to the host's replies (there are none here), so it is consumed. Raises
        what :meth:`commit` raises."""
        gate = self.commit()
        if gate is not None:
            gate.add_done_callback(consume)

    # --- failures and stalls --------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """Fail the write path with ``exc`` (tests inject fatal errors this way)."""
        self._failure.fail(exc)

    def _stalled(self, exc: OSError) -> None:
        # The applier answered its own queue; the requests waiting for room get the error too.
        if self.failed is not None:
            self._durability.answer_flushes(exc)
        self.checkpointer.answer_waiting(exc)

    def _resumed(self) -> None:
        self.checkpointer.want()  # what was held up while stalled may be freed now

    # --- consumers, alerts ---------------------------------------------------------------------

    def acknowledge(self, name: str, seq: int) -> None:
        """Consumer ``name`` holds every record up to ``seq`` durably. Raises KeyError for an
        unknown consumer."""
        self.journal.acknowledge(name, seq)
        self.checkpointer.acknowledged()
        remote = self.applier.remote_ack
        if remote is not None:
            remote.acknowledge(name, seq)

    def alert(self, kind: str, message: str) -> None:
        """Record an alert for status (and the log); other components raise theirs here.
        Raises only what the ``on_alert`` callback raises."""
        self.alerts.alert(kind, message)

    # --- status ---------------------------------------------------------------------------------

    def condition(self) -> tuple[VolumeState, str] | None:
        """``(state, reason)`` when writes are not being taken, for the volume's status:
        FAILED or STALLED. Never raises."""
        if self.failed is not None:
            return VolumeState.FAILED, (
                f"writes refused after an I/O error ({self.failed}); restart the unit to "
                "replay the journal into the volume"
            )
        stalled = self.stalled
        if stalled is not None:
            return VolumeState.STALLED, (
                f"writes to {self.volume.path} fail ({stalled.strerror or stalled}); "
                "host writes are refused and journaled records retried until they succeed"
            )
        return None

    def status(self) -> dict[str, object]:
        """The journal's status with the write path's own. Never raises."""
        out = self.journal.status(self.checkpointer.high_water.mark)
        out["checkpoints"] = self.checkpoints
        out["failed"] = str(self.failed) if self.failed is not None else None
        out["stalled"] = str(self.stalled) if self.stalled is not None else None
        out["stalls"] = self.applier.stalls
        out["thread_apply_runs"] = self.applier.thread_runs
        out["waiting_for_room"] = len(self.checkpointer.waiting)
        out["overflows"] = self.checkpointer.overflows
        out["overflow"] = self.checkpointer.overflow
        out["alerts"] = list(self.alerts.events)
        remote = self.remote_ack
        out["ack"] = remote.status() if remote is not None else {"mode": "local"}
        out["applied_seq"] = self.applied_seq
        out["volume_durable_seq"] = self.journal.volume_durable_seq
        out["unchanged"] = self.unchanged.status()
        return out
