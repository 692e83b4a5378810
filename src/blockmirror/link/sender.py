"""The source's end of a link: one sender per peer, a consumer of the volume's journal.

A sender connects (forever, with capped exponential backoff), proves who it is, learns what the
secondary holds, then streams journal records it lacks (:mod:`blockmirror.link.outbound`),
keeping a window of bytes in flight. When the secondary lacks records the journal no longer has
(a new replica, a consumer switched to tracking), it copies the dirty regions while the stream
goes on (:mod:`blockmirror.link.copier`), and clears each region's bit once the secondary has it
durably.

Where the link stands is a :class:`~blockmirror.state.LinkPhase`, changed only through
``state.transition``; its value is the peer's ``state`` in status ("paused" and "tracking" are
derived from the consumer there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.errors import BlockmirrorError, ProtocolError
from blockmirror.journal.journal import Consumer
from blockmirror.link import auth
from blockmirror.link.handshake import End
from blockmirror.link.outbound import OutboundStream
from blockmirror.link.protocol import (
    PROTOCOL_VERSION,
    AuthClient,
    AuthServer,
    Hello,
    Welcome,
)
from blockmirror.link.session import (
    DEFAULT_TIMEOUTS,
    READ_SIZE,
    LinkRefused,
    LinkSession,
    Timeouts,
    tune_socket,
)
from blockmirror.link.session_crypto import CHACHA20_POLY1305, Opener, Sealer, derive_keys
from blockmirror.state import ConsumerMode, LinkPhase, transition

log = logging.getLogger(__name__)

BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 10.0

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(slots=True)
class SenderStats:
    phase: LinkPhase = LinkPhase.CONNECTING
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
    """Replicates one volume to one peer, for as long as the unit runs.

    ``connect`` opens the connection (by default TCP, with TLS when ``ssl_context`` is set);
    tests give one that returns an in-memory stream. ``timeouts`` are the protocol's unless a
    test shortens them.
    """

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
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        connect: Callable[[], Awaitable[Streams]] | None = None,
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
        self.timeouts = timeouts
        self._connect = connect or self._open_connection
        self.stats = SenderStats()
        self._task: asyncio.Task[None] | None = None
        self._lsn = 0
        self._stopping = False

    @property
    def consumer(self) -> Consumer:
        return self.wp.journal.consumers[self.consumer_name]

    @property
    def phase(self) -> LinkPhase:
        return self.stats.phase

    def enter(self, phase: LinkPhase) -> None:
        """Move the link to ``phase`` (``state.TRANSITIONS`` says which moves exist)."""
        what = f"link to {self.host}:{self.port} for {self.volume_name}"
        self.stats.phase = transition(self.stats.phase, phase, what=what)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.stats.phase is not LinkPhase.STOPPED:
            self.enter(LinkPhase.STOPPED)

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
        phase = self.stats.phase
        state = "paused" if consumer.paused else phase.value
        if consumer.mode == ConsumerMode.TRACKING and state not in (
            LinkPhase.SYNCING,
            LinkPhase.CONNECTING,
            "paused",
        ):
            state = "tracking"
        return {
            "address": f"{self.host}:{self.port}",
            "state": state,
            "mode": consumer.mode,
            "acked_seq": consumer.acked_seq,
            "applied_seq": self.stats.peer_applied_seq,
            "lag_bytes": backlog + consumer.dirty.dirty_bytes(),
            "lag_records": records,
            "lag_seconds": round(lag_seconds, 3) if consumer.mode == ConsumerMode.JOURNAL else None,
            "dirty_bytes": consumer.dirty.dirty_bytes(),
            "bytes_sent": self.stats.bytes_sent,
            "sync_bytes_sent": self.stats.sync_bytes_sent,
            "records_sent": self.stats.records_sent,
            "throughput_bytes_per_second": round(self.stats.throughput),
            "consistent": self.stats.consistent,
            "connects": self.stats.connects,
            "last_error": self.stats.last_error,
            "reason": self.stats.reason if phase is LinkPhase.CONNECTING else None,
        }

    # --- connection life cycle ------------------------------------------------------------------

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
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
            self.enter(LinkPhase.CONNECTING)  # the next attempt
            if self._stopping:
                # A stop's cancellation can be absorbed while a failed session cleans up: the
                # flag, not the exception, decides that the sender ends.
                return
            if time.monotonic() - started > 5 * BACKOFF_MAX:
                delay = BACKOFF_MIN  # it worked for a while: start over quickly
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _open_connection(self) -> Streams:
        return await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl_context, limit=READ_SIZE
        )

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(self._connect(), self.timeouts.handshake)
        tune_socket(writer.get_extra_info("socket"), self.timeouts.idle)
        link = LinkSession(
            reader,
            writer,
            end=End.SOURCE,
            timeouts=self.timeouts,
            what=f"link to {self.host}:{self.port} for {self.volume_name}",
        )
        try:
            welcome = await self._handshake(link)
            self.stats.connects += 1
            self.stats.connected_since = time.time()
            self.stats.last_error = None
            self.stats.reason = None
            await self._replicate(link, welcome)
        finally:
            # Never wait forever for a peer that stopped reading to take our unsent bytes.
            await link.close()

    async def _handshake(self, link: LinkSession) -> Welcome:
        """HELLO, the proofs both ways when a key is set, and the WELCOME; the link streams
        after it. The order is :mod:`blockmirror.link.handshake`'s: whatever else arrives is
        refused there."""
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
        reply = await link.receive()  # AUTH_SERVER or WELCOME
        if isinstance(reply, AuthServer):
            if self.psk is None:
                raise LinkRefused("auth", "the secondary requires a pre-shared key; none set")
            expected = auth.server_proof(self.psk, nonce, reply.nonce, self.volume_name)
            if not auth.verify(expected, reply.proof):
                link.refuse_quietly("auth", "the secondary does not know the pre-shared key")
                raise LinkRefused("auth", "the secondary failed to prove the pre-shared key")
            if reply.crypto != offer:
                if offer is None:
                    raise ProtocolError(f"the secondary seals with {reply.crypto!r}, not offered")
                raise link.refuse(
                    "crypto-required",
                    f"a pre-shared key without TLS needs sealed frames ({offer}); the secondary "
                    "does not seal (an older unit, or the offer was stripped on the way)",
                )
            link.send(AuthClient(auth.client_proof(self.psk, reply.nonce, nonce, self.volume_name)))
            if offer is not None:
                keys = derive_keys(self.psk, nonce, reply.nonce, hello)
                link.seal(Sealer(keys.source), Opener(keys.secondary))
            reply = await link.receive()  # the WELCOME
        elif self.psk is not None:
            link.refuse_quietly("auth", "a pre-shared key is configured here; prove it")
            raise LinkRefused("auth", "the secondary did not ask for the pre-shared key")
        if not isinstance(reply, Welcome):  # pragma: no cover - the handshake order says so
            raise ProtocolError(f"expected WELCOME, got {type(reply).__name__}")
        ours = self.wp.journal.max_payload()
        if reply.max_record is not None and reply.max_record < ours:
            # An older secondary that did not check the HELLO's max_record itself.
            raise link.refuse(
                "journal-too-small",
                f"the secondary's journal holds records of at most {reply.max_record} bytes, "
                f"this volume's records may carry {ours}; give it a larger journal_size",
            )
        link.stream()
        return reply

    # --- replication ----------------------------------------------------------------------------

    async def _replicate(self, link: LinkSession, welcome: Welcome) -> None:
        full = await self._resume_point(welcome)
        consumer = self.consumer
        stream = OutboundStream(
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

    async def _resume_point(self, welcome: Welcome) -> bool:
        """Set the consumer up to follow what the secondary says it holds; whether it needs a
        full copy."""
        journal = self.wp.journal
        bound, dropped = journal.bind_peer(self.consumer_name, welcome.unit)
        if bound:
            log.info("%s -> %s:%d: %s", self.volume_name, self.host, self.port, bound)
            await self.wp.checkpoint()  # the cursor's owner, durably, before maps go
            await asyncio.to_thread(_remove_maps, dropped)
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
        elif consumer.mode == ConsumerMode.JOURNAL:
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
            consumer.set_mode(ConsumerMode.TRACKING)
        self.stats.consistent = welcome.consistent and not full and not lost
        self.stats.peer_applied_seq = welcome.applied_seq
        if full or lost:
            await self.wp.checkpoint()  # the lowered cursor or the dirty bits, durably
        return full

    def next_lsn(self) -> int:
        self._lsn += 1
        return self._lsn


def _remove_maps(consumers: list[Consumer]) -> None:
    """Close and delete the dirty maps of cursors a checkpoint no longer holds (blocking)."""
    for consumer in consumers:
        path = consumer.dirty.path
        consumer.dirty.close(sync=False)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
