"""Both ends of a link on real journals in a tmp dir, connected in memory (see memory.py).

:class:`Pair` is a primary's :class:`PeerSender` and a secondary's :class:`ReceiverSession`s:
each connection the sender makes is a fresh in-memory duplex with a receiver session serving
its other end, as the listener would. :class:`ScriptedPeer` plays one end by hand with the
frame codec, for frames no correct peer sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.journal.format import Kind, RecordHeader
from blockmirror.journal.journal import Journal
from blockmirror.link.protocol import LinkCodec, Message, encode, encode_records
from blockmirror.link.receiver import ReceiverSession, ReceiverSettings
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.link.sender import PeerSender
from blockmirror.link.session import Timeouts
from blockmirror.link.session_crypto import Opener, Sealer
from blockmirror.store.volume import Volume
from tests.unit.link.memory import FrameTap, Streams, Wire, duplex

MiB = 1024 * 1024
VOLUME = 8 * MiB
JOURNAL = 4 * MiB
PEER = "peer"
# Short deadlines, so that a test of a dead link takes a second, not ten.
FAST = Timeouts(handshake=2.0, idle=0.6, heartbeat=0.1, progress=0.8, close=0.2)


def open_site(
    tmp: Path, name: str, *, consumers: tuple[str, ...] = (), size: int = VOLUME
) -> JournalWritePath:
    """A volume and its journal under ``tmp/name``, opened as the daemon opens them."""
    where = tmp / name
    where.mkdir()
    volume = Volume.open(where / "vol.img", size=size)
    journal = Journal.open(
        where / "vol.journal",
        volume=volume,
        journal_size=JOURNAL,
        consumers=list(consumers),
        dirty_dir=where,
        volume_name="vol",
    )
    wp = JournalWritePath(journal, volume, asyncio.get_running_loop())
    wp.start()
    return wp


async def write(wp: JournalWritePath, offset: int, data: bytes, *, fua: bool = False) -> None:
    """A host write through the write path, answered."""
    result = wp.write(offset, [data], fua=fua)
    gate = wp.commit()
    if gate is not None:
        await gate
    if result is not None:
        await result


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def same_data(a: JournalWritePath, b: JournalWritePath) -> bool:
    return a.volume.pread(0, a.volume.size) == b.volume.pread(0, b.volume.size)


class Pair:
    """A primary's sender to a secondary, every connection in memory."""

    def __init__(
        self,
        primary: JournalWritePath,
        secondary: JournalWritePath,
        *,
        source_key: bytes | None = None,
        secondary_key: bytes | None = None,
        replica_size: int | None = None,
        timeouts: Timeouts = FAST,
    ) -> None:
        self.primary = primary
        self.secondary = secondary
        self.timeouts = timeouts
        self.runtime = ReplicaRuntime(
            "vol", secondary.volume.size if replica_size is None else replica_size, secondary
        )
        self.settings = ReceiverSettings("site-b", self._replica, secondary_key)
        self.sessions: list[ReceiverSession] = []
        self.served: list[asyncio.Task[bool]] = []
        self.wires: list[Wire] = []
        self.taps: list[FrameTap] = []
        self.sender = peer_sender(primary, self._connect, psk=source_key, timeouts=timeouts)

    def _replica(self, name: str) -> ReplicaRuntime | None:
        return self.runtime if name == "vol" else None

    async def _connect(self) -> Streams:
        source_end, secondary_end, wire = duplex()
        self.wires.append(wire)
        self.taps.append(FrameTap(wire))
        session = ReceiverSession(
            self.settings, *secondary_end, f"memory:{len(self.sessions)}", timeouts=self.timeouts
        )
        self.sessions.append(session)
        self.served.append(asyncio.create_task(session.serve()))
        return source_end

    def caught_up(self) -> bool:
        """The replica holds every write the primary applied, and says it is consistent."""
        status = self.runtime.status()
        return (
            bool(status["consistent"])
            and self.secondary.applied_seq >= self.primary.applied_seq
            and self.primary.journal.consumers[PEER].acked_seq >= self.primary.applied_seq
            and self.sender.stats.consistent
        )

    async def close(self) -> None:
        await self.sender.stop()
        for task in self.served:
            task.cancel()
        await asyncio.gather(*self.served, return_exceptions=True)


@contextlib.asynccontextmanager
async def linked(
    tmp: Path,
    *,
    source_key: bytes | None = None,
    secondary_key: bytes | None = None,
    replica_size: int | None = None,
) -> AsyncIterator[Pair]:
    """A primary under ``tmp/a``, a secondary under ``tmp/b`` and a :class:`Pair` between them
    (not started); everything stopped and closed afterwards."""
    primary = open_site(tmp, "a", consumers=(PEER,))
    secondary = open_site(tmp, "b")
    pair = Pair(
        primary,
        secondary,
        source_key=source_key,
        secondary_key=secondary_key,
        replica_size=replica_size,
    )
    try:
        yield pair
    finally:
        await pair.close()
        await primary.close()
        await secondary.close()


def peer_sender(
    primary: JournalWritePath,
    connect: Callable[[], Awaitable[Streams]],
    *,
    psk: bytes | None = None,
    timeouts: Timeouts = FAST,
) -> PeerSender:
    """The sender of ``primary``'s volume to consumer :data:`PEER`, connecting with ``connect``."""
    return PeerSender(
        unit_name="site-a",
        volume_name="vol",
        write_path=primary,
        consumer=PEER,
        host="memory",
        port=1,
        volume_id=lambda: primary.journal.volume_id,
        psk=psk,
        timeouts=timeouts,
        connect=connect,
    )


class ScriptedPeer:
    """One end of an in-memory link driven by hand, frame by frame."""

    def __init__(self, streams: Streams) -> None:
        self.reader, self.writer = streams
        self.codec = LinkCodec()
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None

    def send(self, message: Message) -> None:
        buffers = encode(message)
        if self.sealer is not None:
            buffers = self.sealer.seal(buffers)
        self.writer.writelines(buffers)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def receive(self, timeout: float = 5.0) -> Message:
        """The next frame the other end sent; EOFError when it closed first."""
        async with asyncio.timeout(timeout):
            while True:
                message = self.codec.next_event()
                if message is not None:
                    return message
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("the other end closed the link")
                if self.opener is None:
                    self.codec.feed(data)
                else:
                    for chunk in self.opener.feed(data):
                        self.codec.feed(chunk)

    async def closed(self, timeout: float = 5.0) -> list[Message]:
        """Every frame until the other end closes."""
        frames: list[Message] = []
        try:
            while True:
                frames.append(await self.receive(timeout))
        except EOFError:
            return frames


def records(first_seq: int, offset: int, payloads: list[bytes]) -> bytes:
    """A RECORDS frame of writes, one after the other from ``offset`` (valid CRCs)."""
    items = []
    at = offset
    for i, payload in enumerate(payloads):
        header = RecordHeader(
            Kind.WRITE, first_seq + i, time.time_ns(), at, len(payload), 0, len(payload), 7
        )
        items.append((header, [payload]))
        at += len(payload)
    return b"".join(bytes(b) for b in encode_records(items))
