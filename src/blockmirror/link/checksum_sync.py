"""Checksum sync: a full copy to a replica that already holds similar data sends what differs.

Before a full resync copies its dirty regions, the source asks the secondary for the digests of
them, batch by batch (DIGEST_REQUEST, the frame online verify uses), and clears the bit of every
region whose digest equals its own, by the same rule as verify (``link/verify.py``): equal, and
no record between the two sides' points wrote it. A replica restored from an old backup of the
same volume then costs its differences, not its size. A region the secondary holds as zeros is
never read here (a new, sparse replica costs one digest request per batch and no extra read on
the source): the copy sends zeros as a marker anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING

from blockmirror.link.protocol import DigestRequest
from blockmirror.link.verify import BATCH, REGION, REPLY_TIMEOUT, next_request_id, touched_regions
from blockmirror.state import ConsumerMode
from blockmirror.store.digests import DIGEST_BYTES, region_digests

if TYPE_CHECKING:
    from blockmirror.link.outbound import OutboundStream

__all__ = ["skip_equal_regions"]

log = logging.getLogger(__name__)


def _batches(runs: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """(offset, count) of at most BATCH whole regions each, covering the dirty runs."""
    out: list[tuple[int, int]] = []
    for offset, length in runs:
        first = offset // REGION
        last = (min(offset + length, size) - 1) // REGION
        at = first
        while at <= last:
            count = min(BATCH, last - at + 1)
            out.append((at * REGION, count))
            at += count
    return out


async def skip_equal_regions(stream: OutboundStream) -> int:
    """Clear the dirty bits of regions the secondary already holds; returns the bytes it saves.
    Raises what a request raises (TimeoutError, ConnectionError): the copy then sends all."""
    sender, wp = stream.sender, stream.wp
    consumer = sender.consumer
    size = wp.volume.size
    skipped = 0
    for offset, count in _batches(list(consumer.dirty.dirty_regions()), size):
        if consumer.mode != ConsumerMode.JOURNAL:
            return skipped
        generation = consumer.generation
        s0 = wp.applied_seq
        remote = await stream.request_digests(
            DigestRequest(next_request_id(), offset, REGION, count), REPLY_TIMEOUT
        )
        end = min(size, offset + REGION * count)
        zero = {
            n: hashlib.blake2b(bytes(n), digest_size=DIGEST_BYTES).digest()
            for n in {REGION, (end - offset) % REGION or REGION}
        }
        lengths = [min(REGION, end - (offset + i * REGION)) for i in range(count)]
        if all(d == zero[n] for d, n in zip(remote.digests, lengths, strict=True)):
            continue  # the secondary holds zeros there: nothing to save by reading ours
        local = await asyncio.to_thread(region_digests, wp.volume, offset, REGION, count)
        s1 = wp.applied_seq
        touched = touched_regions(
            wp, min(s0, remote.applied_seq), max(s1, remote.applied_seq), offset, end
        )
        if touched is None or consumer.generation != generation:
            continue
        for i, (mine, theirs) in enumerate(zip(local, remote.digests, strict=True)):
            if mine == theirs and i not in touched and theirs != zero[lengths[i]]:
                consumer.dirty.clear(offset + i * REGION, lengths[i])
                skipped += lengths[i]
    sender.stats.sync_bytes_skipped += skipped
    if skipped:
        log.info(
            "%s -> %s:%d: checksum sync: %d bytes already on the replica, not sent",
            sender.volume_name,
            sender.host,
            sender.port,
            skipped,
        )
    return skipped
