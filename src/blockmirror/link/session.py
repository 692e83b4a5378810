"""One link connection, the same for both ends: frames out and in, sealing, the order of the
handshake, heartbeats, deadlines and closing (docs/link-protocol.md, "Keep-alive").

:class:`LinkSession` moves bytes between an asyncio stream and the sans-I/O pieces: the frame
codec (:class:`~blockmirror.link.protocol.LinkCodec`), the sealed records of
:mod:`~blockmirror.link.session_crypto` and the frame order of
:mod:`~blockmirror.link.handshake`. The source's sender and the secondary's receiver each hold
one per connection and add only what their end decides.

Every deadline of a link is here, once: :class:`Timeouts` holds them (tests shorten them).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from blockmirror.errors import LinkError, ProtocolError
from blockmirror.journal.format import Buffer
from blockmirror.link.compression import FLAG_ZSTD
from blockmirror.link.handshake import End, HandshakeOrder, OutOfOrder
from blockmirror.link.protocol import (
    FRAME_HEADER_SIZE,
    HANDSHAKE_FRAMES,
    MAX_JSON,
    Heartbeat,
    LinkCodec,
    Message,
    Refuse,
    encode,
)
from blockmirror.link.session_crypto import IntegrityError, Opener, Sealer
from blockmirror.state import HandshakeStep

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_TIMEOUTS",
    "HANDSHAKE_TIMEOUT",
    "HEARTBEAT_INTERVAL",
    "IDLE_TIMEOUT",
    "PROGRESS_TIMEOUT",
    "READ_SIZE",
    "LinkRefused",
    "LinkSession",
    "ProgressWatch",
    "Timeouts",
    "close_writer",
    "tune_socket",
]

_M = TypeVar("_M", bound=Message)

# For the whole handshake, however many reads it takes (the source's connect included).
HANDSHAKE_TIMEOUT: Final = 10.0
# No whole, valid frame for this long: the peer is gone. Bytes alone do not count.
IDLE_TIMEOUT: Final = 10.0
# A side that has sent nothing for this long sends a HEARTBEAT.
HEARTBEAT_INTERVAL: Final = 2.0
# Bytes in flight and no acknowledgement progress for this long: the peer takes nothing in.
PROGRESS_TIMEOUT: Final = 60.0
# How long a close may wait for unsent bytes before the socket is reset.
CLOSE_TIMEOUT: Final = 2.0
# One read from the stream, and the stream's buffer limit.
READ_SIZE: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The deadlines of one link (seconds); the defaults are the protocol's."""

    handshake: float = HANDSHAKE_TIMEOUT
    idle: float = IDLE_TIMEOUT
    heartbeat: float = HEARTBEAT_INTERVAL
    progress: float = PROGRESS_TIMEOUT
    close: float = CLOSE_TIMEOUT


DEFAULT_TIMEOUTS: Final = Timeouts()


class LinkRefused(LinkError):
    """We refused the other side (or it refused us); ``code`` is the protocol's refusal code."""

    def __init__(self, code: str, message: str, refusal: Refuse | None = None) -> None:
        self.code = code
        self.message = message
        # The REFUSE itself when the peer sent it (version 2 carries its lineage).
        self.refusal = refusal
        super().__init__(f"{code}: {message}")


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


class ProgressWatch:
    """The no-progress deadline: bytes in flight and no acknowledgement progress for
    ``timeout`` seconds end the link, heartbeats or not (a peer that answers them but has
    stopped reading is as dead as a silent one)."""

    __slots__ = ("_acked", "_since", "timeout")

    def __init__(self, timeout: float = PROGRESS_TIMEOUT) -> None:
        self.timeout = timeout
        self._acked = 0
        self._since = time.monotonic()

    def check(self, acked: int, sent: int) -> None:
        """``acked`` and ``sent`` are cumulative byte counts; raises :class:`TimeoutError`."""
        now = time.monotonic()
        if acked != self._acked or sent == acked:
            self._acked, self._since = acked, now
        elif now - self._since > self.timeout:
            raise TimeoutError(
                f"the secondary acknowledged nothing for {self.timeout:g} s with "
                f"{sent - acked} bytes in flight"
            )


