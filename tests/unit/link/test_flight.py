"""The in-flight window: sized to rate x horizon, between 1 MiB and 64 MiB."""

from __future__ import annotations

from blockmirror.link.flight import MAX_HORIZON, MAX_WINDOW, MIN_WINDOW, FlightWindow

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_t1_gets_the_floor_and_never_more_than_two_seconds_above_it() -> None:
    w = FlightWindow(clock=Clock())
    t1 = 1_544_000 / 8
    assert w.size(t1) == MIN_WINDOW  # nothing measured: the floor
    w.on_ack_delay(0.8)
    assert w.size(t1) == MIN_WINDOW  # 193 kB/s x 1.6 s is below 1 MiB
    fast = 100 * MiB
    w.on_ack_delay(30.0)  # a huge delay cannot stretch the horizon past MAX_HORIZON
    assert w.size(fast) <= max(MIN_WINDOW, fast * MAX_HORIZON)
    assert w.size(fast) == MAX_WINDOW or w.size(fast) == int(fast * w.horizon())


def test_an_unlimited_link_grows_from_the_floor_to_what_it_measures() -> None:
    clock = Clock()
    w = FlightWindow(clock=clock)
    assert w.size(None) == MIN_WINDOW
    w.on_ack_delay(0.004)
    acked = 0
    for _ in range(10):
        clock.now += 0.1
        acked += 40 * MiB  # 400 MiB/s delivered with data waiting
        w.on_acked(acked, in_flight=MiB)
    assert w.delivery_rate is not None and 390 * MiB < w.delivery_rate < 410 * MiB
    assert w.size(None) == min(MAX_WINDOW, int(w.delivery_rate * 0.25))


def test_a_limit_above_the_path_does_not_size_the_window() -> None:
    clock = Clock()
    w = FlightWindow(clock=clock)
    w.on_ack_delay(1.0)
    acked = 0
    for _ in range(20):
        clock.now += 0.1
        acked += 19_300  # a T1's 193 kB/s
        w.on_acked(acked, in_flight=MiB)
    # A 10 Mbit/s limit on a T1: the T1's rate x 2 s is below the floor, so the floor.
    assert w.size(10_000_000 / 8) == MIN_WINDOW


def test_idle_spells_say_nothing_of_the_capacity() -> None:
    clock = Clock()
    w = FlightWindow(clock=clock)
    w.on_acked(0, in_flight=0)
    clock.now += 1.0
    w.on_acked(1000, in_flight=0)  # nothing was waiting: not a sample
    assert w.delivery_rate is None
    clock.now += 20.0
    w.on_acked(2000, in_flight=10)
    assert w.delivery_rate is not None
    clock.now += 11.0
    w.on_acked(3000, in_flight=10)
    assert w.delivery_rate is not None and len(w._rates) == 1  # the old sample aged out


def test_round_trips_are_smoothed_and_negative_ones_ignored() -> None:
    w = FlightWindow()
    w.on_rtt(-1.0)
    assert w.rtt is None
    w.on_rtt(0.3)
    w.on_rtt(0.1)
    assert w.rtt is not None and 0.1 < w.rtt < 0.3 and w.rtt_min == 0.1
