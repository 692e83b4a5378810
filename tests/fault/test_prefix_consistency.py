"""Invariant 3 on a live replica: at every instant it is the volume after a prefix of the writes.

A host (the project's NbdClient, two connections, several writes in flight) writes stamped 4 KiB
blocks (tests/support/stamps.py) through the primary's export, in *flush epochs*: a burst of
writes, all acknowledged, then a FLUSH, acknowledged, then the next burst. So epoch k holds the
writes submitted after FLUSH k-1 was acknowledged and acknowledged before FLUSH k was sent; the
host ordered every write of an earlier epoch before every write of a later one, and nothing
inside one epoch (its writes were in flight together, on two connections).

Meanwhile the secondary unit is frozen (SIGSTOP, every thread stopped) at random moments, its
replica image copied, and thawed (SIGCONT, always). Each copy must pass :func:`check_prefix`,
the rule of docs (testing.md, "Checking crash consistency"): let E be the epoch of the newest
write visible anywhere in the image; every block holds the last write to it of the epochs before
E (zeros if there was none), or one of epoch E's writes to it. A block still showing something
older behind a newer visible write is a hole: the replica skipped or reordered writes across a
point the host had ordered. The checker is proved able to fail on hand-made states first.

The replica owes this only once its initial resync is over (status ``replica.consistent``), so
the workload starts after :func:`wait_caught_up`; the test also proves the link stayed in
journal mode (no resync, no reconnect) while the snapshots were taken, and that the caught-up
replica finally equals the primary's volume with every write in place.

Seeded: the seed is in every assertion message; set BLOCKMIRROR_PREFIX_SEED to replay one (it
fixes the writes and the snapshot schedule; where the replica stands at each freeze is timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from blockmirror.frontend.nbd_client import NbdClient
from tests.support.pair import MiB, Site, frozen, peer_address, topology, wait_caught_up
from tests.support.stamps import BLOCK, Buffer, Ledger, read_stamp, stamps

pytestmark = pytest.mark.fault

SEED = int(os.environ.get("BLOCKMIRROR_PREFIX_SEED") or random.SystemRandom().randrange(2**32))

VOLUME_SIZE = 16 * MiB
# The stamped region: half the volume, so blocks are rewritten many times; the rest stays zero.
STAMP_BLOCKS = 2048
SNAPSHOTS = 24
BURST = 4  # a long freeze, then quick snapshots while the replica catches up
CONNECTIONS = 2
DEPTH = 8  # writes in flight at once, over all connections
MAX_BLOCKS = 4  # blocks per write
MAX_EPOCH_WRITES = 12
# Room for the backlog a frozen secondary leaves (the host runs at tens of MB/s here): were the
# journal to overflow, the peer would be resynced, and owes no prefix consistency meanwhile.
JOURNAL_SIZE = "256MiB"


@contextlib.contextmanager
def context(what: str) -> Iterator[None]:
    """Prefix any assertion failure inside with ``what`` (the seed, the snapshot)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from exc


# --- the checker --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """One host write: its number in submission order, its flush epoch, and where it went."""

    seq: int
    epoch: int
    first: int
    count: int


@dataclass
class History:
    """Every write the host submitted, per block in submission order."""

    run_id: int
    blocks: int
    writes: dict[int, Write] = field(default_factory=dict)  # seq -> write
    per_block: dict[int, list[Write]] = field(default_factory=dict)  # block -> writes, by seq

    def add(self, write: Write) -> None:
        assert write.seq not in self.writes, f"write {write.seq} logged twice"
        self.writes[write.seq] = write
        for block in range(write.first, write.first + write.count):
            self.per_block.setdefault(block, []).append(write)


@dataclass(frozen=True)
class Verdict:
    """What a snapshot showed: the newest visible epoch and write, and how many writes."""

    epoch: int  # 0: nothing visible (the volume before any write)
    newest_seq: int
    visible_writes: int  # distinct writes with at least one block visible


def observe(image: Buffer, history: History) -> dict[int, int]:
    """block -> seq of the write it shows (blocks showing zeros left out).

    Fails on a block that is neither zeros nor an intact stamp of this run, for this block, of
    a write that was submitted to it; and on any non-zero byte past the stamped region.
    """
    view = memoryview(image)
    found: dict[int, int] = {}
    for block in range(history.blocks):
        try:
            stamp = read_stamp(view[block * BLOCK : (block + 1) * BLOCK])
        except AssertionError as exc:
            raise AssertionError(f"block {block}: {exc}") from None
        if stamp is None:
            continue
        run_id, seq, stamped_block = stamp
        assert (run_id, stamped_block) == (history.run_id, block), (
            f"block {block} holds a stamp of run {run_id:#x} block {stamped_block}: misplaced"
        )
        write = history.writes.get(seq)
        assert write is not None and write.first <= block < write.first + write.count, (
            f"block {block} holds write {seq}, which was never submitted to it"
        )
        found[block] = seq
    rest = view[history.blocks * BLOCK :]
    zeros = bytes(MiB)
    for at in range(0, rest.nbytes, MiB):
        chunk = rest[at : at + MiB]
        if chunk != zeros[: chunk.nbytes]:
            raise AssertionError(
                f"data past the stamped region, near byte {history.blocks * BLOCK + at}"
            )
    return found


