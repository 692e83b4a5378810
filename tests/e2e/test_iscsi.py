"""The iSCSI target (issue 12) with libiscsi's tools, qemu-img and iscsi-test-cu, on real units.

What must hold: the target is discovered and reports the volume's identity and size, with and
without CHAP, and a wrong CHAP secret is refused; an image written through iSCSI is the volume
byte for byte and reaches the secondary; and in libiscsi's conformance suite our target fails
no more tests than Debian's tgtd in each family, run side by side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.config_file import Document, edit_config
from tests.support.iscsi import conformance, run, tgtd_target
from tests.support.pair import (
    MiB,
    Site,
    peer_address,
    qemu_img_compare,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import free_port, require_commands

pytestmark = pytest.mark.e2e

SIZE = 64 * MiB
BASE = "iqn.2026-12.org.example:site-a"
TARGET = f"{BASE}:vol"


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_commands("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "qemu-img")


def serve_iscsi(site: Site, **table: Any) -> int:
    port = free_port()

    def change(doc: Document) -> None:
        doc["iscsi"] = {"listen": f"127.0.0.1:{port}", "base_iqn": BASE, **table}
        for volume in doc["volume"]:
            volume["iscsi"] = True

    edit_config(site.config, change)
    return port


def secret(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def test_discovery_identity_and_size(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE)
        port = serve_iscsi(a)
        a.start()
        portal = f"iscsi://127.0.0.1:{port}"
        listed = run(["iscsi-ls", "-s", portal], timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert f"Target:{TARGET} Portal:127.0.0.1:{port},1" in listed.stdout, listed.stdout
        assert "DIRECT_ACCESS" in listed.stdout
        inq = run(["iscsi-inq", f"{portal}/{TARGET}/0"], timeout=30)
        assert inq.returncode == 0 and "Peripheral Device Type:DIRECT_ACCESS" in inq.stdout
        serial = run(["iscsi-inq", "-e", "1", "-c", "128", f"{portal}/{TARGET}/0"], timeout=30)
        assert serial.returncode == 0 and "Unit Serial Number" in serial.stdout, serial.stdout
        cap = run(["iscsi-readcapacity16", f"{portal}/{TARGET}/0"], timeout=30)
        assert cap.returncode == 0 and f"Total size:{SIZE}" in cap.stdout, cap.stdout
        status = a.volume_status()
        assert status["iscsi"]["target"] == TARGET
        unknown = run(["iscsi-inq", f"{portal}/{BASE}:nope/0"], timeout=30)
        assert unknown.returncode != 0


def test_chap_is_required_and_checked(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE)
        port = serve_iscsi(
            a,
            chap_user="host1",
            chap_secret_file=secret(tmp_path, "chap.secret", "a-long-chap-secret"),
        )
        a.start()
        target = f"127.0.0.1:{port}/{TARGET}/0"
        good = run(["iscsi-readcapacity16", f"iscsi://host1%a-long-chap-secret@{target}"])
        assert good.returncode == 0 and f"Total size:{SIZE}" in good.stdout, good.stderr
        wrong = run(["iscsi-readcapacity16", f"iscsi://host1%not-the-secret!!@{target}"])
        assert wrong.returncode != 0
        anonymous = run(["iscsi-readcapacity16", f"iscsi://{target}"])
        assert anonymous.returncode != 0
        assert "login from" in (a.unit.log() if a.unit else "")
        # The unit serves on after the refusals.
        again = run(["iscsi-readcapacity16", f"iscsi://host1%a-long-chap-secret@{target}"])
        assert again.returncode == 0


def test_an_image_written_by_iscsi_is_the_volume_and_reaches_the_secondary(
    tmp_path: Path,
) -> None:
    image = tmp_path / "random.img"
    image.write_bytes(os.urandom(SIZE))
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        port = serve_iscsi(a)
        b.start()
        a.start()
        wait_caught_up(a, b)
        url = f"iscsi://127.0.0.1:{port}/{TARGET}/0"
        done = run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url])
        assert done.returncode == 0, done.stderr
        same = run(["qemu-img", "compare", "-f", "raw", str(image), url])
        assert same.returncode == 0, same.stdout + same.stderr
        wait_caught_up(a, b)
        qemu_img_compare(image, a.images["vol"])
        qemu_img_compare(image, b.images["vol"])
        counters = a.volume_status()["counters"]
        assert counters["bytes_written"] >= SIZE


def test_conformance_is_no_worse_than_tgtd(tmp_path: Path) -> None:
    require_commands("iscsi-test-cu", "tgtd")
    scratch = tmp_path / "tgtd.img"
    with open(scratch, "wb") as f:
        f.truncate(SIZE)
    rows: dict[str, dict[str, Any]] = {}
    with tgtd_target(scratch) as baseline:
        for family in ("iSCSI", "SCSI"):
            rows[f"tgtd {family}"] = {"r": conformance(baseline.url, family, tmp_path)}
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE)
        port = serve_iscsi(a)
        a.start()
        url = f"iscsi://127.0.0.1:{port}/{TARGET}/0"
        for family in ("iSCSI", "SCSI"):
            rows[f"blockmirror {family}"] = {"r": conformance(url, family, tmp_path)}
        assert a.volume_status()["state"] == "serving"
    for name, row in rows.items():
        print(f"{name}: {row['r'].row()}; failed: {', '.join(row['r'].failed) or 'none'}")
    for family in ("iSCSI", "SCSI"):
        ours, theirs = rows[f"blockmirror {family}"]["r"], rows[f"tgtd {family}"]["r"]
        assert len(ours.outcomes) > 10, ours.outcomes  # the suite really ran
        assert ours.count("fail") <= theirs.count("fail"), (family, ours.failed, theirs.failed)
