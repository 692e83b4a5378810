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
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.errors import BlockmirrorError, LinkError, ProtocolError
from blockmirror.journal.checkpoint import ReplicaState
from blockmirror.journal.record import Record
from blockmirror.link import auth
from blockmirror.link.protocol import (
    FRAME_HEADER_SIZE,
    HANDSHAKE_FRAMES,
    MAX_JSON,
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
from blockmirror.link.session_crypto import (
    CHACHA20_POLY1305,
    IntegrityError,
    Opener,
    Sealer,
    derive_keys,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # for the whole handshake, from accept to WELCOME (not per read)
IDLE_TIMEOUT = 10.0  # no whole, valid frame for this long: the peer is gone
HEARTBEAT_INTERVAL = 2.0
READ_SIZE = 256 * 1024
CLOSE_TIMEOUT = 2.0  # how long a close may wait for unsent bytes before the socket is reset
# Connections that have not completed the handshake yet. Beyond either cap the oldest of them
# (of that address, or of all) is closed at once: a flood cannot exhaust descriptors or memory,
# and a real source, whose handshake takes a few round trips, still gets in.
MAX_UNAUTHENTICATED = 64
MAX_UNAUTHENTICATED_PER_ADDRESS = 8


def tune_socket(sock: socket.socket | None, timeout: float = IDLE_TIMEOUT) -> None:
    """Keepalive and TCP_USER_TIMEOUT on a link socket: a peer that vanishes (a cable pulled,
    a host that died) is noticed by the kernel too, not only by the heartbeat deadline."""
    if sock is None:
        return
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), max(1, int(timeout / 2))),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), max(1, int(timeout / 2))),
        # Data unacknowledged by the peer's TCP for this long: the connection is dropped.
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(timeout * 2000)),
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    ]
    for level, option, value in options:
        if option is None:
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)


