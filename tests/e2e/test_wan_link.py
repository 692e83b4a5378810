"""The WAN link on loopback (issue 13): compression, bandwidth limits, transmit windows and
skipping unchanged rewrites, each measured where it acts.

What must hold: compressed links carry compressible data in fewer bytes and random data in no
more, to a peer configured without compression too; a bandwidth limit holds within 10 % and a
live change takes effect within 2 s; outside a transmit window nothing is sent (a dial-up peer is
not even connected) and status says until when, and when it opens the backlog drains to an
identical replica; a rewrite of unchanged data is neither journaled nor sent. Every replica is
compared byte for byte.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.config_file import edit_config, volume_entry
from tests.support.failover import cli
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.pair import (
    MiB,
    Site,
    find_peer,
    peer_address,
    qemu_img_compare,
    run_client,
    topology,
    wait_caught_up,
    wait_caught_up_via,
    wait_status,
)

pytestmark = pytest.mark.e2e


def compressible_tree(size: int) -> bytes:
    """``size`` bytes of a tar of a real tree of text and binaries: Python's standard library
    (source files and compiled extension modules), as a filesystem image would hold them."""
    out = io.BytesIO()
    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path in sorted(root.rglob("*")):
            if out.tell() >= size:
                break
            if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    data = out.getvalue()
    assert len(data) >= size, f"{root} holds only {len(data)} bytes"
    return data[:size]


def copy_in(site: Site, data: bytes, tmp_path: Path, name: str) -> None:
    """Write ``data`` at offset 0 of the site's export with nbdcopy (one real client)."""
    assert site.unit is not None
    source = tmp_path / name
    source.write_bytes(data)
    done = run_client(["nbdcopy", "--", str(source), site.unit.export_url("vol")])
    assert done.returncode == 0, done.stderr


def peer_of(a: Site, b: Site) -> dict[str, Any]:
    return find_peer(a, peer_address(b))


def test_compression_shrinks_what_compresses_and_never_inflates_the_rest(tmp_path: Path) -> None:
    size = 64 * MiB
    with topology(tmp_path) as topo:
        # The secondary says compression = "none": that is about what it sends, and it still
        # decodes what the source compresses (the codecs a unit decodes are in its WELCOME).
        b = topo.add_secondary("site-b", volumes={"vol": size}, replication={"compression": "none"})
        a = topo.add_primary(
            "site-a",
            peers=[peer_address(b)],
            size=size,
            replication={"compression": "zstd", "compression_level": 3},
        )
        b.start()
        a.start()
        wait_caught_up(a, b)
        before = peer_of(a, b)
        assert before["compression"] == "zstd" and before["compressing"] is True, before

        tree = compressible_tree(16 * MiB)
        copy_in(a, tree, tmp_path, "tree.img")
        wait_caught_up(a, b)
        mid = peer_of(a, b)
        payload = mid["bytes_sent"] - before["bytes_sent"]
        wire = mid["wire_bytes_sent"] - before["wire_bytes_sent"]
        print(f"16 MiB of a source tree: {payload} payload bytes in {wire} on the wire")
        assert payload >= 16 * MiB and wire * 2 <= payload, (payload, wire)

        noise = os.urandom(16 * MiB)
        copy_in(a, noise, tmp_path, "noise.img")
        wait_caught_up(a, b)
        after = peer_of(a, b)
        payload = after["bytes_sent"] - mid["bytes_sent"]
        wire = after["wire_bytes_sent"] - mid["wire_bytes_sent"]
        print(f"16 MiB of random data: {payload} payload bytes in {wire} on the wire")
        assert payload >= 16 * MiB and wire <= payload, (payload, wire)  # sent raw, not inflated
        assert after["compression_ratio"] > 1.0
        qemu_img_compare(a.images["vol"], b.images["vol"])

        # Switched off on the live link: frames go plain from then on, same connection.
        where = ["--config", str(a.config)]
        done = cli("link", "set", "vol", peer_address(b), "--compression", "none", *where)
        assert done.returncode == 0 and "compression none" in done.stdout, done.stdout
        copy_in(a, tree[: 4 * MiB][::-1], tmp_path, "tree2.img")
        wait_caught_up(a, b)
        plain = peer_of(a, b)
        assert plain["connects"] == after["connects"] and plain["compressing"] is False
        payload = plain["bytes_sent"] - after["bytes_sent"]
        wire = plain["wire_bytes_sent"] - after["wire_bytes_sent"]
        assert payload >= 4 * MiB and wire == payload, (payload, wire)
        qemu_img_compare(a.images["vol"], b.images["vol"])


