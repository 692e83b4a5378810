"""Drills with real units and real clients (issue 10).

What must hold: a read-only drill serves exactly the point ``restore`` writes (``qemu-img
compare`` of the NBD export against the image), while the host keeps writing and replicating;
a writable drill takes an ext4 mount, ``e2fsck`` and new files, and neither the volume nor its
replica sees any of it; stopping the drill frees its copy-on-write file.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from tests.e2e.conftest import BlockStack, run
from tests.e2e.test_replica_filesystem import verify_tree, write_tree
from tests.support.failover import cli
from tests.support.history import WriteLog, bookmark, history_pair, logged_workload, restore
from tests.support.pair import (
    MiB,
    Site,
    file_hash,
    qemu_img_compare,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import admin_request, require_commands

pytestmark = pytest.mark.e2e


def drill_start(site: Site, *args: str) -> str:
    proc = cli("drill", "start", "vol", *args, "--config", str(site.config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    url = proc.stdout.splitlines()[0]
    assert url.startswith("nbd://127.0.0.1:"), proc.stdout
    return url


def drills(site: Site) -> list[dict[str, object]]:
    assert site.unit is not None
    status, body = admin_request(site.unit, "GET", "/api/volumes/vol/drills")
    assert status == 200, body
    return list(body["drills"])


def test_read_only_drill_is_the_restored_point_while_writes_go_on(tmp_path: Path) -> None:
    require_commands("qemu-img")
    size = 16 * MiB
    with topology(tmp_path) as topo:
        a, b = history_pair(topo, size)
        log = logged_workload(a, size=size, count=200, blocks=2048)
        wait_caught_up(a, b)
        seq = log.writes[79].seq
        url = drill_start(b, "--seq", str(seq), "--name", "test80")
        # The host goes on writing, B goes on applying: the drill must not move.
        logged_workload(a, size=size, count=200, blocks=2048, seed=21, log=log)
        wait_caught_up(a, b)
        image = tmp_path / "p80.img"
        code, body = restore(b, image, seq=seq)
        assert code == 200, body
        assert image.read_bytes() == log.image(80)
        proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(image)])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [shown] = drills(b)
        assert shown["name"] == "test80" and shown["seq"] == seq and not shown["writable"]
        # A read-only drill refuses writes, and the volume is untouched by it.
        proc = run(["qemu-io", "-f", "raw", url, "-c", "write -P 0x11 0 4096"])
        assert proc.returncode != 0 or "failed" in proc.stdout + proc.stderr
        proc = cli("drill", "list", "--config", str(b.config))
        assert proc.returncode == 0 and "test80" in proc.stdout, proc.stdout + proc.stderr
        proc = cli("drill", "stop", "vol", "test80", "--config", str(b.config))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert drills(b) == []
        qemu_img_compare(a.images["vol"], b.images["vol"])


def test_writable_drill_takes_ext4_and_leaves_volume_and_replica_alone(
    tmp_path: Path, block_stack: BlockStack
) -> None:
    size = 128 * MiB
    fs_size = 96 * MiB
    with topology(tmp_path) as topo:
        a, b = history_pair(topo, size)
        # The host: ext4 on the first 96 MiB of the volume.
        host_fs = tmp_path / "host-fs"
        assert a.unit is not None
        loop = block_stack.attach(a.unit.export_url("vol"))
        run(["mkfs.ext4", "-q", "-F", loop, str(fs_size // 1024)], check=True)
        block_stack.mount(loop, host_fs)
        sums = write_tree(host_fs, seed=3)
        run(["sync"], check=True)
        block_stack.umount(host_fs)
        block_stack.close()
        bookmark(a, "fs-ready")
        wait_caught_up(a, b)
        fs_before = file_hash(a.images["vol"], fs_size)

        url = drill_start(a, "--bookmark", "fs-ready", "--writable", "--name", "dr")
        # Replication goes on meanwhile: the host writes the last 32 MiB.
        log = WriteLog(run_id=5, size=size)
        writer = threading.Thread(
            target=logged_workload,
            args=(a,),
            kwargs={
                "size": size,
                "count": 400,
                "blocks": 8192 - 8,
                "first_block": fs_size // 4096,
                "log": log,
            },
        )
        writer.start()
        drill_fs = tmp_path / "drill-fs"
        dloop = block_stack.attach(url)
        run(["e2fsck", "-fn", dloop], check=True)
        block_stack.mount(dloop, drill_fs)
        verify_tree(drill_fs, sums)
        (drill_fs / "drill-only.txt").write_text("written in a drill\n")
        new = drill_fs / "new"
        new.mkdir()
        for i in range(8):
            (new / f"n{i}.bin").write_bytes(bytes([i]) * (2 * MiB))
        run(["sync"], check=True)
        block_stack.umount(drill_fs)
        proc = run(["e2fsck", "-fn", dloop])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        block_stack.close()
        writer.join(timeout=120)
        assert not writer.is_alive() and len(log.writes) == 400

        [shown] = drills(a)
        assert shown["writable"] and int(shown["cow_bytes"]) > MiB, shown  # type: ignore[call-overload]
        cow_dir = a.state / "drills"
        assert any(cow_dir.iterdir())
        proc = cli("drill", "stop", "vol", "--config", str(a.config))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not any(cow_dir.iterdir()), "the copy-on-write file was not removed"

        # Nothing of the drill reached the volume or the replica.
        wait_caught_up(a, b)
        assert file_hash(a.images["vol"], fs_size) == fs_before
        qemu_img_compare(a.images["vol"], b.images["vol"])
        data = a.images["vol"].read_bytes()
        assert b"written in a drill" not in data
        assert (
            hashlib.sha256(data[fs_size:]).digest()
            == hashlib.sha256(log.image(len(log.writes))[fs_size:]).digest()
        )
