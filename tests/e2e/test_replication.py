"""Replication between real units: real host workloads, then byte-for-byte comparison.

What must not be lost: every write the host made through the primary's export must be in the
replica once the link has caught up, after workloads, secondary crashes and a primary crash.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import run
from tests.support.pair import (
    MiB,
    file_hash,
    peer_address,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.e2e


def fio_randwrite(url: str, cwd: Path, *, size: str = "32M", seed: int = 1) -> None:
    require_commands("fio")
    proc = run(
        [
            "fio",
            "--name=rep",
            "--ioengine=nbd",
            f"--uri={url}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            f"--size={size}",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            f"--randseed={seed}",
        ],
        cwd=cwd,
        timeout=120,
    )
    assert proc.returncode == 0 and "err= 0" in proc.stdout, proc.stdout + proc.stderr


def qemu_compare(a: Path, b: Path) -> None:
    require_commands("qemu-img")
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fio_workload_is_replicated_byte_for_byte(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        b.start()
        primary = a.start()
        wait_caught_up(a, b)  # the initial full sync of a new replica
        fio_randwrite(primary.export_url("vol"), tmp_path)
        rep = wait_caught_up(a, b)
        assert rep["replica"]["consistent"] is True
        qemu_compare(a.images["vol"], b.images["vol"])
        peer = a.volume_status()["peers"][0]
        assert peer["bytes_sent"] > 32 * MiB and peer["state"] == "replicating"
        assert rep["replica"]["bytes_received"] > 32 * MiB


def test_secondary_killed_five_times_mid_stream_ends_identical(tmp_path: Path) -> None:
    require_commands("fio")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        url = primary.export_url("vol")
        for i in range(5):
            writer = subprocess.Popen(
                [
                    "fio",
                    "--name=k",
                    "--ioengine=nbd",
                    f"--uri={url}",
                    "--rw=randwrite",
                    "--bs=64k",
                    "--iodepth=8",
                    "--size=48M",
                    "--time_based",
                    "--runtime=2",
                    f"--randseed={i + 7}",
                    "--verify_state_save=0",
                ],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                run(["sleep", "0.7"])
                b.kill()  # SIGKILL in the middle of the stream
                b.start()
            finally:
                assert writer.wait(60) == 0
        rep = wait_caught_up(a, b, timeout=90)
        assert rep["replica"]["consistent"]
        qemu_compare(a.images["vol"], b.images["vol"])


def test_primary_killed_once_replica_ends_identical(tmp_path: Path) -> None:
    require_commands("fio")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        writer = subprocess.Popen(
            [
                "fio",
                "--name=k",
                "--ioengine=nbd",
                f"--uri={primary.export_url('vol')}",
                "--rw=randwrite",
                "--bs=16k",
                "--iodepth=8",
                "--size=48M",
                "--time_based",
                "--runtime=5",
                "--verify_state_save=0",
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            run(["sleep", "1.5"])
            a.kill()
        finally:
            writer.wait(60)  # fio fails: its server died; that is the point
        a.start()
        rep = wait_caught_up(a, b, timeout=90)
        assert rep["replica"]["consistent"]
        qemu_compare(a.images["vol"], b.images["vol"])


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("wrong-key", "auth"),
        ("missing-key", "auth"),
        ("unknown-volume", "unknown-volume"),
        ("size-mismatch", "size-mismatch"),
    ],
)
def test_refused_links_apply_nothing(tmp_path: Path, case: str, expect: str) -> None:
    with topology(tmp_path) as topo:
        key_b = tmp_path / "key-b"
        key_b.write_text("the-secondary-key-0123456789\n")
        key_a = tmp_path / "key-a"
        key_a.write_text("a-different-key-9876543210\n")
        rep_b: dict[str, str] = {}
        rep_a: dict[str, str] | None = None
        volumes = {"vol": 64 * MiB}
        if case == "wrong-key":
            rep_b = {"psk_file": str(key_b)}
            rep_a = {"psk_file": str(key_a)}
        elif case == "missing-key":
            rep_b = {"psk_file": str(key_b)}
        elif case == "unknown-volume":
            volumes = {"other": 64 * MiB}
        b = topo.add_secondary(
            "site-b",
            replication=rep_b,
            volumes=volumes,
            image_size=32 * MiB if case == "size-mismatch" else None,
        )
        a = topo.add_primary("site-a", peers=[peer_address(b)], replication=rep_a)
        b.start()
        primary = a.start()
        image = next(iter(b.images.values()))
        before = file_hash(image, image.stat().st_size)
        run(
            ["qemu-io", "-f", "raw", primary.export_url("vol"), "-c", "write -P 0x5a 0 1M"],
            check=True,
        )
        deadline_status = None
        for _ in range(100):
            peer = a.volume_status()["peers"][0]
            deadline_status = peer
            if peer["last_error"] and expect in peer["last_error"]:
                break
            run(["sleep", "0.1"])
        assert deadline_status is not None and expect in str(deadline_status["last_error"])
        assert deadline_status["state"] != "replicating"
        # Nothing was applied, and both daemons still answer.
        assert file_hash(image, image.stat().st_size) == before
        assert b.status()["unit"] == "site-b"
        assert a.status()["unit"] == "site-a"


def test_a_second_source_for_an_active_volume_is_refused(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        c = topo.add_primary("site-c", peers=[peer_address(b)])
        b.start()
        a.start()
        wait_caught_up(a, b)
        before = file_hash(b.images["vol"], 64 * MiB)
        intruder = c.start()
        run(
            ["qemu-io", "-f", "raw", intruder.export_url("vol"), "-c", "write -P 0x77 0 4M"],
            check=True,
        )
        for _ in range(100):
            err = c.volume_status()["peers"][0]["last_error"] or ""
            if "busy" in err or "identity" in err:
                break
            run(["sleep", "0.1"])
        assert "busy" in err or "identity-mismatch" in err, err
        assert file_hash(b.images["vol"], 64 * MiB) == before
        rep = b.volume_status()["replica"]
        assert rep["consistent"] and rep["source_unit"] == "site-a"
