"""The source's end of a link (``PeerSender``) over in-memory streams, on real journals.

Against a real receiver session (``Pair``): a new replica is copied (SYNC_START, SYNC_DATA,
SYNC_ZERO, SYNC_DONE) and then follows the records; with a key both ends prove it and the
session is sealed; refusals are reported and retried; a link gone silent ends on its deadline
and the sender reconnects by itself. Against a scripted secondary: what only a broken or
hostile one sends (no ACKs while answering heartbeats, an unasked-for proof, a small journal).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from blockmirror.journal.lineage import fixed_lineage
from blockmirror.link.compression import Codec
from blockmirror.link.protocol import (
    PROTOCOL_VERSION,
    Ack,
    AuthServer,
    Heartbeat,
    Hello,
    Refuse,
    SyncData,
    Welcome,
)
from blockmirror.link.sender import PeerSender
from blockmirror.link.session_crypto import CHACHA20_POLY1305
from blockmirror.state import LinkPhase, Role
from tests.unit.link.ends import (
    FAST,
    PEER,
    VOLUME,
    MiB,
    ScriptedPeer,
    linked,
    open_site,
    peer_sender,
    same_data,
    until,
    write,
)
from tests.unit.link.memory import Streams, duplex

KEY = b"a pre-shared key of 32 bytes...."


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


def welcome(unit: str, volume_id: str, max_record: int | None = None) -> Welcome:
    """A secondary's WELCOME: it holds this very volume up to 0, consistently."""
    return Welcome(
        PROTOCOL_VERSION,
        unit,
        0,
        0,
        True,
        volume_id,
        max_record,
        fixed_lineage(unit, Role.SECONDARY, 0),
    )


def test_a_new_replica_is_copied_then_follows_the_records(tmp_path: Path) -> None:
    async def body() -> None:
        async with linked(tmp_path) as pair:
            primary, secondary = pair.primary, pair.secondary
            # Written before the link exists: the new replica gets them by a copy.
            await write(primary, 0, b"\x11" * MiB)
            await write(primary, 3 * MiB, b"\x22" * 4096, fua=True)
            pair.sender.start()
            await until(pair.caught_up, "the first resync")
            tap = pair.taps[0]
            sent = tap.kinds("a")
            assert sent[0] == "Hello", sent
            assert {"SyncStart", "SyncData", "SyncZero", "SyncDone"} <= set(sent), sent
            assert sent.index("SyncStart") < sent.index("SyncData") < sent.index("SyncDone")
            assert sent.index("SyncZero") < sent.index("SyncDone")
            assert tap.kinds("b")[0] == "Welcome" and "Ack" in tap.kinds("b")
            assert same_data(primary, secondary)
            assert pair.sender.status()["state"] == "replicating"
            assert pair.sender.status()["consistent"] is True

            # Then records: streamed, acknowledged, and the journal's cursor follows.
            before = len(tap.frames["a"])
            for i in range(8):
                await write(primary, i * 65536, bytes([i + 1]) * 65536)
            await until(pair.caught_up, "the records")
            later = tap.kinds("a")[before:]
            assert "Records" in later and not [k for k in later if k.startswith("Sync")], later
            last = primary.journal.next_seq - 1
            assert primary.journal.consumers[PEER].acked_seq == last
            assert pair.sender.stats.acked_seq == last
            assert secondary.journal.durable_seq == last
            acks = [m for m in tap.frames["b"] if isinstance(m, Ack)]
            assert acks[-1].durable_seq == last
            assert same_data(primary, secondary)
            status = pair.sender.status()
            assert status["lag_bytes"] == 0 and pair.sender.stats.records_sent >= 8, status
            # Records keep their origin time through the link.
            ours = {r.seq: r.timestamp_ns for r in primary.journal.records}
            theirs = {r.seq: r.timestamp_ns for r in secondary.journal.records}
            assert ours and all(theirs.get(seq) == ts for seq, ts in ours.items())
        assert pair.sender.phase is LinkPhase.STOPPED

    run(body)


def test_with_a_key_both_ends_prove_it_and_the_session_is_sealed(tmp_path: Path) -> None:
    async def body() -> None:
        async with linked(tmp_path, source_key=KEY, secondary_key=KEY) as pair:
            primary, secondary = pair.primary, pair.secondary
            secret = b"\x5a\xa5" * 2048
            await write(primary, MiB, secret)
            pair.sender.start()
            await until(pair.caught_up, "the sealed resync")
            await write(primary, 2 * MiB, secret)
            await until(pair.caught_up, "the sealed records")
            tap = pair.taps[0]
            # In clear: HELLO, AUTH_SERVER, AUTH_CLIENT; everything after is sealed records.
            assert tap.kinds("a") == ["Hello", "AuthClient"], tap.kinds("a")
            assert tap.kinds("b") == ["AuthServer"], tap.kinds("b")
            assert tap.stopped == {"a", "b"}
            hello = tap.frames["a"][0]
            assert isinstance(hello, Hello) and hello.auth == "psk"
            assert hello.crypto == CHACHA20_POLY1305
            assert secret[:64] not in tap.bytes["a"]
            assert same_data(primary, secondary)

    run(body)


