"""The origin time and unit of a write survive a chain A→B→C→D unchanged.

What must not be lost: when, and at which unit, the host made each write. Point-in-time history
on any unit of a chain depends on it, so a relay must pass on its source's timestamp and origin
instead of stamping records with its own clock when they reach it. The test makes the records
reach the far end seconds after the host wrote them (the first hop is paused), keeps them in
C's journal (C's consumer for D is paused), and reads C's journal file directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blockmirror.journal.checkpoint import read_checkpoint
from blockmirror.journal.record import origin_id
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.scan import scan
from blockmirror.statedir import journal_path
from blockmirror.units import parse_size
from tests.support.pair import (
    Site,
    fio_write,
    peer_address,
    topology,
    wait_caught_up,
    wait_status,
)
from tests.support.unit_process import admin_request, require_commands

pytestmark = pytest.mark.e2e
JOURNAL_SIZE = "64MiB"


def consumer_control(site: Site, consumer: str, action: str) -> None:
    assert site.unit is not None
    code, body = admin_request(
        site.unit, "POST", f"/api/volumes/vol/consumers/{consumer.replace(':', '%3A')}/{action}"
    )
    assert code == 200, body


def test_origin_time_and_unit_survive_a_chain(tmp_path: Path) -> None:
    require_commands("fio")
    with topology(tmp_path) as topo:
        d = topo.add_secondary("site-d")
        c = topo.add_secondary("site-c", peers=[peer_address(d)])
        b = topo.add_secondary("site-b", peers=[peer_address(c)])
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        c.start()
        wait_caught_up(b, c)
        d.start()
        wait_caught_up(c, d)

        consumer_control(c, peer_address(d), "pause")  # C keeps what it receives
        consumer_control(a, peer_address(b), "pause")  # what A journals waits at A
        before = a.volume_status()["journal"]["newest_seq"]
        started = time.time_ns()
        fio_write(primary.export_url("vol"), tmp_path, size="2M", seed=7, verify=False)
        written = time.time_ns()
        newest = a.volume_status()["journal"]["newest_seq"]
        assert newest > before
        time.sleep(2.0)  # the records leave A seconds after the host wrote them
        resumed = time.time_ns()
        consumer_control(a, peer_address(b), "resume")
        wait_status(
            lambda: c.volume_status()["replica"]["applied_seq"] >= newest,
            timeout=30,
            what=f"C applied up to {newest}",
        )

        ring = Ring(parse_size(JOURNAL_SIZE) - DATA_START)
        with open(journal_path(c.state, "vol"), "rb") as f:
            found = read_checkpoint(f.fileno())
            assert found is not None
            _, _, cp = found
            result = scan(f.fileno(), ring, cp.head_lpos, cp.head_seq, cp.next_seq)
        held = {r.seq: r for r in result.records if before < r.seq <= newest}
        assert sorted(held) == list(range(before + 1, newest + 1)), "C's journal lost records"
        site_a = origin_id("site-a")
        for seq, record in held.items():
            assert record.origin == site_a, (seq, record.origin, site_a)
            # Stamped by A while the host wrote, not when B or C received it.
            assert started <= record.timestamp_ns <= written, (seq, record.timestamp_ns)
            assert record.timestamp_ns < resumed
