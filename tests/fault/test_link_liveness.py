"""A link whose far end stops reading or goes silent, and a paused consumer (issue 7, points 8,
20 and 21).

What must hold: a sender never hangs on a peer that takes nothing in; a silent peer is noticed
within a bounded time whether or not the host writes; the peer then shows ``connecting`` with
the reason, the sender reconnects by itself, and once the network heals replication resumes
and the replica ends byte-identical. A paused consumer is sent nothing, not even a resync.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.fault.test_link_faults import (
    admin_post,
    background,
    proxy_address,
    proxy_to,
)
from tests.support.faultproxy import Direction
from tests.support.pair import (
    find_peer,
    fio_args,
    fio_write,
    qemu_img_compare,
    topology,
    wait_caught_up_via,
    wait_status,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.fault

# Far more than the 10 s idle deadline, the 10 s handshake deadline and a 2 s close together.
DETECT_WITHIN = 30.0


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_commands("fio", "qemu-img")


def steady_writes(url: str, seconds: int) -> list[str]:
    """fio writing 1 MiB/s of 16 KiB random writes for ``seconds`` (within the first 16 MiB)."""
    return [
        *fio_args(url, size="16M", bs="16k", seed=51, iodepth=4, verify=False),
        "--time_based",
        f"--runtime={seconds}",
        "--rate=1m",
    ]


@pytest.mark.parametrize(
    ("direction", "point"),
    [("up", "8: the peer stops reading"), ("both", "21: the peer goes silent")],
)
def test_stalled_peer_is_detected_while_the_host_writes_and_replication_resumes(
    tmp_path: Path, direction: Direction, point: str
) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        with proxy_to(b) as proxy:
            via = proxy_address(proxy)
            a = topo.add_primary("site-a", peers=[via])
            b.start()
            primary = a.start()
            wait_caught_up_via(a, b, via)
            before = find_peer(a, via)
            url = primary.export_url("vol")
            # Enough unsent data that a close must wait for the peer to read it.
            fio_write(url, tmp_path, size="8M", bs="64k", seed=50, verify=False)
            proxy.stall(True, direction)
            stalled_at = time.monotonic()
            down: dict[str, Any] | None = None
            with background(steady_writes(url, int(DETECT_WITHIN) + 5), tmp_path) as fio:
                fio_write(url, tmp_path, size="16M", offset="16M", bs="64k", seed=52, verify=False)
                while time.monotonic() - stalled_at < DETECT_WITHIN + 5:
                    peer = find_peer(a, via)
                    if peer["state"] == "connecting" and peer.get("reason"):
                        down = peer
                        break
                    assert fio.poll() is None or fio.returncode == 0, "the host was not served"
                    time.sleep(0.2)
                detected_after = time.monotonic() - stalled_at
                assert down is not None, (point, find_peer(a, via))
                assert detected_after <= DETECT_WITHIN, (point, detected_after)
                # It keeps trying (a new connection through the still-stalled proxy) and says
                # why it is down each time.
                wait_status(
                    lambda: proxy.connections_accepted >= 2 and find_peer(a, via).get("reason"),
                    timeout=DETECT_WITHIN,
                    what="the sender to reconnect",
                )
                proxy.stall(False, direction)
                out, _ = fio.communicate(timeout=120)
                assert fio.returncode == 0 and "err= 0" in out, out
            wait_caught_up_via(a, b, via, timeout=90)
            after = find_peer(a, via)
            assert after["connects"] > before["connects"], (before, after)
            assert after["reason"] is None and after["state"] == "replicating", after
            qemu_img_compare(a.images["vol"], b.images["vol"])


def test_paused_consumer_is_sent_no_resync(tmp_path: Path) -> None:
    """Point 20: with the peer's records overflowed to dirty-map tracking, ``consumer pause``
    must stop the dirty-region resync too: nothing crosses the link while paused."""
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        with proxy_to(b) as proxy:
            via = proxy_address(proxy)
            a = topo.add_primary("site-a", peers=[via], journal_size="4MiB")
            b.start()
            primary = a.start()
            wait_caught_up_via(a, b, via)
            proxy.cut()
            wait_status(
                lambda: find_peer(a, via)["state"] != "replicating",
                timeout=15,
                what="the sender to notice the cut",
            )
            fio_write(primary.export_url("vol"), tmp_path, size="16M", seed=53, verify=False)
            peer = find_peer(a, via)
            assert peer["mode"] == "tracking" and peer["dirty_bytes"] > 0, peer
            paused = admin_post(a, f"/api/volumes/vol/consumers/{via}/pause")
            assert paused, paused
            accepted = proxy.connections_accepted
            proxy.heal()
            wait_status(
                lambda: proxy.connections_accepted > accepted and proxy.active_connections > 0,
                timeout=30,
                what="the sender to reconnect",
            )
            up = proxy.bytes_up
            time.sleep(5)
            held = find_peer(a, via)
            # Heartbeats only (a few dozen bytes a second): no resync data, no SYNC_START.
            assert proxy.bytes_up - up < 64 * 1024, (proxy.bytes_up - up, held)
            assert held["sync_bytes_sent"] == peer["sync_bytes_sent"], (peer, held)
            assert held["dirty_bytes"] == peer["dirty_bytes"], (peer, held)
            assert held["state"] == "paused", held
            admin_post(a, f"/api/volumes/vol/consumers/{via}/resume")
            wait_caught_up_via(a, b, via, timeout=60)
            qemu_img_compare(a.images["vol"], b.images["vol"])
            assert find_peer(a, via)["sync_bytes_sent"] > peer["sync_bytes_sent"]
