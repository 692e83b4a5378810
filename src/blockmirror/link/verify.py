"""Online verify: compare per-region digests of a volume and a peer's replica while both change.

The source asks for the digests of a run of regions (DIGEST_REQUEST, in the record stream); the
secondary answers once every record received before the request is applied, with the newest
record it holds (:func:`answer_digests`). The source reads its own digests between two applied
sequence numbers ``s0`` and ``s1``. A region whose digests differ is a real difference only if
no record between the two sides' points (``min(s0, L)`` .. ``max(s1, L)``, L the secondary's)
touched it; one that was touched is checked again later (:func:`verify_peer`). Differences are
named, and with ``repair`` marked dirty for that peer, so its next resync copies only them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.errors import LinkError
from blockmirror.journal.format import EXTENT_KINDS
from blockmirror.link.protocol import DigestRequest, Digests
from blockmirror.state import ConsumerMode
from blockmirror.store.digests import region_digests

if TYPE_CHECKING:
    from blockmirror.link.sender import PeerSender

__all__ = [
    "BATCH",
    "REGION",
    "VerifyError",
    "VerifyResult",
    "answer_digests",
    "next_request_id",
    "touched_regions",
    "verify_peer",
]

log = logging.getLogger(__name__)

# One region of verify: the dirty map's, so a repair copies exactly what differs.
REGION = 64 * 1024
BATCH = 256  # regions per request (16 MiB)
RECHECKS = 8
REPLY_TIMEOUT = 60.0
_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_ids)


class VerifyError(LinkError):
    """Verify cannot run against this peer now; the message says why."""


async def answer_digests(wp: JournalWritePath, message: DigestRequest) -> Digests:
    """The secondary's answer: digests once every record received so far is applied."""
    # A lagged replica (replay_delay) answers as it is: its held records are not due (the
    # source then finds the regions they write "changed meanwhile", never "different").
    target = wp.applied_seq if wp.replica.delay.held else wp.journal.next_seq - 1
    gate = wp.commit()
    if gate is not None:
        await gate
    while wp.applied_seq < target:
        wp.applied_event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wp.applied_event.wait(), 1.0)
        if wp.failed is not None:
            raise VerifyError(f"the replica cannot be written: {wp.failed}")
    digests = await asyncio.to_thread(
        region_digests, wp.volume, message.offset, message.region, message.count
    )
    return Digests(
        message.request_id, message.offset, message.region, wp.applied_seq, tuple(digests)
    )


@dataclass
class VerifyResult:
    peer: str
    regions: int = 0
    differing: list[tuple[int, int]] = field(default_factory=list)
    unsettled: list[tuple[int, int]] = field(default_factory=list)  # kept changing
    rechecks: int = 0
    repaired: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "regions": self.regions,
            "region_size": REGION,
            "differing": [{"offset": o, "length": n} for o, n in self.differing],
            "differing_bytes": sum(n for _, n in self.differing),
            "unsettled": [{"offset": o, "length": n} for o, n in self.unsettled],
            "rechecks": self.rechecks,
            "repaired": self.repaired,
            "seconds": round(self.seconds, 3),
        }


def touched_regions(
    wp: JournalWritePath, lo: int, hi: int, offset: int, end: int
) -> set[int] | None:
    """Indexes of the regions in ``[offset, end)`` that records ``lo+1 .. hi`` wrote; None when
    those records are no longer all in the journal (nothing can be concluded)."""
    if hi <= lo:
        return set()
    records = wp.journal.records
    if not records or records[0].seq > lo + 1:
        return None
    touched: set[int] = set()
    for rec in records:
        if rec.seq <= lo or rec.kind not in EXTENT_KINDS:
            continue
        if rec.seq > hi:
            break
        a, b = max(rec.offset, offset), min(rec.offset + rec.length, end)
        if a < b:
            touched.update(range((a - offset) // REGION, (b - 1 - offset) // REGION + 1))
    return touched


async def _compare(sender: PeerSender, offset: int, count: int, result: VerifyResult) -> list[int]:
    """Compare ``count`` regions from ``offset``; returns the offsets to check again."""
    wp = sender.wp
    stream = sender.stream
    if stream is None:
        raise VerifyError(f"peer {sender.consumer_name} is not connected")
    s0 = wp.applied_seq
    local = await asyncio.to_thread(region_digests, wp.volume, offset, REGION, count)
    s1 = wp.applied_seq
    remote = await stream.request_digests(
        DigestRequest(next_request_id(), offset, REGION, count), REPLY_TIMEOUT
    )
    if len(remote.digests) != len(local):
        raise VerifyError("the peer answered for another number of regions")
    end = min(wp.volume.size, offset + REGION * count)
    touched = touched_regions(
        wp, min(s0, remote.applied_seq), max(s1, remote.applied_seq), offset, end
    )
    again: list[int] = []
    for i, (mine, theirs) in enumerate(zip(local, remote.digests, strict=True)):
        if mine == theirs:
            continue
        at = offset + i * REGION
        if touched is None or i in touched:
            again.append(at)
        else:
            result.differing.append((at, min(REGION, wp.volume.size - at)))
    return again


async def verify_peer(sender: PeerSender, *, repair: bool) -> VerifyResult:
    """Compare the whole volume with the peer of ``sender``. Raises :class:`VerifyError`
    when the peer is not replicating in journal mode with a consistent replica, and OSError
    when a volume cannot be read."""
    started = time.monotonic()
    wp = sender.wp
    consumer = sender.consumer
    result = VerifyResult(sender.consumer_name)
    if wp.journal.enqueue_paused:
        raise VerifyError("enqueueing is paused: the volume changes outside the journal")
    if consumer.mode != ConsumerMode.JOURNAL or not consumer.dirty.is_clean():
        raise VerifyError(
            f"peer {sender.consumer_name} has regions to resync already; verify after it"
        )
    if sender.stream is None or not sender.stats.consistent:
        raise VerifyError(f"peer {sender.consumer_name} is not replicating a consistent replica")
    size = wp.volume.size
    regions = (size + REGION - 1) // REGION
    result.regions = regions
    again: list[int] = []
    for first in range(0, regions, BATCH):
        again.extend(await _compare(sender, first * REGION, min(BATCH, regions - first), result))
    for _ in range(RECHECKS):
        if not again:
            break
        result.rechecks += len(again)
        await asyncio.sleep(0.2)
        retry, again = again, []
        for at in retry:
            again.extend(await _compare(sender, at, 1, result))
    result.unsettled = [(at, min(REGION, size - at)) for at in again]
    result.differing.sort()
    if repair and result.differing:
        for at, length in result.differing:
            consumer.dirty.mark(at, length)
        consumer.generation += 1
        await asyncio.to_thread(wp.journal.sync_dirty_maps)
        sender.wake()
        result.repaired = True
    result.seconds = time.monotonic() - started
    log.warning(
        "%s: verify against %s: %d of %d regions differ%s",
        sender.volume_name,
        sender.consumer_name,
        len(result.differing),
        regions,
        " (marked for resync)" if result.repaired else "",
    )
    return result
