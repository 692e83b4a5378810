"""``ack = "remote"``: the host is answered only once the secondary holds its write durably.

What must not be lost: a write the host was told is done must already be on the secondary
(the reason to choose ``ack = "remote"``). When the secondary goes silent, the host is not held
hostage: after ``ack_timeout`` the write completes on the local journal, the volume reports
"remote-degraded" with an ``ack_timeout`` alert, and once the secondary is back and has caught
up, writes wait for it again.

The link runs through a proxy that delays every byte towards the secondary by half a second:
with ``ack = "local"`` a write would return long before the secondary had it, so the checks
made right after each write returns can tell the two modes apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.pair import (
    Site,
    find_peer,
    run_client,
    topology,
    wait_caught_up_via,
    wait_status,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.e2e

ACK_TIMEOUT = 2.0
LINK_DELAY = 0.5  # seconds added to every byte towards the secondary


@contextmanager
def proxy_to(replica: Site) -> Iterator[ThreadedFaultProxy]:
    assert replica.listen_port is not None
    proxy = ThreadedFaultProxy(("127.0.0.1", replica.listen_port))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def timed_write(url: str, offset: int, *, fua: bool, pattern: int) -> float:
    """One qemu-io write of 64 KiB; returns how long the host waited for it."""
    flags = "-f " if fua else ""
    began = time.monotonic()
    proc = run_client(
        ["qemu-io", "-f", "raw", url, "-c", f"write {flags}-P {pattern:#x} {offset} 64k"],
        timeout=60,
    )
    took = time.monotonic() - began
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wrote 65536/65536 bytes" in proc.stdout, proc.stdout
    return took


def ack_status(site: Site) -> dict[str, object]:
    ack = site.volume_status()["journal"]["ack"]
    assert isinstance(ack, dict)
    return ack


def alert_kinds(site: Site) -> list[str]:
    return [a["kind"] for a in site.volume_status()["journal"]["alerts"]]


def test_remote_ack_waits_for_the_secondary_degrades_and_recovers(tmp_path: Path) -> None:
    require_commands("qemu-io")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        with proxy_to(b) as proxy:
            via = f"127.0.0.1:{proxy.port}"
            a = topo.add_primary(
                "site-a", peers=[via], extra={"ack": "remote", "ack_timeout": ACK_TIMEOUT}
            )
            b.start()
            primary = a.start()
            url = primary.export_url("vol")
            wait_caught_up_via(a, b, via)
            assert ack_status(a)["mode"] == "remote"
            proxy.set_delay(LINK_DELAY, direction="up")

            # 1. Secondary up: when the host's write returns, the secondary already has it.
            for i, fua in enumerate([True, False, True]):
                took = timed_write(url, i * 65536, fua=fua, pattern=0x10 + i)
                received = b.volume_status()["replica"]["received_seq"]  # no waiting
                newest = a.volume_status()["journal"]["newest_seq"]
                assert received >= newest, (i, fua, received, newest)
                # The host waited for the trip over the (delayed) link.
                assert took >= LINK_DELAY * 0.9, took
            assert ack_status(a)["mode"] == "remote"
            assert ack_status(a)["degradations"] == 0

            # 2. Secondary gone: the next write waits for ack_timeout, then succeeds locally.
            b.kill()
            took = timed_write(url, 8 * 65536, fua=True, pattern=0x21)
            assert took >= ACK_TIMEOUT * 0.9, took
            ack = ack_status(a)
            assert ack["mode"] == "remote-degraded", ack
            assert ack["degraded_peers"] == [via], ack
            assert "ack_timeout" in alert_kinds(a)
            assert find_peer(a, via)["state"] != "replicating"
            # Degraded: later writes no longer wait for the missing peer.
            took = timed_write(url, 9 * 65536, fua=True, pattern=0x22)
            assert took < ACK_TIMEOUT, took
            newest = a.volume_status()["journal"]["newest_seq"]

            # 3. Secondary back: once caught up, writes wait for it again.
            b.start()
            wait_caught_up_via(a, b, via, timeout=60)
            wait_status(
                lambda: ack_status(a)["mode"] == "remote",
                timeout=15,
                what='ack mode back to "remote"',
            )
            assert "ack_remote_restored" in alert_kinds(a)
            assert b.volume_status()["replica"]["received_seq"] >= newest
            took = timed_write(url, 10 * 65536, fua=True, pattern=0x23)
            received = b.volume_status()["replica"]["received_seq"]
            assert received >= a.volume_status()["journal"]["newest_seq"], received
            assert took >= LINK_DELAY * 0.9, took
            assert ack_status(a)["mode"] == "remote"
