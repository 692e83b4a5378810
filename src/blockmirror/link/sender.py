"""The source's end of a link: one sender per peer, a consumer of the volume's journal.

A sender connects (forever, with capped exponential backoff), proves who it is, learns what the
secondary holds, then streams journal records it lacks, keeping a window of bytes in flight.
When the secondary lacks records the journal no longer has (a new replica, a consumer switched to
tracking), it copies the dirty regions while the stream goes on, and clears each region's bit
once the secondary has it durably.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.errors import BlockmirrorError, ProtocolError
from blockmirror.journal.journal import Consumer, RecordsGone
from blockmirror.link import auth
from blockmirror.link.protocol import (
    PROTOCOL_VERSION,
    Ack,
    AuthClient,
    AuthServer,
    Heartbeat,
    Hello,
    LinkCodec,
    Message,
    Refuse,
    SyncData,
    SyncDone,
    SyncStart,
    SyncZero,
    Welcome,
    encode,
    encode_raw_records,
)
from blockmirror.link.receiver import LinkRefused, close_writer, tune_socket
from blockmirror.link.session_crypto import (
    CHACHA20_POLY1305,
    IntegrityError,
    Opener,
    Sealer,
    derive_keys,
)

log = logging.getLogger(__name__)

WINDOW_BYTES = 64 * 1024 * 1024
FRAME_BYTES = 4 * 1024 * 1024
SYNC_CHUNK = 1024 * 1024
SYNC_ZERO_MAX = 64 * 1024 * 1024  # the most one SYNC_ZERO marker for a hole covers
SYNC_YIELD = 0.005  # a resync gives the event loop back at least this often (seconds)
CONNECT_TIMEOUT = 10.0  # to connect, and then for the whole handshake
IDLE_TIMEOUT = 10.0  # no whole, valid frame from the secondary for this long: the link is dead
HEARTBEAT_INTERVAL = 2.0
PROGRESS_TIMEOUT = 60.0  # bytes in flight and no ACK progress for this long: the link is dead
BACKOFF_MIN = 0.1
BACKOFF_MAX = 10.0
READ_SIZE = 256 * 1024


@dataclass(slots=True)
class SenderStats:
    state: str = "connecting"
    acked_seq: int = 0
    peer_applied_seq: int = 0
    bytes_sent: int = 0
    records_sent: int = 0
    sync_bytes_sent: int = 0
    connects: int = 0
    last_error: str | None = None
    # Why the link is not replicating right now (None while it is): the last session's end.
    reason: str | None = None
    connected_since: float | None = None
    consistent: bool = False
    throughput: float = 0.0  # bytes per second, smoothed
    _rate_at: float = field(default_factory=time.monotonic)
    _rate_bytes: int = 0

    def count(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self._rate_bytes += nbytes
        now = time.monotonic()
        elapsed = now - self._rate_at
        if elapsed >= 1.0:
            self.throughput = 0.5 * self.throughput + 0.5 * self._rate_bytes / elapsed
            self._rate_at, self._rate_bytes = now, 0


class PeerSender:
    def __init__(
        self,
        *,
        unit_name: str,
        volume_name: str,
        write_path: JournalWritePath,
        consumer: str,
        host: str,
        port: int,
        volume_id: Callable[[], str | None],
        psk: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.unit_name = unit_name
        self.volume_name = volume_name
        self.wp = write_path
        self.consumer_name = consumer
        self.host = host
        self.port = port
        self._volume_id = volume_id
        self.volume_id = ""
        self.psk = psk
        self.ssl_context = ssl_context
        self.stats = SenderStats()
        self._task: asyncio.Task[None] | None = None
        self._lsn = 0
        self._stopping = False

    @property
    def consumer(self) -> Consumer:
        return self.wp.journal.consumers[self.consumer_name]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def describe_task(self) -> str:
        task = self._task
        if task is None:
            return "not started"
        if not task.done():
            return f"running: {task!r}"
        if task.cancelled():
            return "cancelled"
        return f"ended: {task.exception()!r}"

    def status(self) -> dict[str, object]:
        journal = self.wp.journal
        consumer = self.consumer
        backlog, records = journal.backlog(consumer)
        oldest = next((r for r in journal.records if r.seq > consumer.acked_seq), None)
        lag_seconds = (time.time_ns() - oldest.timestamp_ns) / 1e9 if oldest else 0.0
        state = "paused" if consumer.paused else self.stats.state
        if consumer.mode == "tracking" and state not in ("syncing", "connecting", "paused"):
            state = "tracking"
        return {
            "address": f"{self.host}:{self.port}",
            "state": state,
            "mode": consumer.mode,
            "acked_seq": consumer.acked_seq,
            "applied_seq": self.stats.peer_applied_seq,
            "lag_bytes": backlog + consumer.dirty.dirty_bytes(),
            "lag_records": records,
            "lag_seconds": round(lag_seconds, 3) if consumer.mode == "journal" else None,
            "dirty_bytes": consumer.dirty.dirty_bytes(),
            "bytes_sent": self.stats.bytes_sent,
            "sync_bytes_sent": self.stats.sync_bytes_sent,
            "records_sent": self.stats.records_sent,
            "throughput_bytes_per_second": round(self.stats.throughput),
            "consistent": self.stats.consistent,
            "connects": self.stats.connects,
            "last_error": self.stats.last_error,
            "reason": self.stats.reason if self.stats.state == "connecting" else None,
        }

    # --- connection life cycle ------------------------------------------------------------------

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
            self.stats.state = "connecting"
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                if self._stopping:
                    raise
                # Not ours to end: a cancellation leaked from inside the session.
                self.stats.last_error = "session cancelled unexpectedly"
                self.stats.reason = self.stats.last_error
                log.exception(
                    "link to %s:%d for %s: session cancelled",
                    self.host,
                    self.port,
                    self.volume_name,
                )
            except (
                OSError,
                ProtocolError,
                BlockmirrorError,
                TimeoutError,
                asyncio.IncompleteReadError,
            ) as exc:
                self.stats.last_error = str(exc) or type(exc).__name__
                self.stats.reason = self.stats.last_error
                log.info(
                    "link to %s:%d for %s: %s",
                    self.host,
                    self.port,
                    self.volume_name,
                    self.stats.last_error,
                )
            except Exception as exc:
                # A bug must not end replication for good: say so loudly, then reconnect.
                self.stats.last_error = f"internal error: {exc!r}"
                self.stats.reason = self.stats.last_error
                log.exception("link to %s:%d for %s failed", self.host, self.port, self.volume_name)
            self.stats.connected_since = None
            self.stats.state = "connecting"
            if self._stopping:
                # A stop's cancellation can be absorbed while a failed session cleans up: the
                # flag, not the exception, decides that the sender ends.
                return
            if time.monotonic() - started > 5 * BACKOFF_MAX:
                delay = BACKOFF_MIN  # it worked for a while: start over quickly
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl_context, limit=READ_SIZE),
            CONNECT_TIMEOUT,
        )
        tune_socket(writer.get_extra_info("socket"), IDLE_TIMEOUT)
        link = _Link(reader, writer)
        try:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    welcome = await self._handshake(link)
            except TimeoutError:
                raise TimeoutError(
                    f"no handshake with the secondary within {CONNECT_TIMEOUT:g} s"
                ) from None
            self.stats.connects += 1
            self.stats.connected_since = time.time()
            self.stats.last_error = None
            self.stats.reason = None
            await self._replicate(link, welcome)
        finally:
            # Never wait forever for a peer that stopped reading to take our unsent bytes.
            await close_writer(writer)

    async def _handshake(self, link: _Link) -> Welcome:
        identity = self._volume_id()
        if identity is None:
            # A relay with nothing received yet has no data to pass on.
            raise BlockmirrorError("this replica has no source data yet; nothing to relay")
        self.volume_id = identity
        nonce = auth.new_nonce()
        # A key without TLS: every frame after the handshake is sealed (session_crypto).
        # With TLS, TLS already protects the stream and frames go as they are.
        offer = CHACHA20_POLY1305 if self.psk is not None and self.ssl_context is None else None
        hello = Hello(
            PROTOCOL_VERSION,
            self.unit_name,
            self.volume_name,
            self.volume_id,
            self.wp.volume.size,
            nonce,
            "psk" if self.psk else "none",
            self.wp.journal.max_payload(),
            offer,
        )
        link.send(hello)
        reply = await link.receive(CONNECT_TIMEOUT)
        if isinstance(reply, AuthServer):
            if self.psk is None:
                raise LinkRefused("auth", "the secondary requires a pre-shared key; none set")
            expected = auth.server_proof(self.psk, nonce, reply.nonce, self.volume_name)
            if not auth.verify(expected, reply.proof):
                link.send(Refuse("auth", "the secondary does not know the pre-shared key"))
                raise LinkRefused("auth", "the secondary failed to prove the pre-shared key")
            if reply.crypto != offer:
                if offer is None:
                    raise ProtocolError(f"the secondary seals with {reply.crypto!r}, not offered")
                message = (
                    f"a pre-shared key without TLS needs sealed frames ({offer}); the secondary "
                    "does not seal (an older unit, or the offer was stripped on the way)"
                )
                link.send(Refuse("crypto-required", message))
                raise LinkRefused("crypto-required", message)
            link.send(AuthClient(auth.client_proof(self.psk, reply.nonce, nonce, self.volume_name)))
            if offer is not None:
                keys = derive_keys(self.psk, nonce, reply.nonce, hello)
                link.seal(Sealer(keys.source), Opener(keys.secondary))
            reply = await link.receive(CONNECT_TIMEOUT)
        elif self.psk is not None and isinstance(reply, Welcome):
            link.send(Refuse("auth", "a pre-shared key is configured here; prove it"))
            raise LinkRefused("auth", "the secondary did not ask for the pre-shared key")
        if isinstance(reply, Refuse):
            raise LinkRefused(reply.code, reply.message)
        if not isinstance(reply, Welcome):
            raise ProtocolError(f"expected WELCOME, got {type(reply).__name__}")
        ours = self.wp.journal.max_payload()
        if reply.max_record is not None and reply.max_record < ours:
            # An older secondary that did not check the HELLO's max_record itself.
            message = (
                f"the secondary's journal holds records of at most {reply.max_record} bytes, "
                f"this volume's records may carry {ours}; give it a larger journal_size"
            )
            link.send(Refuse("journal-too-small", message))
            raise LinkRefused("journal-too-small", message)
        return reply

    # --- replication ----------------------------------------------------------------------------

    async def _replicate(self, link: _Link, welcome: Welcome) -> None:
        journal = self.wp.journal
        consumer = self.consumer
        received = welcome.received_seq
        full = False
        # The secondary's WELCOME is the truth about what it holds, not what it acknowledged
        # before: a replica restored from a backup (or a secondary that lost its journal's
        # tail) holds less than its old ACKs said.
        lost = received < consumer.acked_seq
        if welcome.volume_id != self.volume_id:
            full = True  # a new replica, or one of another volume we were allowed to overwrite
        elif received > journal.next_seq - 1:
            full = True  # it claims records we never wrote
        elif consumer.mode == "journal":
            if received + 1 < journal.head_seq:
                full = True  # a gap we no longer hold
            elif lost:
                log.warning(
                    "%s -> %s:%d: the secondary holds records up to %d only, although it "
                    "acknowledged %d (restored from a backup?); resending from %d",
                    self.volume_name,
                    self.host,
                    self.port,
                    received,
                    consumer.acked_seq,
                    received + 1,
                )
                # Lowered, not only skipped back: the journal must keep these records now.
                consumer.acked_seq = received
                self.stats.acked_seq = received
            elif received > consumer.acked_seq:
                self.wp.acknowledge(self.consumer_name, received)
        elif lost:
            # Tracking: the dirty map covers what came after the cursor; what the secondary
            # lost before it must be copied too, from the records, or all of it.
            if received + 1 < journal.head_seq:
                full = True
            else:
                consumer.generation += 1
                for rec in journal.records:
                    if received < rec.seq <= consumer.acked_seq and rec.length:
                        consumer.dirty.mark(rec.offset, rec.length)
                log.warning(
                    "%s -> %s:%d: the secondary lost records %d..%d; their regions are resynced",
                    self.volume_name,
                    self.host,
                    self.port,
                    received + 1,
                    consumer.acked_seq,
                )
        if full:
            log.info(
                "%s -> %s:%d: full resync: the secondary holds %s up to %d (it acknowledged "
                "%d); this journal holds %d..%d",
                self.volume_name,
                self.host,
                self.port,
                "this volume" if welcome.volume_id == self.volume_id else "another volume",
                received,
                consumer.acked_seq,
                journal.head_seq,
                journal.next_seq - 1,
            )
            consumer.dirty.mark_all()
            consumer.mode = "tracking"
        self.stats.consistent = welcome.consistent and not full and not lost
        self.stats.peer_applied_seq = welcome.applied_seq
        if full or lost:
            await self.wp.checkpoint()  # the lowered cursor or the dirty bits, durably
        stream = _Stream(
            self, link, start=consumer.acked_seq + 1, peer_consistent=welcome.consistent
        )
        # Sending, reading ACKs and heartbeats run side by side; the first to fail ends the
        # session whatever the others are waiting on (a drain towards a peer that stopped
        # reading, say): the idle deadline always applies.
        tasks = [
            asyncio.ensure_future(stream.run(full=full)),
            asyncio.ensure_future(stream.read_acks()),
            asyncio.ensure_future(stream.heartbeats()),
        ]
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done and not task.cancelled() and (error := task.exception()):
                    raise error
            raise ConnectionError("the session ended")  # pragma: no cover - they run forever
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    def next_lsn(self) -> int:
        self._lsn += 1
        return self._lsn


class _Link:
    """Frames over one stream connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = LinkCodec()
        self.last_sent = time.monotonic()
        self.last_heard = time.monotonic()
        # Set once the handshake has made session keys (a pre-shared key without TLS).
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None

    def seal(self, sealer: Sealer, opener: Opener) -> None:
        """Seal every frame from now on, both ways (the secondary sends nothing between our
        AUTH_CLIENT and its sealed WELCOME, so nothing unsealed is buffered here)."""
        if self.codec.buffered:
            raise ProtocolError("the secondary sent frames before the session was sealed")
        self.sealer, self.opener = sealer, opener

    def send(self, message: Message) -> int:
        return self.send_buffers(encode(message))

    def send_buffers(self, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
        self._check_open()
        if self.sealer is not None:
            buffers = self.sealer.seal(buffers)
        self.writer.writelines(buffers)
        self.last_sent = time.monotonic()
        return sum(memoryview(b).nbytes for b in buffers)

    def _check_open(self) -> None:
        # uvloop raises RuntimeError on a write to a closed transport; asyncio drops it quietly.
        if self.writer.is_closing():
            raise ConnectionResetError("the link is closed")

    async def receive(self, timeout: float) -> Message:
        """The next whole frame within ``timeout`` seconds, however many reads it takes:
        bytes alone do not keep a link alive (docs/link-protocol.md, "Keep-alive")."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self.codec.next_event()
            if event is not None:
                self.last_heard = time.monotonic()
                return event
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no frame from the secondary for {timeout:g} s")
            try:
                async with asyncio.timeout(left):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError("the secondary closed the link")
            if self.opener is None:
                self.codec.feed(data)
                continue
            try:
                plain = self.opener.feed(data)
            except IntegrityError as exc:
                with contextlib.suppress(Exception):
                    self.send(Refuse("integrity", str(exc)))
                raise LinkRefused("integrity", str(exc)) from None
            for chunk in plain:
                self.codec.feed(chunk)


class _Stream:
    """One connected session: records out, ACKs in, resync alongside."""

    def __init__(
        self, sender: PeerSender, link: _Link, *, start: int, peer_consistent: bool = True
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
        self.sent_bytes_at: deque[tuple[int, int]] = deque()  # (seq, cumulative bytes)
        self.cumulative = 0
        self.acked_bytes = 0
        # (lsn, offset, length, consumer generation when the region was read)
        self.sync_inflight: deque[tuple[int, int, int, int]] = deque()
        self.sync_done_lsn: int | None = None
        self.progress = asyncio.Event()
        self.failed: BaseException | None = None

    # --- sending --------------------------------------------------------------------------------

    async def run(self, *, full: bool) -> None:
        consumer = self.sender.consumer
        if consumer.mode == "tracking" or not consumer.dirty.is_clean() or not self.peer_consistent:
            await self._resync(full=full)
            self.peer_consistent = True
        self.sender.stats.state = "replicating"
        while True:
            await self._check_failed()
            if self.sender.consumer.mode == "tracking" or (
                not self.sender.consumer.dirty.is_clean() and not self.sync_inflight
            ):
                # The journal overflowed while we were behind: our records are gone.
                await self._resync(full=False)
                self.sender.stats.state = "replicating"
                continue
            if self.sender.consumer.paused:
                await self._wait(1.0)
                continue
            if not self._send_records():
                await self._wait(HEARTBEAT_INTERVAL)

    async def _wait(self, seconds: float) -> None:
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

    async def _check_failed(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.link.writer.transport.get_write_buffer_size() > WINDOW_BYTES:
            await self.link.writer.drain()

    def _send_records(self) -> bool:
        """Send what the volume holds and the window allows; False when nothing could go."""
        sent_any = False
        if self.sender.consumer.paused:
            return False
        limit = self.wp.applied_seq
        while self.next_seq <= limit and self.cumulative - self.acked_bytes < WINDOW_BYTES:
            if self.sender.consumer.mode != "journal":
                return sent_any
            try:
                run, raw = self.journal.read_run(self.next_seq, limit, FRAME_BYTES)
            except RecordsGone:
                # Records this consumer needs are gone (should not happen in journal mode):
                # fall back to copying everything rather than leave the replica short.
                log.error(
                    "%s: records from %d were freed under a journal-mode consumer",
                    self.sender.volume_name,
                    self.next_seq,
                )
                self.sender.consumer.dirty.mark_all()
                self.sender.consumer.mode = "tracking"
                return sent_any
            if not run:
                return sent_any
            last = run[-1]
            nbytes = self.link.send_buffers(encode_raw_records(raw))
            self.cumulative += nbytes
            self.sent_bytes_at.append((last.seq, self.cumulative))
            self.sender.stats.count(nbytes)
            self.sender.stats.records_sent += len(run)
            self.next_seq = last.seq + 1
            sent_any = True
        return sent_any

    async def _resync(self, *, full: bool) -> None:
        """Copy every dirty region while records keep streaming (docs/link-protocol.md)."""
        sender = self.sender
        consumer = sender.consumer
        sender.stats.state = "syncing"
        sender.stats.consistent = False
        while consumer.paused:  # a paused consumer is sent nothing: not even SYNC_START
            await self._wait(1.0)
            await self._check_failed()
        # From here on every new write reaches the peer through the journal, so the dirty map
        # only has to cover what happened before this point. A consumer still in journal mode
        # (an interrupted resync) keeps its cursor: its records after it are not in the map.
        if consumer.mode == "journal":
            base = min(consumer.acked_seq, self.wp.applied_seq)
        else:
            base = self.wp.applied_seq
        consumer.mode = "journal"
        consumer.acked_seq = base
        await self.wp.checkpoint()
        self.next_seq = base + 1
        self.acked = base
        total = consumer.dirty.dirty_bytes()
        log.info(
            "%s -> %s:%d: %s resync of %d bytes",
            sender.volume_name,
            sender.host,
            sender.port,
            "full" if full else "dirty-region",
            total,
        )
        self.link.send(SyncStart(sender.next_lsn(), full, total, base))
        volume = self.wp.volume
        zeros = bytes(SYNC_CHUNK)
        loop = asyncio.get_running_loop()
        yielded = loop.time()
        while True:
            # Writes made outside the journal (enqueueing paused) reach the volume at moments
            # the copy cannot order against its reads: a pass during which one happened, or
            # one that ends while they still may, proves no prefix. Copy again what they dirtied.
            unjournaled = self.wp.unjournaled_count
            for run_offset, run_length in list(consumer.dirty.dirty_regions()):
                offset, end = run_offset, run_offset + run_length
                while offset < end:
                    n = min(SYNC_CHUNK, end - offset)
                    await self._check_failed()
                    while self.cumulative - self.acked_bytes >= WINDOW_BYTES or consumer.paused:
                        # A paused consumer is sent nothing, resync included.
                        await self._wait(1.0)
                        await self._check_failed()
                        yielded = loop.time()
                    if loop.time() - yielded > SYNC_YIELD:
                        # Zero markers are tiny: the window alone would never make this loop wait,
                        # and the host's requests and the admin API must not starve behind it.
                        await asyncio.sleep(0)
                        await self._check_failed()
                        yielded = loop.time()
                    if consumer.mode != "journal":
                        return  # overflowed again mid-copy; run() starts over from the dirty map
                    self._send_records()  # records the copy would include go first
                    as_of = self.wp.applied_seq
                    lsn = sender.next_lsn()
                    hole = self._hole_at(offset, end)
                    if hole >= n:
                        # A hole of a sparse volume: one marker for all of it (up to a bound), read
                        # from the allocation map at this moment, like a pread would be.
                        n = hole
                        nbytes = self.link.send(SyncZero(lsn, offset, n, as_of))
                    else:
                        data = volume.pread(offset, n)
                        if data == zeros[:n]:
                            nbytes = self.link.send(SyncZero(lsn, offset, n, as_of))
                        else:
                            nbytes = self.link.send(SyncData(lsn, offset, as_of, memoryview(data)))
                    self.sync_inflight.append((lsn, offset, n, consumer.generation))
                    self.cumulative += nbytes
                    self.sent_bytes_at.append((-lsn, self.cumulative))
                    sender.stats.count(nbytes)
                    sender.stats.sync_bytes_sent += n
                    offset += n
            wp = self.wp
            if (
                wp.unjournaled_count == unjournaled
                and not wp.unjournaled_pending
                and not wp.journal.enqueue_paused
            ):
                break
            await self._wait(0.5)
            await self._check_failed()
        # A relay vouches for a copy only once its own replica is consistent: until then the
        # regions it sent may still be followed by more from upstream.
        while not self._own_replica_consistent():
            if consumer.mode != "journal":
                return
            self._send_records()
            await self._wait(0.5)
            await self._check_failed()
        while consumer.paused:
            await self._wait(1.0)
            await self._check_failed()
        done_lsn = sender.next_lsn()
        self.sync_done_lsn = done_lsn
        self.link.send(SyncDone(done_lsn, self.wp.applied_seq))
        while self.sync_inflight:
            self._send_records()
            await self._wait(1.0)
            await self._check_failed()
        log.info("%s -> %s:%d: resync complete", sender.volume_name, sender.host, sender.port)

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
        replica = self.journal.replica
        return replica is None or replica.consistent

    # --- receiving ------------------------------------------------------------------------------

    async def read_acks(self) -> None:
        try:
            while True:
                message = await self.link.receive(IDLE_TIMEOUT)
                if isinstance(message, Ack):
                    self._on_ack(message)
                elif isinstance(message, Heartbeat):
                    pass
                elif isinstance(message, Refuse):
                    raise LinkRefused(message.code, message.message)
                else:
                    raise ProtocolError(f"unexpected {type(message).__name__} from secondary")
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.failed = exc
                self.progress.set()
            raise

    def _on_ack(self, ack: Ack) -> None:
        sender = self.sender
        sender.stats.peer_applied_seq = ack.applied_seq
        if ack.durable_seq > self.acked:
            self.acked = ack.durable_seq
            if sender.consumer.mode == "journal":
                self.wp.acknowledge(sender.consumer_name, ack.durable_seq)
            sender.stats.acked_seq = ack.durable_seq
        consumer = sender.consumer
        while self.sync_inflight and self.sync_inflight[0][0] <= ack.sync_lsn:
            _, offset, length, generation = self.sync_inflight.popleft()
            # The secondary holds this copy durably, and every write since it was read is in
            # the stream, unless bits were set behind it (the generation moved): then the
            # region must be copied again, so its bit stays.
            if consumer.mode == "journal" and consumer.generation == generation:
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
            and consumer.mode == "journal"
            and not self.sync_inflight
            and consumer.dirty.is_clean()
        )
        self.progress.set()

    async def heartbeats(self) -> None:
        acked_bytes, progress_at = self.acked_bytes, time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL / 2)
            now = time.monotonic()
            if now - self.link.last_sent >= HEARTBEAT_INTERVAL:
                with contextlib.suppress(Exception):
                    self.link.send(Heartbeat(time.time_ns(), 0))
            # A secondary that answers heartbeats but takes nothing in (stopped reading) is as
            # dead as a silent one: bytes in flight and no ACK progress for long end the link.
            if self.acked_bytes != acked_bytes or self.cumulative == self.acked_bytes:
                acked_bytes, progress_at = self.acked_bytes, now
            elif now - progress_at > PROGRESS_TIMEOUT:
                raise TimeoutError(
                    f"the secondary acknowledged nothing for {PROGRESS_TIMEOUT:g} s with "
                    f"{self.cumulative - self.acked_bytes} bytes in flight"
                )
