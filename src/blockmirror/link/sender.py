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
from typing import Final

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.errors import BlockmirrorError, ProtocolError
from blockmirror.journal.consumers import first_after
from blockmirror.journal.journal import Consumer
from blockmirror.link.compression import Codec, negotiated
from blockmirror.link.direction import LinkRoles
from blockmirror.link.handshake import End
from blockmirror.link.link_control import LinkControl
from blockmirror.link.outbound import OutboundStream, WindowClosed
from blockmirror.link.peer_configs import ConfigShare, offer
from blockmirror.link.protocol import (
    RefuseCode,
    Welcome,
)
from blockmirror.link.resume import (
    SplitBrainFound,
    add_diverged,
    check_same_line,
    remove_maps,
    resume_point,
)
from blockmirror.link.session import (
    DEFAULT_TIMEOUTS,
    READ_SIZE,
    LinkRefused,
    LinkSession,
    Timeouts,
    tune_socket,
)
from blockmirror.link.source_handshake import source_handshake
from blockmirror.state import ConsumerMode, LinkPhase, Role, transition

log = logging.getLogger(__name__)

BACKOFF_MIN: Final = 0.1
# A returning peer is reconnected within about a second: a backlog waits for nothing but the
# link. An attempt on a peer that is down costs a SYN (or a refused connect) a second, and the
# log says so once per kind of failure, not every second.
BACKOFF_MAX: Final = 1.0
# A peer that answered and refused (a journal too small, a wrong key, another volume) will not
# change its mind within a second: asking it again backs off further, as before.
REFUSED_BACKOFF_MAX: Final = 10.0
# How long a sender waits, unless the roles change first, before it asks again a peer that
# refused it for a reason of direction.
UPSTREAM_RECHECK: Final = 10.0
SPLIT_BRAIN_RECHECK: Final = 30.0
_DIRECTION_CODES: Final = frozenset(
    {RefuseCode.UPSTREAM, RefuseCode.SUPERSEDED, RefuseCode.SPLIT_BRAIN, RefuseCode.UNRELATED}
)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# The phases whose status carries the reason.
_REASONED: Final = frozenset({LinkPhase.CONNECTING, LinkPhase.UPSTREAM, LinkPhase.SPLIT_BRAIN})


