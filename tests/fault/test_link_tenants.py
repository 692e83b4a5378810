"""Many-to-one isolation: a replica belongs to the key its source authenticated with (point 13).

One secondary holds the replicas of two tenants, each volume with its own pre-shared key. A
tenant that knows only its own key and names the other tenant's volume is refused at the
handshake, and the other tenant's replica does not change by one byte. Must not be lost: the
victim's replica; checked by hash and by comparing it with its source.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.pair import (
    MiB,
    file_hash,
    find_peer,
    fio_write,
    peer_address,
    qemu_img_compare,
    topology,
    wait_caught_up,
)


def write_key(path: Path, key: str) -> str:
    path.write_text(key + "\n")
    path.chmod(0o600)
    return str(path)


def test_a_tenant_cannot_write_another_tenants_replica(tmp_path: Path) -> None:
    key_a = write_key(tmp_path / "key-a", "tenant a's own key, 32 bytes long")
    key_b = write_key(tmp_path / "key-b", "tenant b's own key, 32 bytes long")
    with topology(tmp_path) as topo:
        shared = topo.add_secondary(
            "shared",
            volumes={"va": 16 * MiB, "vb": 16 * MiB},
            volume_extra={"va": {"psk_file": key_a}, "vb": {"psk_file": key_b}},
        )
        a = topo.add_primary(
            "a",
            peers=[peer_address(shared)],
            volume="va",
            size=16 * MiB,
            extra={"psk_file": key_a},
        )
        b = topo.add_primary(
            "b",
            peers=[peer_address(shared)],
            volume="vb",
            size=16 * MiB,
            extra={"psk_file": key_b},
        )
        shared.start()
        a.start()
        b.start()
        assert a.unit is not None and b.unit is not None
        fio_write(a.unit.export_url("va"), tmp_path, size="4M", seed=1)
        fio_write(b.unit.export_url("vb"), tmp_path, size="4M", seed=2)
        wait_caught_up(a, shared, volume="va")
        wait_caught_up(b, shared, volume="vb")
        assert b.unit.terminate() == 0
        victim = file_hash(shared.images["vb"], 16 * MiB)
        # The attacker: tenant a's key, tenant b's volume name, different data.
        mallory = topo.add_primary(
            "mallory",
            peers=[peer_address(shared)],
            volume="vb",
            size=16 * MiB,
            extra={"psk_file": key_a},
        )
        mallory.start()
        assert mallory.unit is not None
        fio_write(mallory.unit.export_url("vb"), tmp_path, size="4M", seed=3)
        deadline = time.monotonic() + 10
        peer = find_peer(mallory, peer_address(shared), volume="vb")
        while time.monotonic() < deadline and "auth" not in str(peer.get("last_error")):
            time.sleep(0.2)
            peer = find_peer(mallory, peer_address(shared), volume="vb")
        assert "auth" in str(peer["last_error"]), peer
        assert peer["state"] == "connecting", peer
        assert file_hash(shared.images["vb"], 16 * MiB) == victim
        replica = shared.volume_status("vb")["replica"]
        assert replica["source"] is None, replica
        mallory.kill()
        # The rightful source comes back and carries on where it was.
        b.start()
        fio_write(b.unit.export_url("vb"), tmp_path, size="4M", offset="8M", seed=4)
        wait_caught_up(b, shared, volume="vb")
        assert b.unit.terminate() == 0
        assert a.unit.terminate() == 0
        assert shared.unit is not None and shared.unit.terminate() == 0
        qemu_img_compare(b.images["vb"], shared.images["vb"])
        qemu_img_compare(a.images["va"], shared.images["va"])
