"""The delay-based background gate: quiet probes open it, a queue of others' keeps it shut."""

from __future__ import annotations

from blockmirror.link.background import (
    MAX_FRAME,
    MIN_FRAME,
    STARVE_AFTER,
    TARGET,
    QuietGate,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_quiet_path_lets_one_frame_go_per_reading() -> None:
    clock = Clock()
    gate = QuietGate(clock=clock)
    assert not gate.may_send() and gate.waiting  # no reading yet: a probe is asked for
    gate.on_idle_probe(0.002)
    assert gate.may_send() and not gate.waiting
    gate.sent()
    assert not gate.may_send()  # the next frame needs a new reading
    gate.on_idle_probe(0.003)
    assert gate.may_send() and gate.qdelay is not None and abs(gate.qdelay - 0.001) < 1e-9


def test_a_queue_built_by_others_keeps_it_shut_until_it_drains() -> None:
    clock = Clock()
    gate = QuietGate(clock=clock)
    gate.on_idle_probe(0.001)  # the path's base
    gate.sent()
    for _ in range(10):
        clock.now += 0.2
        gate.on_idle_probe(0.001 + 2 * TARGET)  # a bulk flow's queue
        assert not gate.may_send()
    clock.now += 0.2
    gate.on_idle_probe(0.001 + TARGET / 2)
    assert gate.may_send()


def test_it_never_starves_for_good() -> None:
    clock = Clock()
    gate = QuietGate(clock=clock)
    gate.on_idle_probe(0.001)
    gate.sent()
    gate.on_idle_probe(0.5)
    assert not gate.may_send()
    clock.now += STARVE_AFTER
    assert gate.may_send()


def test_the_base_is_the_smallest_of_the_last_minutes() -> None:
    clock = Clock()
    gate = QuietGate(clock=clock)
    gate.on_idle_probe(0.010)
    clock.now += 11 * 60  # the old minute's base ages out: a new path's base is learnt
    gate.on_idle_probe(0.200)
    assert gate.base() == 0.200 and gate.qdelay == 0.0 and gate.may_send()
    gate.on_idle_probe(-1.0)  # a wall clock stepped: ignored
    assert gate.base() == 0.200


def test_frames_are_about_a_second_of_the_line() -> None:
    assert QuietGate.frame_bytes(None) == MIN_FRAME
    assert QuietGate.frame_bytes(193_000) == 193_000
    assert QuietGate.frame_bytes(10e9) == MAX_FRAME
    assert QuietGate.frame_bytes(1000) == MIN_FRAME