class PeerSender(LinkControl):
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
        configs: ConfigShare | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        connect: Callable[[], Awaitable[Streams]] | None = None,
        roles: LinkRoles | None = None,
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
        super().__init__()  # the link's settings and pace (link_control)
        # The configuration exchange (peer_configs); what the peer's WELCOME said of it.
        self.configs = configs
        self._peer_takes_configs = False
        self.peer_unit: str | None = None
        self.ssl_context = ssl_context
        self.timeouts = timeouts
        self._connect = connect or self._open_connection
        self._task: asyncio.Task[None] | None = None
        self._lsn = 0
        self._stopping = False
        self.roles = roles

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

    def wake(self) -> None:
        """Look at the consumer again now (its dirty map changed: a repair). Never raises."""
        if self.stream is not None:
            self.stream.progress.set()

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
        start = first_after(journal.records, consumer.acked_seq)
        oldest = journal.records[start] if start is not None else None
        lag_seconds = (time.time_ns() - oldest.timestamp_ns) / 1e9 if oldest else 0.0
        phase = self.stats.phase
        # A split brain (or a peer we must not send to) says more than a pause does.
        directed = phase in (LinkPhase.UPSTREAM, LinkPhase.SPLIT_BRAIN)
        state = "paused" if consumer.paused and not directed else phase.value
        window, window_until = self._window_status()
        if window == "closed" and not directed and state != "paused":
            state = "window-closed"  # connected or not, nothing is sent until it opens
        if consumer.mode == ConsumerMode.TRACKING and state not in (
            LinkPhase.SYNCING,
            LinkPhase.CONNECTING,
            LinkPhase.UPSTREAM,
            LinkPhase.SPLIT_BRAIN,
            "paused",
            "window-closed",
        ):
            state = "tracking"
        return {
            "address": f"{self.host}:{self.port}",
            "peer": consumer.peer,
            "state": state,
            "mode": consumer.mode,
            "acked_seq": consumer.acked_seq,
            "applied_seq": self.stats.peer_applied_seq,
            "lag_bytes": backlog + consumer.dirty.dirty_bytes(),
            "lag_records": records,
            "lag_seconds": round(lag_seconds, 3) if consumer.mode == ConsumerMode.JOURNAL else None,
            "dirty_bytes": consumer.dirty.dirty_bytes(),
            "bytes_sent": self.stats.bytes_sent,
            "wire_bytes_sent": self.stats.wire_bytes_sent,
            "compression": str(self.settings.compression),
            "compressing": self.stream is not None and self.stream.compress,
            "compression_ratio": self.stats.compression_ratio,
            "sync_bytes_sent": self.stats.sync_bytes_sent,
            "sync_bytes_skipped": self.stats.sync_bytes_skipped,
            "records_sent": self.stats.records_sent,
            "throughput_bytes_per_second": round(self.stats.throughput),
            "consistent": self.stats.consistent,
            "connects": self.stats.connects,
            "diverged_union_bytes": self.stats.diverged_union_bytes,
            "last_error": self.stats.last_error,
            "last_ack_time": self.stats.last_ack_time,
            "rate_limit": self.rate_limit,
            "priority": str(self.settings.priority),
            "priority_control": str(self.priority_control),
            "pace_bytes_per_second": round(self.bucket.rate) if self.bucket.rate else None,
            "queue_delay_seconds": (
                round(self.quiet_gate.qdelay, 4)
                if self.quiet_gate is not None and self.quiet_gate.qdelay is not None
                else None
            ),
            "window": window,
            "window_until": window_until,
            "connect": str(self.settings.connect),
            "eta_seconds": self._eta(backlog + consumer.dirty.dirty_bytes()),
            # End to end (the probes' echoes, the smallest of the last 10 s) and as the kernel
            # measures it to the next TCP hop (a proxy on the way ends that one).
            "rtt_seconds": _rounded(self.flight.recent_rtt),
            "tcp_rtt_seconds": _rounded(self.stream.tcp_rtt if self.stream is not None else None),
            "inflight_bytes": self.stream.in_flight if self.stream is not None else 0,
            "inflight_window_bytes": self.stream.window if self.stream is not None else None,
            "reason": self.stats.reason if phase in _REASONED else None,
        }

    def share_config(self) -> None:
        """Send our configuration to the peer now, if it is connected and takes it (at the
        start of each session, and after a reload)."""
        link = self._link
        if link is None:
            return
        try:
            offer(self.configs, link, accepted=self._peer_takes_configs, what=self.describe())
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot send the configuration: %s", self.describe(), exc)

    def describe(self) -> str:
        return f"{self.volume_name} -> {self.host}:{self.port}"

    # --- connection life cycle ------------------------------------------------------------------

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
            started = time.monotonic()
            cap = BACKOFF_MAX
            try:
                if await self._session():
                    # Waited for the roles to change (or a recheck): ask again at once.
                    delay = BACKOFF_MIN
                    self.enter(LinkPhase.CONNECTING)
                    if self._stopping:
                        return
                    continue
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
                if isinstance(exc, LinkRefused):
                    cap = REFUSED_BACKOFF_MAX
                error = str(exc) or type(exc).__name__
                repeated = error == self.stats.last_error
                self.stats.last_error = error
                self.stats.reason = error
                log.log(
                    logging.DEBUG if repeated else logging.INFO,
                    "link to %s:%d for %s: %s%s",
                    self.host,
                    self.port,
                    self.volume_name,
                    error,
                    ""
                    if repeated
                    else " (retried with backoff; repeats are logged at debug level)",
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
            if time.monotonic() - started > 5 * REFUSED_BACKOFF_MAX:
                delay = BACKOFF_MIN  # it worked for a while: start over quickly
            if self.roles is not None:
                # A change of role or source (a peer that just connected to us is reachable)
                # cuts the wait short.
                await self.roles.wait_changed(delay)
            else:
                await asyncio.sleep(delay)
            delay = min(delay * 2, cap)

    async def _open_connection(self) -> Streams:
        return await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl_context, limit=READ_SIZE
        )

    async def _session(self) -> bool:
        """One connection; True when it ended by waiting on the roles or a transmit window
        (no backoff)."""
        if self.dial_up and self.window_opens() is not None:
            await self._wait_for_window()
            return True
        roles = self.roles
        if roles is not None:
            source = roles.source()
            why = None
            if roles.lineage().role is Role.DEMOTED:
                why = "this volume is demoted: it sends nothing until it follows a new primary"
            elif source is not None and self.consumer.peer == source:
                why = f"{source} is this volume's source"
            if why is not None:
                self.stats.reason = why
                self.enter(LinkPhase.UPSTREAM)
                await roles.wait_changed(UPSTREAM_RECHECK)
                return True
        reader, writer = await asyncio.wait_for(self._connect(), self.timeouts.handshake)
        sock = writer.get_extra_info("socket")
        tune_socket(sock, self.timeouts.idle)
        self._choose_priority(sock)
        link = LinkSession(
            reader,
            writer,
            end=End.SOURCE,
            timeouts=self.timeouts,
            what=f"link to {self.host}:{self.port} for {self.volume_name}",
        )
        try:
            try:
                welcome, regions = await self._handshake(link)
            except LinkRefused as exc:
                if roles is None or exc.code not in _DIRECTION_CODES:
                    raise
                await link.close()
                await self._refused(roles, exc)
                return True
            try:
                same_line = check_same_line(self, welcome)
            except SplitBrainFound as found:
                assert roles is not None
                link.refuse_quietly(found.ours.code, found.ours.message, frame=found.ours)
                await link.close()
                await self._refused(
                    roles, LinkRefused(found.theirs.code, found.theirs.message, found.theirs)
                )
                return True
            self.stats.connects += 1
            self.stats.connected_since = time.time()
            self.stats.last_error = None
            self.stats.reason = None
            if roles is not None:
                roles.linked(self.consumer_name, welcome.lineage)
            try:
                await self._replicate(link, welcome, regions, same_line=same_line)
            except WindowClosed as closed:
                log.info("%s: %s; disconnecting", self.describe(), closed)
                self.stats.reason = str(closed)
                return True
        finally:
            # Never wait forever for a peer that stopped reading to take our unsent bytes.
            await link.close()
        return False

    async def _refused(self, roles: LinkRoles, exc: LinkRefused) -> None:
        """The peer refused us for a reason of direction: learn who it is, let the roles act
        (demote, record a split brain), and wait for a change before asking again."""
        refusal = exc.refusal
        peer = refusal.lineage if refusal is not None else None
        if peer is not None:
            journal = self.wp.journal
            bound, dropped = journal.bind_peer(self.consumer_name, peer.unit)
            if bound:
                log.info("%s -> %s:%d: %s", self.volume_name, self.host, self.port, bound)
            if roles.source() == peer.unit:
                # Our source: it holds everything we have (its cursor must not hold records).
                journal.peer_holds(peer.unit, journal.durable_seq)
            if bound:
                await self.wp.checkpoint()
                await asyncio.to_thread(remove_maps, dropped)
        if refusal is not None:
            await roles.refused(self.consumer_name, refusal)
        self.stats.last_error = None
        self.stats.reason = f"{exc.code}: {exc.message}"
        split = exc.code in (RefuseCode.SPLIT_BRAIN, RefuseCode.UNRELATED)
        self.enter(LinkPhase.SPLIT_BRAIN if split else LinkPhase.UPSTREAM)
        await roles.wait_changed(SPLIT_BRAIN_RECHECK if split else UPSTREAM_RECHECK)

    async def _handshake(self, link: LinkSession) -> tuple[Welcome, list[tuple[int, int]]]:
        return await source_handshake(self, link)

    # --- replication ----------------------------------------------------------------------------

    async def _replicate(
        self,
        link: LinkSession,
        welcome: Welcome,
        regions: list[tuple[int, int]],
        *,
        same_line: bool = True,
    ) -> None:
        full = await resume_point(self, welcome, same_line=same_line)
        if regions and not full:
            await add_diverged(self, regions)
        consumer = self.consumer
        self.peer_decodes = welcome.compression
        stream = OutboundStream(
            self,
            link,
            start=consumer.acked_seq + 1,
            peer_consistent=welcome.consistent,
            compress=negotiated(self.settings.compression, welcome.compression) is not Codec.NONE,
        )
        self.stream = stream
        self._link, self.peer_unit = link, welcome.unit
        self._peer_takes_configs = welcome.configs
        self.share_config()
        # Sending, reading ACKs and heartbeats run side by side; the first to fail ends the
        # session whatever the others are waiting on (a drain towards a peer that stopped
        # reading, say): the idle deadline always applies.
        tasks = [
            asyncio.ensure_future(stream.run(full=full)),
            asyncio.ensure_future(stream.read_acks()),
            asyncio.ensure_future(stream.heartbeats()),
            asyncio.ensure_future(stream.probes()),
        ]
        if self.roles is not None:
            tasks.append(asyncio.ensure_future(self._role_changes(self.roles)))
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done and not task.cancelled() and (error := task.exception()):
                    raise error
            raise ConnectionError("the session ended")  # pragma: no cover - they run forever
        finally:
            self.stream = None
            self._link = None
            stream.fail_digest_requests()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    async def _role_changes(self, roles: LinkRoles) -> None:
        """End the session when this volume stops being a source for the peer (demoted, or
        now following it): the next one asks again with the new lineage."""
        role = roles.lineage().role
        while True:
            await roles.wait_changed(3600.0)
            if roles.lineage().role is not role or roles.source() == self.consumer.peer:
                raise ConnectionError(
                    f"this volume's role changed ({role} -> {roles.lineage().role})"
                )

    def next_lsn(self) -> int:
        self._lsn += 1
        return self._lsn


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)
