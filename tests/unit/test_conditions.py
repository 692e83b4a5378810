"""Watch: which event conditions hold, read from a status document."""

from __future__ import annotations

from typing import Any

from blockmirror.conditions import Condition, Watch
from blockmirror.events import EventName, Subject

PEER = "10.0.0.2:7800"


def _status(
    *,
    state: str = "serving",
    used: int = 0,
    capacity: int = 1000,
    waiting: int = 0,
    overflows: int = 0,
    peer: dict[str, Any] | None = None,
    split: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    base_peer = {
        "address": PEER,
        "state": "replicating",
        "mode": "journal",
        "lag_seconds": 0.0,
        "dirty_bytes": 0,
        "last_error": None,
    }
    return {
        "volumes": [
            {
                "name": "db",
                "state": state,
                "problem": "journal: Input/output error" if state == "failed" else None,
                "journal": {
                    "capacity": capacity,
                    "used": used,
                    "high_water": 0.8,
                    "waiting_for_room": waiting,
                    "overflows": overflows,
                },
                "peers": [{**base_peer, **(peer or {})}],
                "split_brain": split or [],
            }
        ]
    }


def _holding(conditions: list[Condition]) -> dict[tuple[EventName, Subject], str]:
    return {(c.name, c.subject): c.message for c in conditions if c.message is not None}


def test_a_healthy_unit_holds_nothing_but_reports_every_subject() -> None:
    conditions = Watch(rpo_seconds=5).evaluate(_status(), 0.0)
    assert _holding(conditions) == {}
    names = {(c.name, c.subject) for c in conditions}
    assert (EventName.LINK_DOWN, Subject("db", PEER)) in names
    assert (EventName.JOURNAL_HIGH_WATER, Subject("db")) in names


def test_volume_failed_names_the_problem() -> None:
    held = _holding(Watch().evaluate(_status(state="failed"), 0.0))
    assert "Input/output error" in held[(EventName.VOLUME_FAILED, Subject("db"))]


def test_high_water_has_hysteresis() -> None:
    watch = Watch()
    key = (EventName.JOURNAL_HIGH_WATER, Subject("db"))
    assert key not in _holding(watch.evaluate(_status(used=799), 0.0))
    assert "80% full" in _holding(watch.evaluate(_status(used=800), 0.0))[key]
    # Open: it holds down to 90 % of the mark (72 %), not below.
    assert key in _holding(watch.evaluate(_status(used=730), 0.0, open_high_water={"db"}))
    assert key not in _holding(watch.evaluate(_status(used=719), 0.0, open_high_water={"db"}))


def test_journal_full_by_waiting_writes_or_an_overflow() -> None:
    watch = Watch()
    key = (EventName.JOURNAL_FULL, Subject("db"))
    assert key not in _holding(watch.evaluate(_status(overflows=3), 0.0))  # counted before
    assert "wait for room" in _holding(watch.evaluate(_status(used=990, waiting=2), 1.0))[key]
    # Nothing waits any more but the journal is still above the mark: still full.
    assert key in _holding(watch.evaluate(_status(used=900, overflows=3), 2.0))
    assert key not in _holding(watch.evaluate(_status(used=100, overflows=3), 3.0))
    # An overflow (a consumer switched to tracking) starts an episode on its own.
    held = _holding(watch.evaluate(_status(used=850, overflows=4), 4.0))
    assert "dirty tracking" in held[key]


def test_link_down_only_after_the_threshold() -> None:
    watch = Watch(link_down_seconds=30)
    key = (EventName.LINK_DOWN, Subject("db", PEER))
    down = {"state": "connecting", "last_error": "connection refused"}
    assert key not in _holding(watch.evaluate(_status(peer=down), 100.0))
    assert key not in _holding(watch.evaluate(_status(peer=down), 129.0))
    message = _holding(watch.evaluate(_status(peer=down), 130.0))[key]
    assert "30 s" in message and "connection refused" in message
    # Back up: cleared, and the next outage counts from its own start.
    assert key not in _holding(watch.evaluate(_status(), 131.0))
    assert key not in _holding(watch.evaluate(_status(peer=down), 140.0))
    assert key in _holding(watch.evaluate(_status(peer=down), 170.0))


def test_paused_or_upstream_peers_are_not_down() -> None:
    watch = Watch(link_down_seconds=0)
    for state in ("paused", "upstream", "split-brain", "syncing", "stopped"):
        held = _holding(watch.evaluate(_status(peer={"state": state}), 0.0))
        assert (EventName.LINK_DOWN, Subject("db", PEER)) not in held


def test_tracking_peer_is_out_of_sync_and_then_out_of_date() -> None:
    watch = Watch(rpo_seconds=10)
    tracking = {"mode": "tracking", "lag_seconds": None, "dirty_bytes": 4096}
    held = _holding(watch.evaluate(_status(peer=tracking), 0.0))
    assert "4096 bytes" in held[(EventName.PEER_TRACKING, Subject("db", PEER))]
    assert (EventName.RPO_EXCEEDED, Subject("db", PEER)) not in held
    held = _holding(watch.evaluate(_status(peer=tracking), 11.0))
    assert "out of sync for 11 s" in held[(EventName.RPO_EXCEEDED, Subject("db", PEER))]


def test_rpo_by_lag_seconds() -> None:
    key = (EventName.RPO_EXCEEDED, Subject("db", PEER))
    assert key not in _holding(Watch().evaluate(_status(peer={"lag_seconds": 1e6}), 0.0))
    watch = Watch(rpo_seconds=2.5)
    assert key not in _holding(watch.evaluate(_status(peer={"lag_seconds": 2.5}), 0.0))
    assert "3 s behind" in _holding(watch.evaluate(_status(peer={"lag_seconds": 3.1}), 0.0))[key]


def test_split_brain_per_peer_unit() -> None:
    split = [{"peer": "site-b", "common_seq": 41, "reason": "both wrote after seq 41"}]
    held = _holding(Watch().evaluate(_status(split=split), 0.0))
    assert "after seq 41" in held[(EventName.SPLIT_BRAIN, Subject("db", "site-b"))]


def test_a_removed_peer_is_forgotten() -> None:
    watch = Watch(link_down_seconds=5)
    down = {"state": "connecting"}
    watch.evaluate(_status(peer=down), 0.0)
    gone = _status()
    gone["volumes"][0]["peers"] = []
    watch.evaluate(gone, 1.0)
    # Re-added later: its outage counts afresh.
    assert (EventName.LINK_DOWN, Subject("db", PEER)) not in _holding(
        watch.evaluate(_status(peer=down), 10.0)
    )
