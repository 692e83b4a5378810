"""Live settings by reload (issue 11), each seen where it acts, and key rotation.

What must hold: keys are read again at every reload (a rewritten key file is a new key, used
from the next connection, while the open link goes on); admin access, NBD limits, the export's
description, history retention, the overflow policy and a replica's replay delay change live.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.config_file import Document, edit_config, volume_entry
from tests.support.failover import cli
from tests.support.pair import (
    MiB,
    Site,
    fio_write,
    peer_address,
    qemu_img_compare,
    qemu_write,
    run_client,
    topology,
    wait_caught_up,
    wait_status,
)
from tests.support.unit_process import admin_request

pytestmark = pytest.mark.e2e

SIZE = 16 * MiB


def reload(site: Site) -> subprocess.CompletedProcess[str]:
    done = cli("reload", "--config", str(site.config))
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def write_key(path: Path) -> None:
    path.write_text(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)


def test_keys_are_rotated_by_rewriting_their_file(tmp_path: Path) -> None:
    key = tmp_path / "link.key"
    write_key(key)
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE}, replication={"psk_file": str(key)})
        a = topo.add_primary(
            "site-a", peers=[peer_address(b)], size=SIZE, replication={"psk_file": str(key)}
        )
        b.start()
        a.start()
        wait_caught_up(a, b)
        connects = a.volume_status()["peers"][0]["connects"]
        write_key(key)  # the same path, a new key
        for site in (a, b):
            done = reload(site)
            assert "replication.psk_file: a new key" in done.stdout, done.stdout
        # The open link keeps its session: no reconnect, and records still flow.
        qemu_write(a, 0x61, 0, "1M")
        wait_caught_up(a, b)
        assert a.volume_status()["peers"][0]["connects"] == connects
        # The next connection authenticates with the new key, on both ends.
        b.kill()
        b.start()
        qemu_write(a, 0x62, MiB, "1M")
        wait_caught_up(a, b)
        assert a.volume_status()["peers"][0]["connects"] == connects + 1
        qemu_img_compare(a.images["vol"], b.images["vol"])
        # B's copy of A's configuration came over the old key: it still takes A's next one.
        assert b.unit is not None
        edit_config(a.config, lambda doc: volume_entry(doc).__setitem__("description", "v2"))
        reload(a)

        def kept_version() -> int | None:
            assert b.unit is not None
            code, doc = admin_request(b.unit, "GET", "/api/peer-configs?unit=site-a")
            return doc["config_version"] if code == 200 and doc["config_version"] == 2 else None

        wait_status(kept_version, timeout=30, what="B to keep A's version 2")
        assert "over another credential" not in b.unit.log()


def test_live_settings_take_effect(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE, extra={"history": "10m"})
        b.start()
        a.start()
        assert a.unit is not None and b.unit is not None
        wait_caught_up(a, b)
        url = f"http://{a.unit.admin}/api/status"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401

        def change(doc: Document) -> None:
            doc["unit"]["admin_public_status"] = True
            doc["unit"]["nbd_max_connections"] = 7
            vol = volume_entry(doc)
            vol["description"] = "the database, v2"
            vol["history"] = "1h"
            vol["overflow"] = "block"

        edit_config(a.config, change)
        done = reload(a)
        for key in ("admin_public_status", "nbd_max_connections", "description", "history"):
            assert key in done.stdout, done.stdout
        with urllib.request.urlopen(url, timeout=5) as response:
            public = json.loads(response.read())
        assert public["nbd"]["max_connections"] == 7
        vol = a.volume_status()
        assert vol["history"]["retention_seconds"] == 3600
        assert vol["journal"]["overflow"] == "block"
        info = run_client(["nbdinfo", "--json", a.unit.export_url("vol")])
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["exports"][0]["description"] == "the database, v2"

        # A replica's replay delay, by a reload of the secondary.
        edit_config(b.config, lambda doc: volume_entry(doc).__setitem__("replay_delay", "1h"))
        assert "replay_delay" in reload(b).stdout
        qemu_write(a, 0x71, 0, "64k")
        wait_status(
            lambda: (b.volume_status()["replica"].get("delayed_records") or 0) > 0 or None,
            timeout=30,
            what="records held back by the new replay_delay",
        )
        assert b.volume_status()["replica"]["replay_delay_seconds"] == 3600


def test_a_bandwidth_limit_paces_the_link_and_a_reload_changes_it(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary(
            "site-a",
            peers=[peer_address(b)],
            size=SIZE,
            replication={"bandwidth": "4Mbit"},
        )
        # The peer's own limit overrides the default.
        edit_config(
            a.config,
            lambda doc: volume_entry(doc).__setitem__(
                "peers", [{"address": peer_address(b), "bandwidth": "16Mbit"}]
            ),
        )
        b.start()
        a.start()
        wait_caught_up(a, b)
        assert a.volume_status()["peers"][0]["rate_limit"] == 16_000_000
        started = time.monotonic()
        # Writes of 64 KiB: the limit paces whole records, so small ones show it closely.
        assert a.unit is not None
        fio_write(a.unit.export_url("vol"), tmp_path, size="8MiB", bs="64k", iodepth=4)
        wait_caught_up(a, b)
        paced = time.monotonic() - started
        # 8 MiB at 2 MB/s (less one burst) take at least about 4 s; only a lower bound is
        # asserted: a slow machine can only take longer.
        assert paced >= 3.0, paced
        # No limit for this peer now, by a reload: the same amount goes at the link's speed.
        edit_config(
            a.config,
            lambda doc: volume_entry(doc).__setitem__(
                "peers", [{"address": peer_address(b), "bandwidth": "none"}]
            ),
        )
        done = reload(a)
        assert "peer_links" in done.stdout, done.stdout
        assert a.volume_status()["peers"][0]["rate_limit"] is None
        started = time.monotonic()
        fio_write(a.unit.export_url("vol"), tmp_path, size="8MiB", bs="64k", iodepth=4, seed=2)
        wait_caught_up(a, b)
        print(f"8 MiB at 16 Mbit/s: {paced:.1f} s; unlimited: {time.monotonic() - started:.1f} s")
        # Back to the default, which the unit applies to a peer without its own limit.
        edit_config(a.config, lambda doc: volume_entry(doc).__setitem__("peers", [peer_address(b)]))
        reload(a)
        assert a.volume_status()["peers"][0]["rate_limit"] == 4_000_000
        # And by hand, on the live link: `link set` (until the next reload).
        where = ["--config", str(a.config)]
        done = cli("link", "set", "vol", peer_address(b), "--bandwidth", "2Mbit", *where)
        assert done.returncode == 0 and "2 Mbit/s" in done.stdout, done.stdout + done.stderr
        assert a.volume_status()["peers"][0]["rate_limit"] == 2_000_000
        bad = cli("link", "set", "vol", peer_address(b), "--bandwidth", "fast", *where)
        assert bad.returncode == 1 and "invalid bandwidth" in bad.stderr, bad.stderr
        nobody = cli("link", "set", "vol", "127.0.0.1:1", "--bandwidth", "none", *where)
        assert nobody.returncode == 1 and "no peer" in nobody.stderr, nobody.stderr
        assert (
            a.volume_status()["peers"][0]["rate_limit"] == 2_000_000
        )  # the refusals changed nothing
        done = cli("link", "set", "vol", peer_address(b), "--bandwidth", "none", *where)
        assert done.returncode == 0 and "limit none" in done.stdout
        assert a.volume_status()["peers"][0]["rate_limit"] is None
        qemu_img_compare(a.images["vol"], b.images["vol"])
