"""The delay-based background controller: yields when a queue builds, regains when it drains."""

from __future__ import annotations

from blockmirror.link.background import MIN_RATE, TARGET, DelayController

T1 = 1_544_000 / 8


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(c: DelayController, clock: Clock, delay: float, samples: int) -> float:
    rate = c.rate
    for _ in range(samples):
        clock.now += 0.2
        rate = c.on_delay(delay)
    return rate


def test_it_yields_to_a_queue_and_regains_the_link_after() -> None:
    clock = Clock()
    c = DelayController(T1, clock=clock)
    offset = 1000.0  # the two clocks differ by a constant: it must cancel out
    assert run(c, clock, offset + 0.001, 50) == T1  # no queue: up to the ceiling
    # A competing flow fills the bottleneck queue (400 ms of it): back off to the floor.
    assert run(c, clock, offset + 0.4, 40) == MIN_RATE
    assert c.qdelay is not None and c.qdelay > TARGET
    # The flow ends: the queue drains and within 10 s (50 samples) the link is ours again.
    assert run(c, clock, offset + 0.001, 50) >= 0.9 * T1


def test_near_the_target_it_holds_its_pace() -> None:
    clock = Clock()
    c = DelayController(T1, clock=clock)
    run(c, clock, 0.0, 1)
    before = run(c, clock, TARGET * 0.99, 1)
    after = run(c, clock, TARGET * 1.01, 1)
    assert 0.98 * before < after < 1.02 * before


def test_the_base_delay_ages_out_by_minute() -> None:
    clock = Clock()
    c = DelayController(None, clock=clock)
    c.on_delay(0.010)
    clock.now += 11 * 60  # past BASE_MINUTES: a route change's new base is learnt
    c.on_delay(0.200)
    assert c.base() == 0.200 and c.qdelay == 0.0


def test_without_a_ceiling_it_still_never_drops_below_the_floor() -> None:
    clock = Clock()
    c = DelayController(None, clock=clock)
    assert run(c, clock, 0.0, 1) > MIN_RATE
    assert run(c, clock, 5.0, 100) == MIN_RATE
