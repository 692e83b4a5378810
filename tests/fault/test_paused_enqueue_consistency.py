"""With enqueueing paused, the replica is never called consistent (issue 7, point 5).

While the journal is paused, host writes reach the volume without records: each consumer's
dirty map records them, and a dirty-region resync copies those regions, each read at its own
moment with host writes in between. Such a copy is no prefix of the host's writes, so the
replica must not say ``consistent`` until a copy pass ran with no write outside the journal
and enqueueing is back on. Must not be lost: every write; checked by comparing the images.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from tests.support.pair import (
    MiB,
    fio_args,
    peer_address,
    qemu_img_compare,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import admin_request, require_commands


def test_no_consistent_replica_while_writes_bypass_the_journal(tmp_path: Path) -> None:
    require_commands("fio", "qemu-img")
    with topology(tmp_path) as topo:
        secondary = topo.add_secondary("b", volumes={"vol": 64 * MiB})
        primary = topo.add_primary("a", peers=[peer_address(secondary)], size=64 * MiB)
        secondary.start()
        unit = primary.start()
        wait_caught_up(primary, secondary)
        code, body = admin_request(unit, "POST", "/api/volumes/vol/journal/pause")
        assert code == 200, body
        url = unit.export_url("vol")
        stop = threading.Event()
        errors: list[str] = []

        def write_until_stopped() -> None:
            while not stop.is_set():
                out = subprocess.run(
                    [*fio_args(url, size="32M", iodepth=4, verify=False), "--io_size=2M"],
                    capture_output=True,
                    text=True,
                    check=False,
                    cwd=tmp_path,
                )
                if out.returncode != 0:
                    errors.append(out.stderr)
                    return

        writer = threading.Thread(target=write_until_stopped)
        writer.start()
        try:
            time.sleep(1.5)
            said_consistent = []
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                replica = secondary.volume_status()["replica"]
                said_consistent.append(bool(replica["consistent"]))
                time.sleep(0.05)
        finally:
            stop.set()
            writer.join()
        assert not errors, errors
        assert said_consistent and not any(said_consistent), said_consistent.count(True)
        # Still paused, writes stopped: a copy now would be a prefix, but any next write would
        # break it again without notice; consistent only once the journal takes writes again.
        time.sleep(1.5)
        assert not secondary.volume_status()["replica"]["consistent"]
        code, body = admin_request(unit, "POST", "/api/volumes/vol/journal/resume")
        assert code == 200, body
        wait_caught_up(primary, secondary)
        assert primary.unit is not None and secondary.unit is not None
        assert primary.unit.terminate() == 0
        assert secondary.unit.terminate() == 0
        qemu_img_compare(primary.images["vol"], secondary.images["vol"])
