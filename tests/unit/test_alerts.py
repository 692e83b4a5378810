"""Alerts: the log status shows, the callback, and one high-water alert per episode."""

from __future__ import annotations

import logging

import pytest

from blockmirror.alerts import KEEP, AlertLog, HighWater


def test_an_alert_is_kept_logged_and_passed_on(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, str]] = []
    alerts = AlertLog("db.journal", lambda kind, message: seen.append((kind, message)))
    with caplog.at_level(logging.WARNING, logger="blockmirror.alerts"):
        alerts.alert("volume_failed", "writes refused")
    assert alerts.events == [{"kind": "volume_failed", "message": "writes refused"}]
    assert seen == [("volume_failed", "writes refused")]
    assert [r.getMessage() for r in caplog.records] == ["db.journal: writes refused"]


def test_only_the_newest_alerts_are_kept_oldest_first() -> None:
    alerts = AlertLog("x")
    for i in range(KEEP + 5):
        alerts.alert("k", f"m{i}")
    assert [e["message"] for e in alerts.events] == [f"m{i}" for i in range(5, KEEP + 5)]


def test_without_a_callback_an_alert_is_still_kept() -> None:
    alerts = AlertLog("x")
    alerts.alert("k", "m")
    assert len(alerts.events) == 1


def test_high_water_alerts_once_per_episode() -> None:
    alerts = AlertLog("x")
    mark = HighWater(alerts, 0.8)
    mark.update(79, 100)
    assert alerts.events == []
    mark.update(80, 100)
    assert alerts.events == [{"kind": "journal_high_water", "message": "journal is 80% full"}]
    for used in (95, 100, 80, 73):  # still the same episode: above 90 % of the mark
        mark.update(used, 100)
    assert len(alerts.events) == 1 and mark.above
    mark.update(71, 100)  # below 72 %: the episode is over
    assert not mark.above and len(alerts.events) == 1
    mark.update(85, 100)
    assert [e["message"] for e in alerts.events][-1] == "journal is 85% full"
    assert len(alerts.events) == 2
