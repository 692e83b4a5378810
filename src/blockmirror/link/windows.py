"""Transmit windows: the times of the week a link may send, in local time (sans-I/O).

A window is written ``"22:00-06:00"`` (every day; one that ends before it starts runs past
midnight) or ``"Sat 00:00-Mon 06:00"`` (a span of the week, which may wrap from Sunday to
Monday). ``24:00`` ends a day. A schedule is the union of its windows; no windows at all means
always open. Everything is computed on wall-clock minutes of the week, so a window opens at
the local time it names on days when the clocks change too (a time the change skips opens it
at the first minute that exists after it).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["Schedule", "TransmitWindow", "WindowError", "parse_window"]

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_MINUTES: Final = 24 * 60
WEEK_MINUTES: Final = 7 * DAY_MINUTES

_TIME = r"(\d{1,2}):(\d{2})"
_DAILY: Final = re.compile(rf"^{_TIME}\s*-\s*{_TIME}$")
_WEEKLY: Final = re.compile(
    rf"^([A-Za-z]{{3}})[A-Za-z]*\s+{_TIME}\s*-\s*([A-Za-z]{{3}})[A-Za-z]*\s+{_TIME}$"
)


class WindowError(ValueError):
    """A transmit window that cannot be read; the message says why."""


@dataclass(frozen=True, slots=True)
class TransmitWindow:
    """One window as written, and the spans of the week it covers: ``[start, end)`` minutes
    from Monday 00:00, each within ``0..WEEK_MINUTES``."""

    text: str
    spans: tuple[tuple[int, int], ...]

    def __str__(self) -> str:
        return self.text


def _minutes(hours: str, minutes: str, text: str) -> int:
    h, m = int(hours), int(minutes)
    if m > 59 or h > 24 or (h == 24 and m):
        raise WindowError(f"{text!r}: {hours}:{minutes} is not a time of day (00:00..24:00)")
    return h * 60 + m


def _day(name: str, text: str) -> int:
    key = name[:3].lower()
    if key not in DAYS:
        raise WindowError(f"{text!r}: {name!r} is not a day (Mon, Tue, ... Sun)")
    return DAYS.index(key)


def _on_week(start: int, end: int) -> list[tuple[int, int]]:
    """``[start, end)`` (``start`` within the week, ``end`` after it) as spans of one week:
    a span past Sunday midnight goes on from Monday 00:00."""
    if end <= WEEK_MINUTES:
        return [(start, end)]
    return [(start, WEEK_MINUTES), (0, end - WEEK_MINUTES)]


def parse_window(text: str) -> TransmitWindow:
    """Read one window; raises :class:`WindowError` naming what is wrong."""
    cleaned = " ".join(text.split())
    spans: list[tuple[int, int]] = []
    if daily := _DAILY.match(cleaned):
        start = _minutes(daily[1], daily[2], text)
        end = _minutes(daily[3], daily[4], text)
        if start == DAY_MINUTES:
            raise WindowError(f"{text!r}: a window cannot start at 24:00")
        # One that ends before it starts runs past midnight; "09:00-09:00" is the whole day.
        length = (end - start) % DAY_MINUTES or DAY_MINUTES
        for day in range(7):
            first = day * DAY_MINUTES + start
            spans.extend(_on_week(first, first + length))
    elif weekly := _WEEKLY.match(cleaned):
        start = _day(weekly[1], text) * DAY_MINUTES + _minutes(weekly[2], weekly[3], text)
        end = _day(weekly[4], text) * DAY_MINUTES + _minutes(weekly[5], weekly[6], text)
        start %= WEEK_MINUTES  # "Sun 24:00" is Monday 00:00
        length = (end - start) % WEEK_MINUTES or WEEK_MINUTES
        spans.extend(_on_week(start, start + length))
    else:
        raise WindowError(
            f"{text!r} is not a window: write 'HH:MM-HH:MM' (every day) or "
            "'Day HH:MM-Day HH:MM' (a span of the week), in local time"
        )
    return TransmitWindow(cleaned, _merge(spans))


def _merge(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


class Schedule:
    """When a link may send: the union of its windows (none: always)."""

    __slots__ = ("_spans", "windows")

    def __init__(self, windows: Sequence[TransmitWindow] = ()) -> None:
        self.windows = tuple(windows)
        self._spans = _merge(span for w in self.windows for span in w.spans)

    @property
    def always(self) -> bool:
        return not self.windows or self._spans == ((0, WEEK_MINUTES),)

    def is_open(self, now: dt.datetime) -> bool:
        """Whether ``now`` (a local wall-clock time) is inside a window."""
        if self.always:
            return True
        minute = _week_minute(now)
        return any(start <= minute < end for start, end in self._spans)

    def next_change(self, now: dt.datetime) -> dt.datetime | None:
        """The next local wall-clock time at which :meth:`is_open` changes (None: never)."""
        if self.always:
            return None
        starts = {start for start, _ in self._spans}
        ends = {end % WEEK_MINUTES for _, end in self._spans}
        # A span that ends at Sunday midnight and one that starts at Monday 00:00 are one: no
        # change there. Otherwise every start and end is one.
        edges = sorted(starts ^ ends)
        minute = _week_minute(now)
        later = [edge for edge in edges if edge > minute]
        step = (later[0] if later else edges[0] + WEEK_MINUTES) - minute
        return now.replace(second=0, microsecond=0) + dt.timedelta(minutes=step)


def _week_minute(now: dt.datetime) -> int:
    return now.weekday() * DAY_MINUTES + now.hour * 60 + now.minute
