"""The archive on a real S3 server (SeaweedFS ``weed mini``, authentication on), issue 14.

What must hold: any archived point, named by sequence number, time or bookmark, restored from
the archive alone (no unit, a fresh directory) equals the volume after exactly that prefix of
the host's writes; the listing shows the chain; verify finds nothing wrong in a sound archive.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from blockmirror.archive import objects as fmt
from tests.e2e.test_metrics import scrape
from tests.support.archive import (
    add_archive,
    archive_cli,
    archive_list,
    archive_status,
    restore_from_archive,
    wait_archived,
    write_random,
)
from tests.support.failover import cli, role_change, symmetric, wait_role
from tests.support.history import WriteLog, check_image, check_prefix, iso, logged_workload
from tests.support.pair import (
    MiB,
    Site,
    find_peer,
    peer_address,
    topology,
    wait_caught_up,
    wait_status,
)
from tests.support.seaweed import Seaweed, seaweed_fixture

pytestmark = pytest.mark.e2e

BUCKET = "archive"
SIZE = 8 * MiB
# Every test here shares one server: room for all of them (weed frees deleted objects' space
# only when it compacts a volume).
seaweed = seaweed_fixture(scope="module", bucket=BUCKET, volume_max=32)


def test_random_points_restore_exactly_from_the_archive_alone(
    tmp_path: Path, seaweed: Seaweed
) -> None:
    url = f"s3://{BUCKET}/points"
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE)
        add_archive(a, seaweed, url)
        a.start()
        wait_archived(a)  # the first base, of the empty volume
        log = logged_workload(a, size=SIZE, count=300, marks={90: "before-upgrade", 210: "ckpt"})
        status = wait_archived(a)
        assert status["lag_seconds"] == 0, status
        assert status["errors"] == 0, status
        code, _, text = scrape(a, a.unit.admin_token if a.unit else None)
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        lag = families["blockmirror_archive_lag_seconds"].samples
        assert [(s.labels, s.value) for s in lag] == [({"volume": "vol", "archive": "s3"}, 0)]
        last = families["blockmirror_archive_last_seq"].samples[0].value
        assert last == log.writes[-1].seq, last
        a.kill()  # the archive alone from here on

    listing = archive_list(seaweed, url)
    [gen] = listing["generations"]
    assert gen["gaps"] == [] and gen["overlaps"] == [], gen
    assert gen["last_seq"] == log.writes[-1].seq, gen
    assert {m["name"]: m["seq"] for m in gen["bookmarks"]} == {m.name: m.seq for m in log.marks}

    restored = tmp_path / "elsewhere"
    restored.mkdir()
    rng = random.Random(14)
    for n in range(12):
        k = rng.randint(1, len(log.writes))
        out = restored / f"point-{n}.img"
        how = n % 3
        if how == 0:
            point = ["--seq", str(log.writes[k - 1].seq)]
        elif how == 1:
            point = ["--at", iso(log.prefix_at_time(k))]
        else:
            mark = log.marks[n % len(log.marks)]
            k = mark.after
            point = ["--bookmark", mark.name]
        result = restore_from_archive(seaweed, url, out, *point)
        check_prefix(out, log, k, f"{point} -> {result}")

    report = archive_cli(seaweed, "verify", "vol", "--url", url)
    assert "0 problems" in report.stdout, report.stdout


def test_a_second_writer_is_refused_and_the_first_chain_stays_whole(
    tmp_path: Path, seaweed: Seaweed
) -> None:
    """Another volume called "vol" archived to the same URL, and a replica of the same volume
    archiving alongside its primary: both refused, and the first chain restores exactly."""
    url = f"s3://{BUCKET}/writers"
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": SIZE})
        add_archive(b, seaweed, url)
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=SIZE)
        add_archive(a, seaweed, url)
        other = topo.add_primary("site-x", peers=[], size=SIZE)
        add_archive(other, seaweed, url)
        a.start()
        wait_archived(a)
        b.start()
        other.start()
        log = logged_workload(a, size=SIZE, count=120)
        wait_caught_up(a, b)
        wait_archived(a)
        logged_workload(other, size=SIZE, count=40, seed=99)
        for site, why in ((other, "another volume called vol"), (b, "already archives")):

            def refused(s: Site = site) -> dict[str, Any] | None:
                found = archive_status(s)
                return found if found["state"] == "refused" else None

            status = wait_status(refused, timeout=60, what=f"{site.name}'s archive refused")
            assert why in status["reason"], status
            assert status["segments"] == 0 and status["bases"] == 0, status
        newest = log.writes[-1].seq
        a.kill()
        b.kill()
        other.kill()

    listing = archive_list(seaweed, url)
    [gen] = listing["generations"]
    assert gen["unit"] == "site-a" and gen["last_seq"] == newest, gen
    assert gen["gaps"] == [] and gen["overlaps"] == [], gen
    out = tmp_path / "restored.img"
    restore_from_archive(seaweed, url, out, "--seq", str(newest))
    check_prefix(out, log, len(log.writes), "newest point after the refused writers")
    report = archive_cli(seaweed, "verify", "vol", "--url", url)
    assert "0 problems" in report.stdout, report.stdout


def test_retention_deletes_exactly_what_is_outside_the_window(
    tmp_path: Path, seaweed: Seaweed
) -> None:
    """history 8 s, a base every 3 s: at the end, the oldest base kept is the newest at or before
    the window's start, nothing older is left (bases, segments, bookmarks, data objects no kept
    manifest uses), and the window's oldest point restores exactly; an older one is refused."""
    url = f"s3://{BUCKET}/retention"
    history = 8.0
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE)
        add_archive(a, seaweed, url, history="8s", base_interval="3s")
        a.start()
        wait_archived(a)
        log = WriteLog(run_id=random.Random(8).getrandbits(32), size=SIZE)
        began = time.monotonic()
        batch = 0
        while time.monotonic() - began < 16:
            batch += 1
            marks = {10: f"mark-{batch}"} if batch % 4 == 0 else None
            logged_workload(a, size=SIZE, count=20, seed=batch, log=log, marks=marks)
            time.sleep(0.5)
        wait_archived(a)
        time.sleep(2.5)  # a couple of retention passes after the last write
        status = archive_status(a)
        killed_ns = time.time_ns()
        a.kill()
    assert status["deleted"] > 0, status

    s3 = seaweed.client()
    root = "retention/vol/"
    keys = []
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=root)
    for page in pages:
        for item in page.get("Contents", []):
            parsed = fmt.parse_key(item["Key"][len(root) :])
            if parsed is not None:
                keys.append(parsed)
    bases = sorted((k for k in keys if isinstance(k, fmt.ManifestKey)), key=lambda k: k.end)
    segments = sorted((k for k in keys if isinstance(k, fmt.SegmentKey)), key=lambda k: k.first)
    cutoff = killed_ns - int(history * 1e9)
    slack = int(1.5e9)  # retention runs once a second
    oldest = bases[0]
    assert oldest.end_ts <= cutoff, (oldest, cutoff)  # the window's start is covered
    assert len(bases) >= 2 and bases[1].end_ts > cutoff - slack, bases[:2]  # nothing older left
    assert all(s.last > oldest.start for s in segments), (oldest, segments[:2])
    assert segments[0].first <= oldest.start + 1, (oldest, segments[0])
    kept_marks = [k for k in keys if isinstance(k, fmt.BookmarkKey)]
    assert all(m.seq >= oldest.end for m in kept_marks), kept_marks
    used: set[str] = set()
    for base in bases:
        body = s3.get_object(Bucket=BUCKET, Key=root + base.key)["Body"].read()
        used |= set(fmt.decode_manifest(body).objects)
    data = {k.key for k in keys if isinstance(k, fmt.DataKey)}
    assert data <= used, data - used

    # The window's oldest point restores exactly; one well before it is gone.
    k = next(i for i in range(1, len(log.writes)) if log.prefix_at_time(i) >= cutoff + int(3e8))
    out = tmp_path / "oldest.img"
    restore_from_archive(seaweed, url, out, "--at", iso(log.prefix_at_time(k)))
    check_prefix(out, log, k, "the window's oldest point")
    early = log.prefix_at_time(3)
    assert early < oldest.end_ts, (early, oldest)
    gone = archive_cli(
        seaweed, "restore", "vol", "--url", url, "--at", iso(early), "--to",
        str(tmp_path / "early.img"), check=False,
    )  # fmt: skip
    assert gone.returncode != 0 and not (tmp_path / "early.img").exists(), gone.stderr


