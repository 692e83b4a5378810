"""How many bytes a link keeps in flight: a window sized to the link, not a constant (sans-I/O).

The window must hold the bandwidth-delay product, or the link idles between acknowledgements;
and it bounds what a cut costs, since everything unacknowledged is sent again. So it is the
link's rate times a horizon of twice the time an acknowledgement takes (at least
:data:`MIN_HORIZON`, at most :data:`MAX_HORIZON`), never below :data:`MIN_WINDOW` and never
above :data:`MAX_WINDOW`. After a cut, at most max(1 MiB, 2 s of the link's rate) is resent.

The rate is the fastest delivery measured over the last :data:`RATE_MEMORY` seconds, and at most
the configured bandwidth limit (the link can go no faster; before anything is measured the limit
alone sizes the window). A window that
is the bottleneck measures a rate of window / ack delay, and the horizon is longer than the ack
delay, so the window grows until the link, not the window, sets the pace.

Round trips come from HEARTBEAT probes the source sends and the secondary echoes; the time
between sending a frame and its acknowledgement is the ack delay (it includes the secondary's
sync).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_WINDOW", "MIN_WINDOW", "FlightWindow"]

MIN_WINDOW: Final = 1024 * 1024
MAX_WINDOW: Final = 64 * 1024 * 1024
MIN_HORIZON: Final = 0.25
MAX_HORIZON: Final = 2.0
RATE_MEMORY: Final = 10.0
_SAMPLE: Final = 0.1  # seconds of acknowledgements one delivery-rate sample spans at least
_SMOOTH: Final = 1 / 8  # RFC 6298's alpha, for the smoothed round trip and ack delay


class FlightWindow:
    __slots__ = (
        "_clock",
        "_rates",
        "_rtts",
        "_sample_acked",
        "_sample_at",
        "ack_delay",
        "rtt",
        "rtt_min",
    )

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.rtt: float | None = None  # smoothed probe round trip, seconds
        self.rtt_min: float | None = None
        self._rtts: deque[tuple[float, float]] = deque()  # (when, round trip) of recent probes
        self.ack_delay: float | None = None  # smoothed send-to-acknowledgement time
        self._rates: deque[tuple[float, float]] = deque()  # (when, bytes per second)
        self._sample_at: float | None = None
        self._sample_acked = 0

    # --- what the stream tells it ----------------------------------------------------------------

    def on_rtt(self, seconds: float) -> None:
        """A probe's round trip."""
        if seconds < 0:
            return  # a wall clock stepped between send and echo
        self.rtt = seconds if self.rtt is None else self.rtt + _SMOOTH * (seconds - self.rtt)
        self.rtt_min = seconds if self.rtt_min is None else min(self.rtt_min, seconds)
        now = self._clock()
        self._rtts.append((now, seconds))
        while now - self._rtts[0][0] > RATE_MEMORY:
            self._rtts.popleft()

    @property
    def recent_rtt(self) -> float | None:
        """The smallest probe round trip of the last RATE_MEMORY seconds: the path's, with as
        little of the link's own queue as a moment in that span had."""
        return min((rtt for _, rtt in self._rtts), default=None)

    def on_ack_delay(self, seconds: float) -> None:
        """How long the oldest frame an acknowledgement covered was in flight."""
        if seconds < 0:
            return
        d = self.ack_delay
        self.ack_delay = seconds if d is None else d + _SMOOTH * (seconds - d)

    def on_acked(self, acked_bytes: int, in_flight: int) -> None:
        """The cumulative acknowledged byte count moved to ``acked_bytes``, with ``in_flight``
        bytes still unacknowledged. A sample counts only while data was waiting: an idle link
        says nothing of its capacity."""
        now = self._clock()
        if self._sample_at is None:
            self._sample_at, self._sample_acked = now, acked_bytes
            return
        elapsed = now - self._sample_at
        if elapsed < _SAMPLE:
            return
        if in_flight > 0:
            self._rates.append((now, (acked_bytes - self._sample_acked) / elapsed))
        self._sample_at, self._sample_acked = now, acked_bytes
        while self._rates and now - self._rates[0][0] > RATE_MEMORY:
            self._rates.popleft()

    def idle(self) -> None:
        """Nothing is in flight: the next sample starts when data does."""
        self._sample_at = None

    # --- what it answers ----------------------------------------------------------------------

    @property
    def delivery_rate(self) -> float | None:
        """The fastest recent delivery, bytes per second (None: not measured yet)."""
        if not self._rates:
            return None
        return max(rate for _, rate in self._rates)

    def horizon(self) -> float:
        delay = self.ack_delay if self.ack_delay is not None else self.rtt
        if delay is None:
            return MIN_HORIZON
        return min(MAX_HORIZON, max(MIN_HORIZON, 2 * delay))

    def size(self, limit: float | None, *, floor: int = MIN_WINDOW) -> int:
        """The window in bytes for a link limited to ``limit`` bytes a second (None: none),
        and at least ``floor``."""
        measured = self.delivery_rate
        # A limit above what the path carries must not size the window: the path's rate does.
        rate = measured if limit is None else min(limit, measured or limit)
        if rate is None:
            return floor  # grows once the first acknowledgements measure the link
        return int(min(MAX_WINDOW, max(floor, rate * self.horizon())))
