"""Failover, failback and split brain with real units (issue 9).

What must hold: a planned switchover loses no acknowledged write and copies nothing; a forced
failover followed by the old primary's return is a split brain that copies nothing until an
operator resolves it, and then only the union of both sides' diverged regions is copied; the
replicas end byte for byte identical.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.fault.test_link_faults import qemu_write
from tests.support.failover import (
    peer_of,
    role_change,
    symmetric,
    wait_role,
    wait_split_brain,
)
from tests.support.pair import (
    MiB,
    Site,
    file_hash,
    fio_write,
    peer_address,
    qemu_img_compare,
    run_client,
    topology,
    wait_caught_up,
    wait_status,
)
from tests.support.unit_process import admin_request, require_commands

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_commands("qemu-io", "qemu-img", "fio")


def host_write_refused(site: Site) -> str:
    """A write through the site's export fails; returns what qemu-io said."""
    assert site.unit is not None
    proc = run_client(
        ["qemu-io", "-f", "raw", site.unit.export_url("vol"), "-c", "write -P 0x66 0 4096"]
    )
    out = proc.stdout + proc.stderr
    # qemu-io opens read-write: a read-only export refuses that ("Permission denied"); an export
    # that turned read-only under an open client fails the write itself (EPERM).
    refused = ("Operation not permitted", "Permission denied", "read-only", "Read-only")
    assert proc.returncode != 0 or "failed" in out, out
    assert any(word in out for word in refused), out
    return out


