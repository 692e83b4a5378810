"""Point-in-time history with real units (issue 10).

What must hold: an image restored at any kept point, chosen by sequence number, by time or by
bookmark, on the primary or on its replica, equals the volume after exactly that prefix of the
host's writes, block for block; points older than ``history`` are gone and ``history_size``
shortens history with an alert; a restart keeps history; along a chain A→B→C a point means the
same on C as on A (A's write times, A's bookmarks).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.support.failover import cli
from tests.support.history import (
    check_prefix,
    history,
    history_pair,
    iso,
    logged_workload,
    restore,
)
from tests.support.pair import MiB, peer_address, topology, wait_caught_up, wait_status

pytestmark = pytest.mark.e2e

SIZE = 8 * MiB


def test_random_points_restore_exactly_on_primary_and_replica(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        a, b = history_pair(topo, SIZE)
        log = logged_workload(a, size=SIZE, count=300, marks={90: "before-upgrade", 210: "ckpt"})
        wait_caught_up(a, b)
        for site in (a, b):
            h = history(site)
            assert h["enabled"] and not h["failed"], h
            assert h["newest"]["seq"] == log.writes[-1].seq, h
            marks = {m["name"]: m["seq"] for m in h["bookmark_list"]}
            assert marks == {m.name: m.seq for m in log.marks}, h

        rng = random.Random(7)
        checked = 0
        for n in range(24):
            site = (a, b)[n % 2]
            k = rng.randint(1, len(log.writes))
            out = tmp_path / f"point-{n}.img"
            how = n % 3
            if how == 0:
                status, body = restore(site, out, seq=log.writes[k - 1].seq)
                what = f"{site.name} seq {log.writes[k - 1].seq}"
            elif how == 1:
                status, body = restore(site, out, at=iso(log.prefix_at_time(k)))
                what = f"{site.name} at {iso(log.prefix_at_time(k))}"
            else:
                mark = log.marks[n % len(log.marks)]
                k = mark.after
                status, body = restore(site, out, bookmark=mark.name)
                what = f"{site.name} bookmark {mark.name}"
            assert status == 200, (what, body)
            check_prefix(out, log, k, what)
            checked += 1
        assert checked >= 20

        # The command line, with each way of naming a point.
        for args, k in (
            (["--seq", str(log.writes[49].seq)], 50),
            (["--at", iso(log.prefix_at_time(150))], 150),
            (["--bookmark", "ckpt"], 210),
        ):
            out = tmp_path / "cli.img"
            proc = cli("restore", "vol", *args, "--to", str(out), "--config", str(b.config))
            assert proc.returncode == 0, proc.stderr
            check_prefix(out, log, k, f"cli {args}")
        proc = cli("history", "vol", "--config", str(a.config))
        assert proc.returncode == 0 and "bookmark ckpt" in proc.stdout, proc.stdout + proc.stderr
        proc = cli("status", "--config", str(b.config))
        assert proc.returncode == 0, proc.stderr
        assert f"seq {log.writes[-1].seq}" in proc.stdout and "consistent point" in proc.stdout

        # Refusals change nothing and say why.
        status, body = restore(a, tmp_path / "x.img", seq=log.writes[-1].seq + 5)
        assert status == 409 and "newer than the newest" in str(body["error"]), body
        status, body = restore(a, tmp_path / "x.img", bookmark="no-such")
        assert status == 409 and "no bookmark" in str(body["error"]), body
        existing = tmp_path / "exists.img"
        existing.write_bytes(b"keep")
        status, body = restore(a, existing, seq=log.writes[0].seq)
        assert status == 409 and existing.read_bytes() == b"keep", body
        assert not (tmp_path / "x.img").exists()


def test_retention_by_age_and_size_and_restart(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary(
            "site-a",
            peers=[peer_address(b)],
            size=SIZE,
            extra={"history": "4s", "history_size": "64MiB"},
        )
        b.start()
        a.start()
        wait_caught_up(a, b)
        early = logged_workload(a, size=SIZE, count=40)
        time.sleep(4.5)
        late = logged_workload(a, size=SIZE, count=40, seed=11, log=early)
        # Age: the points of the first run are older than 4 s: gone, and refused.
        h = wait_status(
            lambda: h if (h := history(a))["oldest"]["seq"] > early.writes[39].seq else None,
            timeout=10,
            what="the first run's points to expire",
        )
        status, body = restore(a, tmp_path / "old.img", seq=early.writes[10].seq)
        assert status == 409 and "older than the oldest point" in str(body["error"]), body
        # What is kept restores exactly, before and after a restart.
        k = 60
        status, body = restore(a, tmp_path / "p.img", seq=late.writes[k - 1].seq)
        assert status == 200, body
        check_prefix(tmp_path / "p.img", late, k, "before restart")
        assert a.unit is not None
        a.unit.terminate()
        a.start()
        h2 = history(a)
        assert h2["newest"]["seq"] == h["newest"]["seq"], (h, h2)
        status, body = restore(a, tmp_path / "p.img", seq=late.writes[k - 1].seq)
        assert status == 200, body
        check_prefix(tmp_path / "p.img", late, k, "after restart")


def test_size_cap_shortens_history_with_an_alert(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        a = topo.add_primary(
            "site-a", peers=[], size=SIZE, extra={"history": "1h", "history_size": "4MiB"}
        )
        a.start()
        # 600 writes of up to 16 KiB: several MiB of before-images against a 4 MiB cap.
        log = logged_workload(a, size=SIZE, count=600, blocks=2048)
        h = wait_status(
            lambda: h if (h := history(a))["shortened"] else None,
            timeout=10,
            what="history_size to shorten history",
        )
        assert int(h["bytes"]) <= 4 * MiB + 1 * MiB, h  # the cap, plus the segment being written
        assert h["oldest"]["seq"] > log.writes[0].seq, h
        alerts = a.volume_status()["journal"]["alerts"]
        assert any(e["kind"] == "history_shortened" for e in alerts), alerts
        # What is left is still exact.
        oldest = int(h["oldest"]["seq"])
        k = next(i + 1 for i, w in enumerate(log.writes) if w.seq > oldest + 5)
        status, body = restore(a, tmp_path / "p.img", seq=log.writes[k - 1].seq)
        assert status == 200, body
        check_prefix(tmp_path / "p.img", log, k, "after the cap")


def test_chain_keeps_the_primarys_times_and_bookmarks(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        c = topo.add_secondary(
            "site-c", volumes={"vol": SIZE}, volume_extra={"vol": {"history": "1h"}}
        )
        b = topo.add_secondary(
            "site-b",
            volumes={"vol": SIZE},
            peers=[peer_address(c)],
            volume_extra={"vol": {"history": "1h"}},
        )
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE, extra={"history": "1h"})
        for site in (c, b, a):
            site.start()
        wait_caught_up(a, b)
        wait_caught_up(b, c)
        log = logged_workload(a, size=SIZE, count=120, marks={60: "mid"})
        wait_caught_up(a, b)
        wait_caught_up(b, c)
        ha, hc = history(a), history(c)
        assert ha["bookmark_list"] == hc["bookmark_list"], (ha, hc)
        assert ha["newest"] == hc["newest"], (ha, hc)
        # A time on A's clock names the same prefix on C.
        for k in (30, 61, 100):
            status, body = restore(c, tmp_path / "c.img", at=iso(log.prefix_at_time(k)))
            assert status == 200, body
            check_prefix(tmp_path / "c.img", log, k, f"C at A's time of write {k}")


def test_kill_9_keeps_every_point_on_primary_and_replica(tmp_path: Path) -> None:
    """``kill -9`` of the replica in the middle of the workload and of the primary right
    after it: the journals replay their tails at the restart (capturing what was not yet
    captured) and every point still restores exactly on both. (A kill keeps the page cache;
    what a power cut does to history is docs/history.md's "Crash safety".)"""
    with topology(tmp_path) as topo:
        a, b = history_pair(topo, SIZE)
        log = logged_workload(a, size=SIZE, count=100)
        b.kill()
        log = logged_workload(a, size=SIZE, count=100, seed=12, log=log)
        a.kill()  # no clean checkpoint: the restart replays the journal's tail
        a.start()
        b.start()
        wait_caught_up(a, b)
        rng = random.Random(3)
        for n in range(8):
            site = (a, b)[n % 2]
            k = rng.randint(1, len(log.writes))
            out = tmp_path / f"k{n}.img"
            status, body = restore(site, out, seq=log.writes[k - 1].seq)
            assert status == 200, body
            check_prefix(out, log, k, f"{site.name} after kill -9, prefix {k}")
