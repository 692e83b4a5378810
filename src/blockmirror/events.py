"""Events: the conditions an operator must hear about, raised once per episode and cleared.

An *episode* is one stretch of time a condition holds for one subject (a volume, or a peer of a
volume): a link down for two minutes is one ``link-down`` raise and one clear, however often the
condition is looked at in between. :class:`EventLog` keeps which episodes are open, the newest
events (raises and clears) for ``GET /api/events``, and hands each event to its listeners: the
log, the alert targets (:mod:`blockmirror.notify`), and the admin API's event streams.

This module is at the bottom of the layers: it imports nothing of ours, so any layer may raise an
event without depending on the one that delivers it.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["KEEP", "Event", "EventLog", "EventName", "EventState", "Listener", "Subject"]

log = logging.getLogger(__name__)

# How many events GET /api/events keeps: a day of a flapping link is never a growing list.
KEEP = 500


class EventName(enum.StrEnum):
    """The events of the user contract (docs/operations.md, "Monitoring and alerts")."""

    JOURNAL_HIGH_WATER = "journal-high-water"
    JOURNAL_FULL = "journal-full"
    LINK_DOWN = "link-down"
    PEER_TRACKING = "peer-tracking"
    RPO_EXCEEDED = "rpo-exceeded"
    SPLIT_BRAIN = "split-brain"
    CONFIG_LOST = "config-lost"
    VOLUME_FAILED = "volume-failed"


class EventState(enum.StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"


@dataclass(frozen=True, slots=True)
class Subject:
    """What an episode is about: the unit itself (both None), a volume, or a volume's peer."""

    volume: str | None = None
    peer: str | None = None

    def __str__(self) -> str:
        if self.volume is None:
            return "unit"
        return self.volume if self.peer is None else f"{self.volume} → {self.peer}"


@dataclass(frozen=True, slots=True)
class Event:
    """One raise or clear. ``id`` grows by one per event of the unit (SSE's ``id:``); ``time``
    is wall-clock seconds since the epoch; ``since`` is when the episode began."""

    id: int
    name: EventName
    state: EventState
    unit: str
    subject: Subject
    message: str
    time: float
    since: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": str(self.name),
            "state": str(self.state),
            "unit": self.unit,
            "volume": self.subject.volume,
            "peer": self.subject.peer,
            "message": self.message,
            "time": self.time,
            "since": self.since,
        }

    @property
    def summary(self) -> str:
        """One line for a log, a trap's text or a mail's subject."""
        verb = "" if self.state is EventState.RAISED else "cleared: "
        return f"{self.name} {verb}{self.subject}: {self.message}"


Listener = Callable[[Event], None]


class EventLog:
    """The open episodes of a unit, its newest events, and the listeners that get each one.

    ``raise_event`` and ``clear`` are idempotent per (name, subject): a condition looked at every
    second raises once and clears once. A listener that raises is logged and skipped, never
    allowed to stop the others (delivery is the listeners' business and must not block).
    """

    def __init__(
        self, unit: str, *, keep: int = KEEP, clock: Callable[[], float] = time.time
    ) -> None:
        self.unit = unit
        self._clock = clock
        self._ids = itertools.count(1)
        self._open: dict[tuple[EventName, Subject], Event] = {}
        self.recent: deque[Event] = deque(maxlen=keep)
        self.listeners: list[Listener] = []

    def raise_event(self, name: EventName, subject: Subject, message: str) -> Event | None:
        """Open an episode; None (and nothing sent) if this one is open already."""
        if (name, subject) in self._open:
            return None
        now = self._clock()
        event = Event(
            next(self._ids), name, EventState.RAISED, self.unit, subject, message, now, now
        )
        self._open[(name, subject)] = event
        self._emit(event)
        return event

    def clear(self, name: EventName, subject: Subject, message: str = "") -> Event | None:
        """Close an episode; None if none was open."""
        opened = self._open.pop((name, subject), None)
        if opened is None:
            return None
        now = self._clock()
        event = Event(
            next(self._ids),
            name,
            EventState.CLEARED,
            self.unit,
            subject,
            message or f"was: {opened.message}",
            now,
            opened.since,
        )
        self._emit(event)
        return event

    def settle(self, name: EventName, subject: Subject, message: str | None) -> None:
        """Raise when ``message`` is a condition's description, clear when it is None."""
        if message is None:
            self.clear(name, subject)
        else:
            self.raise_event(name, subject, message)

    def is_open(self, name: EventName, subject: Subject) -> bool:
        return (name, subject) in self._open

    def active(self) -> list[Event]:
        """The open episodes' raises, oldest first."""
        return sorted(self._open.values(), key=lambda e: e.id)

    def subjects(self) -> Iterator[tuple[EventName, Subject]]:
        return iter(list(self._open))

    def forget(self, volume: str, peer: str | None = None) -> None:
        """Clear every open episode of a volume (or of one of its peers) that is going away."""
        for name, subject in list(self._open):
            if subject.volume == volume and (peer is None or subject.peer == peer):
                self.clear(name, subject, "no longer configured")

    def since(self, last_id: int) -> list[Event]:
        """The kept events newer than ``last_id``, oldest first."""
        return [e for e in self.recent if e.id > last_id]

    def _emit(self, event: Event) -> None:
        level = logging.WARNING if event.state is EventState.RAISED else logging.INFO
        log.log(level, "event %s", event.summary)
        self.recent.append(event)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("an event listener failed on %s", event.name)
