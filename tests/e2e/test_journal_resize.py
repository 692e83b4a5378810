"""``blockmirror journal resize``: a new journal size without breaking replication (issue 7,
point 11; invariants 4 and 6).

The old procedure (stop, remove the journal, start) gave the volume a new identity, and the
secondary answered ``identity-mismatch`` forever. The resize keeps the volume's identity and the
peer's cursor: records the peer has not acknowledged are copied into the new ring, or, when they
do not fit a smaller one, turned into dirty bits, so the peer streams on or resyncs only those
regions.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.test_journal_controls import cli
from tests.support.pair import (
    MiB,
    Site,
    find_peer,
    fio_write,
    peer_address,
    qemu_img_compare,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.e2e


def stop(site: Site) -> None:
    assert site.unit is not None
    assert site.unit.terminate() == 0, site.unit.log()


def set_journal_size(site: Site, size: str) -> None:
    text = site.config.read_text()
    new, count = re.subn(r'^journal_size = ".*"$', f'journal_size = "{size}"', text, flags=re.M)
    assert count == 1, text
    site.config.write_text(new)


def resize(site: Site, size: str) -> str:
    proc = cli("journal", "resize", str(site.config), "vol", size)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_resizing_the_journal_keeps_replication_going(tmp_path: Path) -> None:
    require_commands("fio", "qemu-img")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", journal_size="16MiB")
        a = topo.add_primary("site-a", peers=[peer_address(b)], journal_size="16MiB")
        journal = a.state / "vol.journal"
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        fio_write(primary.export_url("vol"), tmp_path, size="8M", seed=1, verify=False)
        wait_caught_up(a, b)
        volume_id = a.volume_status()["journal"]["volume_id"]

        # Refused while the unit runs: nothing changes.
        running = cli("journal", "resize", str(a.config), "vol", "32MiB")
        assert running.returncode == 1 and "stop it first" in running.stderr, running
        assert journal.stat().st_size == 16 * MiB

        # Bigger, with records the peer has not acknowledged yet (it is down): copied.
        stop(b)
        fio_write(primary.export_url("vol"), tmp_path, size="4M", seed=2, verify=False)
        stop(a)
        out = resize(a, "32MiB")
        assert "records still needed by a consumer copied" in out, out
        assert "set journal_size" in out
        assert journal.stat().st_size == 32 * MiB
        set_journal_size(a, "32MiB")
        b.start()
        primary = a.start()
        assert a.volume_status()["journal"]["volume_id"] == volume_id
        fio_write(primary.export_url("vol"), tmp_path, size="4M", seed=3, verify=False)
        rep = wait_caught_up(a, b)
        assert rep["replica"]["consistent"]
        qemu_img_compare(a.images["vol"], b.images["vol"])
        peer = find_peer(a, peer_address(b))
        assert peer["state"] == "replicating"
        assert a.unit is not None
        # Every record it lacked was still in the (new) journal: streamed, nothing resynced.
        assert "resync of" not in a.unit.log(), a.unit.log()

        # Smaller than what the peer still lacks: the oldest records become dirty bits.
        stop(b)
        fio_write(primary.export_url("vol"), tmp_path, size="12M", seed=4, verify=False)
        stop(a)
        out = resize(a, "2MiB")
        assert "turned into dirty bits" in out, out
        assert journal.stat().st_size == 2 * MiB
        set_journal_size(a, "2MiB")
        b.start()
        primary = a.start()
        assert a.volume_status()["journal"]["volume_id"] == volume_id
        fio_write(primary.export_url("vol"), tmp_path, size="1M", seed=5, verify=False)
        rep = wait_caught_up(a, b, timeout=90)
        assert rep["replica"]["consistent"]
        qemu_img_compare(a.images["vol"], b.images["vol"])
        assert a.unit is not None
        log = a.unit.log()
        # Only the regions of the records that did not fit are copied, never the whole volume.
        assert "dirty-region resync of" in log and "full resync" not in log, log

        # Never a refusal for identity on either side.
        assert a.unit is not None and b.unit is not None
        for site in (a, b):
            assert site.unit is not None
            assert "identity-mismatch" not in site.unit.log(), site.unit.log()
        stop(a)
        stop(b)
        for site in (a, b):
            assert site.unit is not None
            assert "identity-mismatch" not in site.unit.log()


def test_resize_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], journal_size="16MiB")
        a.start()
        stop(a)
        same = cli("journal", "resize", str(a.config), "vol", "16MiB")
        assert same.returncode == 1 and "already" in same.stderr
        tiny = cli("journal", "resize", str(a.config), "vol", "64KiB")
        assert tiny.returncode == 1 and "minimum" in tiny.stderr
        unknown = cli("journal", "resize", str(a.config), "nope", "32MiB")
        assert unknown.returncode == 1 and "no volume named" in unknown.stderr
        bad = cli("journal", "resize", str(a.config), "vol", "lots")
        assert bad.returncode == 2
        assert (a.state / "vol.journal").stat().st_size == 16 * MiB
