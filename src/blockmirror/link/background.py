"""Background priority: a link that yields to other traffic on its path (sans-I/O).

Linux's TCP-LP congestion control does this in the kernel, and a link uses it when the kernel
offers it (``TCP_CONGESTION`` ``lp``). Where it does not, this module's :class:`QuietGate` does
it in user space, on LEDBAT's idea (RFC 6817): traffic that competes for the path builds a queue
at its bottleneck, and the queue shows as a longer round trip. The gate lets the link send a
frame only while the queueing delay of others is below :data:`TARGET`.

The delay is read the one way that our own bytes cannot distort: a probe (a HEARTBEAT the
secondary echoes) sent when nothing of ours is in flight, everything sent before acknowledged.
Its round trip above the smallest such round trip seen (the *base*, kept per minute for
:data:`BASE_MINUTES` minutes as RFC 6817 keeps it) is the queue others made. A journal record is
sent whole and one record can hold a slow line for a second, so measuring around our own frames
would mistake our queue for theirs. Between frames the link therefore waits for one probe: on a
slow line a frame lasts about a second (:meth:`QuietGate.frame_bytes`) and the probe a round
trip, so alone the link keeps nearly all of the line; with others on it, it sends nothing but
probes, and one frame every :data:`STARVE_AFTER` seconds so it never stops for good. When they
stop, the next probe finds the path quiet and the link takes the line back at once.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["TARGET", "PriorityControl", "QuietGate"]

# Seconds of queueing delay by others tolerated: RFC 6817 allows up to 100 ms; a queue that a
# competing flow keeps on a slow line can be a few tens of ms, so the gate must see less.
TARGET: Final = 0.025
BASE_MINUTES: Final = 10
STARVE_AFTER: Final = 30.0  # a frame at least this often, whatever the queue
FRAME_SECONDS: Final = 1.0  # a background frame is about this much of the line
MIN_FRAME: Final = 64 * 1024
MAX_FRAME: Final = 4 * 1024 * 1024


class PriorityControl(enum.StrEnum):
    """How a link's priority is carried out (shown in status)."""

    NONE = "none"  # normal priority
    TCP_LP = "tcp-lp"  # the kernel's low-priority congestion control
    DELAY_BASED = "delay-based"  # this module's gate


class QuietGate:
    """Whether a background link may send its next frame now."""

    __slots__ = ("_base", "_clock", "_last_frame", "_reading", "qdelay", "waiting")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._base: deque[tuple[int, float]] = deque()  # (minute, smallest idle round trip)
        self.qdelay: float | None = None  # the last idle probe's queueing delay
        self._reading = False  # a probe made since the last frame says the path is quiet
        self._last_frame = clock()
        self.waiting = False  # a frame waits for a probe (the stream sends one)

    def base(self) -> float | None:
        return min((rtt for _, rtt in self._base), default=None)

    def on_idle_probe(self, rtt: float) -> None:
        """The round trip of a probe sent with nothing of ours in flight."""
        if rtt < 0:
            return
        minute = int(self._clock() // 60)
        if self._base and self._base[-1][0] == minute:
            if rtt < self._base[-1][1]:
                self._base[-1] = (minute, rtt)
        else:
            self._base.append((minute, rtt))
            while self._base and self._base[0][0] <= minute - BASE_MINUTES:
                self._base.popleft()
        base = self.base()
        assert base is not None
        self.qdelay = rtt - base
        self._reading = self.qdelay < TARGET

    def may_send(self) -> bool:
        """Whether the next frame may go (call it with nothing of ours in flight)."""
        if self._reading or self._clock() - self._last_frame >= STARVE_AFTER:
            self.waiting = False
            return True
        self.waiting = True
        return False

    def sent(self) -> None:
        """A frame went: the next one needs a new quiet reading."""
        self._reading = False
        self._last_frame = self._clock()

    @staticmethod
    def frame_bytes(rate: float | None) -> int:
        """How much one frame carries: about a second of the line's measured rate."""
        if rate is None:
            return MIN_FRAME
        return int(min(MAX_FRAME, max(MIN_FRAME, rate * FRAME_SECONDS)))
