"""The source's side of one connected link: records out, ACKs in, a window of bytes in flight.

An :class:`OutboundStream` lives for one session of a :class:`~blockmirror.link.sender.
PeerSender`. It streams journal runs (``Journal.read_run``: the ring's layout stays the
journal's business) up to the volume's applied point, keeps at most :data:`WINDOW_BYTES`
unacknowledged, frees journal space as ACKs arrive, and hands over to the resync copier
(:mod:`blockmirror.link.copier`) whenever the consumer's dirty map holds regions to copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from blockmirror.errors import ProtocolError
from blockmirror.journal.journal import RecordsGone
from blockmirror.link.copier import Copier
from blockmirror.link.peer_configs import credential_of, take
from blockmirror.link.protocol import (
    Ack,
    DigestRequest,
    Digests,
    Heartbeat,
    PeerConfig,
    encode_raw_records,
)
from blockmirror.link.session import LinkSession, ProgressWatch
from blockmirror.state import ConsumerMode, LinkPhase

if TYPE_CHECKING:
    from blockmirror.link.sender import PeerSender

log = logging.getLogger(__name__)

WINDOW_BYTES: Final = 64 * 1024 * 1024  # unacknowledged bytes in flight, records and copies
FRAME_BYTES: Final = 4 * 1024 * 1024  # the most record bytes one RECORDS frame carries


class OutboundStream:
    """One connected session: records out, ACKs in, resync alongside."""

    def __init__(
        self, sender: PeerSender, link: LinkSession, *, start: int, peer_consistent: bool = True
    ) -> None:
        self.sender = sender
        self.link = link
        # What the secondary said in its WELCOME: a replica left inconsistent (a resync cut
        # short after its regions were acknowledged) needs a SYNC_DONE even with a clean map.
        self.peer_consistent = peer_consistent
        self.wp = sender.wp
        self.journal = sender.wp.journal
        self.next_seq = start
        self.acked = start - 1
        # (seq, cumulative bytes) of each RECORDS frame, (-lsn, cumulative bytes) of each copy.
        self.sent_bytes_at: deque[tuple[int, int]] = deque()
        self.cumulative = 0
        self.acked_bytes = 0
        # (lsn, offset, length, consumer generation when the region was read)
        self.sync_inflight: deque[tuple[int, int, int, int]] = deque()
        self.sync_done_lsn: int | None = None
        self.progress = asyncio.Event()
        self.failed: BaseException | None = None
        self.copier = Copier(self)
        self._watch = ProgressWatch(link.timeouts.progress)
        # DIGEST_REQUESTs waiting for their answer, by request id (online verify).
        self.digest_waiters: dict[int, asyncio.Future[Digests]] = {}

    @property
    def window_full(self) -> bool:
        return self.cumulative - self.acked_bytes >= WINDOW_BYTES

    # --- sending --------------------------------------------------------------------------------

    async def run(self, *, full: bool) -> None:
        sender = self.sender
        consumer = sender.consumer
        if (
            consumer.mode == ConsumerMode.TRACKING
            or not consumer.dirty.is_clean()
            or not self.peer_consistent
        ):
            await self.copier.resync(full=full)
            self.peer_consistent = True
        sender.enter(LinkPhase.REPLICATING)
        while True:
            await self.check_failed()
            consumer = sender.consumer
            if consumer.mode == ConsumerMode.TRACKING or (
                not consumer.dirty.is_clean() and not self.sync_inflight
            ):
                # The journal overflowed while we were behind: our records are gone.
                await self.copier.resync(full=False)
                sender.enter(LinkPhase.REPLICATING)
                continue
            if consumer.paused:
                await self.wait(1.0)
                continue
            if not self.send_records() and sender.bucket.ready:
                await self.wait(self.link.timeouts.heartbeat)

    async def wait(self, seconds: float) -> None:
        """Until records reach the volume, an ACK arrives, the session fails, or ``seconds``."""
        self.wp.applied_event.clear()
        self.progress.clear()
        waits = [
            asyncio.ensure_future(self.wp.applied_event.wait()),
            asyncio.ensure_future(self.progress.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def check_failed(self) -> None:
        """Raise what ended the reading side; wait while the transport holds a window."""
        if self.failed is not None:
            raise self.failed
        if self.link.write_buffer_size() > WINDOW_BYTES:
            await self.link.drain()
        await self.sender.bucket.pace()  # the link's bandwidth limit

    def sent(self, key: int, nbytes: int) -> None:
        """Account for a frame of ``nbytes`` in flight until ``key`` is acknowledged (a record
        sequence number, or minus a resync frame's lsn)."""
        self.cumulative += nbytes
        self.sent_bytes_at.append((key, self.cumulative))
        self.sender.stats.count(nbytes)
        self.sender.bucket.charge(nbytes)

    def send_records(self) -> bool:
        """Send what the volume holds and the window allows; False when nothing could go."""
        sender = self.sender
        sent_any = False
        if sender.consumer.paused:
            return False
        limit = self.wp.applied_seq
        bucket = sender.bucket
        # Under a bandwidth limit, frames of about one burst: the limit then holds over any
        # second, not just on average over a few large frames.
        frame = FRAME_BYTES if bucket.rate is None else min(FRAME_BYTES, int(bucket.burst))
        while (
            self.next_seq <= limit
            and self.cumulative - self.acked_bytes < WINDOW_BYTES
            and bucket.ready
        ):
            consumer = sender.consumer
            if consumer.mode != ConsumerMode.JOURNAL:
                return sent_any
            try:
                run, raw = self.journal.read_run(self.next_seq, limit, frame)
            except RecordsGone:
                # Records this consumer needs are gone (should not happen in journal mode):
                # fall back to copying everything rather than leave the replica short.
                log.error(
                    "%s: records from %d were freed under a journal-mode consumer",
                    sender.volume_name,
                    self.next_seq,
                )
                consumer.dirty.mark_all()
                consumer.set_mode(ConsumerMode.TRACKING)
                return sent_any
            if not run:
                return sent_any
            last = run[-1]
            self.sent(last.seq, self.link.send_buffers(encode_raw_records(raw)))
            sender.stats.records_sent += len(run)
            self.next_seq = last.seq + 1
            sent_any = True
        return sent_any

    # --- receiving ------------------------------------------------------------------------------

    async def read_acks(self) -> None:
        try:
            while True:
                message = await self.link.receive()  # only ACK and HEARTBEAT get through
                if isinstance(message, Ack):
                    self._on_ack(message)
                elif isinstance(message, Digests):
                    waiter = self.digest_waiters.pop(message.request_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message)
                elif isinstance(message, PeerConfig):
                    try:
                        take(
                            self.sender.configs,
                            message,
                            peer_unit=str(self.sender.peer_unit),
                            where=self.sender.describe(),
                            credential=credential_of(self.sender.psk, self.link.extra("peercert")),
                        )
                    except ValueError as exc:
                        raise ProtocolError(str(exc)) from None
                elif not isinstance(message, Heartbeat):  # pragma: no cover - the order says
                    raise ProtocolError(f"unexpected {type(message).__name__} from secondary")
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.failed = exc
                self.progress.set()
            raise

    def _on_ack(self, ack: Ack) -> None:
        sender = self.sender
        consumer = sender.consumer
        sender.stats.peer_applied_seq = ack.applied_seq
        sender.stats.last_ack_time = time.time()
        if ack.durable_seq > self.acked:
            self.acked = ack.durable_seq
            if consumer.mode == ConsumerMode.JOURNAL:
                self.wp.acknowledge(sender.consumer_name, ack.durable_seq)
            sender.stats.acked_seq = ack.durable_seq
        while self.sync_inflight and self.sync_inflight[0][0] <= ack.sync_lsn:
            _, offset, length, generation = self.sync_inflight.popleft()
            # The secondary holds this copy durably, and every write since it was read is in
            # the stream, unless bits were set behind it (the generation moved): then the
            # region must be copied again, so its bit stays.
            if (
                consumer.mode == ConsumerMode.JOURNAL
                and consumer.generation == generation
                and not self.wp.unjournaled_pending
            ):
                # (With a change outside the journal still on its way to the volume, the copy
                # may lack it: the bit stays, and the region is copied again.)
                consumer.dirty.clear(offset, length)
        while self.sent_bytes_at:
            key, cumulative = self.sent_bytes_at[0]
            done = key <= self.acked if key > 0 else -key <= ack.sync_lsn
            if not done:
                break
            self.acked_bytes = cumulative
            self.sent_bytes_at.popleft()
        sender.stats.consistent = (
            self.peer_consistent
            and consumer.mode == ConsumerMode.JOURNAL
            and not self.sync_inflight
            and consumer.dirty.is_clean()
        )
        self.progress.set()

    async def request_digests(self, request: DigestRequest, timeout: float) -> Digests:
        """Send a DIGEST_REQUEST after what was sent so far and wait for its answer. Raises
        TimeoutError, or ConnectionError when the session ends first."""
        waiter: asyncio.Future[Digests] = asyncio.get_running_loop().create_future()
        self.digest_waiters[request.request_id] = waiter
        self.link.send(request)
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self.digest_waiters.pop(request.request_id, None)

    def fail_digest_requests(self) -> None:
        """The session ended: every request waiting for digests fails. Never raises."""
        for waiter in self.digest_waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the link to the peer went down"))
        self.digest_waiters.clear()

    async def heartbeats(self) -> None:
        """Heartbeats while idle, and the no-progress deadline on what is in flight."""
        await self.link.heartbeats(lambda: self._watch.check(self.acked_bytes, self.cumulative))
