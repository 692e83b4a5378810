"""The archive under faults (issue 14), against a real S3 server of each test's own.

What must not be lost, in every case: no write acknowledged to the host (the volume holds them
all, and the newest point restored from the archive equals the volume byte for byte), and no
point silently wrong: after recovery the chain is continuous, or its gap is reported and a
restore into the gap is refused.

- ``kill -9`` of the unit while a segment is on its way (the store's link is throttled, so the
  upload is provably in flight): after a restart the chain has no gap and no overlap.
- The store stopped for a minute under host writes: status says ``stalled`` and why, the
  journal holds the records, and every point of that minute restores exactly afterwards.
- The store denying writes while the journal overflows: ``stalled`` with the reason, then a
  gap the listing reports, a refused restore inside it, exact restores on both sides of it.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.archive import (
    add_archive,
    archive_cli,
    archive_list,
    archive_status,
    restore_from_archive,
    wait_archived,
    write_random,
)
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.history import WriteLog, check_image, logged_workload
from tests.support.pair import MiB, Site, topology, wait_status
from tests.support.seaweed import Seaweed, running_seaweed

pytestmark = pytest.mark.e2e

BUCKET = "faults"
SIZE = 32 * MiB


@pytest.fixture
def weed(tmp_path: Path) -> Iterator[Seaweed]:
    with running_seaweed(tmp_path / "s3", bucket=BUCKET) as server:
        yield server


def _stalled(site: Site, words: str) -> dict[str, object] | None:
    found = archive_status(site)
    if found["state"] == "stalled" and words in str(found["reason"]):
        return found
    return None


def test_kill_9_during_an_upload_leaves_a_continuous_chain(tmp_path: Path, weed: Seaweed) -> None:
    url = f"s3://{BUCKET}/kill"
    proxy = ThreadedFaultProxy(("127.0.0.1", weed.s3_port))
    proxy.start()
    try:
        with topology(tmp_path) as topo:
            a = topo.add_primary("site-a", peers=[], size=SIZE, journal_size="64MiB")
            add_archive(
                a,
                weed,
                url,
                endpoint=f"http://127.0.0.1:{proxy.port}",
                segment_size="8MiB",
                compression="none",
            )
            a.start()
            wait_archived(a)
            data = random.Random(9).randbytes(24 * MiB)
            sent_before = proxy.stats().bytes_up
            proxy.set_bandwidth(2 * MiB, "up")  # a segment of 8 MiB takes about 4 s
            write_random(a, 0, data)
            newest = int(a.volume_status()["journal"]["newest_seq"])
            wait_status(
                lambda: proxy.stats().bytes_up - sent_before > 2 * MiB,
                timeout=60,
                what="a segment upload under way",
            )
            mid = archive_status(a)
            assert mid["last_seq"] < newest, mid  # the upload in flight is not acknowledged
            a.kill()  # SIGKILL mid-upload
            proxy.clear()
            a.start()
            status = wait_archived(a)
            assert status["errors"] == 0 or status["state"] == "archiving", status
            final_seq = int(a.volume_status()["journal"]["newest_seq"])
            assert final_seq == newest, (final_seq, newest)
            a.kill()
        # Every write the host had acknowledged is on the volume.
        volume = a.images["vol"].read_bytes()
        assert volume[: len(data)] == data
    finally:
        proxy.stop()

    listing = archive_list(weed, url)
    [gen] = listing["generations"]
    assert gen["gaps"] == [] and gen["overlaps"] == [], gen
    assert gen["last_seq"] == newest, gen
    out = tmp_path / "newest.img"
    restore_from_archive(weed, url, out, "--seq", str(newest))
    check_image(out, volume, "the newest point after kill -9 mid-upload")
    report = archive_cli(weed, "verify", "vol", "--url", url)
    assert "0 problems" in report.stdout, report.stdout


def test_a_store_down_for_a_minute_loses_no_point(tmp_path: Path, weed: Seaweed) -> None:
    url = f"s3://{BUCKET}/outage"
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE)
        add_archive(a, weed, url)
        a.start()
        wait_archived(a)
        log = logged_workload(a, size=SIZE, count=50)
        wait_archived(a)
        weed.stop()
        began = time.monotonic()
        batch = 0
        while time.monotonic() - began < 60:
            batch += 1
            logged_workload(a, size=SIZE, count=40, seed=batch, log=log)
            time.sleep(1.0)
        status = wait_status(
            lambda: _stalled(a, "cannot be reached"), timeout=30, what="archive stalled"
        )
        journal = a.volume_status()["journal"]
        consumer = journal["consumers"]["archive:s3"]
        assert consumer["mode"] == "journal", journal  # the journal held every record
        assert float(str(status["lag_seconds"])) >= 30, status
        weed.start()
        weed.wait_writable(BUCKET)
        status = wait_archived(a, timeout=120)
        assert status["lag_seconds"] == 0, status
        a.kill()

    listing = archive_list(weed, url)
    [gen] = listing["generations"]
    assert gen["gaps"] == [], gen
    assert gen["last_seq"] == log.writes[-1].seq, gen
    rng = random.Random(60)
    for n in range(6):
        k = rng.randint(1, len(log.writes))
        out = tmp_path / f"p{n}.img"
        restore_from_archive(weed, url, out, "--seq", str(log.writes[k - 1].seq))
        check_image(out, log.image(k), f"the point after write {k} of {len(log.writes)}")
        out.unlink()


def _set_writes(weed: Seaweed, allowed: bool) -> None:
    """Let the unit's identity write, or only read, then restart the server."""
    path = weed.directory / "s3.json"
    doc = json.loads(path.read_text())
    for identity in doc["identities"]:
        if identity["name"] == "test":
            identity["actions"] = (
                ["Admin", "Read", "Write", "List", "Tagging"] if allowed else ["Read", "List"]
            )
    path.write_text(json.dumps(doc))
    weed.stop()
    weed.start()
    if allowed:
        weed.wait_writable(BUCKET)


