"""A host workload whose every write is logged, and the volume it leaves after any prefix.

:func:`logged_workload` writes stamped blocks through a unit's NBD export one request at a
time (so write ``i`` is journal record ``base + 1 + i`` plus the bookmarks before it), with
FLUSHes and bookmarks among them, and notes when each write was answered. :meth:`WriteLog.image`
is the volume after exactly the first ``k`` writes, block for block.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockmirror.frontend.nbd_client import NbdClient
from tests.support.pair import Site, Topology, peer_address, wait_caught_up
from tests.support.stamps import BLOCK, stamps
from tests.support.unit_process import admin_request


@dataclass
class Write:
    block: int
    count: int
    seq: int  # the journal record it became
    submitted_ns: int
    answered_ns: int


@dataclass
class Mark:
    name: str
    seq: int
    after: int  # how many writes the bookmark follows


@dataclass
class WriteLog:
    run_id: int
    size: int
    writes: list[Write] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def image(self, k: int) -> bytes:
        """The volume after the first ``k`` writes (it was all zeros before them)."""
        out = bytearray(self.size)
        for i, w in enumerate(self.writes[:k]):
            out[w.block * BLOCK : (w.block + w.count) * BLOCK] = stamps(
                self.run_id, i, w.block, w.count
            )
        return bytes(out)

    def prefix_at_time(self, k: int) -> int:
        """A time between the answer to write ``k - 1`` and the submission of write ``k``."""
        before = self.writes[k - 1].answered_ns
        after = self.writes[k].submitted_ns if k < len(self.writes) else time.time_ns()
        return (before + after) // 2


def bookmark(site: Site, name: str) -> int:
    assert site.unit is not None
    status, body = admin_request(
        site.unit, "POST", f"/api/volumes/vol/bookmark?name={urllib.parse.quote(name)}"
    )
    assert status == 200, body
    return int(body["seq"])


async def _write_all(
    site: Site,
    log: WriteLog,
    count: int,
    blocks: tuple[int, int],
    rng: random.Random,
    marks: dict[int, str],
) -> None:
    assert site.unit is not None
    host, port = site.unit.export_address("vol")
    base = int(site.volume_status()["journal"]["newest_seq"])
    seq = base
    async with await NbdClient.connect(host, port, "vol") as client:
        for i in range(count):
            if i in marks:
                await client.flush()
                mark_seq = await asyncio.to_thread(bookmark, site, marks[i])
                seq += 1
                assert mark_seq == seq, (mark_seq, seq)
                log.marks.append(Mark(marks[i], mark_seq, len(log.writes)))
            n = rng.randint(1, 4)
            block = rng.randrange(blocks[0], blocks[1] - n)
            submitted = time.time_ns()
            index = len(log.writes)  # across every run appended to this log
            await client.write(block * BLOCK, stamps(log.run_id, index, block, n))
            answered = time.time_ns()
            seq += 1
            log.writes.append(Write(block, n, seq, submitted, answered))
            if i % 17 == 16:
                await client.flush()
            # Distinct times between writes, so a point by time falls between two of them.
            await asyncio.sleep(0.002)
        await client.flush()
    newest = int(site.volume_status()["journal"]["newest_seq"])
    assert newest == seq, f"the journal's newest record is {newest}, the log says {seq}"


def logged_workload(
    site: Site,
    *,
    size: int,
    count: int = 300,
    blocks: int = 512,
    first_block: int = 0,
    seed: int = 10,
    marks: dict[int, str] | None = None,
    log: WriteLog | None = None,
) -> WriteLog:
    """``count`` logged writes to blocks ``first_block`` to ``first_block + blocks`` of the
    site's volume ``vol`` (appended to ``log`` if given)."""
    rng = random.Random(seed)
    log = log or WriteLog(run_id=rng.getrandbits(32), size=size)
    span = (first_block, first_block + blocks)
    asyncio.run(_write_all(site, log, count, span, rng, marks or {}))
    return log


def restore(site: Site, to: Path, **point: str | int) -> tuple[int, dict[str, Any]]:
    """``POST .../restore`` on the site's unit; (status, body)."""
    assert site.unit is not None
    query = urllib.parse.urlencode({**point, "to": str(to)})
    return admin_request(site.unit, "POST", f"/api/volumes/vol/restore?{query}", timeout=120)


def history(site: Site) -> dict[str, Any]:
    assert site.unit is not None
    status, body = admin_request(site.unit, "GET", "/api/volumes/vol/history")
    assert status == 200, body
    return body


def history_pair(topo: Topology, size: int, history_value: str = "1h") -> tuple[Site, Site]:
    """A primary ``site-a`` and its secondary ``site-b``, both keeping ``history_value`` of
    history, started and caught up; returns (a, b)."""
    b = topo.add_secondary(
        "site-b", volumes={"vol": size}, volume_extra={"vol": {"history": history_value}}
    )
    a = topo.add_primary(
        "site-a", peers=[peer_address(b)], size=size, extra={"history": history_value}
    )
    b.start()
    a.start()
    wait_caught_up(a, b)
    return a, b


def iso(ns: int) -> str:
    """``ns`` since the epoch as ISO 8601 UTC with microseconds, as restores take times."""
    secs, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rest // 1000:06d}Z"


def check_image(image: Path, want: bytes, what: str) -> None:
    """``image`` holds exactly ``want``; else name the first 4 KiB block that differs."""
    got = image.read_bytes()
    assert len(got) == len(want), what
    if got != want:
        bad = next(i for i in range(0, len(got), 4096) if got[i : i + 4096] != want[i : i + 4096])
        raise AssertionError(f"{what}: block {bad // 4096} differs")


def check_prefix(image: Path, log: WriteLog, k: int, what: str) -> None:
    """``image`` is the volume after exactly the first ``k`` writes of ``log``; removed after."""
    check_image(image, log.image(k), f"{what} (the prefix of {k} writes)")
    image.unlink()
