"""A peer is known by its unit name, not by the address it is configured at.

What must not be lost: the peer's position in the journal. When an operator changes the
address a peer is reached at (here a DNS name instead of the IP), the records the peer has not
received yet are streamed to it, and nothing it already holds is copied again (no resync).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pair import (
    MiB,
    file_hash,
    find_peer,
    fio_write,
    peer_address,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.e2e


def test_a_changed_peer_address_keeps_the_peer_position(tmp_path: Path) -> None:
    require_commands("fio")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        old_address = peer_address(b)
        a = topo.add_primary("site-a", peers=[old_address])
        b.start()
        unit_a = a.start()
        fio_write(unit_a.export_url("vol"), tmp_path, size="8M", seed=1)
        wait_caught_up(a, b)
        consumer = a.volume_status()["journal"]["consumers"][old_address]
        assert consumer["peer"] == "site-b"

        # A backlog the peer lacks: written while it is down, held in A's journal for it.
        assert b.unit is not None
        b.unit.terminate()
        fio_write(unit_a.export_url("vol"), tmp_path, size="4M", offset="16M", seed=2)
        backlog = a.volume_status()["journal"]["consumers"][old_address]
        assert backlog["mode"] == "journal" and backlog["backlog_records"] > 0
        unit_a.terminate()

        # The same peer, reached by name instead of IP.
        new_address = f"localhost:{b.listen_port}"
        text = a.config.read_text()
        assert f'"{old_address}"' in text
        a.config.write_text(text.replace(f'"{old_address}"', f'"{new_address}"'))
        b.start()
        a.start()
        wait_caught_up(a, b)

        status = a.volume_status()
        peer = find_peer(a, new_address)
        assert peer["sync_bytes_sent"] == 0, f"the changed address started a resync: {peer}"
        assert peer["records_sent"] >= backlog["backlog_records"]
        consumers = status["journal"]["consumers"]
        assert set(consumers) == {new_address}, consumers
        assert consumers[new_address]["peer"] == "site-b"
        assert consumers[new_address]["mode"] == "journal"
        # The old address's dirty map went with its cursor.
        assert not list(a.state.glob("vol.127.0.0.1_*.dirty"))
        assert file_hash(a.images["vol"], 64 * MiB) == file_hash(b.images["vol"], 64 * MiB)


def test_a_different_unit_at_a_known_address_is_bound_anew(tmp_path: Path) -> None:
    """The other side of binding by name: the cursor at an address now answered by another
    unit becomes that unit's, and the new unit gets every region (here its replica is empty;
    tests/unit/journal/test_consumers.py covers a different unit that claims the volume)."""
    require_commands("fio")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        address = peer_address(b)
        a = topo.add_primary("site-a", peers=[address])
        b.start()
        unit_a = a.start()
        fio_write(unit_a.export_url("vol"), tmp_path, size="4M", seed=3)
        wait_caught_up(a, b)
        assert b.unit is not None
        b.unit.terminate()
        unit_a.terminate()

        # Another unit (an empty replica) now listens on B's port.
        c = topo.add_secondary("site-c")
        assert c.listen_port is not None
        text = c.config.read_text().replace(f":{c.listen_port}", f":{b.listen_port}")
        c.config.write_text(text)
        c.listen_port = b.listen_port
        c.start()
        a.start()
        wait_caught_up(a, c)
        peer = find_peer(a, address)
        assert peer["sync_bytes_sent"] > 0, peer
        consumer = a.volume_status()["journal"]["consumers"][address]
        assert consumer["peer"] == "site-c"
        assert file_hash(a.images["vol"], 64 * MiB) == file_hash(c.images["vol"], 64 * MiB)
