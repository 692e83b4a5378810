"""The secondary's listener: accept links, bound the connections still in their handshake.

One :class:`ReplicationServer` per unit listens on ``[replication] listen``; each accepted
connection becomes a :class:`~blockmirror.link.receiver.ReceiverSession`. Until a connection
is bound to a replica it counts against two caps (all of them, and those of its address);
beyond either the oldest of them is closed at once, so a flood cannot exhaust descriptors or
memory, and a real source, which sends its HELLO as soon as it is connected, still gets in
(docs/link-protocol.md, "Handshake").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from blockmirror.link.peer_configs import ConfigShare
from blockmirror.link.receiver import ReceiverSession, ReceiverSettings
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.link.session import DEFAULT_TIMEOUTS, READ_SIZE, Timeouts, tune_socket

__all__ = [
    "MAX_UNAUTHENTICATED",
    "MAX_UNAUTHENTICATED_PER_ADDRESS",
    "ReplicationServer",
]

log = logging.getLogger(__name__)

# Connections that have not completed the handshake yet, in all and per source address.
MAX_UNAUTHENTICATED: Final = 64
# Many sources may share one address (a NAT, a site of primaries): a burst of them at once
# (a secondary coming back) must not evict each other.
MAX_UNAUTHENTICATED_PER_ADDRESS: Final = 32


class ReplicationServer:
    def __init__(
        self,
        unit_name: str,
        replicas: Callable[[str], ReplicaRuntime | None],
        *,
        psk: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
        configs: ConfigShare | None = None,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        max_unauthenticated_per_address: int = MAX_UNAUTHENTICATED_PER_ADDRESS,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.unit_name = unit_name
        self._settings = ReceiverSettings(
            unit_name, replicas, psk, tls=ssl_context is not None, configs=configs
        )
        self._ssl = ssl_context
        self.timeouts = timeouts
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

    def set_psk(self, psk: bytes | None) -> None:
        """The listener's key from now on (a reload): sessions already open keep theirs."""
        self._settings = dataclasses.replace(self._settings, psk=psk)

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
        # One deadline for the whole handshake, from the accepted connection (TLS included)
        # to the WELCOME, however the bytes arrive.
        deadline = loop.time() + self.timeouts.handshake
        try:
            tune_socket(conn, self.timeouts.idle)
            reader = asyncio.StreamReader(limit=READ_SIZE)
            try:
                async with asyncio.timeout_at(deadline):
                    transport, protocol = await loop.connect_accepted_socket(
                        lambda: asyncio.StreamReaderProtocol(reader),
                        conn,
                        ssl=self._ssl,
                        ssl_handshake_timeout=self.timeouts.handshake if self._ssl else None,
                    )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                log.info("link from %s closed before its handshake: %s", where, exc)
                conn.close()
                return
        except asyncio.CancelledError:
            conn.close()  # evicted before a transport owned it
            return
        task = asyncio.current_task()
        assert task is not None
        session = ReceiverSession(
            self._settings,
            reader,
            asyncio.StreamWriter(transport, protocol, reader, loop),
            where,
            timeouts=self.timeouts,
            handshake_deadline=deadline,
            on_frame=lambda: self._progress(task),
            on_bound=lambda: self._authenticated(task),
        )
        if await session.serve():
            self.refusals += 1
