"""Background priority: a link that yields to other traffic on its path (sans-I/O).

Linux's TCP-LP congestion control does this in the kernel, and a link uses it when the kernel
offers it (``TCP_CONGESTION`` ``lp``; :func:`choose_control`). Where it does not, this module's
:class:`DelayController` does the same in user space, on LEDBAT's idea (RFC 6817): the one-way
delay of the source's probes grows when a queue builds on the path, and a queue that our own
pace did not build means someone else wants the link. The controller keeps the queueing delay
near :data:`TARGET`: it slows the link's pace in proportion to the delay above it, and speeds
it up in proportion to the room below it.

One-way delay is the secondary's clock when it echoed a probe minus ours when we sent it. The
two clocks differ by a constant, which cancels out: only the delay above the smallest seen (the
*base*, kept per minute for :data:`BASE_MINUTES` minutes as RFC 6817 keeps it) counts.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["TARGET", "DelayController", "PriorityControl"]

TARGET: Final = 0.05  # seconds of queueing delay the link tolerates before it yields
BASE_MINUTES: Final = 10
MIN_RATE: Final = 2048.0  # bytes a second the link keeps even when it yields (the probes' share)
START_FRACTION: Final = 0.1  # of the ceiling, where a controller starts
_DECREASE: Final = 0.5  # the most one sample cuts the pace by (at twice the target and more)
_INCREASE: Final = 0.25  # the most one sample raises it by (with no queue at all)


class PriorityControl(enum.StrEnum):
    """How a link's priority is carried out (shown in status)."""

    NONE = "none"  # normal priority
    TCP_LP = "tcp-lp"  # the kernel's low-priority congestion control
    DELAY_BASED = "delay-based"  # this module's controller


class DelayController:
    """The pace a background link may send at, from probe delays."""

    __slots__ = ("_base", "_clock", "ceiling", "qdelay", "rate")

    def __init__(
        self, ceiling: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        # The fastest the link may go (its bandwidth limit or the measured path rate); None
        # until one of them is known, and then the controller starts low.
        self.ceiling = ceiling
        self.rate = max(MIN_RATE, (ceiling or 0) * START_FRACTION) if ceiling else MIN_RATE * 64
        self.qdelay: float | None = None
        self._base: deque[tuple[int, float]] = deque()  # (minute, smallest delay in it)

    def set_ceiling(self, ceiling: float | None) -> None:
        self.ceiling = ceiling
        if ceiling is not None:
            self.rate = min(self.rate, ceiling)

    def base(self) -> float | None:
        return min((d for _, d in self._base), default=None)

    def on_delay(self, one_way: float) -> float:
        """A probe's one-way delay (seconds, clock offset included); the new pace."""
        minute = int(self._clock() // 60)
        if self._base and self._base[-1][0] == minute:
            if one_way < self._base[-1][1]:
                self._base[-1] = (minute, one_way)
        else:
            self._base.append((minute, one_way))
            while self._base and self._base[0][0] <= minute - BASE_MINUTES:
                self._base.popleft()
        base = self.base()
        assert base is not None
        qdelay = one_way - base
        self.qdelay = qdelay
        off_target = (TARGET - qdelay) / TARGET  # 1 with no queue, negative above the target
        if off_target >= 0:
            self.rate *= 1 + _INCREASE * off_target
        else:
            self.rate *= 1 - _DECREASE * min(1.0, -off_target)
        ceiling = self.ceiling
        self.rate = max(MIN_RATE, self.rate if ceiling is None else min(ceiling, self.rate))
        return self.rate
