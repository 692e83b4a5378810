"""EventLog: one raise and one clear per episode, listeners isolated, a bounded backlog."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.events import Event, EventLog, EventName, EventState, Subject

DB = Subject("db")
PEER = Subject("db", "site-b:7800")


def _log(keep: int = 500) -> tuple[EventLog, list[Event]]:
    clock = itertools.count(1000)
    events = EventLog("site-a", keep=keep, clock=lambda: float(next(clock)))
    got: list[Event] = []
    events.listeners.append(got.append)
    return events, got


def test_an_episode_is_raised_once_and_cleared_once() -> None:
    events, got = _log()
    assert events.raise_event(EventName.LINK_DOWN, PEER, "unreachable for 31 s") is not None
    assert events.raise_event(EventName.LINK_DOWN, PEER, "unreachable for 32 s") is None
    assert events.is_open(EventName.LINK_DOWN, PEER)
    cleared = events.clear(EventName.LINK_DOWN, PEER)
    assert cleared is not None and events.clear(EventName.LINK_DOWN, PEER) is None
    assert [(e.name, e.state) for e in got] == [
        (EventName.LINK_DOWN, EventState.RAISED),
        (EventName.LINK_DOWN, EventState.CLEARED),
    ]
    # The clear says what the episode was, and when it began.
    assert cleared.message == "was: unreachable for 31 s"
    assert cleared.since == got[0].time < cleared.time
    assert [e.id for e in got] == [1, 2]


def test_subjects_are_separate_episodes() -> None:
    events, got = _log()
    events.raise_event(EventName.RPO_EXCEEDED, PEER, "behind")
    events.raise_event(EventName.RPO_EXCEEDED, Subject("db", "site-c:7800"), "behind")
    events.raise_event(EventName.LINK_DOWN, PEER, "down")
    assert len(got) == 3 and len(events.active()) == 3
    events.forget("db", "site-b:7800")
    assert [(e.name, e.subject.peer) for e in events.active()] == [
        (EventName.RPO_EXCEEDED, "site-c:7800")
    ]
    assert got[-1].message == "no longer configured"


def test_a_failing_listener_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    events, got = _log()

    def broken(event: Event) -> None:
        raise RuntimeError("target down")

    events.listeners.insert(0, broken)
    events.raise_event(EventName.VOLUME_FAILED, DB, "journal: EIO")
    assert len(got) == 1
    assert "an event listener failed" in caplog.text


def test_to_json_names_the_event_as_text() -> None:
    events, _ = _log()
    event = events.raise_event(EventName.JOURNAL_HIGH_WATER, DB, "journal is 85% full")
    assert event is not None
    doc = event.to_json()
    assert doc["event"] == "journal-high-water" and doc["state"] == "raised"
    assert doc["volume"] == "db" and doc["peer"] is None and doc["unit"] == "site-a"
    assert event.summary == "journal-high-water db: journal is 85% full"


@given(st.lists(st.tuples(st.sampled_from(list(EventName)), st.booleans()), max_size=200))
def test_settle_alternates_raise_and_clear(steps: list[tuple[EventName, bool]]) -> None:
    """However a condition flaps, the events of one subject alternate raised/cleared, starting
    with a raise, and the backlog never exceeds its bound."""
    events, got = _log(keep=50)
    for name, holds in steps:
        events.settle(name, DB, "holds" if holds else None)
    assert len(events.recent) <= 50
    for name in EventName:
        states = [e.state for e in got if e.name is name]
        assert states == [
            EventState.RAISED if i % 2 == 0 else EventState.CLEARED for i in range(len(states))
        ]
        assert events.is_open(name, DB) == (len(states) % 2 == 1)
    assert events.since(0) == list(events.recent)
