"""Live reconfiguration (issue 11): ``blockmirror reload`` and SIGHUP on real units.

What must hold, and is checked: a peer added under fio load syncs to an identical image while
fio sees no error (its NBD connection is never dropped); a removed peer's sender stops and its
journal cursor (and dirty map) is released, so the records it held are freed; a volume added by
a reload is served and one removed is closed; an export moved by a reload answers at its new
address; thresholds take effect; every applied configuration gets a new ``config_version``;
and a broken or restart-only file is refused naming each key, with nothing changed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockmirror.statedir import dirty_map_path
from tests.support.config_file import Document, edit_config, volume_entry
from tests.support.failover import cli
from tests.support.pair import (
    MiB,
    Site,
    fio_args,
    peer_address,
    qemu_img_compare,
    qemu_write,
    run_client,
    topology,
    wait_caught_up,
    wait_status,
)
from tests.support.unit_process import free_port, require_commands

pytestmark = pytest.mark.e2e

SIZE = 32 * MiB


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_commands("fio", "nbdinfo", "qemu-img")


def reload_cli(site: Site, *how: str) -> subprocess.CompletedProcess[str]:
    """``blockmirror reload`` against the site's unit (by --config unless ``how`` says)."""
    assert site.unit is not None
    return cli("reload", *(how or ("--config", str(site.config))))


def by_admin(site: Site) -> list[str]:
    """Reach the unit by its admin address and token file, not by its (maybe broken) file."""
    assert site.unit is not None
    return ["--admin", site.unit.admin, "--token-file", str(site.unit.admin_token_file)]


def config_version(site: Site) -> int:
    version = site.status()["config_version"]
    assert isinstance(version, int)
    return version


def until(site: Site, check: Callable[[dict[str, Any]], bool], what: str) -> None:
    wait_status(lambda: check(site.status()), timeout=30, what=what)


def peer_addresses(site: Site, volume: str = "vol") -> list[str]:
    return [p["address"] for p in site.volume_status(volume)["peers"]]