def test_denied_writes_and_an_overflowing_journal_leave_a_reported_gap(
    tmp_path: Path, weed: Seaweed
) -> None:
    url = f"s3://{BUCKET}/denied"
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE, journal_size="8MiB")
        add_archive(a, weed, url)
        a.start()
        wait_archived(a)
        log = logged_workload(a, size=SIZE, count=60)
        wait_archived(a)
        before_gap = log.writes[-1].seq
        _set_writes(weed, allowed=False)
        data = random.Random(3).randbytes(16 * MiB)  # twice the journal: it must give up records
        write_random(a, 16 * MiB, data)
        wait_status(lambda: _stalled(a, "refuses writes"), timeout=60, what="archive stalled")
        consumer = a.volume_status()["journal"]["consumers"]["archive:s3"]
        assert consumer["mode"] == "tracking", consumer
        in_gap = int(a.volume_status()["journal"]["newest_seq"]) - 1
        _set_writes(weed, allowed=True)
        status = wait_archived(a, timeout=180, bases=2)
        assert status["gaps"], status
        after = logged_workload(a, size=SIZE, count=30, seed=5, log=WriteLog(log.run_id, SIZE))
        wait_archived(a)
        newest = after.writes[-1].seq
        a.kill()
        volume = a.images["vol"].read_bytes()
    assert volume[16 * MiB : 32 * MiB] == data  # acknowledged writes are on the volume

    listing = archive_list(weed, url)
    [gen] = listing["generations"]
    assert gen["gaps"], gen
    [(lo, hi)] = gen["gaps"]
    assert lo <= before_gap < hi and lo < in_gap < hi, (gen["gaps"], before_gap, in_gap)
    refused = archive_cli(
        weed, "restore", "vol", "--url", url, "--seq", str(in_gap), "--to",
        str(tmp_path / "gap.img"), check=False,
    )  # fmt: skip
    assert refused.returncode != 0, refused.stdout
    assert "gap" in refused.stderr, refused.stderr
    assert not (tmp_path / "gap.img").exists()
    out = tmp_path / "before.img"
    restore_from_archive(weed, url, out, "--seq", str(before_gap))
    check_image(out, log.image(len(log.writes)), "the point before the gap")
    out.unlink()
    out = tmp_path / "newest.img"
    restore_from_archive(weed, url, out, "--seq", str(newest))
    check_image(out, volume, "the newest point after the gap")
    assert os.path.getsize(out) == SIZE
