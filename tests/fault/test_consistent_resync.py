"""A replica stays restorable while a dirty-region resync overwrites it (issue 10).

The fault: a long cut makes the primary's small journal overflow, so its peer goes to dirty-map
tracking; once the link returns (slowly) a resync copies the dirty regions, and the primary is
killed with ``kill -9`` in the middle of it. What must not be lost: the replica's last
consistent point, the volume after exactly the writes made before the cut. The secondary keeps
no history (``history = "0"``): the resync's before-images are kept anyway. Its status names the
point, ``restore`` writes it, and ``promote`` brings the replica itself back to it, byte for
byte: never a mix of old and new regions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.test_link_faults import proxy_address, proxy_to
from tests.support.failover import role_change, wait_role
from tests.support.history import logged_workload, restore
from tests.support.pair import (
    MiB,
    find_peer,
    topology,
    wait_caught_up_via,
    wait_status,
)

pytestmark = pytest.mark.fault

SIZE = 16 * MiB


def test_kill_9_mid_resync_leaves_the_consistent_point_for_restore_and_promote(
    tmp_path: Path,
) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary(
            "site-b", volumes={"vol": SIZE}, volume_extra={"vol": {"history": "0"}}
        )
        with proxy_to(b) as proxy:
            via = proxy_address(proxy)
            a = topo.add_primary("site-a", peers=[via], size=SIZE, journal_size="1MiB")
            b.start()
            a.start()
            wait_caught_up_via(a, b, via)
            log = logged_workload(a, size=SIZE, count=60, blocks=4096)
            wait_caught_up_via(a, b, via)
            before_cut = len(log.writes)
            consistent_seq = log.writes[-1].seq

            proxy.cut()
            # Far more than the 1 MiB journal holds: the peer goes to tracking.
            log = logged_workload(a, size=SIZE, count=700, blocks=4096, seed=4, log=log)
            wait_status(
                lambda: find_peer(a, via)["mode"] == "tracking",
                timeout=20,
                what="the peer to fall back to dirty-map tracking",
            )
            proxy.set_bandwidth(256 * 1024)
            proxy.heal()
            # The resync has begun and has overwritten some regions, but is far from done.
            mid = wait_status(
                lambda: (
                    v
                    if (v := b.volume_status())["replica"]["syncing"]
                    and find_peer(a, via)["sync_bytes_sent"] > 256 * 1024
                    else None
                ),
                timeout=60,
                what="the resync to be under way",
            )
            a.kill()
            assert mid["consistent_point"] == {
                "seq": consistent_seq,
                "time": mid["consistent_point"]["time"],
            }, mid

        status = b.volume_status()
        assert status["replica"]["consistent"] is False, status
        assert status["consistent_point"]["seq"] == consistent_seq, status
        out = tmp_path / "point.img"
        code, body = restore(b, out, seq=consistent_seq)
        assert code == 200, body
        assert out.read_bytes() == log.image(before_cut), "restore of the consistent point"

        proc = role_change(b, "promote")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_role(b, "primary")
        assert b.images["vol"].read_bytes() == log.image(before_cut), "the promoted replica"
        promoted = b.volume_status()
        assert promoted["journal"]["newest_seq"] == consistent_seq, promoted
