"""A primary whose volume file was restored from an older copy refuses to serve it until an
operator adopts it; after adopting, the replica converges on the adopted content (issue 7,
point 10; invariants 4, 8 and 9).

Before the fix, the restored volume was served and the secondary kept its newer blocks: both
sides said consistent while 50-100 blocks differed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_journal_controls import cli
from tests.support.pair import (
    MiB,
    Site,
    fio_write,
    peer_address,
    qemu_img_compare,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.e2e


def restore_in_place(backup: Path, image: Path) -> None:
    """Copy the backup's bytes over the volume file (as `dd` or a restore tool does): the inode
    stays the same, so no metadata tells the two apart."""
    inode = image.stat().st_ino
    with backup.open("rb") as src, image.open("r+b") as dst:
        shutil.copyfileobj(src, dst, 4 * MiB)
        dst.flush()
        os.fsync(dst.fileno())
    assert image.stat().st_ino == inode


def stop(site: Site) -> None:
    assert site.unit is not None
    assert site.unit.terminate() == 0, site.unit.log()


def test_a_restored_older_volume_is_refused_until_adopted(tmp_path: Path) -> None:
    require_commands("fio", "qemu-img")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", journal_size="16MiB")
        a = topo.add_primary("site-a", peers=[peer_address(b)], journal_size="16MiB")
        image = a.images["vol"]
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        fio_write(primary.export_url("vol"), tmp_path, size="8M", seed=1, verify=False)
        wait_caught_up(a, b)
        stop(a)
        backup = tmp_path / "backup.img"
        shutil.copyfile(image, backup)

        primary = a.start()
        fio_write(primary.export_url("vol"), tmp_path, size="8M", seed=2, verify=False)
        wait_caught_up(a, b)
        stop(a)
        newer = tmp_path / "newer.img"
        shutil.copyfile(image, newer)

        restore_in_place(backup, image)
        primary = a.start()
        vol = a.volume_status()
        assert vol["state"] == "failed", vol
        assert vol["export"] is None
        assert "not the one this journal was written for" in vol["problem"], vol["problem"]
        assert "blockmirror volume adopt" in vol["problem"]
        assert vol["peers"] == []  # nothing is sent from a refused volume
        # The replica keeps the newer content; nothing was replayed into the restored file.
        qemu_img_compare(b.images["vol"], newer)
        assert image.read_bytes() == backup.read_bytes()

        # Adopting needs the unit stopped.
        running = cli("volume", "adopt", str(a.config), "vol", "--yes")
        assert running.returncode == 1 and "stop it first" in running.stderr, running
        stop(a)
        unconfirmed = cli("volume", "adopt", str(a.config), "vol")
        assert unconfirmed.returncode == 2 and "nothing was changed" in unconfirmed.stderr
        adopted = cli("volume", "adopt", str(a.config), "vol", "--yes")
        assert adopted.returncode == 0, adopted.stdout + adopted.stderr
        assert "full resync" in adopted.stdout
        assert "(unproven-start) begins at seq" in adopted.stdout, adopted.stdout

        a.start()
        vol = a.volume_status()
        assert vol["state"] == "serving", vol
        # Nothing proves the adopted content continues the old line: a new generation.
        assert [g["reason"] for g in vol["generations"]] == ["created", "unproven-start"]
        rep = wait_caught_up(a, b, timeout=90)
        assert rep["replica"]["consistent"]
        assert rep["generation"] == vol["generation"]
        # The adopted content everywhere: the restored copy, byte for byte, on both sides.
        qemu_img_compare(image, backup)
        qemu_img_compare(b.images["vol"], backup)
        assert b.unit is not None
        assert "identity-mismatch" not in b.unit.log()


def test_a_wrong_path_is_refused_and_says_why(tmp_path: Path) -> None:
    """A typo in `path` makes a new empty file under the existing journal: refused."""
    require_commands("fio")
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", journal_size="16MiB")
        a = topo.add_primary("site-a", peers=[peer_address(b)], journal_size="16MiB")
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        fio_write(primary.export_url("vol"), tmp_path, size="4M", seed=3, verify=False)
        wait_caught_up(a, b)
        stop(a)
        text = a.config.read_text()
        typo = a.images["vol"].with_name("vol.imgg")
        a.config.write_text(text.replace(str(a.images["vol"]), str(typo)))
        a.start()
        vol = a.volume_status()
        assert vol["state"] == "failed", vol
        assert "not the one this journal was written for" in vol["problem"], vol["problem"]
        stop(a)
        # The right path again: served as before, nothing to resync.
        a.config.write_text(text)
        a.start()
        assert a.volume_status()["state"] == "serving"
        wait_caught_up(a, b)
        qemu_img_compare(a.images["vol"], b.images["vol"])
