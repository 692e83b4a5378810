"""The source's resync: copy the dirty regions of a consumer while records keep streaming
(docs/link-protocol.md, "Resync").

A :class:`Copier` belongs to one :class:`~blockmirror.link.outbound.OutboundStream` and shares
its window: SYNC_START, then each dirty region as SYNC_DATA read from the volume when it is
sent (or SYNC_ZERO for what reads as zeroes, holes found in the allocation map without reading
them), then SYNC_DONE. A region's dirty bit is cleared by the stream when its copy is
acknowledged, and only if no bit was set behind it while it was in flight.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from blockmirror.link.checksum_sync import skip_equal_regions
from blockmirror.link.protocol import SyncData, SyncDone, SyncStart, SyncZero
from blockmirror.state import ConsumerMode, LinkPhase

if TYPE_CHECKING:
    from blockmirror.link.outbound import OutboundStream

log = logging.getLogger(__name__)

SYNC_CHUNK: Final = 1024 * 1024  # the most one SYNC_DATA frame carries
SYNC_ZERO_MAX: Final = 64 * 1024 * 1024  # the most one SYNC_ZERO marker for a hole covers
SYNC_YIELD: Final = 0.005  # a resync gives the event loop back at least this often (seconds)
_ZEROS: Final = bytes(SYNC_CHUNK)


class Copier:
    """Copies a consumer's dirty regions over one stream."""

    def __init__(self, stream: OutboundStream) -> None:
        self.stream = stream
        self.sender = stream.sender
        self.wp = stream.wp

    async def _pause(self, seconds: float) -> None:
        await self.stream.wait(seconds)
        await self.stream.check_failed()

    async def resync(self, *, full: bool) -> None:
        """Copy every dirty region while records keep streaming (docs/link-protocol.md)."""
        stream, sender, wp = self.stream, self.sender, self.wp
        consumer = sender.consumer
        sender.enter(LinkPhase.SYNCING)
        sender.stats.consistent = False
        while consumer.paused:  # a paused consumer is sent nothing: not even SYNC_START
            await self._pause(1.0)
        # From here on every new write reaches the peer through the journal, so the dirty map
        # only has to cover what happened before this point. A consumer still in journal mode
        # (an interrupted resync) keeps its cursor: its records after it are not in the map.
        if consumer.mode == ConsumerMode.JOURNAL:
            base = min(consumer.acked_seq, wp.applied_seq)
        else:
            base = wp.applied_seq
            consumer.set_mode(ConsumerMode.JOURNAL)
        consumer.acked_seq = base
        await wp.checkpoint()
        stream.next_seq = base + 1
        stream.acked = base
        total = consumer.dirty.dirty_bytes()
        log.info(
            "%s -> %s:%d: %s resync of %d bytes",
            sender.volume_name,
            sender.host,
            sender.port,
            "full" if full else "dirty-region",
            total,
        )
        stream.link.send(SyncStart(sender.next_lsn(), full, total, base))
        if full:
            # A full copy to a replica that may hold most of it already (docs/link-protocol.md).
            await skip_equal_regions(stream)
        if not await self._copy_regions():
            return  # overflowed again mid-copy; the stream starts over from the dirty map
        # A relay vouches for a copy only once its own replica is consistent: until then the
        # regions it sent may still be followed by more from upstream.
        while not self._own_replica_consistent():
            if consumer.mode != ConsumerMode.JOURNAL:
                return
            await stream.send_records()
            await self._pause(0.5)
        while consumer.paused:
            await self._pause(1.0)
        done_lsn = sender.next_lsn()
        stream.sync_done_lsn = done_lsn
        stream.link.send(SyncDone(done_lsn, wp.applied_seq))
        while stream.sync_inflight:
            await stream.send_records()
            await self._pause(1.0)
        log.info("%s -> %s:%d: resync complete", sender.volume_name, sender.host, sender.port)

    async def _copy_regions(self) -> bool:
        """Send every dirty region, in passes until none raced a write outside the journal;
        False when the consumer left journal mode meanwhile (the copy is void)."""
        stream, sender, wp = self.stream, self.sender, self.wp
        consumer = sender.consumer
        volume = wp.volume
        loop = asyncio.get_running_loop()
        yielded = loop.time()
        while True:
            # Writes made outside the journal (enqueueing paused) reach the volume at moments
            # the copy cannot order against its reads: a pass during which one happened, or
            # one that ends while they still may, proves no prefix. Copy again what they dirtied.
            unjournaled = wp.unjournaled_count
            for run_offset, run_length in list(consumer.dirty.dirty_regions()):
                offset, end = run_offset, run_offset + run_length
                while offset < end:
                    n = min(SYNC_CHUNK, end - offset)
                    await stream.check_failed()
                    await stream.wait_window()
                    while stream.window_full or consumer.paused or not stream.gate_open():
                        # A paused consumer is sent nothing, resync included.
                        await self._pause(1.0)
                        yielded = loop.time()
                    if loop.time() - yielded > SYNC_YIELD:
                        # Zero markers are tiny: the window alone would never make this loop wait,
                        # and the host's requests and the admin API must not starve behind it.
                        await asyncio.sleep(0)
                        await stream.check_failed()
                        yielded = loop.time()
                    if consumer.mode != ConsumerMode.JOURNAL:
                        return False
                    await stream.send_records()  # records the copy would include go first
                    as_of = wp.applied_seq
                    lsn = sender.next_lsn()
                    payload = None
                    hole = self._hole_at(offset, end)
                    if hole >= n:
                        # A hole of a sparse volume: one marker for all of it (up to a bound), read
                        # from the allocation map at this moment, like a pread would be.
                        n = hole
                        nbytes = stream.link.send(SyncZero(lsn, offset, n, as_of))
                    else:
                        data = volume.pread(offset, n)
                        if data == _ZEROS[:n]:
                            nbytes = stream.link.send(SyncZero(lsn, offset, n, as_of))
                        else:
                            nbytes, payload = await stream.send_sync_data(
                                SyncData(lsn, offset, as_of, memoryview(data))
                            )
                    stream.sync_inflight.append((lsn, offset, n, consumer.generation))
                    stream.sent(-lsn, nbytes, payload)
                    stream.gate_sent()
                    sender.stats.sync_bytes_sent += n
                    offset += n
            if (
                wp.unjournaled_count == unjournaled
                and not wp.unjournaled_pending
                and not wp.journal.enqueue_paused
            ):
                return True
            await self._pause(0.5)

    def _hole_at(self, offset: int, end: int) -> int:
        """How many bytes from ``offset`` (before ``end``, at most SYNC_ZERO_MAX) the volume's
        allocation map says read as zeros; 0 when it says data or cannot tell."""
        try:
            extents = self.wp.volume.extents(offset, min(end - offset, SYNC_ZERO_MAX))
        except OSError:
            return 0
        if not extents or not extents[0].zero:
            return 0
        return extents[0].length

    def _own_replica_consistent(self) -> bool:
        replica = self.wp.journal.replica
        return replica is None or replica.consistent