def rate_over(a: Site, b: Site, seconds: float) -> float:
    """Wire bytes a second to the peer over the next ``seconds``."""
    start, t0 = int(peer_of(a, b)["wire_bytes_sent"]), time.monotonic()
    time.sleep(seconds)
    end, t1 = int(peer_of(a, b)["wire_bytes_sent"]), time.monotonic()
    return (end - start) / (t1 - t0)


def test_a_bandwidth_limit_holds_and_changes_live(tmp_path: Path) -> None:
    size = 128 * MiB
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": size}, journal_size="160MiB")
        a = topo.add_primary(
            "site-a",
            peers=[peer_address(b)],
            size=size,
            journal_size="160MiB",
            replication={"bandwidth": "80Mbit"},
        )
        b.start()
        a.start()
        wait_caught_up(a, b)
        # A backlog far larger than the link moves in the test's time: the limit, not the
        # host, sets the pace. Written at loopback speed.
        copy_in(a, os.urandom(96 * MiB), tmp_path, "backlog.img")
        time.sleep(1.0)  # past the first burst
        measured = rate_over(a, b, 3.0)
        print(f"80 Mbit/s limit: {measured * 8 / 1e6:.1f} Mbit/s measured")
        assert 0.9 * 10e6 <= measured <= 1.1 * 10e6, measured
        done = cli("link", "set", "vol", peer_address(b), "--bandwidth", "40Mbit", "--config",
                   str(a.config))  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        changed = time.monotonic()
        time.sleep(max(0.0, changed + 1.0 - time.monotonic()))
        measured = rate_over(a, b, 3.0)  # from 1 s after the change
        print(f"40 Mbit/s after a live change: {measured * 8 / 1e6:.1f} Mbit/s measured")
        assert 0.9 * 5e6 <= measured <= 1.1 * 5e6, measured
        assert peer_of(a, b)["lag_bytes"] > 0  # the backlog still set no pace of its own
        done = cli("link", "set", "vol", peer_address(b), "--bandwidth", "none", "--config",
                   str(a.config))  # fmt: skip
        assert done.returncode == 0
        wait_caught_up(a, b, timeout=120)
        qemu_img_compare(a.images["vol"], b.images["vol"])


def next_window(now: dt.datetime) -> tuple[dt.datetime, str]:
    """A window that opens at a minute boundary at least 25 s from ``now`` and lasts 30 min."""
    opens = (now + dt.timedelta(seconds=25)).replace(second=0, microsecond=0)
    opens += dt.timedelta(minutes=1)
    closes = opens + dt.timedelta(minutes=30)
    return opens, f"{opens:%H:%M}-{closes:%H:%M}"


def test_outside_its_window_a_link_sends_nothing_and_drains_when_it_opens(tmp_path: Path) -> None:
    size = 32 * MiB
    opens, window = next_window(dt.datetime.now())
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": size})
        c = topo.add_secondary("site-c", volumes={"vol": size})
        a = topo.add_primary(
            "site-a",
            peers=[],
            size=size,
            replication={"transmit_windows": [window]},
        )
        # b stays connected through the closed window; c is dial-up style.
        edit_config(
            a.config,
            lambda doc: volume_entry(doc).__setitem__(
                "peers", [peer_address(b), {"address": peer_address(c), "connect": "windows"}]
            ),
        )
        b.start()
        c.start()
        a.start()
        data = os.urandom(8 * MiB)
        copy_in(a, data, tmp_path, "closed.img")
        until = opens.astimezone().isoformat()
        # b connects (and copies nothing: both volumes start as zeros, which a full sync checks
        # by digest), c does not connect at all.
        connected = wait_status(
            lambda: (p := peer_of(a, b))["connects"] >= 1 and p, timeout=20, what="b to connect"
        )
        assert connected["state"] == "window-closed", connected
        assert connected["window"] == "closed" and connected["window_until"] == until, connected
        dialup = peer_of(a, c)
        assert dialup["connects"] == 0 and dialup["window"] == "closed", dialup
        assert "outside its transmit windows until" in (dialup["reason"] or ""), dialup
        sent = connected["bytes_sent"]
        time.sleep(2.0)
        held = peer_of(a, b)
        # Nothing but keep-alives crossed: far less than one record of the 8 MiB.
        assert held["bytes_sent"] - sent < 64 * 1024, (sent, held)
        assert held["lag_bytes"] >= 8 * MiB and peer_of(a, c)["lag_bytes"] >= 8 * MiB

        left = (opens - dt.datetime.now()).total_seconds()
        assert left > 0, "the window opened before the checks were done"
        wait_status(lambda: peer_of(a, b)["window"] == "open", timeout=left + 10, what="open")
        for replica in (b, c):
            wait_caught_up(a, replica, timeout=60)
            qemu_img_compare(a.images["vol"], replica.images["vol"])
        opened = peer_of(a, c)
        assert opened["connects"] >= 1 and opened["state"] == "replicating", opened
        assert opened["window_until"] is not None  # when it closes again