@pytest.mark.parametrize("how", ["restart", "reload"])
def test_a_new_replica_seeded_from_the_archive_gets_only_the_records_after_it(
    tmp_path: Path, seaweed: Seaweed, how: str
) -> None:
    """A primary archives 16 MiB; then it is given a new peer (at a restart, or by a reload),
    and more is written. The new secondary (seed_from) restores the archive's newest point and
    then receives over its link only the records after that point (and their framing): no
    resync, not the 16 MiB again. Its replica ends identical to the primary's volume."""
    url = f"s3://{BUCKET}/seed-{how}"
    with topology(tmp_path) as topo:
        b = topo.add_secondary(
            "site-b", volumes={"vol": 32 * MiB}, volume_extra={"vol": {"seed_from": "s3"}}
        )
        add_archive(b, seaweed, url, upload=False)
        a = topo.add_primary("site-a", peers=[], size=32 * MiB, journal_size="64MiB")
        add_archive(a, seaweed, url)
        a.start()
        wait_archived(a)
        bulk = random.Random(16).randbytes(16 * MiB)
        write_random(a, 0, bulk)
        archived = wait_archived(a)["last_seq"]
        text = a.config.read_text().replace("peers = []", f'peers = ["{peer_address(b)}"]')
        if how == "restart":
            # The new peer, known to the primary from its next start; and the archive now
            # cuts a segment only every minute, so that what follows is not archived when b
            # seeds.
            a.kill()
            a.config.write_text(text.replace('segment_interval = "1s"', 'segment_interval = "60s"'))
            a.start()
        else:
            a.config.write_text(text)
            done = cli("reload", "--config", str(a.config))
            assert done.returncode == 0, done.stderr
        log = logged_workload(a, size=32 * MiB, count=200, first_block=6000)
        newest = log.writes[-1].seq
        if how == "restart":
            assert archive_status(a)["last_seq"] == archived
        b.start()
        wait_caught_up(a, b)
        peer = find_peer(a, peer_address(b))
        seeded = b.status()["archives"][0]["seeded"]["vol"]
        a.kill()
        b.kill()
        assert seeded["seq"] >= archived, (seeded, archived)
        after = [w for w in log.writes if w.seq > seeded["seq"]]
        # Each record: its 64-byte header and payload; each frame adds a header of its own.
        record_bytes = sum(64 + w.count * 4096 for w in after)
        assert peer["sync_bytes_sent"] == 0, peer
        assert peer["bytes_sent"] <= record_bytes + 64 * max(1, len(after)), (peer, record_bytes)
        if how == "restart":
            assert seeded["seq"] == archived and len(after) == 200, seeded
            assert peer["bytes_sent"] >= record_bytes - 64 * 200, peer
        assert a.images["vol"].read_bytes() == b.images["vol"].read_bytes()
        assert newest == int(peer["acked_seq"]), peer


