"""An in-memory duplex byte stream for link tests: two asyncio (reader, writer) pairs whose
writes arrive at the other end's reader on the next loop turn, as over a socket, with no TCP.

The :class:`Wire` between them can tap what crosses it (a frame codec per direction reads it
back), or go silent (every byte dropped, no FIN: a cable pulled) to exercise the deadlines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from blockmirror.errors import ProtocolError
from blockmirror.link.protocol import LinkCodec, Message

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _End(asyncio.Transport):
    """One side's transport: what it writes is delivered to the other side's protocol."""

    def __init__(self, wire: Wire, loop: asyncio.AbstractEventLoop, name: str) -> None:
        super().__init__()
        self.wire = wire
        self.loop = loop
        self.name = name
        self.protocol: asyncio.Protocol | None = None
        self.peer: _End | None = None
        self._closing = False
        self._eof_seen = False

    # --- what the stream writer calls -----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        chunk = bytes(data)
        self.wire.crossed(self.name, chunk)
        if self.wire.silent:
            return
        assert self.peer is not None
        self.loop.call_soon(self.peer._deliver, chunk)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        assert self.peer is not None
        if not self.wire.silent:
            self.loop.call_soon(self.peer._eof)
        if self.protocol is not None:
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("memory", 0), "sockname": ("memory", 1)}.get(name, default)

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass  # the reader's buffer only grows as far as a test sends

    def resume_reading(self) -> None:
        pass

    # --- what the other side's writes do here ---------------------------------------------------

    def _deliver(self, chunk: bytes) -> None:
        if not self._closing and not self._eof_seen and self.protocol is not None:
            self.protocol.data_received(chunk)

    def _eof(self) -> None:
        if not self._eof_seen and self.protocol is not None:
            self._eof_seen = True
            self.protocol.eof_received()


class Wire:
    """The connection between two ends, ``"a"`` and ``"b"``."""

    def __init__(self) -> None:
        self.silent = False
        self.taps: list[Callable[[str, bytes], None]] = []

    def crossed(self, sender: str, chunk: bytes) -> None:
        for tap in self.taps:
            tap(sender, chunk)

    def go_silent(self) -> None:
        """Drop every byte from now on, both ways, without closing anything."""
        self.silent = True


class FrameTap:
    """The frames each end sent, decoded from the wire. A sealed session's records are not
    frames: a direction's decoding stops at the first one (its bytes are still kept)."""

    def __init__(self, wire: Wire) -> None:
        self.codecs = {"a": LinkCodec(), "b": LinkCodec()}
        self.frames: dict[str, list[Message]] = {"a": [], "b": []}
        self.bytes: dict[str, bytearray] = {"a": bytearray(), "b": bytearray()}
        self.stopped: set[str] = set()
        wire.taps.append(self._crossed)

    def _crossed(self, sender: str, chunk: bytes) -> None:
        self.bytes[sender] += chunk
        if sender in self.stopped:
            return
        codec = self.codecs[sender]
        codec.feed(chunk)
        try:
            self.frames[sender].extend(codec.events())
        except ProtocolError:
            self.stopped.add(sender)

    def kinds(self, sender: str) -> list[str]:
        return [type(m).__name__ for m in self.frames[sender]]


def duplex(wire: Wire | None = None, *, limit: int = 256 * 1024) -> tuple[Streams, Streams, Wire]:
    """Two connected ends (``a``, ``b``) on the running loop, and the wire between them."""
    loop = asyncio.get_running_loop()
    wire = wire or Wire()
    a, b = _End(wire, loop, "a"), _End(wire, loop, "b")
    a.peer, b.peer = b, a

    def end(transport: _End) -> Streams:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.protocol = protocol
        protocol.connection_made(transport)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    return end(a), end(b), wire
