"""The secondary's end of links: accept sources, journal what they send, acknowledge it.

One :class:`ReplicationServer` per unit listens on ``[replication] listen``. Each connection is
authenticated (pre-shared key, TLS), bound to one secondary volume, and then feeds records and
resync data to that volume's journaled write path. An ACK goes back once what arrived is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blockmirror.errors import BlockmirrorError, ProtocolError
from blockmirror.journal.checkpoint import ReplicaState
from blockmirror.journal.writepath import JournalWritePath
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
    Records,
    Refuse,
    SyncData,
    SyncDone,
    SyncStart,
    SyncZero,
    Welcome,
    encode,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 10.0
HEARTBEAT_INTERVAL = 2.0
READ_SIZE = 256 * 1024


class LinkRefused(BlockmirrorError):
    """We refused the other side (or it refused us); ``code`` is the protocol's refusal code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


@dataclass(slots=True)
class ReplicaRuntime:
    """What the receiver needs of one secondary volume, and what status shows about it."""

    name: str
    size: int
    write_path: JournalWritePath
    source: str | None = None
    source_unit: str | None = None
    bytes_received: int = 0
    records_received: int = 0
    connected_since: float | None = None
    last_refusal: str | None = None
    sync_done: tuple[int, int] | None = None  # (lsn, as_of_seq) of a SYNC_DONE not yet reached
    sync_lsn: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def replica(self) -> ReplicaState | None:
        return self.write_path.journal.replica

    def status(self) -> dict[str, object]:
        replica = self.replica
        return {
            "source": self.source,
            "source_unit": self.source_unit or (replica.source_unit if replica else None),
            "volume_id": replica.volume_id if replica else None,
            "received_seq": self.write_path.journal.durable_seq,
            "applied_seq": self.write_path.applied_seq,
            "consistent": bool(replica and replica.consistent),
            "syncing": self.sync_done is not None or bool(replica and not replica.consistent),
            "bytes_received": self.bytes_received,
            "records_received": self.records_received,
            "connected": self.source is not None,
            "last_refusal": self.last_refusal,
        }


