"""LagHistory: one point per interval holding the worst lag, the span, forgetting, bounds."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmirror.admin.lag_history import LagHistory


def peer(address: str, seconds: float | None, nbytes: int) -> dict[str, Any]:
    # The fields volume_status really has (link/sender.py PeerSender.status), trimmed.
    return {
        "address": address,
        "peer": None,
        "state": "replicating",
        "mode": "journal" if seconds is not None else "tracking",
        "lag_bytes": nbytes,
        "lag_records": 0,
        "lag_seconds": seconds,
    }


def status(volumes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "unit": "site-a",
        "volumes": [{"name": name, "role": "primary", "peers": ps} for name, ps in volumes.items()],
    }


def points(history: LagHistory, volume: str = "db", address: str = "b:7800") -> list[list[Any]]:
    result: list[list[Any]] = history.to_json()["volumes"][volume][address]
    return result


def test_one_point_per_interval_holds_the_worst_lag_of_its_samples() -> None:
    h = LagHistory(interval=10, span=3600)
    for t, lag in ((1000.0, 0.5), (1001.0, 7.25), (1009.9, 2.0)):
        h.sample(status({"db": [peer("b:7800", lag, int(lag * 1000))]}), t)
    assert points(h) == [[1000.0, 7.25, 7250]]
    h.sample(status({"db": [peer("b:7800", 1.0, 10)]}), 1010.0)
    assert points(h) == [[1000.0, 7.25, 7250], [1010.0, 1.0, 10]]
    doc = h.to_json()
    assert doc["interval_seconds"] == 10 and doc["span_seconds"] == 3600
    assert doc["now"] == 1010.0 and doc["fields"] == ["time", "lag_seconds", "lag_bytes"]
    json.dumps(doc, allow_nan=False)  # what the admin API serves must be plain JSON


def test_tracking_has_no_seconds_but_keeps_bytes() -> None:
    h = LagHistory(interval=10)
    h.sample(status({"db": [peer("b:7800", None, 4096)]}), 0.0)
    h.sample(status({"db": [peer("b:7800", None, 8192)]}), 5.0)
    assert points(h) == [[0.0, None, 8192]]
    # A journal-mode sample in the same interval brings its seconds in.
    h.sample(status({"db": [peer("b:7800", 3.0, 100)]}), 6.0)
    assert points(h) == [[0.0, 3.0, 8192]]


def test_points_older_than_the_span_are_dropped() -> None:
    h = LagHistory(interval=10, span=60)
    for t in range(0, 200, 10):
        h.sample(status({"db": [peer("b:7800", float(t), t)]}), float(t))
    times = [p[0] for p in points(h)]
    assert times == [130.0, 140.0, 150.0, 160.0, 170.0, 180.0, 190.0]


def test_peers_and_volumes_that_disappear_are_forgotten() -> None:
    h = LagHistory()
    h.sample(status({"db": [peer("b:7800", 1.0, 1), peer("c:7800", 2.0, 2)], "logs": []}), 0.0)
    assert set(h.to_json()["volumes"]) == {"db", "logs"}
    assert set(h.to_json()["volumes"]["db"]) == {"b:7800", "c:7800"}
    h.sample(status({"db": [peer("c:7800", 2.0, 2)]}), 20.0)
    assert h.to_json()["volumes"] == {"db": {"c:7800": [[0.0, 2.0, 2], [20.0, 2.0, 2]]}}
    # A peer that comes back starts afresh: its old points belonged to what was forgotten.
    h.sample(status({"db": [peer("b:7800", 5.0, 5), peer("c:7800", 2.0, 2)]}), 40.0)
    assert points(h) == [[40.0, 5.0, 5]]


def test_a_clock_that_steps_back_keeps_the_series_in_order() -> None:
    h = LagHistory(interval=10)
    for t in (100.0, 110.0, 120.0):
        h.sample(status({"db": [peer("b:7800", 1.0, 1)]}), t)
    h.sample(status({"db": [peer("b:7800", 9.0, 9)]}), 105.0)
    assert points(h) == [[100.0, 9.0, 9]]


def test_malformed_entries_are_skipped_not_fatal() -> None:
    h = LagHistory()
    weird: dict[str, Any] = {
        "volumes": [
            None,
            {"name": 3, "peers": []},
            {"name": "db", "peers": "nope"},
            {
                "name": "logs",
                "peers": [
                    {"no": "address"},
                    {"address": "b:7800", "lag_seconds": True, "lag_bytes": -1},
                    {"address": "c:7800", "lag_seconds": float("nan"), "lag_bytes": 1.5},
                ],
            },
        ]
    }
    h.sample(weird, 1.0)
    h.sample({"volumes": "nope"}, 2.0)
    h.sample({}, float("nan"))
    assert h.to_json()["volumes"] == {}
    h.sample(weird, 3.0)
    assert h.to_json()["volumes"] == {
        "db": {},
        "logs": {"b:7800": [[3.0, None, None]], "c:7800": [[3.0, None, None]]},
    }
    json.dumps(h.to_json(), allow_nan=False)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        LagHistory(interval=0)
    with pytest.raises(ValueError):
        LagHistory(interval=10, span=5)
    with pytest.raises(ValueError):
        LagHistory(interval=float("inf"))


_steps = st.lists(
    st.tuples(
        # Time since the previous sample, in eighths of a second: exact in binary and in the
        # three decimals to_json rounds times to, so the model's times compare equal.
        st.integers(min_value=0, max_value=240).map(lambda n: n / 8),
        st.sets(st.sampled_from(["b:1", "c:2", "d:3"])),  # the peers present
        st.one_of(st.none(), st.integers(min_value=0, max_value=10**9).map(lambda n: n / 1000)),
        st.integers(min_value=0, max_value=2**40),
    ),
    max_size=150,
)


@settings(max_examples=150, deadline=None)
@given(
    interval=st.sampled_from([0.5, 1.0, 10.0]),
    span_intervals=st.integers(min_value=1, max_value=20),
    steps=_steps,
)
def test_bounded_in_order_and_worst_lag_kept(
    interval: float, span_intervals: int, steps: list[tuple[float, set[str], float | None, int]]
) -> None:
    span = interval * span_intervals
    h = LagHistory(interval=interval, span=span)
    now = 1000.0
    # A model: every sample of each peer since it (last) appeared.
    seen: dict[str, list[tuple[float, float | None, int]]] = {}
    for delta, present, seconds, nbytes in steps:
        now += delta
        seen = {a: seen.get(a, []) for a in present}
        for a in present:
            seen[a].append((now, seconds, nbytes))
        h.sample(status({"db": [peer(a, seconds, nbytes) for a in sorted(present)]}), now)
        doc = h.to_json()["volumes"]["db"]
        assert set(doc) == present
        for address, series in doc.items():
            times = [p[0] for p in series]
            assert len(series) <= span_intervals + 1
            assert all(b - a >= interval for a, b in itertools.pairwise(times))
            assert all(now - span <= t <= now for t in times)
            # Every point holds the worst lag of the samples it stands for.
            for i, (t, s, b) in enumerate(series):
                end = times[i + 1] if i + 1 < len(times) else math.inf
                covered = [x for x in seen[address] if t <= x[0] < end]
                assert covered and covered[0][0] == t
                assert b == max(x[2] for x in covered)
                secs = [x[1] for x in covered if x[1] is not None]
                assert s == (round(max(secs), 3) if secs else None)
            # The newest sample is always in the newest point.
            assert series[-1][0] <= now