def test_unchanged_rewrites_are_neither_journaled_nor_sent(tmp_path: Path) -> None:
    size = 80 * MiB
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": size}, journal_size="128MiB")
        a = topo.add_primary(
            "site-a",
            peers=[peer_address(b)],
            size=size,
            journal_size="128MiB",
            extra={"skip_unchanged": True},
        )
        b.start()
        a.start()
        wait_caught_up(a, b)
        data = bytearray(os.urandom(64 * MiB))
        copy_in(a, bytes(data), tmp_path, "first.img")
        wait_caught_up(a, b)
        first = peer_of(a, b)
        journal_first = a.volume_status()["journal"]

        copy_in(a, bytes(data), tmp_path, "same.img")  # the same 64 MiB again
        wait_caught_up(a, b)
        second = peer_of(a, b)
        journal_second = a.volume_status()["journal"]
        skipped = journal_second["unchanged"]["skipped_bytes"]
        sent = second["bytes_sent"] - first["bytes_sent"]
        records = journal_second["newest_seq"] - journal_first["newest_seq"]
        print(f"same 64 MiB again: {skipped} bytes skipped, {sent} bytes sent, {records} records")
        assert skipped >= 63 * MiB, journal_second["unchanged"]
        assert sent < MiB, sent
        qemu_img_compare(a.images["vol"], b.images["vol"])

        for i in range(0, len(data), 4096):  # one changed byte in every 4 KiB
            data[i + 100] ^= 0xFF
        copy_in(a, bytes(data), tmp_path, "changed.img")
        wait_caught_up(a, b)
        third = peer_of(a, b)
        sent = third["bytes_sent"] - second["bytes_sent"]
        assert a.volume_status()["journal"]["unchanged"]["skipped_bytes"] == skipped
        assert sent >= 64 * MiB, sent
        qemu_img_compare(a.images["vol"], b.images["vol"])
        assert a.images["vol"].read_bytes()[: len(data)] == bytes(data)


def test_a_300_ms_round_trip_keeps_the_link_full_and_up(tmp_path: Path) -> None:
    """150 ms each way through a delaying proxy: heartbeats and deadlines hold (no reconnect),
    and the window grows to the bandwidth-delay product, so the link runs at its limit."""
    size = 64 * MiB
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": size})
        assert b.listen_port is not None
        proxy = ThreadedFaultProxy(("127.0.0.1", b.listen_port))
        proxy.start()
        try:
            via = f"127.0.0.1:{proxy.port}"
            a = topo.add_primary(
                "site-a", peers=[via], size=size, replication={"bandwidth": "40Mbit"}
            )
            proxy.set_delay(0.15)
            b.start()
            a.start()
            wait_caught_up_via(a, b, via, timeout=60)
            before = find_peer(a, via)
            started = time.monotonic()
            copy_in(a, os.urandom(24 * MiB), tmp_path, "far.img")
            wait_caught_up_via(a, b, via, timeout=120)
            rate = 24 * MiB / (time.monotonic() - started)
            after = find_peer(a, via)
            print(
                f"300 ms round trip at 40 Mbit/s: {rate * 8 / 1e6:.1f} Mbit/s, window "
                f"{after['inflight_window_bytes']} bytes, rtt {after['rtt_seconds']} s"
            )
            assert after["connects"] == before["connects"] == 1, after
            assert after["rtt_seconds"] is not None and after["rtt_seconds"] >= 0.3, after
            # 5 MB/s x 0.3 s is 1.5 MB in flight at least: the window took the pipe's measure.
            assert after["inflight_window_bytes"] >= 1.5e6, after
            assert rate >= 0.8 * 5e6, rate
            qemu_img_compare(a.images["vol"], b.images["vol"])
        finally:
            proxy.stop()