def check_prefix(image: Buffer, history: History) -> Verdict:
    """``image`` is the volume after all writes of the epochs before some E and a subset of E's.

    E is the epoch of the newest write visible in the image. Every block must show the last
    write to it among the epochs before E (or zeros when there was none), or a write of epoch E
    to it; anything else is a hole: an older write (or zeros) behind a newer visible one.
    "The last write" is well defined: two writes to one block are never in flight together, so
    the later one was submitted after the earlier was acknowledged. Returns what it showed.
    """
    found = observe(image, history)
    if not found:
        return Verdict(0, 0, 0)
    newest = max(found.values(), key=lambda seq: (history.writes[seq].epoch, seq))
    epoch = history.writes[newest].epoch
    for block in range(history.blocks):
        writes = history.per_block.get(block, [])
        before = [w for w in writes if w.epoch < epoch]
        required = before[-1] if before else None
        allowed = {w.seq for w in writes if w.epoch == epoch}
        if required is not None:
            allowed.add(required.seq)
        shown = found.get(block)
        if shown is None and required is None:
            continue
        if shown is not None and shown in allowed:
            continue
        what = "zeros" if shown is None else f"write {shown} (epoch {history.writes[shown].epoch})"
        need = "zeros" if required is None else f"write {required.seq} (epoch {required.epoch})"
        raise AssertionError(
            f"hole at block {block}: it shows {what}, but write {newest} of epoch {epoch} is "
            f"visible, so it must show {need} or a write of epoch {epoch} "
            f"(epoch {epoch} wrote {sorted(w.seq for w in writes if w.epoch == epoch)} there)"
        )
    return Verdict(epoch, newest, len(set(found.values())))


def image_after(history: History, seqs: Sequence[int], size: int) -> bytearray:
    """The volume after applying the writes ``seqs``, in that order (for the self-test)."""
    image = bytearray(size)
    for seq in seqs:
        w = history.writes[seq]
        image[w.first * BLOCK : (w.first + w.count) * BLOCK] = stamps(
            history.run_id, seq, w.first, w.count
        )
    return image


