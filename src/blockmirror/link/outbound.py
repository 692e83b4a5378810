"""The source's side of one connected link: records out, ACKs in, a window of bytes in flight.

An :class:`OutboundStream` lives for one session of a :class:`~blockmirror.link.sender.
PeerSender`. It streams journal runs (``Journal.read_run``: the ring's layout stays the
journal's business) up to the volume's applied point, keeps a window sized to the link
unacknowledged (:mod:`blockmirror.link.flight`), frees journal space as ACKs arrive, and hands
over to the resync copier (:mod:`blockmirror.link.copier`) whenever the consumer's dirty map
holds regions to copy.

Bulk frames are compressed when the link negotiated it (:mod:`blockmirror.link.compression`),
in a worker thread: zstd releases the GIL, and the event loop serves the host meanwhile. The
stream probes the link with HEARTBEATs that the secondary echoes: their round trip sizes the
window, and their one-way delay drives a background link's pace
(:mod:`blockmirror.link.background`). Outside the link's transmit windows nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from blockmirror.errors import LinkError, ProtocolError
from blockmirror.journal.format import Buffer
from blockmirror.journal.journal import RecordsGone
from blockmirror.link.compression import Compressor
from blockmirror.link.copier import Copier
from blockmirror.link.peer_configs import credential_of, take
from blockmirror.link.protocol import (
    FRAME_HEADER_SIZE,
    Ack,
    DigestRequest,
    Digests,
    FrameType,
    Heartbeat,
    PeerConfig,
    SyncData,
    encode,
    encode_compressed,
    encode_raw_records,
)
from blockmirror.link.session import LinkSession, ProgressWatch
from blockmirror.link.tcp_info import tcp_rtt
from blockmirror.state import ConsumerMode, LinkPhase

if TYPE_CHECKING:
    from blockmirror.link.sender import PeerSender

log = logging.getLogger(__name__)

FRAME_BYTES: Final = 4 * 1024 * 1024  # the most record bytes one RECORDS frame carries
# Below this a payload goes uncompressed without a try (frame and prefix would eat the gain),
# and up to it compression runs on the event loop (a thread hop would cost more).
MIN_COMPRESS: Final = 512
INLINE_COMPRESS: Final = 16 * 1024
PROBE_INTERVAL: Final = 1.0  # seconds between round-trip probes
BACKGROUND_PROBE_INTERVAL: Final = 0.2  # a delay-based background link probes more often
_RECORDS: Final = int(FrameType.RECORDS)
_SYNC_DATA: Final = int(FrameType.SYNC_DATA)


class WindowClosed(LinkError):
    """A dial-up style link's transmit window closed: the session ends until the next one."""