async def close_writer(writer: asyncio.StreamWriter, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close a link connection within ``timeout``: a peer that stops reading leaves bytes
    unsent, and ``wait_closed`` would wait for them forever; then the socket is reset."""
    writer.close()
    try:
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await writer.wait_closed()
    except Exception:
        pass


class LinkRefused(LinkError):
    """We refused the other side (or it refused us); ``code`` is the protocol's refusal code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


def certificate_names(cert: Mapping[str, Any]) -> set[str]:
    """The subject common names and DNS subjectAltNames of a peer certificate (getpeercert)."""
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(str(value))
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(str(value))
    return names


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
    # This replica's own key (None: the listener's) and the certificate names allowed to
    # write it (empty: any): what binds a replica to the source that may write it.
    psk: bytes | None = None
    tls_peers: tuple[str, ...] = ()

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
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        max_unauthenticated_per_address: int = MAX_UNAUTHENTICATED_PER_ADDRESS,
    ) -> None:
        self.unit_name = unit_name
        self._replicas = replicas
        self._psk = psk
        self._ssl = ssl_context
        self._listeners: list[socket.socket] = []
        self._accepters: list[asyncio.Task[None]] = []
        self._sessions: set[asyncio.Task[None]] = set()
        # Connections still in their handshake, oldest first: task -> source address.
        self._unauthenticated: OrderedDict[asyncio.Task[None], str] = OrderedDict()
        self._per_address: dict[str, int] = {}
        # Those of them that delivered a whole frame: a real source sends its HELLO at once.
        self._progressed: set[asyncio.Task[None]] = set()
        self.max_unauthenticated = max_unauthenticated
        self.max_unauthenticated_per_address = max_unauthenticated_per_address
        self.refusals = 0
        self.evictions = 0

    @property
    def address(self) -> tuple[str, int]:
        if not self._listeners:
            raise RuntimeError("replication server is not listening")
        host, port = self._listeners[0].getsockname()[:2]
        return str(host), int(port)

    def status(self) -> dict[str, object]:
        return {
            "unauthenticated": len(self._unauthenticated),
            "sessions": len(self._sessions),
            "refusals": self.refusals,
            "evictions": self.evictions,
        }

    async def start(self, host: str, port: int) -> tuple[str, int]:
        # Our own accept loop rather than asyncio.start_server: a connection is counted (and
        # the oldest unauthenticated one closed beyond a cap) before anything else happens to
        # it, the TLS handshake included, which the transport does before the stream sees data.
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, str]] = set()
        try:
            for family, kind, proto, _name, sockaddr in infos:
                if (family, str(sockaddr[0])) in seen:
                    continue
                seen.add((family, str(sockaddr[0])))
                sock = socket.socket(family, kind, proto)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # With port 0, every address of the name gets the port the first one got.
                sock.bind((sockaddr[0], port, *sockaddr[2:]))
                sock.listen(128)
                sock.setblocking(False)
                port = int(sock.getsockname()[1])
        except BaseException:
            for sock in self._listeners:
                sock.close()
            self._listeners.clear()
            raise
        for sock in self._listeners:
            self._accepters.append(loop.create_task(self._accept(sock)))
        return self.address

    async def close(self) -> None:
        for task in self._accepters:
            task.cancel()
        await asyncio.gather(*self._accepters, return_exceptions=True)
        self._accepters.clear()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                # EMFILE and friends: say so, breathe, go on (a flood must not end the listener).
                log.warning("accepting a link failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            address = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else address
            self._make_room(address)
            task = loop.create_task(self._serve(conn, address, where))
            self._sessions.add(task)
            self._unauthenticated[task] = address
            self._per_address[address] = self._per_address.get(address, 0) + 1
            task.add_done_callback(self._session_ended)

    def _make_room(self, address: str) -> None:
        """Close an unauthenticated connection of ``address`` (or of all) when one more would
        exceed a cap: the oldest that has not sent a whole frame yet, else the oldest.

        A real source sends its HELLO as soon as it is connected, so connections that hold a
        slot with a trickle (or nothing) go first, and a flood that reconnects whatever is
        closed still cannot push a real source's handshake out.
        """
        if self._per_address.get(address, 0) >= self.max_unauthenticated_per_address:
            candidates = [t for t, a in self._unauthenticated.items() if a == address]
        elif len(self._unauthenticated) >= self.max_unauthenticated:
            candidates = list(self._unauthenticated)
        else:
            return
        victim = next((t for t in candidates if t not in self._progressed), candidates[0])
        self.evictions += 1
        if self.evictions in (1, 10, 100) or self.evictions % 1000 == 0:
            log.warning(
                "too many unauthenticated links (from %s): closing an older one (%d so far)",
                address,
                self.evictions,
            )
        self._authenticated(victim)
        victim.cancel()

    def _progress(self, task: asyncio.Task[None]) -> None:
        if task in self._unauthenticated:
            self._progressed.add(task)

    def _authenticated(self, task: asyncio.Task[None]) -> None:
        self._progressed.discard(task)
        address = self._unauthenticated.pop(task, None)
        if address is not None:
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]

    def _session_ended(self, task: asyncio.Task[None]) -> None:
        self._sessions.discard(task)
        self._authenticated(task)

    async def _serve(self, conn: socket.socket, address: str, where: str) -> None:
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        session: _Session | None = None
        try:
            tune_socket(conn)
            reader = asyncio.StreamReader(limit=READ_SIZE)
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    transport, protocol = await loop.connect_accepted_socket(
                        lambda: asyncio.StreamReaderProtocol(reader),
                        conn,
                        ssl=self._ssl,
                        ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self._ssl else None,
                    )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                log.info("link from %s closed before its handshake: %s", where, exc)
                conn.close()
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            session = _Session(self, reader, writer, where, loop.time() + HANDSHAKE_TIMEOUT)
            await session.run()
        except LinkRefused as exc:
            self.refusals += 1
            log.warning("link from %s refused: %s", where, exc)
        except (ProtocolError, auth.AuthError) as exc:
            self.refusals += 1
            log.warning("link from %s dropped: %s", where, exc)
            if session is not None:
                session.refuse_quietly("bad-frame", str(exc))
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.info("link from %s closed: %s", where, exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass
        finally:
            if session is not None:
                session.release()
            if writer is not None:
                await close_writer(writer)
            else:
                conn.close()  # cancelled (evicted) before a transport owned it; else a no-op


class _Session:
    def __init__(
        self,
        server: ReplicationServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        where: str,
        handshake_deadline: float,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.where = where
        self.handshake_deadline = handshake_deadline
        self.codec = LinkCodec()
        # Until the peer is authenticated: handshake frames of at most 64 KiB, refused from
        # their header (a 64 MiB RECORDS frame announced first is never buffered).
        self.codec.restrict(HANDSHAKE_FRAMES, MAX_JSON)
        self.replica: ReplicaRuntime | None = None
        self._target: ReplicaRuntime | None = None
        self._owns_replica = False
        self._ack_scheduled = False
        self._last_sent = time.monotonic()
        self._last_heard = time.monotonic()
        # Set once the AUTH_CLIENT proof holds, when the session is sealed (session_crypto).
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None

    # --- frames in and out ----------------------------------------------------------------------

    def send(self, message: Message) -> None:
        if self.writer.is_closing():
            # uvloop raises RuntimeError on a write to a closed transport.
            raise ConnectionResetError("the link is closed")
        buffers = encode(message)
        if self._sealer is not None:
            buffers = self._sealer.seal(buffers)
        self.writer.writelines(buffers)
        self._last_sent = time.monotonic()

    async def receive(self, deadline: float) -> Message:
        """The next whole frame, by ``deadline`` (loop time): one deadline for however many
        reads it takes, so a peer trickling bytes cannot stretch it."""
        loop = asyncio.get_running_loop()
        authenticated = self.replica is not None
        while True:
            event = self.codec.next_event()
            if event is not None:
                self._last_heard = time.monotonic()
                if not authenticated and (task := asyncio.current_task()) is not None:
                    self.server._progress(task)
                return event
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(
                    "no frame from the source in time"
                    if authenticated
                    else f"handshake not completed within {HANDSHAKE_TIMEOUT:g} s"
                )
            # Before authentication, read only what the frame in progress still needs.
            size = READ_SIZE if authenticated else max(FRAME_HEADER_SIZE, self.codec.needed)
            try:
                async with asyncio.timeout(left):
                    data = await self.reader.read(size)
            except TimeoutError:
                continue  # the deadline check above says what timed out
            if not data:
                raise ConnectionError("source closed the link")
            if self.replica is not None:
                self.replica.bytes_received += len(data)
            if self._opener is None:
                self.codec.feed(data)
                continue
            try:
                plain = self._opener.feed(data)
            except IntegrityError as exc:
                raise self.refuse("integrity", str(exc)) from None
            for chunk in plain:
                self.codec.feed(chunk)

    def _idle_deadline(self) -> float:
        return asyncio.get_running_loop().time() + IDLE_TIMEOUT

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
        hello = await self.receive(self.handshake_deadline)
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
        max_record = replica.write_path.journal.max_payload()
        if hello.max_record is not None and hello.max_record > max_record:
            raise self.refuse(
                "journal-too-small",
                f"replica {hello.volume}: records of up to {hello.max_record} bytes may come, "
                f"this unit's journal holds records of at most {max_record} bytes; give it a "
                "larger journal_size",
            )
        self.replica = replica
        task = asyncio.current_task()
        if task is not None:
            self.server._authenticated(task)  # no longer counted against the caps
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
                max_record,
            )
        )
        self.codec.restrict(None)
        log.info("link from %s (%s) carries volume %s", self.where, hello.unit, hello.volume)
        await self._stream(hello)

    async def _authenticate(self, hello: Hello) -> None:
        target = self._target
        if target is not None and target.tls_peers:
            self._check_certificate_names(target)
        # A replica with a key of its own accepts only that key: one tenant's key does not
        # open another tenant's replica on a shared secondary.
        key = target.psk if target is not None and target.psk is not None else self.server._psk
        if key is None:
            return  # a source that expects a proof refuses us itself
        if hello.auth != "psk":
            raise self.refuse("auth", "this unit requires a pre-shared key")
        # Sealed frames (session_crypto) whenever the source offers them; required with a key
        # and no TLS, since the key alone protects only the handshake.
        sealed = hello.crypto == CHACHA20_POLY1305
        if not sealed and self.server._ssl is None:
            offered = "nothing" if hello.crypto is None else repr(hello.crypto)
            raise self.refuse(
                "crypto-required",
                f"a pre-shared key without TLS needs sealed frames ({CHACHA20_POLY1305}); the "
                f"source offers {offered} (an older unit, or the offer was stripped on the way)",
            )
        nonce = auth.new_nonce()
        proof = auth.server_proof(key, hello.nonce, nonce, hello.volume)
        self.send(AuthServer(nonce, proof, CHACHA20_POLY1305 if sealed else None))
        answer = await self.receive(self.handshake_deadline)
        if not isinstance(answer, AuthClient):
            raise self.refuse("auth", "expected AUTH_CLIENT")
        expected = auth.client_proof(key, nonce, hello.nonce, hello.volume)
        if not auth.verify(expected, answer.proof):
            raise self.refuse("auth", "wrong pre-shared key")
        if sealed:
            if self.codec.buffered:
                raise self.refuse("bad-frame", "frames after AUTH_CLIENT before the WELCOME")
            keys = derive_keys(key, hello.nonce, nonce, hello)
            self._sealer, self._opener = Sealer(keys.secondary), Opener(keys.source)

    def _check_certificate_names(self, target: ReplicaRuntime) -> None:
        cert = self.writer.get_extra_info("peercert")
        if not cert:
            raise self.refuse(
                "auth", f"replica {target.name} takes only TLS sources with a named certificate"
            )
        names = certificate_names(cert)
        if not names & set(target.tls_peers):
            shown = ", ".join(sorted(names)) or "none"
            raise self.refuse(
                "auth",
                f"a certificate naming {shown} may not write replica {target.name}",
            )

    # --- streaming ------------------------------------------------------------------------------

    async def _stream(self, hello: Hello) -> None:
        replica = self.replica
        assert replica is not None
        wp = replica.write_path
        heartbeat = asyncio.create_task(self._heartbeats())
        syncing = False  # resync frames are only accepted between SYNC_START and SYNC_DONE
        try:
            while True:
                message = await self.receive(self._idle_deadline())
                if isinstance(message, Records):
                    self._check_records(message)
                    batch = [Record.from_header(r.header, r.payload) for r in message.records]
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
        journal = replica.write_path.journal
        expected = journal.next_seq
        max_record = journal.max_payload()
        for record in message.records:
            h = record.header
            if h.seq != expected:
                raise self.refuse("bad-frame", f"record seq {h.seq} arrived, {expected} expected")
            if h.payload_len > max_record:
                raise self.refuse(
                    "journal-too-small",
                    f"record seq {h.seq} carries {h.payload_len} bytes, this unit's journal "
                    f"holds records of at most {max_record} bytes; give it a larger journal_size",
                )
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
