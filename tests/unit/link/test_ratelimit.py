"""TokenBucket: the average rate holds, bursts are bounded, the rate changes live."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.link.ratelimit import MIN_BURST, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_limit_never_waits() -> None:
    bucket = TokenBucket(None, clock=Clock())
    bucket.charge(1 << 40)
    assert bucket.ready and bucket.delay() == 0


@given(
    st.floats(1e3, 1e9),
    st.lists(st.tuples(st.integers(1, 4 << 20), st.floats(0, 2)), min_size=1, max_size=50),
)
def test_sending_only_when_ready_keeps_the_average_rate(
    rate: float, steps: list[tuple[int, float]]
) -> None:
    """A sender that sends a frame only when the bucket is ready, and otherwise waits what
    delay() says, never gets ahead of rate * elapsed + the burst + one frame."""
    clock = Clock()
    bucket = TokenBucket(rate, clock=clock)
    start, sent, largest = clock.now, 0, 0
    for size, idle in steps:
        clock.now += idle
        if not bucket.ready:
            clock.now += bucket.delay()
        assert bucket.ready
        bucket.charge(size)
        sent += size
        largest = max(largest, size)
        # + 1: ``ready`` allows a byte of slack for the clock's rounding.
        assert sent <= rate * (clock.now - start) + bucket.burst + largest + 1


def test_the_burst_is_bounded_and_a_new_rate_applies_at_once() -> None:
    clock = Clock()
    bucket = TokenBucket(1000.0, clock=clock)
    assert bucket.burst == MIN_BURST
    clock.now += 3600  # idle for an hour: still one burst, not an hour of credit
    bucket.charge(MIN_BURST + 10_000)
    assert bucket.delay() == pytest.approx(10.0)
    bucket.set_rate(10_000.0)
    assert bucket.delay() == pytest.approx(1.0)
    bucket.set_rate(None)
    assert bucket.ready and bucket.delay() == 0


def test_pace_waits_for_the_balance() -> None:
    async def run() -> float:
        bucket = TokenBucket(1_000_000.0)
        bucket.charge(int(bucket.burst) + 50_000)  # 50 ms of debt
        loop = asyncio.get_running_loop()
        started = loop.time()
        await bucket.pace()
        assert bucket.ready
        return loop.time() - started

    # Only a lower bound: pacing must make it wait; a slow machine only waits longer.
    assert asyncio.run(run()) >= 0.04
