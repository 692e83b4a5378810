"""What every part of the journaled write path shares: its fatal failure and its syncs.

:class:`Failure` holds the error after which the write path takes no more writes (a failed
journal write or sync, a failed volume sync): every part checks it before doing more, and any
part may declare it. :class:`Durability` makes records durable for the requests that wait on it
(FLUSH, FUA, a secondary's acknowledgement): one ``fdatasync`` of the journal covers every
waiter that arrived before it started, and the volume is synced only for writes made outside
the journal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from blockmirror.alerts import AlertLog
from blockmirror.history.log import HistoryLog
from blockmirror.io.syncer import Syncer, settle
from blockmirror.journal.journal import Journal
from blockmirror.store.base import Store

__all__ = ["Durability", "Failure", "consume", "settle"]

log = logging.getLogger(__name__)


class Failure:
    """The write path's fatal error, once there is one.

    :meth:`fail` records it and calls every listener with ``(exc, first)``, in the order they
    were added: each part answers the requests waiting on it, so none waits for ever. After an
    I/O error on a file no later sync of that file proves anything, so a failure is never
    cleared: a restart replays the journal.
    """

    __slots__ = ("_listeners", "error")

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._listeners: list[Callable[[BaseException, bool], None]] = []

    def listen(self, listener: Callable[[BaseException, bool], None]) -> None:
        """Call ``listener(exc, first)`` at every :meth:`fail`. Never raises."""
        self._listeners.append(listener)

    def fail(self, exc: BaseException) -> None:
        """Declare the write path failed with ``exc`` (a later error replaces an earlier one).

        Raises only what a listener raises.
        """
        first = self.error is None
        self.error = exc
        for listener in self._listeners:
            listener(exc, first)

    def check(self) -> None:
        """Raise the failure, if there is one."""
        if self.error is not None:
            raise self.error


def consume(f: asyncio.Future[None]) -> None:
    """A done callback for a future nobody awaits: its exception counts as retrieved."""
    if not f.cancelled():
        f.exception()


class Durability:
    """Journal and volume syncs, each coalesced (:class:`Syncer`), and who waits on them.

    It is also the first to hear of a failure: it is the one that says what the ring may have
    lost, and answers the FLUSHes.
    """

    def __init__(
        self,
        journal: Journal,
        volume: Store,
        loop: asyncio.AbstractEventLoop,
        failure: Failure,
        alerts: AlertLog,
    ) -> None:
        self.journal = journal
        self._loop = loop
        self._failure = failure
        self._alerts = alerts
        failure.listen(self._failed)
        self._volume = volume
        # The volume's history, synced before the volume on a primary (docs/history.md).
        self.history: HistoryLog | None = None
        self._journal_syncer = Syncer(self._sync_journal, loop)
        self._volume_syncer = Syncer(self._sync_volume, loop)
        # FLUSH requests waiting for the next commit.
        self._flushes: list[asyncio.Future[None]] = []

    def flush(self) -> asyncio.Future[None]:
        """A FLUSH: its future completes once everything accepted before the next
        :meth:`release_flushes` is durable. Never raises (the future carries any error)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._failure.error is not None:
            # Nothing since the failure can be made durable: say so now, never wait.
            fut.set_exception(self._failure.error)
        else:
            self._flushes.append(fut)
        return fut

    def release_flushes(self, *, volume_upto: int | None) -> None:
        """The batch is written: make it durable for the FLUSHes waiting on it (see
        :meth:`then`). Never raises."""
        if self._flushes:
            waiters, self._flushes = self._flushes, []
            self.then(waiters, volume_upto=volume_upto)

    def _failed(self, exc: BaseException, first: bool) -> None:
        if first and self.journal.io_error is not None:
            # The ring may have lost records the volume (and so a peer) already has, and no
            # checkpoint can be trusted to say so: every peer's dirty map says it instead.
            self.journal.mark_all_dirty()
            self._loop.run_in_executor(None, self.journal.sync_dirty_maps).add_done_callback(
                consume
            )
        if first:
            log.error("volume write path failed: %s", exc)
            self._alerts.alert(
                "volume_failed", f"writes refused until a restart replays the journal: {exc}"
            )
        self.answer_flushes(exc)

    def answer_flushes(self, exc: BaseException) -> None:
        """Every FLUSH waiting for a commit gets ``exc`` now. Never raises."""
        waiters, self._flushes = self._flushes, []
        settle(waiters, exc)

    def then(self, waiters: list[asyncio.Future[None]], *, volume_upto: int | None) -> None:
        """Complete ``waiters`` once the journal is synced (and, with ``volume_upto``, the
        volume, which then durably holds every record up to it).

        A waiter gets the sync's OSError if one fails; a failure of the journal's storage also
        fails the write path (its :attr:`Journal.io_error` is set).
        """
        parts: list[asyncio.Future[None]] = [self._journal_syncer.sync()]
        if volume_upto is not None:
            parts.append(self._loop.create_task(self.sync_volume(volume_upto)))
        combined = asyncio.gather(*parts)

        def finished(f: asyncio.Future[list[None]]) -> None:
            exc = f.exception()
            if exc is not None and self.journal.io_error is not None:
                self._failure.fail(exc)
            settle(waiters, exc)

        combined.add_done_callback(finished)

    async def sync_volume(self, target: int) -> None:
        """Sync the volume; afterwards it durably holds every record up to ``target``.

        Raises the sync's OSError. A failed sync is fatal for the write path: the kernel may have
        dropped the pages it could not write and will not report that again, so no later sync
        of the volume proves anything. The journal keeps every record since the last good sync
        for the replay at the next start.
        """
        try:
            await self._volume_syncer.sync()
        except OSError as exc:
            self._failure.fail(exc)
            raise
        self.journal.volume_durable_seq = max(self.journal.volume_durable_seq, target)

    def _sync_volume(self) -> None:
        """Blocking (a worker thread): fdatasync the volume, after the before-images of what
        it holds, so that no change is durable before its undo record is."""
        history = self.history
        if history is not None and history.capturing:
            try:
                history.sync()
            except OSError as exc:
                history.give_up(exc)
        self._volume.flush()

    def _sync_journal(self) -> None:
        """Blocking (a worker thread): fdatasync the ring. Raises its OSError."""
        durable = self.journal.sync()
        self.journal.durable_seq = max(self.journal.durable_seq, durable)
