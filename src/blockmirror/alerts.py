"""Alerts: the conditions an operator must hear about, kept for status and passed on.

An :class:`AlertLog` keeps the newest alerts (what ``volumes[].journal.alerts`` shows), logs each
one and hands it to an optional ``on_alert`` callback (the daemon forwards alerts from there).
:class:`HighWater` raises one alert per episode of a fill above a mark, not one per write.

This module is at the bottom of the layers: it imports nothing of ours, so any layer may raise an
alert without depending on the one that shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["KEEP", "AlertLog", "HighWater", "OnAlert"]

log = logging.getLogger(__name__)

# ``on_alert(kind, message)``: ``kind`` is a stable name (``journal_high_water``, ...).
OnAlert = Callable[[str, str], None]
# How many alerts status keeps: enough to see what happened, never a growing list.
KEEP = 20
# An episode above the high-water mark ends only once the fill drops this far below it, so a
# fill hovering at the mark raises one alert, not one per write.
HYSTERESIS = 0.9


class AlertLog:
    """The newest alerts of one component, its log lines and its callback.

    ``source`` prefixes every log line (a journal's file name, say). Never raises, unless the
    ``on_alert`` callback does.
    """

    def __init__(self, source: str, on_alert: OnAlert | None = None, *, keep: int = KEEP) -> None:
        self.source = source
        self.keep = keep
        self.on_alert = on_alert
        # Oldest first; what status shows.
        self.events: list[dict[str, str]] = []

    def alert(self, kind: str, message: str) -> None:
        """Record an alert for status, log it and pass it to ``on_alert``."""
        log.warning("%s: %s", self.source, message)
        self.events.append({"kind": kind, "message": message})
        del self.events[: -self.keep]
        if self.on_alert is not None:
            self.on_alert(kind, message)


class HighWater:
    """Raises ``kind`` once when a fill reaches ``mark`` (a fraction of the capacity), and again
    only after it has dropped below ``HYSTERESIS * mark`` and risen again. Never raises."""

    def __init__(
        self,
        alerts: AlertLog,
        mark: float,
        *,
        kind: str = "journal_high_water",
        what: str = "journal",
    ) -> None:
        self.alerts = alerts
        self.mark = mark
        self.kind = kind
        self.what = what
        self.above = False

    def update(self, used: int, capacity: int) -> None:
        """Note the current fill; alerts if this starts an episode above the mark."""
        if used >= self.mark * capacity and not self.above:
            self.above = True
            self.alerts.alert(self.kind, f"{self.what} is {used / capacity:.0%} full")
        elif used < self.mark * capacity * HYSTERESIS and self.above:
            self.above = False
