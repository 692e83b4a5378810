"""Configuration copies and a lost configuration (issue 11), on real units.

What must hold: each unit keeps the configuration of the units it links with, as they applied
it (byte for byte, with its version), and a newer version after a reload; a unit started after
its file was deleted stays up serving nothing, raises ``config-lost``, and gets its file back
from a peer's copy (``blockmirror config fetch``), after which a reload starts it for real: it
serves its volume again and its replica catches up, identical.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.alerting import alerts_table, receivers, set_alerts, until
from tests.support.config_file import edit_config, volume_entry
from tests.support.events import recent_events
from tests.support.failover import cli
from tests.support.pair import (
    MiB,
    Site,
    peer_address,
    qemu_img_compare,
    run_client,
    topology,
    wait_caught_up,
    wait_status,
)
from tests.support.unit_process import admin_request, start_unit

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:Session.login_data is deprecated"),
]

SIZE = 16 * MiB


def kept(site: Site, unit: str) -> dict[str, Any] | None:
    assert site.unit is not None
    code, doc = admin_request(site.unit, "GET", f"/api/peer-configs?unit={unit}")
    return doc if code == 200 else None


def wait_kept(site: Site, unit: str, version: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        doc = kept(site, unit)
        return doc if doc is not None and doc["config_version"] == version else None

    return wait_status(check, timeout=30, what=f"{site.name} to keep {unit} version {version}")


def test_copies_are_kept_and_a_lost_config_comes_back_from_a_peer(tmp_path: Path) -> None:
    with receivers(tmp_path / "rx") as r, topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        set_alerts(a, alerts_table(tmp_path, r))
        b.start()
        a.start()
        assert a.unit is not None and b.unit is not None
        wait_caught_up(a, b)
        original = a.config.read_bytes()
        copy = wait_kept(b, "site-a", 1)
        assert copy["text"].encode() == original and copy["unit"] == "site-a"
        assert wait_kept(a, "site-b", 1)["text"].encode() == b.config.read_bytes()
        listed = admin_request(b.unit, "GET", "/api/peer-configs")[1]["peer_configs"]
        assert [c["unit"] for c in listed] == ["site-a"]
        # Copies are credentials' business: no token, no copy.
        assert admin_request(b.unit, "GET", "/api/peer-configs", token="wrong")[0] == 401

        # A reload hands the new version over.
        edit_config(a.config, lambda doc: volume_entry(doc).__setitem__("description", "db v2"))
        done = cli("reload", "--config", str(a.config))
        assert done.returncode == 0, done.stderr
        v2 = a.config.read_bytes()
        assert wait_kept(b, "site-a", 2)["text"].encode() == v2

        # The file is lost while the unit is down.
        assert a.unit.terminate() == 0
        a.config.unlink()
        refused = cli("run", str(a.config))
        assert refused.returncode == 2 and "--state-dir" in refused.stderr
        a.unit = start_unit_lost(a)
        status = a.status()
        assert "cannot be read" in status["config_lost"]
        assert status["volumes"] == [] and status["replication"] is None
        assert [e["event"] for e in status["events"]] == ["config-lost"]
        lost = recent_events(a.unit)["active"][0]
        assert lost["volume"] is None and "serving nothing" in lost["message"]
        # The targets the state directory remembers hear of it, by trap and by mail.
        until(lambda: r.trap_events("config-lost", "raised"), "a config-lost trap")
        until(lambda: r.mails("config-lost", "raised"), "a config-lost mail")
        assert a.unit.runtime["exports"] == {}
        own_token = ["--admin", a.unit.admin, "--token-file", str(a.unit.admin_token_file)]
        problems = cli("status", "-x", *own_token)
        assert problems.returncode == 1 and "configuration" in problems.stdout, problems.stdout

        # A reload before the file is back changes nothing.
        early = cli("reload", *own_token)
        assert early.returncode != 0 and "cannot read" in early.stderr

        fetched = cli(
            "config",
            "fetch",
            "--from",
            b.unit.admin,
            "--unit",
            "site-a",
            "--token-file",
            str(b.unit.admin_token_file),
            "--output",
            str(a.config),
        )
        assert fetched.returncode == 0, fetched.stderr
        assert "version 2" in fetched.stdout
        assert a.config.read_bytes() == v2
        unknown = cli(
            "config",
            "fetch",
            "--from",
            b.unit.admin,
            "--unit",
            "site-z",
            "--token-file",
            str(b.unit.admin_token_file),
        )
        assert unknown.returncode == 1 and "keeps no configuration" in unknown.stderr

        pid = a.unit.pid
        admin_before = a.unit.admin
        restored = cli(
            "reload", "--admin", admin_before, "--token-file", str(a.unit.admin_token_file)
        )
        assert restored.returncode == 0, restored.stderr
        # The same process starts for real: it serves its volume and links again.
        a.unit.runtime = wait_runtime_with_exports(a, pid)
        assert a.unit.pid == pid
        assert a.volume_status()["state"] == "serving"
        assert a.status()["config_lost"] is None and a.status()["config_version"] == 2
        until(lambda: r.trap_events("config-lost", "cleared"), "the config-lost clear trap")
        assert len(r.trap_events("config-lost", "raised")) == 1
        write = run_client(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 2M", a.unit.export_url("vol")]
        )
        assert write.returncode == 0, write.stderr
        wait_caught_up(a, b)
        qemu_img_compare(a.images["vol"], b.images["vol"])


def start_unit_lost(site: Site) -> Any:
    """``blockmirror run CONFIG --state-dir DIR`` for a site whose file is gone."""
    return start_unit(site.config, site.state, extra_args=["--state-dir", str(site.state)])


def wait_runtime_with_exports(site: Site, pid: int) -> dict[str, Any]:
    import json

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            runtime = json.loads((site.state / "unit.json").read_text())
        except (FileNotFoundError, ValueError):
            runtime = {}
        if runtime.get("pid") == pid and runtime.get("exports"):
            return dict(runtime)
        time.sleep(0.05)
    raise AssertionError("the restored unit did not come up")