class ReplicationServer:
    def __init__(
        self,
        unit_name: str,
        replicas: Callable[[str], ReplicaRuntime | None],
        *,
        psk: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.unit_name = unit_name
        self._replicas = replicas
        self._psk = psk
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self.refusals = 0

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("replication server is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        # The listener does the TLS handshake. (Starting TLS inside the connection callback
        # would let the stream reader swallow the client's first handshake bytes, and both
        # sides would wait for each other until they time out.)
        self._server = await asyncio.start_server(
            self._serve, host, port, ssl=self._ssl, reuse_address=True, limit=READ_SIZE
        )
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        session = _Session(self, reader, writer, where)
        try:
            await session.run()
        except LinkRefused as exc:
            self.refusals += 1
            log.warning("link from %s refused: %s", where, exc)
        except (ProtocolError, auth.AuthError) as exc:
            self.refusals += 1
            log.warning("link from %s dropped: %s", where, exc)
            session.refuse_quietly("bad-frame", str(exc))
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.info("link from %s closed: %s", where, exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass
        finally:
            self._sessions.discard(task)
            session.release()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Session:
    def __init__(
        self,
        server: ReplicationServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        where: str,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.where = where
        self.codec = LinkCodec()
        self.replica: ReplicaRuntime | None = None
        self._target: ReplicaRuntime | None = None
        self._owns_replica = False
        self._ack_scheduled = False
        self._last_sent = time.monotonic()
        self._last_heard = time.monotonic()

    # --- frames in and out ----------------------------------------------------------------------

    def send(self, message: Message) -> None:
        if self.writer.is_closing():
            # uvloop raises RuntimeError on a write to a closed transport.
            raise ConnectionResetError("the link is closed")
        self.writer.writelines(encode(message))
        self._last_sent = time.monotonic()

    async def receive(self, timeout: float) -> Message:
        while True:
            event = self.codec.next_event()
            if event is not None:
                self._last_heard = time.monotonic()
                return event
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
            if not data:
                raise ConnectionError("source closed the link")
            if self.replica is not None:
                self.replica.bytes_received += len(data)
            self.codec.feed(data)

    def refuse(self, code: str, message: str) -> LinkRefused:
        self.refuse_quietly(code, message)
        # Shown on the replica the source asked for, bound or not (an auth failure, say).
        target = self.replica or self._target
        if target is not None:
            target.last_refusal = f"{code}: {message} (from {self.where})"
        return LinkRefused(code, message)

    def refuse_quietly(self, code: str, message: str) -> None:
        with contextlib.suppress(Exception):
            self.send(Refuse(code, message))

    def release(self) -> None:
        if self.replica is not None and self._owns_replica:
            self.replica.source = None
            self.replica.connected_since = None

    # --- handshake ------------------------------------------------------------------------------

    async def run(self) -> None:
        hello = await self.receive(HANDSHAKE_TIMEOUT)
        if not isinstance(hello, Hello):
            raise self.refuse("bad-frame", f"expected HELLO, got {type(hello).__name__}")
        if hello.protocol != PROTOCOL_VERSION:
            raise self.refuse("version", f"protocol {hello.protocol} is not {PROTOCOL_VERSION}")
        self._target = self.server._replicas(hello.volume)
        await self._authenticate(hello)
        replica = self.server._replicas(hello.volume)
        if replica is None:
            raise self.refuse("unknown-volume", f"no secondary volume named {hello.volume!r}")
        if replica.size != hello.size:
            raise self.refuse(
                "size-mismatch", f"replica {hello.volume} is {replica.size} bytes, not {hello.size}"
            )
        state = replica.replica
        if state is not None and state.volume_id and state.volume_id != hello.volume_id:
            raise self.refuse(
                "identity-mismatch",
                f"replica {hello.volume} holds volume {state.volume_id}, not {hello.volume_id}",
            )
        if replica.source is not None:
            raise self.refuse(
                "busy", f"replica {hello.volume} already has a source ({replica.source})"
            )
        self.replica = replica
        self._owns_replica = True
        replica.source = self.where
        replica.source_unit = hello.unit
        replica.connected_since = time.time()
        replica.last_refusal = None
        # Resync progress belongs to one session: the source numbers its frames afresh.
        replica.sync_lsn = 0
        replica.sync_done = None
        wp = replica.write_path
        self.send(
            Welcome(
                PROTOCOL_VERSION,
                self.server.unit_name,
                wp.journal.durable_seq,
                wp.applied_seq,
                bool(state and state.consistent),
                state.volume_id if state else None,
            )
        )
        log.info("link from %s (%s) carries volume %s", self.where, hello.unit, hello.volume)
        await self._stream(hello)

    async def _authenticate(self, hello: Hello) -> None:
        key = self.server._psk
        if key is None:
            return  # a source that expects a proof refuses us itself
        if hello.auth != "psk":
            raise self.refuse("auth", "this unit requires a pre-shared key")
        nonce = auth.new_nonce()
        self.send(AuthServer(nonce, auth.server_proof(key, hello.nonce, nonce, hello.volume)))
        answer = await self.receive(HANDSHAKE_TIMEOUT)
        if not isinstance(answer, AuthClient):
            raise self.refuse("auth", "expected AUTH_CLIENT")
        expected = auth.client_proof(key, nonce, hello.nonce, hello.volume)
        if not auth.verify(expected, answer.proof):
            raise self.refuse("auth", "wrong pre-shared key")

    # --- streaming ------------------------------------------------------------------------------

    async def _stream(self, hello: Hello) -> None:
        replica = self.replica
        assert replica is not None
        wp = replica.write_path
        heartbeat = asyncio.create_task(self._heartbeats())
        syncing = False  # resync frames are only accepted between SYNC_START and SYNC_DONE
        try:
            while True:
                message = await self.receive(IDLE_TIMEOUT)
                if isinstance(message, Records):
                    self._check_records(message)
                    batch = [
                        (r.header.kind, r.header.seq, r.header.offset, r.header.length, r.payload)
                        for r in message.records
                    ]
                    try:
                        done = await wp.append_replicated(batch)
                    except BlockmirrorError as exc:
                        raise self.refuse("internal", str(exc)) from exc
                    replica.records_received += len(batch)
                    done.add_done_callback(self._durable)
                elif isinstance(message, SyncStart):
                    await self._sync_start(hello, message)
                    syncing = True
                elif isinstance(message, SyncData | SyncZero):
                    if not syncing:
                        raise self.refuse("bad-frame", "resync data without SYNC_START")
                    data = message.data if isinstance(message, SyncData) else None
                    length = len(message.data) if isinstance(message, SyncData) else message.length
                    self._check_range(message.offset, length, f"resync lsn {message.lsn}")
                    done = wp.apply_resync(message.offset, length, data)
                    done.add_done_callback(functools.partial(self._sync_applied, message.lsn))
                elif isinstance(message, SyncDone):
                    if not syncing:
                        raise self.refuse("bad-frame", "SYNC_DONE without SYNC_START")
                    syncing = False
                    replica.sync_done = (message.lsn, message.as_of_seq)
                    self._check_consistent()
                elif isinstance(message, Heartbeat):
                    self.send(Heartbeat(time.time_ns(), message.sent_ns))
                elif isinstance(message, Refuse):
                    raise LinkRefused(message.code, message.message)
                else:
                    raise self.refuse("bad-frame", f"unexpected {type(message).__name__}")
        finally:
            heartbeat.cancel()

    def _check_range(self, offset: int, length: int, what: str) -> None:
        replica = self.replica
        assert replica is not None
        if offset + length > replica.size:
            raise self.refuse(
                "bad-frame",
                f"{what}: {offset}+{length} is past the end of the {replica.size}-byte replica",
            )

    def _check_records(self, message: Records) -> None:
        """Refuse, before anything is journaled, records that cannot be applied in order."""
        replica = self.replica
        assert replica is not None
        expected = replica.write_path.journal.next_seq
        for record in message.records:
            h = record.header
            if h.seq != expected:
                raise self.refuse("bad-frame", f"record seq {h.seq} arrived, {expected} expected")
            self._check_range(h.offset, h.length, f"record seq {h.seq}")
            expected += 1

    async def _sync_start(self, hello: Hello, message: SyncStart) -> None:
        replica = self.replica
        assert replica is not None
        wp = replica.write_path
        journal = wp.journal
        # Inconsistent from now on, durably, before any copied region lands on the replica.
        journal.replica = ReplicaState(
            volume_id=hello.volume_id,
            source_unit=hello.unit,
            consistent=False,
            sync_lsn=message.lsn,
            sync_as_of=message.as_of_seq,
        )
        replica.sync_done = None
        replica.sync_lsn = message.lsn
        if journal.next_seq != message.as_of_seq + 1:
            await wp.rebase(message.as_of_seq + 1)
        else:
            await wp.checkpoint()
        log.info(
            "replica %s: %s resync from %s starts (records follow from %d)",
            replica.name,
            "full" if message.full else "dirty-region",
            hello.unit,
            message.as_of_seq + 1,
        )
        self._schedule_ack()

    def _durable(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.writer.close()
            return
        self._check_consistent()
        self._schedule_ack()

    def _sync_applied(self, lsn: int, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.writer.close()
            return
        replica = self.replica
        assert replica is not None
        replica.sync_lsn = max(replica.sync_lsn, lsn)
        self._check_consistent()
        self._schedule_ack()

    def _check_consistent(self) -> None:
        replica = self.replica
        if replica is None or replica.sync_done is None:
            return
        lsn, as_of = replica.sync_done
        wp = replica.write_path
        # SYNC_DONE carries the number after the last region's: every region before it is in.
        if replica.sync_lsn >= lsn - 1 and wp.applied_seq >= as_of:
            replica.sync_lsn = lsn
            replica.sync_done = None
            state = wp.journal.replica
            if state is not None:
                wp.journal.replica = ReplicaState(
                    volume_id=state.volume_id,
                    source_unit=state.source_unit,
                    consistent=True,
                    sync_lsn=replica.sync_lsn,
                    sync_as_of=as_of,
                    sync_done=True,
                )
            asyncio.get_running_loop().create_task(self._persist_consistent())

    async def _persist_consistent(self) -> None:
        replica = self.replica
        assert replica is not None
        await replica.write_path.checkpoint()
        log.info("replica %s is consistent", replica.name)

    def _schedule_ack(self) -> None:
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_ack)

    def _send_ack(self) -> None:
        self._ack_scheduled = False
        replica = self.replica
        if replica is None or self.writer.is_closing():
            return
        wp = replica.write_path
        self.send(Ack(wp.journal.durable_seq, wp.applied_seq, replica.sync_lsn))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL / 2)
            if time.monotonic() - self._last_sent >= HEARTBEAT_INTERVAL:
                with contextlib.suppress(Exception):
                    self.send(Heartbeat(time.time_ns(), 0))
            # An ACK also tells the source how far the replica has applied.
            self._schedule_ack()