def test_a_wrong_key_is_refused_on_both_ends_and_retried(tmp_path: Path) -> None:
    async def body() -> None:
        async with linked(tmp_path, source_key=KEY, secondary_key=KEY[::-1]) as pair:
            primary, secondary = pair.primary, pair.secondary
            await write(primary, 0, b"\x01" * 4096)
            pair.sender.start()
            await until(lambda: len(pair.served) >= 2 and pair.served[0].done(), "a retry")
            stats = pair.sender.stats
            assert stats.last_error == "auth: the secondary failed to prove the pre-shared key"
            assert stats.connects == 0
            status = pair.sender.status()
            assert status["state"] == "connecting" and status["reason"] == stats.last_error
            # The source's REFUSE is out of place where the proof belongs: refused "auth".
            assert str(pair.runtime.last_refusal).startswith("auth: expected AUTH_CLIENT")
            assert pair.served[0].result() is True
            assert secondary.journal.next_seq == 1  # nothing reached the replica

    run(body)


def test_a_refused_size_is_reported_and_nothing_is_sent(tmp_path: Path) -> None:
    async def body() -> None:
        async with linked(tmp_path, replica_size=VOLUME // 2) as pair:
            primary = pair.primary
            await write(primary, 0, b"\x01" * 4096)
            pair.sender.start()
            await until(lambda: pair.sender.stats.last_error is not None, "the refusal")
            assert str(pair.sender.stats.last_error).startswith("size-mismatch: replica vol is")
            assert str(pair.runtime.last_refusal).startswith("size-mismatch: ")
            assert pair.taps[0].kinds("a") == ["Hello"]
            assert pair.taps[0].kinds("b") == ["Refuse"]

    run(body)


def test_a_source_with_a_key_refuses_a_secondary_that_asks_for_none(tmp_path: Path) -> None:
    async def body() -> None:
        async with linked(tmp_path, source_key=KEY) as pair:
            pair.sender.start()
            await until(lambda: pair.sender.stats.last_error is not None, "the refusal")
            assert pair.sender.stats.last_error == (
                "auth: the secondary did not ask for the pre-shared key"
            )
            refusal = pair.taps[0].frames["a"][-1]
            assert isinstance(refusal, Refuse) and refusal.code == "auth"

    run(body)


def test_a_silent_link_ends_on_its_deadline_and_the_sender_reconnects(tmp_path: Path) -> None:
    async def body() -> None:
        async with linked(tmp_path) as pair:
            primary, secondary = pair.primary, pair.secondary
            await write(primary, 0, b"\x07" * 65536)
            pair.sender.start()
            await until(pair.caught_up, "the first session")
            began = time.monotonic()
            pair.wires[0].go_silent()  # a cable pulled: no byte, no FIN, either way
            # The sender's deadline (it is reported until the next session is up, after a
            # backoff of a tenth of a second), and the secondary's.
            await until(lambda: pair.sender.stats.last_error is not None, "the sender to notice")
            assert str(pair.sender.stats.last_error).startswith("no frame from the secondary for")
            await until(pair.served[0].done, "the secondary to notice")
            assert time.monotonic() - began < FAST.idle + 2, "the deadlines held"
            assert pair.served[0].result() is False  # a closed link, not a refusal
            # The journal still held what the replica lacks: records, no new copy.
            await write(primary, 2 * MiB, b"\x08" * 65536)
            await until(lambda: pair.caught_up() and pair.sender.stats.connects >= 2, "the records")
            assert "SyncStart" not in pair.taps[-1].kinds("a")
            assert same_data(primary, secondary)

    run(body)


@contextlib.asynccontextmanager
async def scripted(
    tmp_path: Path, play: Callable[[ScriptedPeer], Coroutine[Any, Any, None]]
) -> AsyncIterator[PeerSender]:
    """A sender on a primary under ``tmp_path/a`` whose every connection ``play`` answers;
    stopped and closed afterwards."""
    primary = open_site(tmp_path, "a", consumers=(PEER,))
    tasks: list[asyncio.Task[None]] = []
    peers: list[ScriptedPeer] = []

    async def connect() -> Streams:
        source_end, secondary_end, _wire = duplex()
        peers.append(ScriptedPeer(secondary_end))
        tasks.append(asyncio.create_task(play(peers[-1])))
        return source_end

    sender = peer_sender(primary, connect)
    try:
        yield sender
    finally:
        await sender.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in peers:
            peer.writer.close()
        await primary.close()


def test_a_secondary_that_answers_heartbeats_but_acknowledges_nothing_is_dropped(
    tmp_path: Path,
) -> None:
    async def play(peer: ScriptedPeer) -> None:
        hello = await peer.receive()
        assert isinstance(hello, Hello)
        # It holds everything up to 0 of this very volume, consistently: no copy is due.
        peer.send(welcome("site-b", hello.volume_id))
        while True:
            message = await peer.receive()
            if isinstance(message, Heartbeat):
                peer.send(Heartbeat(time.time_ns(), message.sent_ns))

    async def body() -> None:
        async with scripted(tmp_path, play) as sender:
            await write(sender.wp, 0, b"\x09" * 65536)
            sender.start()
            await until(lambda: sender.stats.last_error is not None, "the deadline")
            error = str(sender.stats.last_error)
            assert error.startswith(f"the secondary acknowledged nothing for {FAST.progress:g} s")
            # A new consumer starts with a copy of everything: it is what stayed in flight.
            assert sender.stats.sync_bytes_sent > 0
            assert not sender.consumer.dirty.is_clean()

    run(body)


def test_an_unasked_proof_and_a_small_journal_are_refused(tmp_path: Path) -> None:
    connections: list[ScriptedPeer] = []
    refusals: list[Refuse] = []

    async def play(peer: ScriptedPeer) -> None:
        connections.append(peer)
        hello = await peer.receive()
        assert isinstance(hello, Hello) and hello.max_record is not None
        if len(connections) == 1:
            # A proof the source has no key to check: it closes without a word.
            peer.send(AuthServer("0" * 64, "0" * 64))
            assert await peer.closed() == []
            return
        # A journal too small for the source's records (an older secondary's WELCOME).
        peer.send(welcome("b", hello.volume_id, hello.max_record - 8))
        answer = await peer.receive()
        assert isinstance(answer, Refuse)
        refusals.append(answer)
        await peer.closed()

    async def body() -> None:
        async with scripted(tmp_path, play) as sender:
            errors: list[str] = []
            sender.start()
            await until(lambda: sender.stats.last_error is not None, "the first refusal")
            errors.append(str(sender.stats.last_error))
            await until(lambda: refusals, "the second refusal")
            await until(lambda: str(sender.stats.last_error) != errors[0], "its report")
            errors.append(str(sender.stats.last_error))
        assert errors[0] == "auth: the secondary requires a pre-shared key; none set"
        assert errors[1].startswith("journal-too-small: the secondary's journal holds")
        assert refusals[0].code == "journal-too-small"
        assert sender.stats.connects == 0

    run(body)


def test_a_frame_out_of_order_from_the_secondary_drops_the_link(tmp_path: Path) -> None:
    async def play(peer: ScriptedPeer) -> None:
        hello = await peer.receive()
        assert isinstance(hello, Hello)
        peer.send(welcome("b", hello.volume_id))
        peer.send(welcome("b", hello.volume_id))
        await peer.closed()

    async def body() -> None:
        async with scripted(tmp_path, play) as sender:
            sender.start()
            await until(lambda: sender.stats.last_error is not None, "the drop")
            assert sender.stats.last_error == "unexpected Welcome from secondary"
            assert sender.status()["state"] == "connecting"

    run(body)


def test_a_secondary_that_does_not_decode_zstd_gets_plain_frames(tmp_path: Path) -> None:
    """An older secondary lists no codec in its WELCOME: a source set to compress sends it
    plain frames (its codec, which accepts no flag, would refuse anything else)."""
    seen: list[str] = []
    hellos: list[Hello] = []

    async def play(peer: ScriptedPeer) -> None:
        hello = await peer.receive()
        assert isinstance(hello, Hello)
        hellos.append(hello)
        peer.send(welcome("site-b", hello.volume_id))  # no "compression" key
        while True:
            message = await peer.receive()
            seen.append(type(message).__name__)
            if isinstance(message, Heartbeat):
                peer.send(Heartbeat(time.time_ns(), message.sent_ns))
            if isinstance(message, SyncData):
                assert bytes(message.data[:8]) == b"abcdabcd"

    async def body() -> None:
        async with scripted(tmp_path, play) as sender:
            sender.set_compression(Codec.ZSTD, 3)
            await write(sender.wp, 0, b"abcd" * 16384)
            sender.start()
            await until(lambda: "SyncData" in seen, "the copy of the written data")
            assert sender.stream is not None and sender.stream.compress is False
            assert sender.status()["compressing"] is False
            assert sender.stats.wire_bytes_sent == sender.stats.bytes_sent
        assert hellos[0].compression == ("zstd",)  # the source says what it decodes

    run(body)
