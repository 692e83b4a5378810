"""Transmit windows: parsing, and open/closed/next change checked minute by minute."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.link.windows import DAYS, Schedule, WindowError, parse_window

THU = dt.datetime(2026, 12, 3)  # a Thursday
assert THU.weekday() == 3


def at(day_offset: int, hh: int, mm: int = 0) -> dt.datetime:
    return THU + dt.timedelta(days=day_offset, hours=hh, minutes=mm)


def test_a_nightly_window_runs_past_midnight() -> None:
    s = Schedule([parse_window("22:00-06:00")])
    assert not s.is_open(at(0, 13))
    assert s.next_change(at(0, 13)) == at(0, 22)
    assert s.is_open(at(0, 23, 59)) and s.is_open(at(1, 0)) and s.is_open(at(1, 5, 59))
    assert not s.is_open(at(1, 6))
    assert s.next_change(at(0, 23)) == at(1, 6)


def test_a_weekend_window_wraps_into_monday() -> None:
    s = Schedule([parse_window("Sat 00:00-Mon 06:00")])
    assert not s.is_open(at(0, 12))  # Thursday
    assert s.next_change(at(0, 12)) == at(2, 0)  # Saturday 00:00
    sunday_night = at(3, 23, 30)
    assert s.is_open(sunday_night)
    assert s.next_change(sunday_night) == at(4, 6)  # Monday 06:00, not Monday 00:00


def test_windows_join_and_whole_days_are_always() -> None:
    assert Schedule().always and Schedule().next_change(THU) is None
    assert Schedule([parse_window("00:00-24:00")]).always
    assert Schedule([parse_window("09:00-09:00")]).always
    joined = Schedule([parse_window("Mon 00:00-Thu 00:00"), parse_window("Wed 12:00-Mon 00:00")])
    assert joined.always and joined.is_open(at(0, 3))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("25:00-06:00", "not a time of day"),
        ("22:60-06:00", "not a time of day"),
        ("24:00-06:00", "cannot start at 24:00"),
        ("Fun 00:00-Mon 06:00", "not a day"),
        ("22-06", "is not a window"),
        ("", "is not a window"),
        ("Sat 00:00 - 06:00", "is not a window"),
    ],
)
def test_bad_windows_say_why(text: str, reason: str) -> None:
    with pytest.raises(WindowError, match=reason):
        parse_window(text)


def test_spelling_is_forgiving_about_case_and_spaces() -> None:
    a = parse_window("sat 00:00 - MONDAY 6:00")
    b = parse_window("Sat 00:00-Mon 06:00")
    assert a.spans == b.spans


times = st.tuples(st.integers(0, 23), st.integers(0, 59))


@st.composite
def windows(draw: st.DrawFn) -> str:
    (h1, m1), (h2, m2) = draw(times), draw(times)
    if draw(st.booleans()):
        return f"{h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}"
    d1, d2 = draw(st.sampled_from(DAYS)), draw(st.sampled_from(DAYS))
    return f"{d1} {h1:02d}:{m1:02d}-{d2} {h2:02d}:{m2:02d}"


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(windows(), min_size=1, max_size=3),
    start=st.integers(0, 7 * 24 * 60 - 1),
)
def test_next_change_is_the_first_minute_the_state_flips(texts: list[str], start: int) -> None:
    schedule = Schedule([parse_window(t) for t in texts])
    now = dt.datetime(2026, 11, 30) + dt.timedelta(minutes=start)  # from a Monday
    change = schedule.next_change(now)
    state = schedule.is_open(now)
    if change is None:
        assert schedule.always and state
        return
    assert now < change <= now + dt.timedelta(weeks=1)
    minutes = int((change - now).total_seconds() // 60)
    # Checking every minute up to the change is the point: a brute-force oracle.
    for step in range(1, minutes):
        assert schedule.is_open(now + dt.timedelta(minutes=step)) == state
    assert schedule.is_open(change) != state