def test_add_a_peer_under_load_then_remove_it(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        c = topo.add_secondary("site-c", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        b.start()
        c.start()
        a.start()
        assert a.unit is not None
        wait_caught_up(a, b)
        first = config_version(a)
        assert first >= 1
        connects_before = a.status()["nbd"]

        # fio writes (and then verifies) over one NBD connection while the reload adds C.
        fio = subprocess.Popen(
            fio_args(a.unit.export_url("vol"), size="24MiB", iodepth=8),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        try:
            until(a, lambda s: s["volumes"][0]["counters"]["writes"] > 50, "fio's first writes")
            edit_config(
                a.config,
                lambda doc: volume_entry(doc)["peers"].append(peer_address(c)),
            )
            done = reload_cli(a)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"peer {peer_address(c)} added" in done.stdout, done.stdout
            out, _ = fio.communicate(timeout=120)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        assert fio.returncode == 0 and "err= 0" in out, out
        assert config_version(a) == first + 1
        assert peer_addresses(a) == [peer_address(b), peer_address(c)]
        # No host connection was dropped: fio's one connection is the only one ever made.
        nbd = a.status()["nbd"]
        assert nbd.get("refused_connections", 0) == connects_before.get("refused_connections", 0)
        wait_caught_up(a, b)
        wait_caught_up(a, c)
        qemu_img_compare(a.images["vol"], b.images["vol"])
        qemu_img_compare(a.images["vol"], c.images["vol"])

        # B goes away; writes while it is gone stay in the journal for it.
        b.kill()
        run_client(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 4M",
                a.unit.export_url("vol"),
            ]
        )
        wait_caught_up(a, c)
        held = a.volume_status()["journal"]
        assert held["consumers"][peer_address(b)]["backlog_records"] > 0, held
        map_path = dirty_map_path(a.state, "vol", peer_address(b))
        assert map_path.exists()
        edit_config(
            a.config,
            lambda doc: volume_entry(doc).__setitem__("peers", [peer_address(c)]),
        )
        done = reload_cli(a)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"peer {peer_address(b)} removed" in done.stdout, done.stdout
        assert config_version(a) == first + 2
        journal = a.volume_status()["journal"]
        assert list(journal["consumers"]) == [peer_address(c)]
        assert peer_addresses(a) == [peer_address(c)]
        assert not map_path.exists()
        # Released: nothing holds the records B never got, so the journal empties.
        until(a, lambda s: s["volumes"][0]["journal"]["records"] == 0, "the journal to empty")
        qemu_img_compare(a.images["vol"], c.images["vol"])


def test_refused_reloads_change_nothing(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        b.start()
        a.start()
        assert a.unit is not None
        wait_caught_up(a, b)
        version = config_version(a)
        before = a.volume_status()
        good = a.config.read_text()

        def broken(doc: Document) -> None:
            vol = volume_entry(doc)
            vol["journal_high_water"] = 2
            vol["bogus"] = 1
            vol["peers"] = ["not an address"]

        edit_config(a.config, broken)
        done = reload_cli(a, *by_admin(a))
        assert done.returncode != 0
        for key in ("volume[vol].journal_high_water", "volume[vol].bogus", "volume[vol].peers"):
            assert key in done.stderr, done.stderr
        assert "nothing was changed" in done.stderr

        # Valid, but only a restart can apply it.
        a.config.write_text(good)
        edit_config(a.config, lambda doc: volume_entry(doc).__setitem__("size", SIZE // 2))
        done = reload_cli(a)
        assert done.returncode != 0
        assert "volume[vol].size: changes only at a restart" in done.stderr, done.stderr

        # SIGHUP with a broken file: logged with the key, and the unit runs on.
        a.config.write_text(good.replace("[[volume]]", "[[volume]]\nsurprise = true", 1))
        os.kill(a.unit.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in a.unit.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "volume[vol].surprise" in a.unit.log()
        assert a.unit.proc.poll() is None
        after = a.volume_status()
        assert config_version(a) == version
        assert after["journal"]["high_water"] == before["journal"]["high_water"]
        assert [p["address"] for p in after["peers"]] == [peer_address(b)]
        assert after["state"] == "serving"

        # The good file again, with a new mark, by SIGHUP: applied.
        a.config.write_text(good)
        edit_config(a.config, lambda doc: volume_entry(doc).__setitem__("journal_high_water", 0.5))
        os.kill(a.unit.pid, signal.SIGHUP)
        until(a, lambda s: s["volumes"][0]["journal"]["high_water"] == 0.5, "the new mark")
        assert config_version(a) == version + 1


def _second_volume(tmp_path: Path, port: int) -> dict[str, Any]:
    image = tmp_path / "second.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    return {
        "name": "second",
        "role": "primary",
        "path": str(image),
        "size": 8 * MiB,
        "export": f"127.0.0.1:{port}",
        "journal_size": "4MiB",
    }


def test_add_and_remove_a_volume_and_move_an_export(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        b.start()
        a.start()
        assert a.unit is not None
        wait_caught_up(a, b)
        version = config_version(a)
        port = free_port()
        edit_config(a.config, lambda doc: doc["volume"].append(_second_volume(tmp_path, port)))
        done = reload_cli(a)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "volume second added" in done.stdout
        names = [v["name"] for v in a.status()["volumes"]]
        assert names == ["vol", "second"]
        info = run_client(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/second"])
        assert info.returncode == 0 and info.stdout.strip() == str(8 * MiB), info.stderr
        write = run_client(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", f"nbd://127.0.0.1:{port}/second"]
        )
        assert write.returncode == 0, write.stderr

        # Move the first volume's export; the second goes away.
        moved = free_port()

        def change(doc: Document) -> None:
            volume_entry(doc)["export"] = f"127.0.0.1:{moved}"
            doc["volume"] = [v for v in doc["volume"] if v["name"] != "second"]

        edit_config(a.config, change)
        done = reload_cli(a)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "volume second removed" in done.stdout
        assert config_version(a) == version + 2
        assert [v["name"] for v in a.status()["volumes"]] == ["vol"]
        assert a.volume_status()["export"] == f"127.0.0.1:{moved}"
        gone = run_client(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/second"])
        assert gone.returncode != 0
        info = run_client(["nbdinfo", "--size", f"nbd://127.0.0.1:{moved}/vol"])
        assert info.returncode == 0 and info.stdout.strip() == str(SIZE), info.stderr
        # The removed volume was closed durably: its data is in its file.
        with open(tmp_path / "second.img", "rb") as f:
            assert f.read(MiB) == b"\x11" * MiB
        # The replication of the first volume was not disturbed.
        wait_caught_up(a, b)
        qemu_img_compare(a.images["vol"], b.images["vol"])


def test_a_peer_that_moved_keeps_its_position(tmp_path: Path) -> None:
    """A peer's address changed (its unit moved to another port): the reload that swaps the
    addresses keeps the old cursor for the new address, so the peer gets what it lacks from
    the journal, not a full copy."""
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        b.start()
        a.start()
        assert a.unit is not None and b.unit is not None
        wait_caught_up(a, b)
        old = peer_address(b)
        assert b.unit.terminate() == 0
        qemu_write(a, 0x77, 0, "1M")  # while it moves: kept in the journal for it
        b.listen_port = free_port()
        edit_config(b.config, lambda doc: doc["replication"].__setitem__("listen", peer_address(b)))
        b.start()
        edit_config(a.config, lambda doc: volume_entry(doc).__setitem__("peers", [peer_address(b)]))
        done = reload_cli(a)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (
            f"peer {old} removed" in done.stdout and f"peer {peer_address(b)} added" in done.stdout
        )
        wait_caught_up(a, b)
        peer = a.volume_status()["peers"][0]
        assert peer["address"] == peer_address(b)
        assert peer["sync_bytes_sent"] == 0, peer  # the journal's records, no resync
        until(
            a,
            lambda s: list(s["volumes"][0]["journal"]["consumers"]) == [peer_address(b)],
            "the old cursor to be handed over",
        )
        qemu_img_compare(a.images["vol"], b.images["vol"])
