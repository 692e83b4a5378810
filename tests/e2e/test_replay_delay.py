"""A lagged replica (``replay_delay``, issue 10) with real units.

What must hold: received records are durable (acknowledged) at once but reach the replica only
after the delay; a restart keeps them held; ``promote`` refuses to guess and either applies
them (``--apply-delayed``) or gives them up (``--discard-delayed``), and the replica is then
exactly the volume after all, or after none, of the held writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.failover import role_change, wait_role
from tests.support.history import logged_workload
from tests.support.pair import MiB, Site, peer_address, topology, wait_caught_up, wait_status

pytestmark = pytest.mark.e2e

SIZE = 8 * MiB


def wait_received(source: Site, replica: Site) -> dict[str, object]:
    newest = source.volume_status()["journal"]["newest_seq"]
    return wait_status(
        lambda: r if (r := replica.volume_status()["replica"])["received_seq"] >= newest else None,
        timeout=30,
        what=f"{replica.name} to hold every record durably",
    )


def test_records_wait_for_the_delay_then_reach_the_replica(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary(
            "site-b", volumes={"vol": SIZE}, volume_extra={"vol": {"replay_delay": "4s"}}
        )
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        b.start()
        a.start()
        wait_caught_up(a, b)
        log = logged_workload(a, size=SIZE, count=50, blocks=1024)
        rep = wait_received(a, b)
        # Durable and acknowledged, not yet applied: the replica is still the volume before.
        assert rep["delayed_records"] == 50 and rep["replay_delay_seconds"] == 4.0, rep
        assert b.images["vol"].read_bytes() == log.image(0)
        assert a.volume_status()["peers"][0]["acked_seq"] == log.writes[-1].seq
        wait_caught_up(a, b, timeout=30)
        assert b.images["vol"].read_bytes() == log.image(50)
        assert b.volume_status()["replica"]["delayed_records"] == 0


def test_promote_applies_or_discards_what_is_held_and_a_restart_keeps_it(
    tmp_path: Path,
) -> None:
    with topology(tmp_path) as topo:
        lag = {"vol": {"replay_delay": "1h"}}
        b = topo.add_secondary("site-b", volumes={"vol": SIZE}, volume_extra=lag)
        c = topo.add_secondary("site-c", volumes={"vol": SIZE}, volume_extra=lag)
        a = topo.add_primary("site-a", peers=[peer_address(b), peer_address(c)], size=SIZE)
        b.start()
        c.start()
        a.start()
        wait_caught_up(a, b)
        wait_caught_up(a, c)
        base = a.volume_status()["journal"]["newest_seq"]
        log = logged_workload(a, size=SIZE, count=30, blocks=1024)
        wait_received(a, b)
        wait_received(a, c)
        a.kill()  # the primary's site is lost; its last 30 writes sit in the lagged replicas

        proc = role_change(b, "promote")
        assert proc.returncode != 0 and "replay_delay" in proc.stderr, proc.stdout + proc.stderr
        # A restart does not apply them either.
        assert b.unit is not None
        b.unit.terminate()
        b.start()
        assert b.volume_status()["replica"]["delayed_records"] == 30
        assert b.images["vol"].read_bytes() == log.image(0)

        proc = role_change(b, "promote", "--discard-delayed")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_role(b, "primary")
        assert b.images["vol"].read_bytes() == log.image(0)
        assert b.volume_status()["journal"]["newest_seq"] == base

        proc = role_change(c, "promote", "--apply-delayed")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_role(c, "primary")
        assert c.images["vol"].read_bytes() == log.image(30)
        assert c.volume_status()["journal"]["newest_seq"] == log.writes[-1].seq