class LinkSession:
    """Frames over one stream connection, for either end.

    Until the link streams (the WELCOME has crossed) it accepts only handshake frames of at
    most 64 KiB, checked on their header, reads only what the frame in progress still needs
    (no byte after the handshake is read before the session is sealed), and every read shares
    one handshake deadline. Then every frame must arrive within the idle deadline.

    ``on_read(n)`` is told of every ``n`` bytes read, ``on_frame()`` of every whole frame, and
    ``on_refuse(code, message)`` of every refusal this session sends on its own (a sealed
    record that fails to open, a frame out of order that the end answers with a REFUSE).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        end: End,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        what: str = "link",
        handshake_deadline: float | None = None,
        on_read: Callable[[int], None] | None = None,
        on_frame: Callable[[], None] | None = None,
        on_refuse: Callable[[str, str], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.end = end
        self.timeouts = timeouts
        self.order = HandshakeOrder(end, what)
        self.codec = LinkCodec()
        # What a stranger may send before the WELCOME: handshake frames of at most 64 KiB,
        # refused from their header (a 64 MiB RECORDS frame announced first is never buffered).
        self.codec.restrict(HANDSHAKE_FRAMES, MAX_JSON)
        loop = asyncio.get_running_loop()
        self.handshake_deadline = (
            loop.time() + timeouts.handshake if handshake_deadline is None else handshake_deadline
        )
        self.last_sent = time.monotonic()  # what the heartbeat loop goes by
        # Set once the handshake has made session keys (a pre-shared key without TLS).
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        self._on_read = on_read
        self._on_frame = on_frame
        self._on_refuse = on_refuse

    @property
    def step(self) -> HandshakeStep:
        return self.order.step

    def extra(self, name: str) -> Any:
        """The transport's extra information (``"peercert"``, ``"socket"``, ...)."""
        return self.writer.get_extra_info(name)

    # --- the handshake's end -------------------------------------------------------------------

    def seal(self, sealer: Sealer, opener: Opener) -> None:
        """Seal every frame from now on, both ways. Nothing unsealed may be buffered: the
        peer sends nothing between the last plain frame and its first sealed one."""
        if self.codec.buffered:
            raise ProtocolError(f"the {self.end.peer} sent frames before the session was sealed")
        self.sealer, self.opener = sealer, opener

    def stream(self) -> None:
        """The handshake is over: any frame (of any size) from now on, the idle deadline."""
        self.order.enter(HandshakeStep.STREAM)
        self.codec.restrict(None)
        # Both ends offer every codec this build decodes (compression.DECODABLE), in their
        # HELLO or WELCOME: bulk frames may arrive compressed from now on.
        self.codec.accept_flags(FLAG_ZSTD)

    # --- sending -------------------------------------------------------------------------------

    def send(self, message: Message) -> int:
        """Send one frame (sealed when the session is); the bytes put on the wire."""
        self.order.sent(message)
        return self.send_buffers(encode(message))

    def send_buffers(self, buffers: Sequence[Buffer]) -> int:
        """Send encoded frames as they are (vectored: the buffers are not joined)."""
        # uvloop raises RuntimeError on a write to a closed transport; asyncio drops it quietly.
        if self.writer.is_closing():
            raise ConnectionResetError("the link is closed")
        if self.sealer is not None:
            buffers = self.sealer.seal(buffers)
        self.writer.writelines(buffers)
        self.last_sent = time.monotonic()
        return sum(memoryview(b).nbytes for b in buffers)

    def refuse(self, code: str, message: str, *, frame: Refuse | None = None) -> LinkRefused:
        """Refuse the peer: REFUSE is sent (``frame`` when it carries more than the code and
        the message), ``on_refuse`` told; the error to raise."""
        self.refuse_quietly(code, message, frame=frame)
        if self._on_refuse is not None:
            self._on_refuse(code, message)
        return LinkRefused(code, message)

    def refuse_quietly(self, code: str, message: str, *, frame: Refuse | None = None) -> None:
        """Send REFUSE if the link still takes it (it may be gone already); nothing is read
        after it."""
        with contextlib.suppress(Exception):
            self.send(frame if frame is not None else Refuse(code, message))
        self.order.close()

    def write_buffer_size(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self.writer.drain()

    # --- receiving -----------------------------------------------------------------------------

    async def receive(self) -> Message:
        """The next whole frame the link's step allows.

        Within the handshake deadline until the link streams, then within the idle deadline:
        one deadline for however many reads it takes, so a peer trickling bytes cannot stretch
        it, and a frame length corrupted by a bug cannot keep a dead link open. A REFUSE that
        ends the link raises :class:`LinkRefused`; a frame out of order raises it too (after
        sending REFUSE) or :class:`ProtocolError`, as :data:`handshake.ACCEPTS` says.
        """
        message = await self._next_frame()
        try:
            refusal = self.order.received(message)
        except OutOfOrder as exc:
            if exc.code is None:
                raise
            raise self.refuse(exc.code, exc.reason) from None
        if refusal is not None:
            raise LinkRefused(refusal.code, refusal.message, refusal)
        return message

    async def expect(self, kind: type[_M]) -> _M:
        """:meth:`receive`, for a step that takes only frames of ``kind``."""
        message = await self.receive()
        if not isinstance(message, kind):  # pragma: no cover - handshake.ACCEPTS says so
            raise ProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    async def _next_frame(self) -> Message:
        loop = asyncio.get_running_loop()
        handshaking = not self.order.streaming
        deadline = self.handshake_deadline if handshaking else loop.time() + self.timeouts.idle
        while True:
            event = self.codec.next_event()
            if event is not None:
                if self._on_frame is not None:
                    self._on_frame()
                return event
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(
                    f"no handshake with the {self.end.peer} within {self.timeouts.handshake:g} s"
                    if handshaking
                    else f"no frame from the {self.end.peer} for {self.timeouts.idle:g} s"
                )
            # In the (plain) handshake, read only what the frame in progress still needs:
            # bytes after it may be sealed, and a stranger gets no buffer it did not earn.
            if handshaking and self.opener is None:
                size = max(FRAME_HEADER_SIZE, self.codec.needed)
            else:
                size = READ_SIZE
            try:
                async with asyncio.timeout(left):
                    data = await self.reader.read(size)
            except TimeoutError:
                continue  # the deadline check above says what timed out
            if not data:
                raise ConnectionError(f"the {self.end.peer} closed the link")
            if self._on_read is not None:
                self._on_read(len(data))
            if self.opener is None:
                self.codec.feed(data)
                continue
            try:
                plain = self.opener.feed(data)
            except IntegrityError as exc:
                raise self.refuse("integrity", str(exc)) from None
            for chunk in plain:
                self.codec.feed(chunk)

    # --- keep-alive and closing ----------------------------------------------------------------

    async def heartbeats(self, tick: Callable[[], None] | None = None) -> None:
        """Send HEARTBEAT whenever nothing else was sent for the interval; call ``tick`` every
        half interval (its exception ends the loop: a no-progress deadline, say). Runs until
        cancelled, beside the end's own loops."""
        interval = self.timeouts.heartbeat
        while True:
            await asyncio.sleep(interval / 2)
            if time.monotonic() - self.last_sent >= interval:
                with contextlib.suppress(Exception):
                    self.send(Heartbeat(time.time_ns(), 0))
            if tick is not None:
                tick()

    def abort(self) -> None:
        """Close at once, from a callback (the session's tasks see the link end)."""
        self.writer.close()

    @property
    def is_closing(self) -> bool:
        return self.writer.is_closing()

    async def close(self) -> None:
        """Close within the close deadline, resetting the socket if unsent bytes remain."""
        self.order.close()
        await close_writer(self.writer, self.timeouts.close)
