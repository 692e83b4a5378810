"""What a trap carries, without a network: its OIDs, varbinds, texts and engine ID.
(Traps received by Debian's snmptrapd: tests/e2e/test_alert_targets.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from blockmirror.events import Event, EventName, EventState, Subject
from blockmirror.notify.traps import (
    CLEARED,
    ENTERPRISE,
    MAX_TEXT,
    OBJECTS,
    RAISED,
    default_engine_id,
    varbinds,
)

MIB = Path(__file__).resolve().parents[3] / "docs" / "BLOCKMIRROR-MIB.txt"


def event(message: str = "m", peer: str | None = "b:1") -> Event:
    return Event(
        3, EventName.RPO_EXCEEDED, EventState.RAISED, "site-a", Subject("db", peer), message, 0, 0
    )


def values(ev: Event) -> dict[str, Any]:
    return dict(varbinds(ev, "2.0"))


def test_varbinds_are_the_mib_objects_in_order_with_texts() -> None:
    got = values(event())
    assert list(got) == list(OBJECTS.values())
    text = {oid: bytes(v).decode() for oid, v in got.items() if oid != OBJECTS["bmEventId"]}
    assert text[OBJECTS["bmEventName"]] == "rpo-exceeded"
    assert text[OBJECTS["bmEventState"]] == "raised"
    assert text[OBJECTS["bmEventUnit"]] == "site-a"
    assert text[OBJECTS["bmEventVolume"]] == "db" and text[OBJECTS["bmEventPeer"]] == "b:1"
    assert text[OBJECTS["bmEventTime"]] == "1970-01-01T00:00:00.000Z"
    assert text[OBJECTS["bmVersion"]] == "2.0"
    assert int(got[OBJECTS["bmEventId"]]) == 3


def test_a_unit_event_has_empty_volume_and_peer() -> None:
    ev = Event(1, EventName.CONFIG_LOST, EventState.CLEARED, "u", Subject(), "x", 0, 0)
    got = values(ev)
    assert bytes(got[OBJECTS["bmEventVolume"]]) == b"" == bytes(got[OBJECTS["bmEventPeer"]])


@given(st.text(min_size=0, max_size=400))
def test_texts_are_cut_to_255_octets_of_valid_utf8(message: str) -> None:
    raw = bytes(values(event(message))[OBJECTS["bmEventMessage"]])
    assert len(raw) <= MAX_TEXT
    assert message.startswith(raw.decode("utf-8"))
    if len(message.encode()) <= MAX_TEXT:
        assert raw == message.encode()


def test_notification_and_object_oids_sit_under_the_documentation_arc() -> None:
    assert ENTERPRISE == "1.3.6.1.4.1.32473"
    assert RAISED.endswith(".1.0.1") and CLEARED.endswith(".1.0.2")
    assert RAISED.startswith(ENTERPRISE) and CLEARED.startswith(ENTERPRISE)
    assert all(
        oid.startswith(f"{ENTERPRISE}.1.1.") and oid.endswith(".0") for oid in OBJECTS.values()
    )


def test_the_mib_defines_every_object_and_both_notifications_at_these_oids() -> None:
    text = MIB.read_text()
    assigned = dict(
        re.findall(
            r"^(\w+) +(?:OBJECT-TYPE|NOTIFICATION-TYPE)\b.*?::= \{ (\w+ \d+) \}", text, re.S | re.M
        )
    )
    assert "::= { enterprises 32473 1 }" in text
    arcs = {
        name: f"bmEventObjects {oid.removesuffix('.0').rsplit('.', 1)[1]}"
        for name, oid in OBJECTS.items()
    }
    arcs |= {"bmEventRaised": "bmNotifications 1", "bmEventCleared": "bmNotifications 2"}
    assert assigned == arcs
    notified = re.findall(r"OBJECTS\s+\{([^}]*)\}", text)
    assert len(notified) == 3  # both notifications and the object group
    for names in notified:
        assert names.replace(",", " ").split() == list(OBJECTS)


def test_the_default_engine_id_is_stable_rfc3411_text_format() -> None:
    assert default_engine_id("site-a") == bytes.fromhex("80007ed904") + b"site-a"
    long = default_engine_id("x" * 255)
    assert len(long) == 32 and long.startswith(bytes.fromhex("80007ed904"))