def test_prefix_checker_accepts_prefixes_and_rejects_holes_and_reorders() -> None:
    """Self-test on hand-made histories: every rule of check_prefix can fail."""
    blocks = 8
    size = 16 * BLOCK  # stamped region and an unstamped tail
    h = History(run_id=0xABC, blocks=blocks)
    # epoch 1: blocks 0-1 (seq 1), 2 (seq 2), 3 (seq 3)
    # epoch 2: block 0 (seq 4), blocks 4-5 (seq 5)
    # epoch 3: block 2 (seq 6), block 6 (seq 7), block 0 (seq 8, after 4 in its own epoch)
    for w in [
        Write(1, 1, 0, 2),
        Write(2, 1, 2, 1),
        Write(3, 1, 3, 1),
        Write(4, 2, 0, 1),
        Write(5, 2, 4, 2),
        Write(6, 3, 2, 1),
        Write(7, 3, 6, 1),
        Write(8, 3, 0, 1),
    ]:
        h.add(w)

    def ok(seqs: Sequence[int]) -> Verdict:
        return check_prefix(image_after(h, seqs, size), h)

    def bad(seqs: Sequence[int], match: str, *, edit: bytes | None = None, at: int = 0) -> None:
        image = image_after(h, seqs, size)
        if edit is not None:
            image[at : at + len(edit)] = edit
        with pytest.raises(AssertionError, match=match):
            check_prefix(image, h)

    # Good: nothing, every prefix in order, and any subset of the newest epoch.
    assert ok([]) == Verdict(0, 0, 0)
    for n in range(1, 9):
        assert ok(list(range(1, n + 1))).newest_seq == n
    assert ok([1, 2, 3, 5]) == Verdict(2, 5, 4)  # 4 not yet visible: same epoch as 5
    assert ok([1, 2, 3, 4, 5, 7]).epoch == 3  # 6 and 8 not yet, 7 is
    assert ok([1, 2, 3, 4, 5, 8, 7]).epoch == 3  # epoch 3 in another order
    assert ok([1, 2, 3, 5, 4, 6]) == Verdict(3, 6, 5)  # epoch 2 reordered within itself
    assert ok([1, 2, 3, 4, 5, 8]).newest_seq == 8  # 8 without 6 and 7, its epoch-mates

    # A hole: write 5 (epoch 2) visible, write 2 (epoch 1, never overwritten) missing.
    bad([1, 3, 5], r"hole at block 2: it shows zeros.*must show write 2")
    # A hole behind a newer write: block 0 still shows write 1 though epoch 2's write 4 is due,
    # and epoch 3 (write 7) is visible.
    bad([1, 2, 3, 5, 7], r"hole at block 0: it shows write 1 \(epoch 1\).*must show write 4")
    # Reorders across epochs: epoch 1's write 1 applied after epoch 2's write 4 (so it is on
    # top at block 0) with epoch 3 visible; epoch 3's write 7 applied before epoch 2's write 5.
    bad([2, 3, 4, 1, 5, 7], r"hole at block 0: it shows write 1 \(epoch 1\).*write 7 of epoch 3")
    bad([1, 2, 3, 4, 7], r"hole at block 4: it shows zeros.*must show write 5 \(epoch 2\)")
    # Everything of epoch 1 visible except the second block of write 1 (a torn multi-block
    # write across an epoch boundary) while epoch 2 is visible.
    bad([1, 2, 3, 4, 5], r"hole at block 1: it shows zeros", edit=bytes(BLOCK), at=BLOCK)
    # Damage, a stamp in the wrong place, a write never submitted there, data past the region.
    bad([1, 2, 3], r"block 3: .*torn", edit=b"\x01", at=3 * BLOCK + 17)
    bad(
        [1, 2],
        r"block 3 holds a stamp of run .* block 2",
        edit=stamps(0xABC, 2, 2, 1),
        at=3 * BLOCK,
    )
    bad(
        [1],
        r"block 5 holds write 2, which was never submitted",
        edit=stamps(0xABC, 2, 5, 1),
        at=5 * BLOCK,
    )
    bad([1], r"block 1 holds a stamp of run 0x999", edit=stamps(0x999, 1, 1, 1), at=BLOCK)
    bad([1], r"data past the stamped region", edit=b"x", at=blocks * BLOCK + 5)


# --- the live test ------------------------------------------------------------------------------


@dataclass
class HostState:
    epoch: int = 1  # the epoch being written
    flushes: int = 0
    writes_acked: int = 0


async def host_workload(
    clients: list[NbdClient],
    ledger: Ledger,
    history: History,
    rng: random.Random,
    state: HostState,
    stop: asyncio.Event,
) -> None:
    """Bursts of writes (DEPTH in flight, both connections), each closed by a FLUSH."""
    window = asyncio.Semaphore(DEPTH)

    async def one(epoch: int) -> None:
        async with window:
            first, count, seq = ledger.next_extent(rng, MAX_BLOCKS)
            history.add(Write(seq, epoch, first, count))
            try:
                await clients[seq % len(clients)].write(
                    first * BLOCK, stamps(ledger.run_id, seq, first, count)
                )
            finally:
                ledger.finished(first, count)
            ledger.acknowledged(first, count, seq)
            state.writes_acked += 1

    while not stop.is_set():
        epoch = state.epoch
        await asyncio.gather(*(one(epoch) for _ in range(rng.randint(1, MAX_EPOCH_WRITES))))
        # Every write of the epoch is acknowledged: the FLUSH closes it.
        await clients[epoch % len(clients)].flush()
        state.flushes += 1
        state.epoch = epoch + 1
        # A host that pauses now and then (and a bound on the backlog a freeze leaves).
        await asyncio.sleep(rng.uniform(0, 0.004))


@dataclass(frozen=True)
class Snapshot:
    path: Path
    host_epoch: int  # the epoch the host was writing when the freeze began
    submitted_before: int  # writes submitted when the freeze began
    submitted: int  # writes submitted by the time the copy was done (an upper bound)
    frozen_ms: float


def take_snapshot(
    secondary: Site, path: Path, ledger: Ledger, state: HostState, hold: float
) -> Snapshot:
    """Freeze, copy the replica image, (sometimes) stay frozen a while longer, thaw.

    Holding the freeze lets the primary run ahead, so the next snapshots may catch the replica
    in the middle of applying a large backlog rather than trailing by a few writes.
    """
    host_epoch, submitted_before = state.epoch, ledger.seq
    started = time.monotonic()
    with frozen(secondary):
        shutil.copyfile(secondary.images["vol"], path)
        submitted = ledger.seq
        time.sleep(hold)
    frozen_ms = (time.monotonic() - started) * 1000
    return Snapshot(path, host_epoch, submitted_before, submitted, frozen_ms)


