"""The secondary's end of a link (``ReceiverSession``) over in-memory streams, on a real
journal, driven by a scripted source frame by frame.

Covered: the handshake with and without a key (the sealed WELCOME included), records
journaled, applied and acknowledged, a resync reaching the replica and making it consistent,
every refusal of the handshake's checks, frames out of order, and the deadlines (a source gone
quiet after its WELCOME, a handshake that never completes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.journal.lineage import fixed_lineage
from blockmirror.link import auth
from blockmirror.link.protocol import (
    PROTOCOL_VERSION,
    Ack,
    AuthClient,
    AuthServer,
    Heartbeat,
    Hello,
    Message,
    Refuse,
    SyncData,
    SyncDone,
    SyncStart,
    SyncZero,
    Welcome,
    encode,
)
from blockmirror.link.receiver import ReceiverSession, ReceiverSettings
from blockmirror.link.replica_runtime import ReplicaRuntime
from blockmirror.link.session import Timeouts
from blockmirror.link.session_crypto import CHACHA20_POLY1305, Opener, Sealer, derive_keys
from blockmirror.state import Role
from tests.unit.link.ends import FAST, JOURNAL, VOLUME, MiB, ScriptedPeer, open_site, records, until
from tests.unit.link.memory import duplex

KEY = b"the secondary's key, 32 bytes..."
SOURCE_ID = "5" * 32


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


def hello(
    *, volume: str = "vol", size: int = VOLUME, key: bool = False, volume_id: str = SOURCE_ID
) -> Hello:
    return Hello(
        PROTOCOL_VERSION,
        "site-a",
        volume,
        volume_id,
        size,
        auth.new_nonce(),
        "psk" if key else "none",
        JOURNAL // 4,
        CHACHA20_POLY1305 if key else None,
        lineage=fixed_lineage("site-a", Role.PRIMARY, 0),
    )


@dataclass
class Secondary:
    """A secondary holding replica ``vol``; each :meth:`connect` is one accepted link."""

    wp: JournalWritePath
    key: bytes | None = None
    timeouts: Timeouts = FAST
    runtime: ReplicaRuntime = field(init=False)
    served: list[asyncio.Task[bool]] = field(default_factory=list)
    peers: list[ScriptedPeer] = field(default_factory=list)
    bound: int = 0

    def __post_init__(self) -> None:
        self.runtime = ReplicaRuntime("vol", self.wp.volume.size, self.wp)

    def connect(self) -> ScriptedPeer:
        source_end, secondary_end, _wire = duplex()
        settings = ReceiverSettings(
            "site-b", lambda name: self.runtime if name == "vol" else None, self.key
        )
        session = ReceiverSession(
            settings,
            *secondary_end,
            f"memory:{len(self.served)}",
            timeouts=self.timeouts,
            on_bound=self._bound,
        )
        self.served.append(asyncio.create_task(session.serve()))
        peer = ScriptedPeer(source_end)
        self.peers.append(peer)
        return peer

    def _bound(self) -> None:
        self.bound += 1

    async def welcome(self, greeting: Hello | None = None) -> tuple[ScriptedPeer, Welcome]:
        """A connection through a handshake without a key."""
        peer = self.connect()
        peer.send(greeting or hello())
        answer = await peer.receive()
        assert isinstance(answer, Welcome), answer
        return peer, answer

    async def challenged(self) -> tuple[ScriptedPeer, Hello, AuthServer]:
        """A connection whose keyed HELLO got its AUTH_SERVER."""
        peer = self.connect()
        greeting = hello(key=True)
        peer.send(greeting)
        challenge = await peer.receive()
        assert isinstance(challenge, AuthServer), challenge
        return peer, greeting, challenge

    async def close(self) -> None:
        for task in self.served:
            task.cancel()
        await asyncio.gather(*self.served, return_exceptions=True)
        for peer in self.peers:
            peer.writer.close()
        await self.wp.close()


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    *,
    name: str = "b",
    key: bytes | None = None,
    timeouts: Timeouts = FAST,
) -> AsyncIterator[Secondary]:
    """A :class:`Secondary` on a new site ``tmp_path/name``; its links and journal closed
    afterwards."""
    secondary = Secondary(open_site(tmp_path, name), key=key, timeouts=timeouts)
    try:
        yield secondary
    finally:
        await secondary.close()


async def ack_where(peer: ScriptedPeer, condition: Callable[[Ack], bool]) -> Ack:
    """The first ACK that meets ``condition`` (heartbeats and earlier ACKs skipped)."""
    while True:
        message = await peer.receive()
        if isinstance(message, Ack) and condition(message):
            return message


def refusal_of(frames: list[Message]) -> Refuse:
    assert frames and isinstance(frames[-1], Refuse), frames
    return frames[-1]


def test_handshake_without_a_key(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as secondary:
            _peer, welcome = await secondary.welcome()
            assert welcome.protocol == PROTOCOL_VERSION and welcome.unit == "site-b"
            assert (welcome.received_seq, welcome.applied_seq) == (0, 0)
            # A replica that never received: no identity yet, not consistent.
            assert welcome.volume_id is None and welcome.consistent is False
            assert welcome.max_record == secondary.wp.journal.max_payload()
            status = secondary.runtime.status()
            assert status["connected"] is True and status["source_unit"] == "site-a"
            assert secondary.bound == 1

    run(body)


def test_handshake_with_a_key_proves_both_ends_and_seals_the_welcome(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, key=KEY) as secondary:
            peer, greeting, challenge = await secondary.challenged()
            assert challenge.crypto == CHACHA20_POLY1305
            expected = auth.server_proof(KEY, greeting.nonce, challenge.nonce, "vol")
            assert auth.verify(expected, challenge.proof)
            assert secondary.bound == 0  # not before the source's proof
            proof = auth.client_proof(KEY, challenge.nonce, greeting.nonce, "vol")
            peer.send(AuthClient(proof))
            keys = derive_keys(KEY, greeting.nonce, challenge.nonce, greeting)
            peer.sealer, peer.opener = Sealer(keys.source), Opener(keys.secondary)
            welcome = await peer.receive()  # opened with the session key, or it fails
            assert isinstance(welcome, Welcome) and welcome.received_seq == 0
            # A sealed heartbeat is answered (sealed), echoing its time.
            peer.send(Heartbeat(12345, 0))
            echo = await peer.receive()
            while not isinstance(echo, Heartbeat) or echo.echo_ns != 12345:
                echo = await peer.receive()
            assert secondary.bound == 1

    run(body)


def test_a_wrong_proof_is_refused_and_shown_on_the_replica(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, key=KEY) as secondary:
            peer, greeting, challenge = await secondary.challenged()
            peer.send(
                AuthClient(auth.client_proof(KEY[::-1], challenge.nonce, greeting.nonce, "vol"))
            )
            refusal = refusal_of(await peer.closed())
            assert (refusal.code, refusal.message) == ("auth", "wrong pre-shared key")
            assert secondary.runtime.last_refusal == "auth: wrong pre-shared key (from memory:0)"
            assert await secondary.served[0] is True
            assert not secondary.runtime.status()["connected"]

    run(body)


def test_records_are_journaled_applied_and_acknowledged(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as secondary:
            peer, _welcome = await secondary.welcome()
            payloads = [bytes([i + 1]) * 65536 for i in range(4)]
            peer.send_raw(records(1, MiB, payloads))
            peer.send_raw(records(5, 3 * MiB, [b"\x77" * 4096]))
            ack = await ack_where(peer, lambda a: a.durable_seq == 5 and a.applied_seq == 5)
            assert ack.sync_lsn == 0
            wp = secondary.wp
            assert wp.volume.pread(MiB, 4 * 65536) == b"".join(payloads)
            assert wp.volume.pread(3 * MiB, 4096) == b"\x77" * 4096
            assert [r.seq for r in wp.journal.records] == [1, 2, 3, 4, 5]
            status = secondary.runtime.status()
            assert status["records_received"] == 5 and status["received_seq"] == 5
            assert int(str(status["bytes_received"])) > 4 * 65536

    run(body)


def test_a_resync_reaches_the_replica_and_makes_it_consistent(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as secondary:
            wp = secondary.wp
            wp.volume.pwrite(2 * MiB, b"\xee" * MiB)  # stale data a SYNC_ZERO must clear
            peer, _welcome = await secondary.welcome()
            data = bytes(range(256)) * 4096  # 1 MiB
            peer.send(SyncStart(1, True, 3 * MiB, 0))
            peer.send(SyncData(2, 0, 0, memoryview(data)))
            peer.send(SyncZero(3, 2 * MiB, MiB, 0))
            await ack_where(peer, lambda a: a.sync_lsn >= 3)
            assert secondary.runtime.status()["consistent"] is False  # no SYNC_DONE yet
            assert secondary.runtime.status()["syncing"] is True
            peer.send(SyncDone(4, 0))
            await ack_where(peer, lambda a: a.sync_lsn == 4)
            await until(lambda: secondary.runtime.status()["consistent"], "consistent")
            assert wp.volume.pread(0, MiB) == data
            assert wp.volume.pread(2 * MiB, MiB) == bytes(MiB)
            replica = wp.journal.replica
            assert replica is not None and replica.volume_id == SOURCE_ID
            assert replica.source_unit == "site-a"
            assert secondary.runtime.status()["syncing"] is False
        # A later source of another volume is refused: the replica is bound to this one.
        async with serving(tmp_path, name="b2") as secondary:
            secondary.wp.journal.replica = replica
            peer = secondary.connect()
            peer.send(hello(volume_id="6" * 32))
            assert refusal_of(await peer.closed()).code == "identity-mismatch"

    run(body)


@pytest.mark.parametrize(
    ("greeting", "code"),
    [
        (hello(volume="nope"), "unknown-volume"),
        (hello(size=VOLUME // 2), "size-mismatch"),
        (hello(key=True), None),  # a key where none is asked: the source refuses us instead
    ],
)
def test_the_handshakes_checks_refuse(tmp_path: Path, greeting: Hello, code: str | None) -> None:
    async def body() -> None:
        async with serving(tmp_path) as secondary:
            peer = secondary.connect()
            peer.send(greeting)
            if code is None:
                assert isinstance(await peer.receive(), Welcome)
                return
            refusal = refusal_of(await peer.closed())
            assert refusal.code == code, refusal
            if greeting.volume == "vol":
                assert str(secondary.runtime.last_refusal).startswith(f"{code}: ")
            assert secondary.bound == 0

    run(body)


def test_a_second_source_is_busy_and_another_version_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as secondary:
            first, _welcome = await secondary.welcome()
            second = secondary.connect()
            second.send(hello())
            assert refusal_of(await second.closed()).code == "busy"
            newer = secondary.connect()
            newer.send(dataclasses.replace(hello(), protocol=PROTOCOL_VERSION + 1))
            assert refusal_of(await newer.closed()).code == "version"
            assert secondary.runtime.source == "memory:0"
            first.writer.close()

    run(body)


def frame(message: Message) -> bytes:
    return b"".join(bytes(b) for b in encode(message))


OUT_OF_ORDER: dict[str, tuple[Callable[[], list[bytes]], bool, str, str]] = {
    # name: (frames after connecting, with a key, refusal code, refusal message (start))
    "auth-client-first": (
        lambda: [frame(AuthClient("0" * 64))],
        False,
        "bad-frame",
        "expected HELLO, got AuthClient",
    ),
    "refuse-first": (
        lambda: [frame(Refuse("auth", "no"))],
        False,
        "bad-frame",
        "expected HELLO, got Refuse",
    ),
    "records-first": (
        lambda: [records(1, 0, [b"\x01" * 4096])],
        False,
        "bad-frame",
        "RECORDS frame is not allowed here",
    ),
    "welcome-for-a-proof": (
        lambda: [
            frame(hello(key=True)),
            frame(
                Welcome(
                    PROTOCOL_VERSION,
                    "x",
                    0,
                    0,
                    True,
                    None,
                    lineage=fixed_lineage("x", Role.SECONDARY, 0),
                )
            ),
        ],
        True,
        "auth",
        "expected AUTH_CLIENT",
    ),
    "a-second-hello": (
        lambda: [frame(hello()), frame(hello())],
        False,
        "bad-frame",
        "unexpected Hello",
    ),
    "an-ack-to-the-secondary": (
        lambda: [frame(hello()), frame(Ack(1, 1, 0))],
        False,
        "bad-frame",
        "unexpected Ack",
    ),
    "sync-data-without-sync-start": (
        lambda: [frame(hello()), frame(SyncData(1, 0, 0, memoryview(b"\xab" * 4096)))],
        False,
        "bad-frame",
        "resync data without SYNC_START",
    ),
    "sync-done-without-sync-start": (
        lambda: [frame(hello()), frame(SyncDone(1, 0))],
        False,
        "bad-frame",
        "SYNC_DONE without SYNC_START",
    ),
    "a-gap-in-the-records": (
        lambda: [frame(hello()), records(3, 0, [b"\x01" * 4096])],
        False,
        "bad-frame",
        "record seq 3 arrived, 1 expected",
    ),
}


@pytest.mark.parametrize("case", list(OUT_OF_ORDER))
def test_frames_out_of_order_are_refused_and_nothing_is_applied(tmp_path: Path, case: str) -> None:
    make, keyed, code, message = OUT_OF_ORDER[case]

    async def body() -> None:
        async with serving(tmp_path, key=KEY if keyed else None) as secondary:
            before = secondary.wp.volume.pread(0, MiB)
            peer = secondary.connect()
            for chunk in make():
                peer.send_raw(chunk)
            frames = await peer.closed()
            refusal = refusal_of(frames)
            assert refusal.code == code and refusal.message.startswith(message), refusal
            assert all(isinstance(m, Welcome | AuthServer | Refuse | Heartbeat) for m in frames)
            assert await secondary.served[0] is True
            assert secondary.wp.journal.next_seq == 1
            assert secondary.wp.volume.pread(0, MiB) == before
            assert not secondary.runtime.status()["connected"]

    run(body)


def test_a_source_gone_quiet_is_dropped_after_the_idle_deadline(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as secondary:
            peer, _welcome = await secondary.welcome()
            began = time.monotonic()
            frames = await peer.closed(timeout=FAST.idle + 3)
            took = time.monotonic() - began
            assert FAST.idle * 0.9 <= took < FAST.idle + 2, took
            # It kept the link alive meanwhile (an ACK every half heartbeat interval: nothing
            # else needs sending then), and said no REFUSE.
            assert len([m for m in frames if isinstance(m, Ack)]) >= 2, frames
            assert not any(isinstance(m, Refuse) for m in frames), frames
            assert await secondary.served[0] is False
            assert not secondary.runtime.status()["connected"]

    run(body)


def test_a_handshake_that_never_completes_ends_on_its_deadline(tmp_path: Path) -> None:
    async def body() -> None:
        quick = Timeouts(handshake=0.4, idle=5.0, heartbeat=1.0, progress=5.0, close=0.2)
        async with serving(tmp_path, timeouts=quick) as secondary:
            peer = secondary.connect()
            greeting = frame(hello())
            began = time.monotonic()
            # A trickle: a byte now and then keeps no deadline open.
            for byte in greeting[:10]:
                peer.send_raw(bytes([byte]))
                await asyncio.sleep(0.05)
            assert await peer.closed(timeout=3) == []
            assert time.monotonic() - began < quick.handshake + 1
            assert await secondary.served[0] is False
            assert secondary.bound == 0

    run(body)