def test_the_archive_keeps_to_its_bandwidth(tmp_path: Path, seaweed: Seaweed) -> None:
    """``bandwidth = "8Mbit"``: 6 MiB of incompressible segments cannot be stored faster than
    1 MB/s allows (a lower bound on the time only: the bucket's burst and the first segment,
    which goes before any wait, are allowed for)."""
    url = f"s3://{BUCKET}/bandwidth"
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=SIZE)
        add_archive(a, seaweed, url, bandwidth="8Mbit", segment_size="1MiB", compression="none")
        a.start()
        first = wait_archived(a)
        assert first["rate_limit"] == 8_000_000, first
        data = random.Random(1).randbytes(6 * MiB)
        began = time.monotonic()
        write_random(a, 0, data)
        status = wait_archived(a, timeout=120)
        took = time.monotonic() - began
        a.kill()
    sent = status["bytes_uploaded"] - first["bytes_uploaded"]
    assert sent >= len(data), status
    # At most one segment (about 1 MiB) and the burst (a quarter second) go before any wait.
    allowed = sent - (MiB + 64 * 1024) - 1_000_000 // 4
    assert took >= allowed / 1_000_000, (took, sent)


def wait_base_after(site: Site, touch: Callable[[], None]) -> None:
    """Until a base was copied after the newest record (it began when nothing was left).

    A base that began while the writes still came ends at the newest record, and the next one
    is skipped (nothing changed since): its chunks read before a write came hold stale digests,
    so the next base would store them again. Then ``touch`` rewrites data the volume already
    holds: a new record with no change, after which a base starts from a settled volume."""
    while True:
        newest = int(site.volume_status()["journal"]["newest_seq"])

        def reached(n: int = newest) -> dict[str, Any] | None:
            status = archive_status(site)
            return status if (status["base_end"] or 0) >= n else None

        status = wait_status(reached, timeout=60, what=f"a base up to seq {newest}")
        if status["base_start"] >= newest:
            return
        touch()


