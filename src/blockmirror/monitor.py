"""The unit's watch loop: about once a second, status in, events out.

:class:`UnitMonitor` reads the unit's status, asks :class:`~blockmirror.conditions.Watch` which
conditions hold, and settles each in the :class:`~blockmirror.events.EventLog` (one raise and
one clear per episode). A component's alert (the journal reaching its high-water mark, say) pokes
it for an immediate look, so an event does not wait for the next tick. It also feeds the samples
the web console's lag graph draws. It runs on the event loop and does no I/O of its own: status
is built from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from blockmirror.conditions import Watch
from blockmirror.events import EventLog, EventName, Subject

__all__ = ["UnitMonitor"]

log = logging.getLogger(__name__)

INTERVAL = 1.0
# Episodes this loop owns: every other (config-lost) is raised and cleared by whoever knows.
_WATCHED = frozenset(EventName) - {EventName.CONFIG_LOST}


class UnitMonitor:
    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        events: EventLog,
        *,
        rpo_seconds: float | None = None,
        link_down_seconds: float = 30.0,
        samplers: list[Callable[[dict[str, Any], float], None]] | None = None,
        interval: float = INTERVAL,
    ) -> None:
        self._status = status
        self.events = events
        self.watch = Watch(rpo_seconds=rpo_seconds, link_down_seconds=link_down_seconds)
        self.samplers = samplers or []
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._poked: asyncio.Event | None = None

    def reconfigure(self, *, rpo_seconds: float | None, link_down_seconds: float) -> None:
        self.watch.rpo_seconds = rpo_seconds
        self.watch.link_down_seconds = link_down_seconds
        self.poke()

    def start(self) -> None:
        self._poked = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self, *_: object) -> None:
        """Look again now (an ``on_alert`` callback: it takes and ignores the alert)."""
        if self._poked is not None:
            self._poked.set()

    async def _run(self) -> None:
        assert self._poked is not None
        while True:
            try:
                self.check()
            except Exception:
                # A bug in a rule must not end the watch (or the unit): log it, look again.
                log.exception("checking the unit's conditions failed")
            self._poked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self.interval)

    def check(self) -> None:
        """One look: every condition settled, every sampler fed."""
        status = self._status()
        now = time.time()
        open_high = {
            subject.volume
            for name, subject in self.events.subjects()
            if name is EventName.JOURNAL_HIGH_WATER and subject.volume is not None
        }
        seen: set[tuple[EventName, Subject]] = set()
        for condition in self.watch.evaluate(status, now, open_high_water=open_high):
            seen.add((condition.name, condition.subject))
            self.events.settle(condition.name, condition.subject, condition.message)
        # An open episode whose subject status no longer shows (a peer removed, a split brain
        # resolved) has ended.
        for name, subject in self.events.subjects():
            if name in _WATCHED and (name, subject) not in seen:
                self.events.clear(name, subject, "no longer reported")
        for sample in self.samplers:
            sample(status, now)
