"""Events on real units (issue 11): raised once per episode, cleared when it ends, shown by
``GET /api/events`` as JSON and as a server-sent event stream, and in status.

What must hold: a peer cut off longer than ``link_down_seconds`` raises exactly one
``link-down`` (not one per look) and one clear when it is back; a journal filled past its mark
raises one ``journal-high-water``; a stalled peer whose lag passes ``rpo_seconds`` raises
``rpo-exceeded``; a stream resumed with ``Last-Event-ID`` misses nothing that was kept.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from blockmirror.admin.event_routes import MAX_STREAMS
from tests.support.config_file import Document, edit_config
from tests.support.events import EventStream, recent_events
from tests.support.pair import (
    MiB,
    Site,
    frozen,
    peer_address,
    qemu_write,
    topology,
    wait_caught_up,
)

pytestmark = pytest.mark.e2e

SIZE = 32 * MiB


def with_alerts(site: Site, **alerts: Any) -> None:
    def change(doc: Document) -> None:
        doc["alerts"] = alerts

    edit_config(site.config, change)


def named(events: list[dict[str, Any]], name: str, state: str | None = None) -> list[Any]:
    return [e for e in events if e["event"] == name and (state is None or e["state"] == state)]


def test_link_down_and_high_water_once_per_episode(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary(
            "site-a",
            peers=[peer_address(b)],
            size=SIZE,
            journal_size="16MiB",
            extra={"journal_high_water": 0.5},
        )
        with_alerts(a, link_down_seconds=1)
        b.start()
        a.start()
        assert a.unit is not None
        wait_caught_up(a, b)
        stream = EventStream(a.unit)
        try:
            b.kill()
            down, _ = stream.wait_for("link-down", "raised")
            assert down["volume"] == "vol" and down["peer"] == peer_address(b)
            assert "unreachable" in down["message"]
            assert [e["event"] for e in a.status()["events"]] == ["link-down"]
            # Past the mark, while the peer holds every record: one high-water event.
            qemu_write(a, 0x21, 0, "9M")
            high, _ = stream.wait_for("journal-high-water", "raised")
            assert high["volume"] == "vol" and high["peer"] is None
            assert "full" in high["message"]
            qemu_write(a, 0x22, 9 * MiB, "1M")
            time.sleep(3)  # several looks of the watch loop: none may raise again
            quiet = stream.drain()
            assert named(quiet, "link-down", "raised") == [], quiet
            assert named(quiet, "journal-high-water", "raised") == [], quiet
            b.start()
            cleared, _ = stream.wait_for("link-down", "cleared")
            assert cleared["since"] == down["since"] and cleared["peer"] == down["peer"]
            wait_caught_up(a, b)
            stream.wait_for("journal-high-water", "cleared")
            # A second stream that resumes after the first event gets the rest, in order.
            resumed = EventStream(a.unit, last_id=down["id"])
            try:
                got = [
                    resumed.next(5)
                    for _ in range(len(stream.ids) - stream.ids.index(down["id"]) - 1)
                ]
                # (peer-tracking: the first sync's episode may end after the first look.)
                assert [(e["event"], e["state"]) for e in got if e["event"] != "peer-tracking"] == [
                    ("journal-high-water", "raised"),
                    ("link-down", "cleared"),
                    ("journal-high-water", "cleared"),
                ]
            finally:
                resumed.close()
        finally:
            stream.close()
        doc = recent_events(a.unit)
        assert len(named(doc["events"], "link-down", "raised")) == 1
        assert len(named(doc["events"], "link-down", "cleared")) == 1
        assert doc["active"] == [] and a.status()["events"] == []
        assert len(recent_events(a.unit, limit="1")["events"]) == 1
        assert recent_events(a.unit, since=str(down["id"]))["events"][0]["id"] > down["id"]
        assert "link-down" in a.unit.log()


def test_rpo_exceeded_by_a_stalled_peer(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        with_alerts(a, rpo_seconds=1, link_down_seconds=60)
        b.start()
        a.start()
        assert a.unit is not None
        wait_caught_up(a, b)
        stream = EventStream(a.unit)
        try:
            with frozen(b):
                qemu_write(a, 0x31, 0, "64k")
                late, before = stream.wait_for("rpo-exceeded", "raised", timeout=20)
                assert late["peer"] == peer_address(b) and "behind" in late["message"]
                # A stall is not an outage: the connection is up, so no link-down.
                assert named(before, "link-down") == []
            stream.wait_for("rpo-exceeded", "cleared", timeout=30)
        finally:
            stream.close()
        wait_caught_up(a, b)


def test_streams_that_vanish_give_their_slot_back(tmp_path: Path) -> None:
    """Clients that ask for a stream and reset at once, more than the streams allowed, leave
    nothing held: a real client then gets its stream, and the unit serves on."""
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=4 * MiB)
        a.start()
        assert a.unit is not None
        host, port = a.unit.admin.rsplit(":", 1)
        request = (
            "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {a.unit.admin_token}\r\n\r\n"
        ).encode()
        for _ in range(3 * MAX_STREAMS):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(request)
                # RST, not FIN: the server's write of the head fails.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.5)
        streams = [EventStream(a.unit) for _ in range(MAX_STREAMS)]
        try:
            extra = EventStream.refused(a.unit)
            assert extra == 503
        finally:
            for stream in streams:
                stream.close()
        time.sleep(0.5)
        EventStream(a.unit).close()  # the slots came back again
        assert a.status()["volumes"][0]["state"] == "serving"
