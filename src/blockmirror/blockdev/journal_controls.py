"""The operator's controls over one volume's journal, as the admin API reaches them.

Pausing enqueueing turns host writes into dirty bits in every consumer's map instead of journal
records; pausing a consumer stops its sender; discarding turns a consumer's records into dirty
bits. Each writes a checkpoint before it returns, so the setting survives a restart. This is the
whole of what :mod:`blockmirror.admin.controls` may do to a write path.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from blockmirror.blockdev.applier import Applier, Entry
from blockmirror.blockdev.checkpointer import Checkpointer
from blockmirror.blockdev.durability import Durability, Failure
from blockmirror.errors import WritePathError
from blockmirror.journal.format import EXTENT_KINDS, MAX_BOOKMARK, Kind
from blockmirror.journal.journal import Journal
from blockmirror.state import ConsumerMode

__all__ = ["DiscardRangeError", "JournalControls"]


class DiscardRangeError(WritePathError, ValueError):
    """A discard range the consumer's stream cannot honour; nothing was changed."""


class JournalControls:
    """Operator controls of one journal. ``commit_quietly`` writes what the write path has
    staged (so a pause takes effect between whole requests, never inside one)."""

    def __init__(
        self,
        journal: Journal,
        checkpointer: Checkpointer,
        applier: Applier,
        loop: asyncio.AbstractEventLoop,
        *,
        failure: Failure,
        durability: Durability,
        commit_quietly: Callable[[], None],
    ) -> None:
        self._journal = journal
        self._checkpointer = checkpointer
        self._applier = applier
        self._loop = loop
        self._failure = failure
        self._durability = durability
        self._commit_quietly = commit_quietly

    def bookmark(self, name: str) -> asyncio.Future[None]:
        """Journal a bookmark called ``name`` (the state after every write accepted before it);
        the future completes once it is durable in the journal. Raises the write path's
        failure, ValueError for a name that is empty or longer than 200 bytes, the volume's
        OSError while it is stalled, EAGAIN while enqueueing is paused and ENOSPC when the
        journal has no room now."""
        raw = name.encode()
        if not 0 < len(raw) <= MAX_BOOKMARK:
            raise ValueError(f"a bookmark name is 1 to {MAX_BOOKMARK} bytes of UTF-8")
        self._failure.check()
        if self._applier.stalled is not None:
            raise self._applier.stalled
        journal = self._journal
        if journal.enqueue_paused:
            raise OSError(errno.EAGAIN, "the journal's enqueueing is paused; resume it first")
        if not journal.fits(len(raw)):
            raise OSError(errno.ENOSPC, "the journal has no room for a bookmark now; try again")
        done: asyncio.Future[None] = self._loop.create_future()
        placed = journal.stage(Kind.BOOKMARK, 0, len(raw), (raw,))
        self._applier.push(Entry(placed, (raw,)))
        self._checkpointer.appended()
        self._commit_quietly()
        self._durability.then([done], volume_upto=None)
        return done

    @property
    def failed(self) -> BaseException | None:
        """The write path's fatal error, if it has failed (the controls are then refused)."""
        return self._failure.error

    @property
    def enqueue_paused(self) -> bool:
        return self._journal.enqueue_paused

    @property
    def newest_seq(self) -> int:
        return self._journal.next_seq - 1

    def consumer_names(self) -> list[str]:
        """The journal's consumers (its peers). Never raises."""
        return list(self._journal.consumers)

    def consumer_status(self, name: str) -> dict[str, object]:
        """What status shows of consumer ``name``. Raises KeyError for an unknown name."""
        consumers = self._journal.status(self._checkpointer.high_water.mark)["consumers"]
        assert isinstance(consumers, dict)
        return dict(consumers[name])

    async def pause_enqueue(self, paused: bool) -> None:
        """Stop (or restart) journaling host writes; they go to every consumer's dirty map.

        Raises OSError (errno) or a JournalError when the checkpoint cannot be written (the
        setting then holds until a restart).
        """
        self._commit_quietly()
        self._journal.enqueue_paused = paused
        # From now on writes reach the volume outside the journal: no record applied before
        # may be replayed over them after a crash, so the checkpoint covers them all durably.
        await self._checkpointer.checkpoint(volume_durable=paused)

    async def pause_consumer(self, name: str, paused: bool) -> None:
        """Stop (or restart) sending to consumer ``name``.

        Raises KeyError for an unknown consumer, and what :meth:`pause_enqueue` raises.
        """
        self._journal.consumers[name].paused = paused
        await self._checkpointer.checkpoint()

    async def discard(self, name: str, first_seq: int, last_seq: int) -> int:
        """Turn a consumer's records in [first_seq, last_seq] into dirty bits; returns how many.

        Raises :class:`DiscardRangeError` (nothing changed) when the range starts past the
        consumer's next record, KeyError for an unknown consumer, and OSError or a
        JournalError (DirtyMapError) when the dirty map or the checkpoint cannot be written.
        """
        journal = self._journal
        consumer = journal.consumers[name]
        count = 0
        streaming = consumer.mode == ConsumerMode.JOURNAL
        if streaming and first_seq > consumer.acked_seq + 1:
            # A stream cannot skip records in its middle: discarding must start at the next
            # record the consumer would get, or the "discarded" records would still be sent.
            raise DiscardRangeError(
                f"consumer {name} has acknowledged up to {consumer.acked_seq}; a discard must "
                f"start at or before {consumer.acked_seq + 1}"
            )
        if streaming:
            consumer.generation += 1  # bits set behind any copy in flight
            for rec in journal.records:
                if first_seq <= rec.seq <= last_seq and rec.seq > consumer.acked_seq:
                    if rec.kind in EXTENT_KINDS:
                        consumer.dirty.mark(rec.offset, rec.length)
                    count += 1
            if first_seq <= consumer.acked_seq + 1 <= last_seq:
                consumer.acked_seq = min(last_seq, journal.next_seq - 1)
        await asyncio.to_thread(journal.sync_dirty_maps)
        await self._checkpointer.checkpoint()
        return count
