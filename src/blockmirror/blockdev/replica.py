"""A secondary's apply: records and resync data from its source, in order with each other.

Records arrive from the link already numbered, stamped and attributed by the primary; they are
journaled with those same ``seq``, ``timestamp_ns`` and ``origin`` and then applied to the
replica by the same ordered :class:`~blockmirror.blockdev.applier.Applier` as a primary's host
writes. Resync data is not journaled (the source sends it again if the copy is interrupted): it
is applied in order with the records, and every consumer of this unit (a relayed peer) learns of
it from its dirty map.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from blockmirror.blockdev.applier import Applier, Entry
from blockmirror.blockdev.checkpointer import Checkpointer
from blockmirror.blockdev.durability import Durability, Failure
from blockmirror.blockdev.replay_delay import ReplayDelay
from blockmirror.errors import JournalError
from blockmirror.history.log import HistoryLog
from blockmirror.journal.format import EXTENT_KINDS, PAYLOAD_KINDS, Buffer, Kind
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import Record
from blockmirror.state import ConsumerMode

__all__ = ["JournalFullError", "ReplicaApply"]

Gate = asyncio.Future[None] | None


class JournalFullError(JournalError):
    """A journal could not be emptied for renumbering."""


class ReplicaApply:
    """The secondary's side of a write path: what its receiver calls.

    ``commit`` is the write path's group commit: it writes the staged batch to the ring and
    applies what it can, returning a gate like :meth:`Applier.gate` (and raising the write
    path's failure, or the ring's OSError).
    """

    def __init__(
        self,
        journal: Journal,
        applier: Applier,
        checkpointer: Checkpointer,
        loop: asyncio.AbstractEventLoop,
        *,
        failure: Failure,
        durability: Durability,
        commit: Callable[[], Gate],
        commit_quietly: Callable[[], None],
    ) -> None:
        self.journal = journal
        self._applier = applier
        self._checkpointer = checkpointer
        self._loop = loop
        self._failure = failure
        self._durability = durability
        self._commit = commit
        self._commit_quietly = commit_quietly
        self.history: HistoryLog | None = None
        # replay_delay (docs/operations.md, "A lagged replica"): records held back from the
        # replica, durable in the journal meanwhile.
        self.delay = ReplayDelay(applier, loop, commit_quietly)
        self._resyncing = False

    def begin_resync(self, *, whole: bool) -> None:
        """A resync is about to overwrite regions. ``whole``: the replica is consistent now,
        so its history keeps this point until the resync ends (docs/history.md). Raises
        OSError (the history's storage)."""
        self._resyncing = True
        self.delay.release_all()
        if self.history is not None:
            self.history.begin_resync(whole=whole)

    def end_resync(self) -> None:
        """The resync is done and the replica consistent. Raises OSError."""
        self._resyncing = False
        if self.history is not None:
            self.history.end_resync(self._applier.applied_seq)
            self.history.expire()

    async def append_replicated(self, records: Sequence[Record]) -> asyncio.Future[None]:
        """Journal records received from a source, keeping their numbers, times and origins.

        They are written to the ring and applied to the replica in order. Returns (once
        staged; only a full journal makes this wait) a future that completes when they are
        durable in the journal, which is when the source may be told so; it fails with the
        sync's OSError.

        Raises the write path's failure (an OSError, a JournalError), JournalError when a
        record's ``seq`` is not the next one, and OSError (errno) when the ring cannot be
        written while making room.
        """
        self._failure.check()
        journal, applier = self.journal, self._applier
        for record in records:
            kind, length = record.kind, record.length
            while not journal.fits(length if kind in PAYLOAD_KINDS else 0):
                await self._free_space()
            if kind in EXTENT_KINDS:
                for consumer in journal.tracking_consumers():
                    consumer.dirty.mark(record.offset, length)
            data = record.data if kind in PAYLOAD_KINDS else ()
            placed = journal.stage(
                kind,
                record.offset,
                length,
                data,
                seq=record.seq,
                timestamp_ns=record.timestamp_ns,
                origin=record.origin,
            )
            if self.delay.held or (self.delay.seconds > 0 and not self._resyncing):
                # Held without its data (read back from the ring when due): a delay of
                # minutes must not keep minutes of writes in memory.
                self.delay.hold(Entry(placed, (), kind != Kind.WRITE, from_ring=True))
            else:
                applier.push(Entry(placed, data, kind != Kind.WRITE))
        self._checkpointer.appended()
        self._commit_quietly()
        done: asyncio.Future[None] = self._loop.create_future()
        self._durability.then([done], volume_upto=None)
        return done

    def hold_unapplied(self) -> None:
        """At start: the journal's records the start-up replay left for later (not due yet
        under replay_delay) are held again, in order."""
        for rec in self.journal.records:
            if rec.seq > self._applier.applied_seq:
                self.delay.hold(Entry(rec, (), rec.kind != Kind.WRITE, from_ring=True))

    async def _free_space(self) -> None:
        if self.delay.held:
            # The journal holds the delayed records and nothing else can free it: apply the
            # oldest now rather than stop the link (the delay is shortened, and said so).
            self.delay.release_early()
        applier = self._applier
        if applier.stalled is not None:
            # Nothing frees while the replica cannot be written: hold the link until it can.
            await applier.unstalled.wait()
            self._failure.check()
            return
        gate = self._commit()
        if gate is not None:
            try:
                await gate
            except OSError:
                if self._failure.error is not None:
                    raise
                # The replica cannot take writes for now: hold the link until it can.
                await applier.unstalled.wait()
                if self._failure.error is not None:
                    raise self._failure.error from None
                return
        self._checkpointer.release_slowest()
        await self._checkpointer.checkpoint()

    def apply_resync(self, offset: int, length: int, data: Buffer | None) -> asyncio.Future[None]:
        """Write a region copied by a resync (``data`` None: zeros) in order with the records.

        It is not journaled (the source resends it if the copy is interrupted); every consumer
        of this unit learns of it through its dirty map. The returned future completes when
        the region is durable in the replica, and fails with the volume's OSError.

        Raises the write path's failure.
        """
        self._failure.check()
        # A resync overwrites regions in the stream's order: nothing may stay held behind it.
        self.delay.release_all()
        journal = self.journal
        for consumer in journal.consumers.values():
            if consumer.mode == ConsumerMode.JOURNAL:
                # The replica changes outside the journal: a relayed peer must copy regions
                # again, and a copy of this region already in flight to it must not count.
                journal.switch_to_tracking(consumer)
        journal.mark_dirty_everywhere(offset, length)
        done: asyncio.Future[None] = self._loop.create_future()
        # Outside the journal, like a host write while enqueueing is paused: a copy to a
        # relayed peer read before it reaches the replica lacks it, and must not count (its
        # apply may wait behind a history sync or a thread).
        self._applier.unjournaled_pending += 1
        if data is None:
            record = Record(kind=Kind.ZERO, offset=offset, length=length)
            entry = Entry(record, may_trim=True, fua=True, done=done, journaled=False, outside=True)
        else:
            record = Record(kind=Kind.WRITE, offset=offset, length=length)
            entry = Entry(record, (data,), fua=True, done=done, journaled=False, outside=True)
        self._applier.push(entry)
        self._commit_quietly()
        return done

    async def rebase(self, next_seq: int, *, renumbered: bool = True) -> None:
        """Renumber an emptied journal so records from ``next_seq`` on can follow.

        Every journal-mode consumer goes to tracking first (its cursor belongs to the old
        numbering). Raises :class:`JournalFullError` when records are still held after a
        checkpoint, OSError (errno) when the ring, the volume or a checkpoint cannot be
        written, and the write path's failure.
        """
        gate = self._commit()
        if gate is not None:
            await gate
        journal = self.journal
        for consumer in journal.consumers.values():
            if consumer.mode == ConsumerMode.JOURNAL:
                journal.switch_to_tracking(consumer)
        await self._checkpointer.checkpoint()
        if journal.records:
            raise JournalFullError("records are still held after a checkpoint; cannot renumber")
        await self._durability.sync_volume(self._applier.applied_seq)
        lowered = next_seq < journal.next_seq
        journal.rebase(next_seq)
        self._applier.applied_seq = next_seq - 1
        if self.history is not None and renumbered:
            # (Not after a rolled-back resync: the numbering then continues its own line.)
            self.history.rebase(next_seq)
        if lowered:
            # Records of the old numbering past the end must never be read back as new ones.
            await asyncio.to_thread(journal.erase_renumbered)
        await self._checkpointer.checkpoint()
