"""Roles are live state kept in the state directory; the configuration's role is where a new
volume starts (issue 9's contract, first part).

What must not be lost: the live role and the generation history across restarts, also when
the configuration's ``role`` no longer says the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blockmirror.journal.generations import load
from blockmirror.statedir import role_path
from tests.support.pair import peer_address, topology, wait_caught_up
from tests.support.unit_process import free_port

pytestmark = pytest.mark.e2e


def test_status_shows_live_role_configured_role_and_generations(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        b.start()
        a.start()
        wait_caught_up(a, b)
        primary = a.volume_status()
        assert (primary["role"], primary["configured_role"]) == ("primary", "primary")
        (first,) = primary["generations"]
        assert primary["generation"] == first["id"]
        assert (first["unit"], first["reason"], first["start_seq"]) == ("site-a", "created", 1)
        replica = b.volume_status()
        assert (replica["role"], replica["configured_role"]) == ("secondary", "secondary")
        # The secondary took its source's line as its own (learned, so its time is unknown).
        (received,) = replica["generations"]
        assert replica["generation"] == first["id"] == received["id"]
        assert (received["unit"], received["reason"], received["time_ns"]) == (
            "site-a",
            "received",
            0,
        )
        history = load(role_path(a.state, "vol"))
        assert history is not None and history.current is not None
        assert history.current.id == first["id"]


def test_the_live_role_wins_over_a_changed_configuration(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        # A listener, so that the configuration stays valid with role = "secondary".
        a = topo.add_primary("site-a", peers=[], replication={"listen": f"127.0.0.1:{free_port()}"})
        unit = a.start()
        before = a.volume_status()
        unit.terminate()
        text = a.config.read_text()
        assert 'role = "primary"' in text
        a.config.write_text(text.replace('role = "primary"', 'role = "secondary"'))
        a.start()
        after = a.volume_status()
        assert (after["role"], after["configured_role"]) == ("primary", "secondary")
        assert after["generations"] == before["generations"]
        assert after["read_only"] is False  # still the primary: the host may write


def test_a_damaged_role_file_keeps_the_volume_out_of_service(tmp_path: Path) -> None:
    """Bad input changes nothing: the volume is not served, status says why, the unit runs."""
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[])
        unit = a.start()
        unit.terminate()
        path = role_path(a.state, "vol")
        original = path.read_bytes()
        path.write_bytes(original.replace(b'"primary"', b'"secondary"'))
        a.start()
        status = a.volume_status()
        assert status["state"] == "failed"
        assert "role file" in status["problem"] and "crc32c" in status["problem"]
        assert path.read_bytes() == original.replace(b'"primary"', b'"secondary"')