class OutboundStream:
    """One connected session: records out, ACKs in, resync alongside."""

    def __init__(
        self,
        sender: PeerSender,
        link: LinkSession,
        *,
        start: int,
        peer_consistent: bool = True,
        compress: bool = False,
    ) -> None:
        self.sender = sender
        # Whether the peer decodes what the sender's compressor makes (its handshake said so).
        self.compress = compress
        self.link = link
        # What the secondary said in its WELCOME: a replica left inconsistent (a resync cut
        # short after its regions were acknowledged) needs a SYNC_DONE even with a clean map.
        self.peer_consistent = peer_consistent
        self.wp = sender.wp
        self.journal = sender.wp.journal
        self.next_seq = start
        self.acked = start - 1
        # (seq, cumulative bytes, when sent) of each RECORDS frame, (-lsn, ...) of each copy.
        self.sent_bytes_at: deque[tuple[int, int, float]] = deque()
        self.cumulative = 0
        self.acked_bytes = 0
        # (lsn, offset, length, consumer generation when the region was read)
        self.sync_inflight: deque[tuple[int, int, int, int]] = deque()
        self.sync_done_lsn: int | None = None
        self.progress = asyncio.Event()
        self.failed: BaseException | None = None
        self.copier = Copier(self)
        self._watch = ProgressWatch(link.timeouts.progress)
        # The kernel's smoothed round trip of the connection (tcp_info), read at each probe.
        self.tcp_rtt: float | None = None
        # The send time of the idle probe whose echo a background link waits for.
        self._idle_probe: int | None = None
        # DIGEST_REQUESTs waiting for their answer, by request id (online verify).
        self.digest_waiters: dict[int, asyncio.Future[Digests]] = {}

    @property
    def in_flight(self) -> int:
        return self.cumulative - self.acked_bytes

    @property
    def window(self) -> int:
        """The bytes this stream may keep unacknowledged now (flight.FlightWindow)."""
        sender = self.sender
        return sender.flight.size(sender.bucket.rate if sender.rate_limit else None)

    # --- a delay-based background link (background.QuietGate) ------------------------------------

    def gate_open(self) -> bool:
        """Whether a frame may go now as far as background priority goes: always at normal
        priority; for a delay-based background link only with nothing in flight and a quiet
        probe since the last frame (one is sent when needed)."""
        gate = self.sender.quiet_gate
        if gate is None:
            return True
        if self.in_flight:
            return False
        if gate.may_send():
            return True
        if self._idle_probe is None:
            self.send_probe()
        return False

    def gate_sent(self) -> None:
        gate = self.sender.quiet_gate
        if gate is not None:
            gate.sent()
            self._idle_probe = None  # an echo of a probe sent before this frame says nothing

    def send_probe(self) -> None:
        """A HEARTBEAT for the secondary to echo; an idle one (nothing of ours in flight or in
        the transport's buffer) measures the path's queue for a background link."""
        if self.link.is_closing:
            return
        sent_ns = time.time_ns()
        if not self.in_flight and not self.link.write_buffer_size():
            self._idle_probe = sent_ns
        self.link.send(Heartbeat(sent_ns, 0))

    @property
    def window_full(self) -> bool:
        return self.in_flight >= self.window

    # --- sending --------------------------------------------------------------------------------

    async def run(self, *, full: bool) -> None:
        sender = self.sender
        consumer = sender.consumer
        await self.wait_window()  # nothing is sent outside the transmit windows, not even a copy
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
            await self.wait_window()
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
            if not await self.send_records() and sender.bucket.ready:
                await self.wait(self.link.timeouts.heartbeat)

    async def wait_window(self) -> None:
        """Return once the link's transmit window is open; while it is closed nothing is sent
        (heartbeats keep the link up), and a dial-up style link ends its session."""
        sender = self.sender
        while (opens := sender.window_opens()) is not None:
            if sender.dial_up:
                until = opens.astimezone().isoformat()
                raise WindowClosed(f"outside its transmit windows until {until}")
            await self.wait(min(1.0, max(0.05, (opens - sender.now()).total_seconds())))
            await self.check_failed_now()

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
        await self.check_failed_now()
        if self.link.write_buffer_size() > self.window:
            await self.link.drain()
        await self.sender.bucket.pace()  # the link's bandwidth limit

    async def check_failed_now(self) -> None:
        if self.failed is not None:
            raise self.failed

    def sent(self, key: int, wire: int, payload: int | None = None) -> None:
        """Account for a frame that put ``wire`` bytes on the link (``payload``: what it
        carries uncompressed, frame header included; None: the same) in flight until ``key``
        is acknowledged (a record sequence number, or minus a resync frame's lsn)."""
        self.cumulative += wire
        self.sent_bytes_at.append((key, self.cumulative, time.monotonic()))
        self.sender.stats.count(wire if payload is None else payload, wire)
        self.sender.bucket.charge(wire)

    async def pack(self, frame_type: int, payload: Buffer, plain: list[Buffer]) -> list[Buffer]:
        """The frame to send for ``payload``: compressed when the link compresses and it
        shrinks, else ``plain`` (its uncompressed frame) as it is."""
        compressor = self.compressor
        size = memoryview(payload).nbytes
        if compressor is None or size < MIN_COMPRESS:
            return plain
        if size <= INLINE_COMPRESS:
            body = compressor.compress(payload)
        else:
            body = await asyncio.to_thread(compressor.compress, payload)
        if body is None:
            return plain
        return encode_compressed(frame_type, body, compressor.flag)

    async def send_sync_data(self, message: SyncData) -> tuple[int, int]:
        """Send one resync frame, compressed when the link compresses; (wire bytes, payload
        bytes) for :meth:`sent`."""
        plain = encode(message)
        size = sum(memoryview(b).nbytes for b in plain)
        buffers = plain
        if self.compressor is not None:
            # The prefix and the data as one buffer: a copy, made only to compress it.
            joined = bytes(memoryview(plain[0])[FRAME_HEADER_SIZE:]) + bytes(message.data)
            buffers = await self.pack(_SYNC_DATA, joined, plain)
        self.link.order.sent(message)
        return self.link.send_buffers(buffers), size

    @property
    def compressor(self) -> Compressor | None:
        return self.sender.compressor if self.compress else None

    async def send_records(self) -> bool:
        """Send what the volume holds and the window allows; False when nothing could go."""
        sender = self.sender
        sent_any = False
        if sender.consumer.paused or sender.window_opens() is not None:
            return False
        gate = sender.quiet_gate
        limit = self.wp.applied_seq
        bucket = sender.bucket
        # Under a bandwidth limit, frames of about one burst: the limit then holds over any
        # second, not just on average over a few large frames.
        frame = FRAME_BYTES if bucket.rate is None else min(FRAME_BYTES, int(bucket.burst))
        if gate is not None:
            # One frame of about a second of the line at a time, each after a quiet probe.
            frame = min(frame, gate.frame_bytes(sender.flight.delivery_rate))
        while (
            self.next_seq <= limit
            and (room := self.window - self.in_flight) > 0
            and bucket.ready
            and self.gate_open()
        ):
            consumer = sender.consumer
            if consumer.mode != ConsumerMode.JOURNAL:
                return sent_any
            try:
                # No more than the window has room for (past the first record): a cut then
                # costs at most the window, the bound docs/link-protocol.md promises.
                run, raw = self.journal.read_run(self.next_seq, limit, min(frame, room))
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
            if self.in_flight and self.in_flight + FRAME_HEADER_SIZE + len(raw) > self.window:
                # The first record alone would overrun the window: it waits for an ACK (a
                # record larger than the whole window still goes, alone).
                return sent_any
            last = run[-1]
            plain = encode_raw_records(raw)
            buffers = await self.pack(_RECORDS, raw, plain)
            self.sent(last.seq, self.link.send_buffers(buffers), FRAME_HEADER_SIZE + len(raw))
            self.gate_sent()
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
                elif isinstance(message, Heartbeat):
                    if message.echo_ns:
                        self._on_echo(message)
                else:  # pragma: no cover - the handshake order lets nothing else through
                    raise ProtocolError(f"unexpected {type(message).__name__} from secondary")
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.failed = exc
                self.progress.set()
            raise

    def _on_ack(self, ack: Ack) -> None:
        sender = self.sender
        consumer = sender.consumer
        newest = self.journal.next_seq - 1
        if ack.durable_seq > newest:
            raise ProtocolError(
                f"the secondary acknowledged seq {ack.durable_seq}, which was never written "
                f"here (newest {newest})"
            )
        sender.stats.peer_applied_seq = ack.applied_seq
        sender.stats.last_ack_time = time.time()
        # An ACK frees journal space and releases ``ack = "remote"`` writes: it counts only
        # for records this session sent (or the WELCOME said were held). One for more is
        # from before a resync moved the cursor back, or not the secondary's at all.
        durable = min(ack.durable_seq, max(self.next_seq - 1, self.acked))
        if durable > self.acked:
            self.acked = durable
            if consumer.mode == ConsumerMode.JOURNAL:
                self.wp.acknowledge(sender.consumer_name, durable)
            sender.stats.acked_seq = durable
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
        sent_at = None
        while self.sent_bytes_at:
            key, cumulative, when = self.sent_bytes_at[0]
            done = key <= self.acked if key > 0 else -key <= ack.sync_lsn
            if not done:
                break
            self.acked_bytes = cumulative
            sent_at = when
            self.sent_bytes_at.popleft()
        flight = sender.flight
        if sent_at is not None:
            # The newest frame this ACK covered: how long an acknowledgement takes now.
            flight.on_ack_delay(time.monotonic() - sent_at)
            flight.on_acked(self.acked_bytes, self.in_flight)
        elif not self.in_flight:
            flight.idle()
        if not self.in_flight and sender.quiet_gate is not None and sender.quiet_gate.waiting:
            self.send_probe()  # the frame that waits needs a quiet reading: ask at once
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

    async def probes(self) -> None:
        """A HEARTBEAT every probe interval, busy or not: the secondary echoes it, and the echo
        measures the round trip. The kernel's own round trip is read each time too."""
        while True:
            background = self.sender.quiet_gate is not None
            await asyncio.sleep(BACKGROUND_PROBE_INTERVAL if background else PROBE_INTERVAL)
            self.send_probe()
            self.tcp_rtt = tcp_rtt(self.link.extra("socket"))

    def _on_echo(self, echo: Heartbeat) -> None:
        sender = self.sender
        rtt = (time.time_ns() - echo.echo_ns) / 1e9
        sender.flight.on_rtt(rtt)
        gate = sender.quiet_gate
        if gate is not None and echo.echo_ns == self._idle_probe:
            self._idle_probe = None
            if not self.in_flight:
                gate.on_idle_probe(rtt)
                self.progress.set()  # a frame may be waiting for this reading