async def drive(
    primary: Site, secondary: Site, ledger: Ledger, history: History, rng: random.Random, out: Path
) -> tuple[list[Snapshot], HostState]:
    assert primary.unit is not None
    host, port = primary.unit.export_address("vol")
    clients = [await NbdClient.connect(host, port, "vol") for _ in range(CONNECTIONS)]
    state = HostState()
    stop = asyncio.Event()
    writer = asyncio.create_task(
        host_workload(clients, ledger, history, random.Random(rng.getrandbits(64)), state, stop)
    )
    snapshots: list[Snapshot] = []
    try:
        # Let the stream get going, then freeze at random moments.
        while state.flushes < 3:
            assert not writer.done(), writer
            await asyncio.sleep(0.01)
        for i in range(SNAPSHOTS):
            if i % BURST == 0:
                # A long freeze: the primary runs ahead, and the snapshots after it catch the
                # replica applying the backlog, many epochs per frame.
                await asyncio.sleep(rng.uniform(0.02, 0.3))
                hold = rng.uniform(0.15, 0.35)
            else:
                await asyncio.sleep(rng.uniform(0.0, 0.025))
                hold = 0.0
            assert not writer.done(), f"the host workload ended early: {writer}"
            path = out / f"snapshot-{i:02d}.img"
            snapshots.append(
                await asyncio.to_thread(take_snapshot, secondary, path, ledger, state, hold)
            )
        stop.set()
        await asyncio.wait_for(writer, 30)
    finally:
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
    return snapshots, state


def test_replica_is_a_flush_epoch_prefix_at_every_snapshot(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    run_id = rng.getrandbits(63)
    ledger = Ledger(run_id=run_id, blocks=STAMP_BLOCKS)
    history = History(run_id=run_id, blocks=STAMP_BLOCKS)
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": VOLUME_SIZE})
        a = topo.add_primary(
            "site-a", peers=[peer_address(b)], size=VOLUME_SIZE, journal_size=JOURNAL_SIZE
        )
        b.start()
        a.start()
        with context(f"seed {SEED}"):
            rep = wait_caught_up(a, b)  # the initial resync is over: the replica is consistent
            assert rep["replica"]["consistent"], rep
            before = a.volume_status()["peers"][0]

            snapshots, state = asyncio.run(drive(a, b, ledger, history, rng, snaps))

            # The whole run was streamed in journal mode: no resync, no reconnect, so the
            # replica owed prefix consistency at every snapshot.
            after = a.volume_status()["peers"][0]
            assert after["mode"] == "journal" and after["connects"] == before["connects"], after
            assert after["sync_bytes_sent"] == before["sync_bytes_sent"], (before, after)

        verdicts: list[Verdict] = []
        for i, snap in enumerate(snapshots):
            with context(
                f"seed {SEED}, snapshot {i} ({snap.path}, host in epoch {snap.host_epoch})"
            ):
                verdict = check_prefix(snap.path.read_bytes(), history)
                assert verdict.newest_seq <= snap.submitted, (verdict, snap)
                verdicts.append(verdict)

        with context(f"seed {SEED}, after catching up"):
            rep = wait_caught_up(a, b)
            assert rep["replica"]["consistent"], rep
            final = b.images["vol"].read_bytes()
            assert final == a.images["vol"].read_bytes(), "the replica differs from the volume"
            verdict = check_prefix(final, history)
            # Every write is visible now: each block shows its last write.
            newest = {b_: ws[-1].seq for b_, ws in history.per_block.items()}
            assert observe(final, history) == newest
            assert verdict.epoch == max(w.epoch for w in history.writes.values())

    summary = (
        f"seed {SEED}: {len(history.writes)} writes in {state.flushes} flush epochs; snapshots "
        f"(newest visible epoch/host's epoch at the freeze, writes behind, ms frozen): "
        + ", ".join(
            f"{v.epoch}/{s.host_epoch} -{s.submitted_before - v.newest_seq} {s.frozen_ms:.0f}ms"
            for v, s in zip(verdicts, snapshots, strict=True)
        )
    )
    print(summary)
    # The snapshots were of a replica in motion, at different points of the stream.
    assert len(snapshots) >= 8, summary
    assert len({v.newest_seq for v in verdicts}) >= len(verdicts) // 2, summary
    assert all(v.epoch > 0 for v in verdicts), summary
    # Some caught the replica whole epochs behind the host, applying a backlog: those states
    # are where an applier that skipped or reordered records would show a hole.
    assert any(s.host_epoch - v.epoch >= 2 for v, s in zip(verdicts, snapshots, strict=True)), (
        summary
    )