def region(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def test_planned_switchover_under_load_loses_nothing_and_copies_nothing(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        sites = symmetric(topo, {"site-a": "primary", "site-b": "secondary"})
        a, b = sites["site-a"], sites["site-b"]
        b.start()
        primary = a.start()
        # fio verifies every block it wrote (an acknowledged write that read back wrong fails it).
        fio_write(primary.export_url("vol"), tmp_path, size="8M", bs="4k", iodepth=16)
        wait_caught_up(a, b)
        written = file_hash(a.images["vol"], 8 * MiB)
        # B's initial copy is behind us; the switchover itself must copy nothing.
        initial_sync = peer_of(a, b)["sync_bytes_sent"]

        out = role_change(a, "demote")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "every peer holds every record" in out.stdout, out.stdout
        host_write_refused(a)
        status = a.volume_status()
        assert status["role"] == "demoted" and status["read_only"], status

        out = role_change(b, "promote")
        assert out.returncode == 0, out.stdout + out.stderr
        promoted = wait_role(b, "primary")
        assert not promoted["read_only"]
        assert [g["reason"] for g in promoted["generations"]] == ["received", "promote"]
        gen = promoted["generations"][-1]
        assert gen["start_seq"] == a.volume_status()["journal"]["newest_seq"] + 1, promoted
        assert b.unit is not None
        qemu_write(b.unit.export_url("vol"), 16 * MiB, 1 * MiB, 0x5B)

        wait_role(a, "secondary")
        wait_caught_up(b, a)
        assert peer_of(b, a)["sync_bytes_sent"] == 0, peer_of(b, a)
        assert peer_of(a, b)["sync_bytes_sent"] == initial_sync, peer_of(a, b)
        assert a.volume_status()["generation"] == promoted["generation"]
        for site in (a, b):
            assert site.unit is not None and site.unit.terminate() == 0
        qemu_img_compare(a.images["vol"], b.images["vol"])
        assert file_hash(b.images["vol"], 8 * MiB) == written
        assert region(a.images["vol"], 16 * MiB, MiB) == bytes([0x5B]) * MiB


def test_forced_failover_split_brain_and_resolve(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        sites = symmetric(topo, {"site-a": "primary", "site-b": "secondary"})
        a, b = sites["site-a"], sites["site-b"]
        b.start()
        primary = a.start()
        url = primary.export_url("vol")
        qemu_write(url, 0, 4 * MiB, 0x11)
        wait_caught_up(a, b)
        # B knows which of its peers is A (its sender was told "upstream"): what B writes once
        # promoted is kept for A.
        wait_status(lambda: peer_of(b, a)["state"] == "upstream", timeout=30, what="B to know A")
        # A holds writes B never gets: its consumer for B is paused, then A dies.
        code, body = admin_request(
            primary, "POST", f"/api/volumes/vol/consumers/{peer_address(b)}/pause"
        )
        assert code == 200, body
        qemu_write(url, 4 * MiB, 1 * MiB, 0xA1)
        a.kill()

        out = role_change(b, "promote")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_role(b, "primary")
        assert b.unit is not None
        qemu_write(b.unit.export_url("vol"), 4 * MiB + 512 * 1024, 1536 * 1024, 0xB2)

        a.start()
        split_a = wait_split_brain(a, b)
        split_b = wait_split_brain(b, a)
        assert split_a["common_seq"] == split_b["common_seq"], (split_a, split_b)
        assert split_a["local_diverged_bytes"] == split_b["peer_diverged_bytes"] == MiB
        assert split_b["local_diverged_bytes"] == split_a["peer_diverged_bytes"] == 1536 * 1024
        # Both keep serving what they served; neither changed the other.
        assert a.volume_status()["role"] == "primary" and b.volume_status()["role"] == "primary"
        assert peer_of(a, b)["state"] == "split-brain" and peer_of(b, a)["state"] == "split-brain"
        assert region(a.images["vol"], 4 * MiB, MiB) == bytes([0xA1]) * MiB
        assert region(b.images["vol"], 4 * MiB, 512 * 1024) == bytes(512 * 1024)  # never written
        assert region(b.images["vol"], 4 * MiB + 512 * 1024, 64 * 1024) == bytes([0xB2]) * 65536

        out = role_change(a, "resolve", "--discard-local")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_role(a, "secondary")
        wait_caught_up(b, a)
        peer = peer_of(b, a)
        union = 2 * MiB  # [4 MiB, 6 MiB): A's 1 MiB and B's 1.5 MiB joined
        assert peer["diverged_union_bytes"] == union, peer
        # What crossed the link for the resync: the union and its framing, nothing more.
        assert 0 < peer["sync_bytes_sent"] <= union + 64 * 1024, peer
        assert a.unit is not None
        host_write_refused(a)
        for site in (a, b):
            assert site.unit is not None and site.unit.terminate() == 0
        qemu_img_compare(a.images["vol"], b.images["vol"])
        # A's own 0xA1 there is gone: what B held (nothing) came back.
        assert region(a.images["vol"], 4 * MiB, 512 * 1024) == bytes(512 * 1024)
        assert not (a.state / "vol.diverged").exists(), os.listdir(a.state)


def test_promote_during_the_initial_sync_is_refused_unless_forced(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        sites = symmetric(topo, {"site-a": "primary", "site-b": "secondary"}, size=256 * MiB)
        a, b = sites["site-a"], sites["site-b"]
        primary = a.start()
        qemu_write(primary.export_url("vol"), 0, 64 * MiB, 0x21)
        # The consumer for B is paused: B's initial sync starts and cannot finish.
        code, body = admin_request(
            primary, "POST", f"/api/volumes/vol/consumers/{peer_address(b)}/pause"
        )
        assert code == 200, body
        b.start()
        wait_status(
            lambda: b.volume_status()["replica"]["source_unit"] == "site-a",
            timeout=30,
            what="B to hear from A",
        )
        assert b.volume_status()["replica"]["consistent"] is False
        out = role_change(b, "promote")
        assert out.returncode != 0 and "not consistent" in out.stderr, out.stdout + out.stderr
        assert b.volume_status()["role"] == "secondary"
        a.kill()
        out = role_change(b, "promote", "--force")
        assert out.returncode == 0, out.stdout + out.stderr
        status = wait_role(b, "primary")
        assert status["generations"][-1]["reason"] == "forced-promote", status
        assert any(e["kind"] == "forced_promote" for e in status["events"]), status["events"]


@pytest.mark.parametrize("reconnect", ["at-once", "after-writing"])
def test_a_primary_restored_from_a_backup_is_a_split_brain_never_spliced(
    tmp_path: Path, reconnect: str
) -> None:
    """A's volume file and state_dir come back from a backup older than what B holds, and A
    takes writes. Whether it meets B at once (behind B: the lineages tell) or only after
    writing more records than it lost (the same numbers: the stamps tell), both report a split
    brain and B keeps exactly the lost branch, with nothing of A's new writes."""
    with topology(tmp_path) as topo:
        sites = symmetric(topo, {"site-a": "primary", "site-b": "secondary"})
        a, b = sites["site-a"], sites["site-b"]
        b.start()
        qemu_write(a.start().export_url("vol"), 0, MiB, 0x11)
        wait_caught_up(a, b)
        assert a.unit is not None and a.unit.terminate() == 0
        backup = tmp_path / "backup"
        backup.mkdir()
        shutil.copy2(a.images["vol"], backup / "vol.img")
        shutil.copytree(a.state, backup / "state")

        qemu_write(a.start().export_url("vol"), MiB, MiB, 0x22)  # the branch that is lost
        wait_caught_up(a, b)
        assert a.unit.terminate() == 0
        shutil.copy2(backup / "vol.img", a.images["vol"])
        shutil.rmtree(a.state)
        shutil.copytree(backup / "state", a.state)

        if reconnect == "after-writing":
            assert b.unit is not None and b.unit.terminate() == 0
        url = a.start().export_url("vol")
        # More records than the lost branch had, so A's numbers reach past B's.
        for i in range(4):
            qemu_write(url, 2 * MiB + i * 512 * 1024, 512 * 1024, 0x33)
        if reconnect == "after-writing":
            b.start()
        split_b = wait_split_brain(b, a, both_sides=False)
        split_a = wait_split_brain(a, b, both_sides=False)
        assert split_a["common_seq"] == split_b["common_seq"] == 1, (split_a, split_b)
        assert b.volume_status()["role"] == "secondary"
        assert a.volume_status()["role"] == "primary"
        assert peer_of(a, b)["state"] == "split-brain", peer_of(a, b)
        time.sleep(2)  # and it stays that way: nothing is copied either way
        assert peer_of(a, b)["state"] == "split-brain", peer_of(a, b)
        assert peer_of(a, b)["bytes_sent"] == 0 and peer_of(a, b)["sync_bytes_sent"] == 0
        for site in (a, b):
            assert site.unit is not None and site.unit.terminate() == 0
        assert region(b.images["vol"], 0, MiB) == bytes([0x11]) * MiB
        assert region(b.images["vol"], MiB, MiB) == bytes([0x22]) * MiB  # the lost branch, kept
        assert region(b.images["vol"], 2 * MiB, 2 * MiB) == bytes(2 * MiB)  # none of A's
        assert region(a.images["vol"], MiB, MiB) == bytes(MiB)
        assert region(a.images["vol"], 2 * MiB, 2 * MiB) == bytes([0x33]) * 2 * MiB


def test_a_superseded_primary_without_divergent_writes_demotes_itself_and_follows(
    tmp_path: Path,
) -> None:
    with topology(tmp_path) as topo:
        sites = symmetric(topo, {"site-a": "primary", "site-b": "secondary"})
        a, b = sites["site-a"], sites["site-b"]
        b.start()
        qemu_write(a.start().export_url("vol"), 0, 2 * MiB, 0x11)
        wait_caught_up(a, b)
        a.kill()  # A's site is lost; B holds every record A wrote

        out = role_change(b, "promote")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_role(b, "primary")
        assert b.unit is not None
        qemu_write(b.unit.export_url("vol"), 8 * MiB, MiB, 0xB2)
        initial_sync = peer_of(b, a)["sync_bytes_sent"]

        a.start()  # it comes back believing it is the primary
        status = wait_role(a, "secondary")
        kinds = [e["kind"] for e in status["events"]]
        assert "demoted" in kinds and "following" in kinds, status["events"]
        assert status["generation"] == b.volume_status()["generation"]
        host_write_refused(a)
        wait_caught_up(b, a)
        peer = peer_of(b, a)
        # What B wrote since its generation began, and nothing more, reached A.
        assert peer["sync_bytes_sent"] - initial_sync <= MiB + 64 * 1024, peer
        assert not a.volume_status()["split_brain"], a.volume_status()["split_brain"]
        for site in (a, b):
            assert site.unit is not None and site.unit.terminate() == 0
        qemu_img_compare(a.images["vol"], b.images["vol"])
        assert region(a.images["vol"], 8 * MiB, MiB) == bytes([0xB2]) * MiB


def test_chain_promote_the_last_unit_and_the_middle_one_follows_it(tmp_path: Path) -> None:
    """A -> B -> C; A and B are lost, C is promoted and written; B comes back and follows C."""
    with topology(tmp_path) as topo:
        sites = symmetric(
            topo,
            {"site-a": "primary", "site-b": "secondary", "site-c": "secondary"},
            links={"site-a": ["site-b"], "site-b": ["site-a", "site-c"], "site-c": ["site-b"]},
        )
        a, b, c = sites["site-a"], sites["site-b"], sites["site-c"]
        c.start()
        b.start()
        qemu_write(a.start().export_url("vol"), 0, 2 * MiB, 0x11)
        wait_caught_up(a, b)
        wait_caught_up(b, c)
        a.kill()
        b.kill()

        out = role_change(c, "promote")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_role(c, "primary")
        assert c.unit is not None
        qemu_write(c.unit.export_url("vol"), 4 * MiB, MiB, 0xC3)

        b.start()
        wait_status(
            lambda: b.volume_status()["replica"]["source_unit"] == "site-c",
            timeout=30,
            what="B to receive from C",
        )
        status = b.volume_status()
        assert status["role"] == "secondary"
        assert status["generation"] == c.volume_status()["generation"]
        wait_caught_up(c, b)
        assert not b.volume_status()["split_brain"]
        for site in (b, c):
            assert site.unit is not None and site.unit.terminate() == 0
        qemu_img_compare(b.images["vol"], c.images["vol"])
        assert region(b.images["vol"], 4 * MiB, MiB) == bytes([0xC3]) * MiB


@pytest.mark.parametrize("victim", ["secondary", "primary"])
def test_kill_9_during_a_failback_resync_continues_to_an_identical_copy(
    tmp_path: Path, victim: str
) -> None:
    """After a forced failover and resolve, A receives B's diverged regions; either unit is
    killed with SIGKILL in the middle. What must hold: the resync goes on after the restart
    and A ends byte for byte equal to B (nothing of A's discarded writes survives)."""
    size = 256 * MiB
    with topology(tmp_path) as topo:
        sites = symmetric(topo, {"site-a": "primary", "site-b": "secondary"}, size=size)
        a, b = sites["site-a"], sites["site-b"]
        b.start()
        primary = a.start()
        qemu_write(primary.export_url("vol"), 0, MiB, 0x11)
        wait_caught_up(a, b)
        wait_status(lambda: peer_of(b, a)["state"] == "upstream", timeout=30, what="B to know A")
        code, body = admin_request(
            primary, "POST", f"/api/volumes/vol/consumers/{peer_address(b)}/pause"
        )
        assert code == 200, body
        qemu_write(primary.export_url("vol"), MiB, MiB, 0xA1)
        a.kill()
        assert role_change(b, "promote").returncode == 0
        wait_role(b, "primary")
        assert b.unit is not None
        # Enough diverged data that the resync is still running when the kill comes.
        fio_write(b.unit.export_url("vol"), tmp_path, size="160M", bs="1M", iodepth=8)
        a.start()
        wait_split_brain(a, b)
        out = role_change(a, "resolve", "--discard-local")
        assert out.returncode == 0, out.stdout + out.stderr

        def mid_resync() -> bool:
            replica = a.volume_status()["replica"]
            return bool(replica["syncing"] and replica["bytes_received"] > 8 * MiB)

        wait_status(
            mid_resync, timeout=60, what="A to be in the middle of its resync", interval=0.005
        )
        (a if victim == "secondary" else b).kill()
        restarted = (a if victim == "secondary" else b).start()
        assert restarted.pid
        # The kill landed before the end: A still needs what is left.
        assert a.volume_status()["replica"]["consistent"] is False
        wait_caught_up(b, a, timeout=120)
        assert a.volume_status()["replica"]["consistent"] is True
        for site in (a, b):
            assert site.unit is not None and site.unit.terminate() == 0
        qemu_img_compare(a.images["vol"], b.images["vol"])


def test_role_changes_that_cannot_be_made_are_refused_and_change_nothing(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        sites = symmetric(topo, {"site-a": "primary", "site-b": "secondary"})
        a, b = sites["site-a"], sites["site-b"]
        b.start()
        a.start()
        wait_caught_up(a, b)
        before = (a.volume_status()["generations"], b.volume_status()["generations"])
        cases = [
            (a, ("promote",), "already primary"),
            (b, ("demote",), "not primary"),
            (b, ("resolve", "--discard-local"), "no split brain to resolve"),
            (a, ("resolve",), "--discard-local"),
            (b, ("promote",), "demote that unit first"),  # its source is connected
        ]
        for site, args, needle in cases:
            out = role_change(site, *args)
            assert out.returncode != 0, (args, out.stdout)
            assert needle in out.stderr, (args, out.stderr)
        assert a.volume_status()["role"] == "primary" and b.volume_status()["role"] == "secondary"
        assert (a.volume_status()["generations"], b.volume_status()["generations"]) == before
        wait_caught_up(a, b)
