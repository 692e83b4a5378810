"""Online verify with real units (issue 10).

What must hold: bytes flipped behind the unit's back in three regions of a replica are found,
exactly those three regions, while the host keeps writing elsewhere; ``--repair`` resends only
them (the resync's bytes are three regions), and the replica then equals the volume.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest

from tests.support.failover import cli
from tests.support.history import WriteLog, logged_workload
from tests.support.pair import (
    MiB,
    peer_address,
    qemu_img_compare,
    topology,
    wait_caught_up,
    wait_status,
)

pytestmark = pytest.mark.e2e

SIZE = 32 * MiB
REGION = 64 * 1024


def flip(image: Path, offset: int) -> None:
    fd = os.open(image, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)


def test_verify_names_exactly_the_damaged_regions_and_repair_resends_only_them(
    tmp_path: Path,
) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        b.start()
        a.start()
        wait_caught_up(a, b)
        logged_workload(a, size=SIZE, count=200, blocks=8192)  # data everywhere to compare
        wait_caught_up(a, b)
        damaged = [17 * MiB + 100, 23 * MiB + REGION * 3 + 5, SIZE - 10]
        for offset in damaged:
            flip(b.images["vol"], offset)
        want = sorted(offset // REGION * REGION for offset in damaged)

        # The host keeps writing the first 8 MiB meanwhile.
        log = WriteLog(run_id=9, size=SIZE)
        writer = threading.Thread(
            target=logged_workload,
            args=(a,),
            kwargs={"size": SIZE, "count": 300, "blocks": 2048, "seed": 5, "log": log},
        )
        writer.start()
        proc = cli("verify", "vol", "--json", "--config", str(a.config))
        writer.join(timeout=120)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        [peer] = json.loads(proc.stdout)["peers"]
        assert [r["offset"] for r in peer["differing"]] == want, peer
        assert not peer["repaired"]

        before = a.volume_status()["peers"][0]["sync_bytes_sent"]
        proc = cli("verify", "vol", "--repair", "--config", str(a.config))
        assert proc.returncode == 3 and "marked for resync" in proc.stdout, proc.stdout
        wait_status(
            lambda: a.volume_status()["peers"][0]["sync_bytes_sent"] > before,
            timeout=30,
            what="the repair's resync",
        )
        wait_caught_up(a, b)
        sent = a.volume_status()["peers"][0]["sync_bytes_sent"] - before
        # Only the three regions (the last one is a whole region too: SIZE is a multiple).
        assert sent == 3 * REGION, sent
        qemu_img_compare(a.images["vol"], b.images["vol"])
        proc = cli("verify", "vol", "--config", str(a.config))
        assert proc.returncode == 0 and " 0 of " in proc.stdout, proc.stdout + proc.stderr


def test_a_full_sync_to_a_similar_replica_sends_only_what_differs(tmp_path: Path) -> None:
    """A replica pre-seeded with a copy of the volume in which 1 % of the regions differ (an
    old backup, say): its first sync compares region digests first and sends at most 2 % of
    the volume, and the replica then equals the volume."""
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        data = bytearray(os.urandom(SIZE))
        a.images["vol"].write_bytes(data)
        regions = SIZE // REGION
        changed = sorted(random.Random(4).sample(range(regions), regions // 100))
        for index in changed:
            data[index * REGION + 7] ^= 0x5A
        b.images["vol"].write_bytes(data)
        b.start()
        a.start()
        wait_caught_up(a, b)
        peer = a.volume_status()["peers"][0]
        qemu_img_compare(a.images["vol"], b.images["vol"])
        assert peer["sync_bytes_sent"] <= SIZE * 2 // 100, peer
        assert peer["sync_bytes_sent"] >= len(changed) * REGION, peer
        assert peer["sync_bytes_skipped"] >= SIZE * 98 // 100, peer