def test_a_later_base_uploads_only_the_chunks_that_changed(
    tmp_path: Path, seaweed: Seaweed
) -> None:
    """16 MiB of data in the first base; then one 4 KiB write: the next base (a synthetic
    full) stores one chunk and points at the first base's objects for the rest, and the newest
    point restores to the volume byte for byte."""
    url = f"s3://{BUCKET}/synthetic"
    with topology(tmp_path) as topo:
        a = topo.add_primary("site-a", peers=[], size=32 * MiB)
        add_archive(a, seaweed, url, base_interval="3s", compression="none")
        a.start()
        data = random.Random(2).randbytes(16 * MiB)
        write_random(a, 0, data)

        def touch() -> None:
            write_random(a, 0, data[:4096])

        wait_base_after(a, touch)  # a base copied after the data was written
        write_random(a, 5 * MiB, b"\x5a" * 4096)
        wait_base_after(a, touch)
        newest = int(a.volume_status()["journal"]["newest_seq"])
        a.kill()
        volume = a.images["vol"].read_bytes()

    s3 = seaweed.client()
    root = "synthetic/vol/"
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=root, MaxKeys=1000)["Contents"]
    keys = {item["Key"][len(root) :]: item["Size"] for item in listed}
    bases = sorted(
        (k for k in map(fmt.parse_key, keys) if isinstance(k, fmt.ManifestKey)), key=lambda k: k.end
    )
    last, before = bases[-1], bases[-2]
    manifest = fmt.decode_manifest(s3.get_object(Bucket=BUCKET, Key=root + last.key)["Body"].read())
    own = [o for o in manifest.objects if fmt.parse_key(o).base_end == last.start]  # type: ignore[union-attr]
    assert sum(keys[o] for o in own) <= fmt.CHUNK_SIZE, (own, manifest.objects)
    stored = sum(keys[o] for o in set(manifest.objects))
    assert stored >= 16 * MiB, stored  # the rest: the earlier base's objects, referenced
    assert before.end < last.end
    out = tmp_path / "newest.img"
    restore_from_archive(seaweed, url, out, "--seq", str(newest))
    check_image(out, volume, "the newest point of a synthetic full")


def test_after_a_switchover_the_new_primary_archives_a_new_generation(
    tmp_path: Path, seaweed: Seaweed
) -> None:
    """A and B archive to one URL; only A writes generation 1 (B is refused). After a planned
    switchover generation 2 (B's) is archived by exactly one of them, whichever claimed it
    first (both hold the volume), and the other is refused. Points of both generations restore
    exactly from the archive alone: before the switchover from generation 1, after it from
    generation 2."""
    url = f"s3://{BUCKET}/failover"
    with topology(tmp_path) as topo:
        sites = symmetric(topo, {"site-a": "primary", "site-b": "secondary"}, size=SIZE)
        a, b = sites["site-a"], sites["site-b"]
        add_archive(a, seaweed, url)
        add_archive(b, seaweed, url)
        b.start()
        a.start()
        log = logged_workload(a, size=SIZE, count=80)
        wait_caught_up(a, b)
        wait_archived(a)
        wait_status(
            lambda: archive_status(b)["state"] == "refused",
            timeout=60,
            what="B refused: generation 1 is A's",
        )
        before = log.writes[-1].seq
        assert role_change(a, "demote").returncode == 0
        assert role_change(b, "promote").returncode == 0
        wait_role(b, "primary")
        wait_role(a, "secondary")
        logged_workload(b, size=SIZE, count=60, seed=12, log=log)
        wait_caught_up(b, a)
        new_gen = b.volume_status()["generation"]

        def writer() -> tuple[Site, Site] | None:
            sa, sb = archive_status(a), archive_status(b)
            for one, other, st, ot in ((a, b, sa, sb), (b, a, sb, sa)):
                if st["state"] == "archiving" and st["generation"] == new_gen:
                    return (one, other) if ot["state"] == "refused" else None
            return None

        archiver, refused = wait_status(writer, timeout=90, what="one writer of generation 2")
        status = wait_archived(archiver)
        assert new_gen[:8] in archive_status(refused)["reason"], archive_status(refused)
        after = log.writes[-1].seq
        a.kill()
        b.kill()

    listing = archive_list(seaweed, url)
    units = [g["unit"] for g in listing["generations"]]
    assert units == ["site-a", archiver.name], listing
    assert status["generation"] == listing["generations"][1]["generation"]
    for seq, k, what in ((before, 80, "generation 1"), (after, len(log.writes), "generation 2")):
        out = tmp_path / f"{seq}.img"
        result = restore_from_archive(seaweed, url, out, "--seq", str(seq))
        check_prefix(out, log, k, what)
        assert result["generation"] == listing["generations"][0 if k == 80 else 1]["generation"]
