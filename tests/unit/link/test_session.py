"""The link session both ends share (``link.session``), over an in-memory stream.

Vectored sends arrive whole; until the WELCOME only small handshake frames are taken; the
handshake and idle deadlines hold however bytes trickle; a sealed record that fails to open is
answered with REFUSE ``integrity``; heartbeats go out when nothing else does; the no-progress
deadline fires only with bytes in flight and no acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from blockmirror.errors import LinkError, ProtocolError
from blockmirror.journal.lineage import fixed_lineage
from blockmirror.link.handshake import End
from blockmirror.link.protocol import (
    Ack,
    Heartbeat,
    Refuse,
    SyncData,
    Welcome,
    encode,
)
from blockmirror.link.session import LinkRefused, LinkSession, ProgressWatch, Timeouts
from blockmirror.link.session_crypto import Opener, Sealer
from blockmirror.state import HandshakeStep, Role
from tests.unit.link.ends import ScriptedPeer
from tests.unit.link.memory import duplex

QUICK = Timeouts(handshake=0.3, idle=0.3, heartbeat=0.1, progress=0.3, close=0.2)
WELCOME = Welcome(2, "b", 0, 0, True, None, lineage=fixed_lineage("b", Role.SECONDARY, 0))


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


@contextlib.asynccontextmanager
async def source_session(
    on_refuse: Callable[[str, str], None] | None = None,
) -> AsyncIterator[tuple[LinkSession, ScriptedPeer]]:
    """A source's session with a scripted secondary at the other end; both closed after."""
    ours, theirs, _wire = duplex()
    session = LinkSession(*ours, end=End.SOURCE, timeouts=QUICK, on_refuse=on_refuse)
    peer = ScriptedPeer(theirs)
    try:
        yield session, peer
    finally:
        await session.close()
        peer.writer.close()


def streaming(session: LinkSession, peer: ScriptedPeer) -> Awaitable[object]:
    """Through the handshake: the peer's WELCOME received."""
    peer.send(WELCOME)

    async def welcomed() -> object:
        assert await session.receive() == WELCOME
        session.stream()
        return None

    return welcomed()


def test_vectored_buffers_arrive_whole() -> None:
    async def body() -> None:
        async with source_session() as (session, peer):
            data = bytearray(range(256)) * 64
            parts = [memoryview(data)[:1000], memoryview(data)[1000:]]
            message = SyncData(1, 4096, 0, memoryview(data))
            head, _body = encode(message)
            sent = session.send_buffers([head, *parts])
            assert sent == len(head) + len(data)
            got = await peer.receive()
            assert isinstance(got, SyncData) and bytes(got.data) == bytes(data)
        assert session.step is HandshakeStep.CLOSED

    run(body)


def test_only_small_handshake_frames_until_the_welcome() -> None:
    async def body() -> None:
        async with source_session() as (session, peer):
            peer.send(Ack(1, 1, 0))  # a stream frame before the WELCOME: refused on its header
            with pytest.raises(ProtocolError, match="not allowed here"):
                await session.receive()

    run(body)


def test_the_handshake_deadline_holds_however_bytes_trickle() -> None:
    async def body() -> None:
        async with source_session() as (session, peer):
            frame = b"".join(bytes(b) for b in encode(WELCOME))

            async def trickle() -> None:
                for byte in frame[:-1]:
                    peer.send_raw(bytes([byte]))
                    await asyncio.sleep(0.02)

            feeder = asyncio.create_task(trickle())
            began = time.monotonic()
            with pytest.raises(
                TimeoutError, match=r"no handshake with the secondary within 0\.3 s"
            ):
                await session.receive()
            assert time.monotonic() - began < QUICK.handshake + 0.3
            feeder.cancel()

    run(body)


def test_the_idle_deadline_counts_whole_frames_not_bytes() -> None:
    async def body() -> None:
        async with source_session() as (session, peer):
            await streaming(session, peer)
            # Half a frame, then nothing: the next frame never comes whole.
            peer.send_raw(b"".join(bytes(b) for b in encode(Heartbeat(1, 0)))[:20])
            with pytest.raises(TimeoutError, match=r"no frame from the secondary for 0\.3 s"):
                await session.receive()

    run(body)


def test_a_refusal_from_the_peer_is_raised_with_its_code() -> None:
    async def body() -> None:
        async with source_session() as (session, peer):
            peer.send(Refuse("busy", "replica vol already has a source"))
            with pytest.raises(LinkRefused) as caught:
                await session.receive()
            assert isinstance(caught.value, LinkError) and caught.value.code == "busy"
            assert str(caught.value) == "busy: replica vol already has a source"
            assert session.step is HandshakeStep.CLOSED

    run(body)


def test_a_sealed_record_that_fails_to_open_is_refused_integrity() -> None:
    async def body() -> None:
        refused: list[tuple[str, str]] = []
        async with source_session(on_refuse=lambda c, m: refused.append((c, m))) as (session, peer):
            ours, theirs = b"k" * 32, b"K" * 32
            await streaming(session, peer)
            session.seal(Sealer(ours), Opener(theirs))
            peer.sealer, peer.opener = Sealer(b"x" * 32), Opener(ours)  # the wrong key out
            peer.send(Heartbeat(1, 0))
            with pytest.raises(LinkRefused) as caught:
                await session.receive()
            assert caught.value.code == "integrity"
            assert refused and refused[0][0] == "integrity"
            answer = await peer.receive()  # sealed with the session's own key
            assert isinstance(answer, Refuse) and answer.code == "integrity"

    run(body)


def test_heartbeats_go_out_only_when_nothing_else_did() -> None:
    async def body() -> None:
        async with source_session() as (session, peer):
            await streaming(session, peer)
            ticks: list[float] = []
            beat = asyncio.create_task(session.heartbeats(lambda: ticks.append(time.monotonic())))
            first = await peer.receive()
            assert isinstance(first, Heartbeat) and first.echo_ns == 0
            # Something else sent keeps the heartbeat back for an interval.
            session.send(Ack(1, 1, 0))
            assert isinstance(await peer.receive(), Ack)
            assert isinstance(await peer.receive(), Heartbeat)
            assert len(ticks) >= 2
            beat.cancel()

    run(body)


def test_a_failing_tick_ends_the_heartbeats() -> None:
    async def body() -> None:
        async with source_session() as (session, _peer):

            def tick() -> None:
                raise TimeoutError("no progress")

            with pytest.raises(TimeoutError, match="no progress"):
                await session.heartbeats(tick)

    run(body)


def test_the_no_progress_deadline() -> None:
    watch = ProgressWatch(0.05)
    watch.check(0, 0)
    time.sleep(0.08)
    watch.check(0, 0)  # nothing in flight: no deadline
    watch.check(0, 100)
    time.sleep(0.03)
    watch.check(50, 100)  # progress restarts it
    time.sleep(0.03)
    watch.check(50, 100)
    time.sleep(0.05)
    with pytest.raises(TimeoutError, match=r"acknowledged nothing for 0\.05 s with 50 bytes"):
        watch.check(50, 100)
