"""A link's bandwidth limit: a token bucket the sending side charges and waits on.

Sent bytes are charged after the fact (a frame is never split for the limit), so the balance
may go below zero; :meth:`TokenBucket.pace` then waits until it is back to zero. On average the
link carries ``rate`` bytes a second, with bursts of at most ``burst`` bytes after an idle
spell. The rate can change at any time (a reload); None means no limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]

# The largest burst, in seconds of the rate (and at least MIN_BURST bytes): enough to keep a
# frame or two in flight, small enough that the limit holds over any second or so.
BURST_SECONDS = 0.25
MIN_BURST = 64 * 1024


class TokenBucket:
    def __init__(
        self, bytes_per_second: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.rate: float | None = None
        self.burst = 0.0
        self._tokens = 0.0
        self._at = clock()
        self.set_rate(bytes_per_second)
        self._tokens = self.burst  # a link starts with one burst of credit

    def set_rate(self, bytes_per_second: float | None) -> None:
        self._refill()
        self.rate = bytes_per_second if bytes_per_second else None
        self.burst = max(MIN_BURST, (self.rate or 0) * BURST_SECONDS)
        self._tokens = min(self._tokens, self.burst)

    def _refill(self) -> None:
        now = self._clock()
        if self.rate is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def charge(self, nbytes: int) -> None:
        """``nbytes`` went on the wire."""
        if self.rate is not None:
            self._refill()
            self._tokens -= nbytes

    @property
    def ready(self) -> bool:
        """Whether more may be sent now without waiting."""
        if self.rate is None:
            return True
        self._refill()
        return self._tokens > -1.0  # a byte of slack for the clock's rounding

    def delay(self) -> float:
        """Seconds until the balance is back to zero (0: send now)."""
        if self.rate is None:
            return 0.0
        self._refill()
        return max(0.0, -self._tokens / self.rate) if self._tokens <= -1.0 else 0.0

    async def pace(self) -> None:
        """Wait until sending may go on. Re-checked after each sleep: the rate may change."""
        # A wait on the clock (and a rate a reload may change), not on an event.
        while (wait := self.delay()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(wait, 1.0))
