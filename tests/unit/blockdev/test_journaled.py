"""The journaled write path on real files: recovery, torn tails, corruption, overflow.

Each test drives ``JournalWritePath`` the way the export does (accept, commit, await) and
simulates a crash by dropping the objects without the clean close, then reopens the journal.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.errors import VolumeError
from blockmirror.journal.checkpoint import read_checkpoint
from blockmirror.journal.dirtymap import DirtyMap
from blockmirror.journal.journal import Journal
from blockmirror.journal.scan import JournalCorruptError, scan
from blockmirror.state import ConsumerMode, VolumeState
from blockmirror.store.volume import Volume
from tests.support.crash import crash
from tests.unit.blockdev.rig import open_rig, write_path
from tests.unit.blockdev.rig import run as run_parts
from tests.unit.blockdev.rig import settle as settle_parts

MiB = 1024 * 1024
VOLUME = 16 * MiB
REGION = 64 * 1024


def open_path(
    tmp: Path,
    loop: asyncio.AbstractEventLoop,
    *,
    journal_size: int = 2 * MiB,
    consumers: tuple[str, ...] = (),
    overflow: str = "track",
) -> JournalWritePath:
    volume = Volume.open(tmp / "vol.img", size=VOLUME)
    journal = Journal.open(
        tmp / "vol.journal",
        volume=volume,
        journal_size=journal_size,
        consumers=list(consumers),
        dirty_dir=tmp,
        volume_name="vol",
    )
    wp = JournalWritePath(journal, volume, loop, overflow=overflow)  # type: ignore[arg-type]
    wp.start()
    return wp


def corrupt(path: Path, pos: int) -> None:
    """Flip one bit of the file at ``pos``."""
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([byte[0] ^ 0x10]), pos)
    finally:
        os.close(fd)


def regions(peer_map: DirtyMap) -> set[int]:
    return {
        start // REGION
        for off, n in peer_map.dirty_regions()
        for start in range(off, off + n, REGION)
    }


async def settle(result: asyncio.Future[None] | None, wp: JournalWritePath) -> None:
    gate = wp.commit()
    if gate is not None:
        await gate
    if result is not None:
        await result


def run(tmp: Path, body: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    async def main() -> None:
        await body(asyncio.get_running_loop())

    asyncio.run(main())


def test_acknowledged_writes_survive_a_crash_and_are_replayed(tmp_path: Path) -> None:
    rng = random.Random(1)
    model = bytearray(VOLUME)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop)
        # No checkpoint may run: it would (rightly) let recovery skip replaying these records.
        assert wp._task is not None
        wp._task.cancel()
        for i in range(300):
            off = rng.randrange(VOLUME // 4096) * 4096
            data = rng.randbytes(4096)
            model[off : off + 4096] = data
            await settle(wp.write(off, [data], fua=(i % 10 == 0)), wp)
        await settle(wp.flush(), wp)
        # Undo the volume's copy of the last writes to prove replay puts them back.
        wp.volume.pwrite(0, bytes(VOLUME))
        crash(wp)
        wp2 = open_path(tmp_path, loop)
        assert wp2.journal.recovery is not None and wp2.journal.recovery.replayed > 0
        assert wp2.volume.pread(0, VOLUME) == bytes(model)
        await wp2.close()

    run(tmp_path, body)


def caught_up(wp: JournalWritePath, name: str = "peer") -> None:
    """Pretend the consumer has everything: journal mode, nothing dirty (checkpoint after)."""
    peer = wp.journal.consumers[name]
    peer.dirty.clear_all()
    peer.dirty.sync()
    peer.mode = ConsumerMode.JOURNAL
    peer.acked_seq = wp.journal.next_seq - 1


@pytest.mark.parametrize("valid_after_cut", [False, True])
def test_torn_tail_is_cut_and_earlier_records_kept(tmp_path: Path, valid_after_cut: bool) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, consumers=("peer",))
        caught_up(wp)
        await wp.checkpoint()
        for i in range(10):
            await settle(wp.write(i * 4096, [bytes([i + 1]) * 4096], fua=False), wp)
        await settle(wp.flush(), wp)
        wp.acknowledge("peer", wp.journal.next_seq - 1)
        await wp.checkpoint()
        durable = wp.journal.durable_seq
        # The last batch(es): written to the ring but never synced, and then torn.
        await settle(wp.write(100 * 4096, [b"\xaa" * 4096], fua=False), wp)
        torn = wp.journal.records[-1]
        if valid_after_cut:
            await settle(wp.write(101 * 4096, [b"\xbb" * 4096], fua=False), wp)
        path = wp.journal.path
        crash(wp)
        corrupt(path, wp.journal.ring.physical(torn.lpos) + 64 + 100)
        wp2 = open_path(tmp_path, loop, consumers=("peer",))
        report = wp2.journal.recovery
        assert report is not None and report.torn_tail is not None
        assert wp2.journal.next_seq == durable + 1  # the torn record is gone, and all after it
        for i in range(10):
            assert wp2.volume.pread(i * 4096, 4096) == bytes([i + 1]) * 4096
        dirty = wp2.journal.consumers["peer"].dirty.dirty_bytes()
        if valid_after_cut:
            # A record after the cut may have been sent before the crash: resync everything.
            assert dirty == VOLUME
        else:
            # A torn last batch was never applied, so never sent: nothing to resync.
            assert dirty == 0
        await wp2.close()

    run(tmp_path, body)


def test_corruption_in_the_middle_is_refused(tmp_path: Path) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop)
        for i in range(20):
            await settle(wp.write(i * 4096, [bytes([i + 1]) * 4096], fua=True), wp)
        records = list(wp.journal.records)
        path, ring = wp.journal.path, wp.journal.ring
        crash(wp)
        victim = records[5]
        corrupt(path, ring.physical(victim.lpos) + 64 + 7)
        with pytest.raises(JournalCorruptError) as info:
            open_path(tmp_path, loop)
        assert info.value.bad.expected_seq == victim.seq
        assert "crc mismatch" in str(info.value)
        assert "blockmirror journal recover" in str(info.value)

    run(tmp_path, body)


def test_overflow_switches_the_lagging_consumer_to_tracking(tmp_path: Path) -> None:
    rng = random.Random(7)
    written: set[int] = set()

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, consumers=("peer",), journal_size=1 * MiB)
        peer = wp.journal.consumers["peer"]
        # Pretend the peer was fully caught up: journal mode, nothing dirty.
        peer.dirty.clear_all()
        peer.dirty.sync()
        peer.mode = ConsumerMode.JOURNAL
        peer.acked_seq = wp.journal.next_seq - 1
        await wp.checkpoint()
        for _ in range(600):  # ~2.4 MiB through a 1 MiB journal
            off = rng.randrange(VOLUME // 4096) * 4096
            written.add(off // REGION)
            await settle(wp.write(off, [rng.randbytes(4096)], fua=False), wp)
        await settle(wp.flush(), wp)
        assert str(peer.mode) == "tracking"
        assert regions(peer.dirty) == written  # exactly the regions the workload touched
        assert any(a["kind"] == "consumer_tracking" for a in wp.alerts.events)
        crash(wp)
        wp2 = open_path(tmp_path, loop, consumers=("peer",), journal_size=1 * MiB)
        peer2 = wp2.journal.consumers["peer"]
        assert peer2.mode == "tracking"
        assert regions(peer2.dirty) == written
        await wp2.close()

    run(tmp_path, body)


def test_overflow_block_waits_for_the_consumer(tmp_path: Path) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, consumers=("peer",), journal_size=1 * MiB, overflow="block")
        peer = wp.journal.consumers["peer"]
        peer.dirty.clear_all()
        peer.dirty.sync()
        peer.mode = ConsumerMode.JOURNAL
        peer.acked_seq = wp.journal.next_seq - 1
        await wp.checkpoint()
        pending: list[asyncio.Future[None]] = []
        for i in range(400):
            fut = wp.write((i % 256) * 4096, [b"x" * 4096], fua=False)
            wp.commit()
            if fut is not None:
                pending.append(fut)
        assert pending, "the journal should have filled"
        await asyncio.sleep(0.3)
        assert not all(f.done() for f in pending)  # the host waits: nothing was dropped
        assert peer.mode == "journal"
        wp.acknowledge("peer", wp.journal.next_seq - 1)
        await asyncio.wait_for(asyncio.gather(*pending), 10)
        assert peer.dirty.is_clean()
        await wp.close()

    run(tmp_path, body)


def test_checkpoint_scan_agrees_with_memory(tmp_path: Path) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop)
        for i in range(50):
            await settle(wp.write(i * 8192, [b"y" * 5000], fua=False), wp)
        await wp.checkpoint()
        fd = wp.journal.fd
        found = read_checkpoint(fd)
        assert found is not None
        _, _, cp = found
        result = scan(fd, wp.journal.ring, cp.head_lpos, cp.head_seq, cp.next_seq)
        assert not result.corrupt
        assert [r.seq for r in result.records] == [r.seq for r in wp.journal.records]
        await wp.close()

    run(tmp_path, body)


def test_condition_names_a_stall_and_a_failure_as_volume_states(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = write_path(rig, loop)
        assert wp.condition() is None
        rig.volume.fail("pwrite", errno.ENOSPC, times=None)
        with pytest.raises(OSError):
            await settle_parts(wp, wp.write(0, [b"\x01" * 4096], fua=False))
        condition = wp.condition()
        assert condition is not None
        state, reason = condition
        assert state is VolumeState.STALLED and str(state) == "stalled"
        assert "No space left on device" in reason and "retried" in reason
        with pytest.raises(OSError):  # host writes are refused meanwhile
            wp.write(4096, [b"\x02" * 4096], fua=False)
        wp.alert("custom", "raised by another component")
        status = wp.status()
        assert status["stalled"] and status["stalls"] == 1
        kinds = [a["kind"] for a in status["alerts"]]  # type: ignore[attr-defined]
        assert kinds == ["volume_write_failed", "custom"]
        rig.volume.heal()
        await asyncio.wait_for(wp.applier.unstalled.wait(), 5)
        assert wp.condition() is None
        rig.volume.fail("flush", errno.EIO)
        with pytest.raises(OSError):
            await wp.checkpoint(clean=True)
        condition = wp.condition()
        assert condition is not None and condition[0] is VolumeState.FAILED
        assert "restart the unit" in condition[1]
        flush = wp.flush()
        assert flush is not None and flush.done()  # answered at once, never waits
        with pytest.raises(OSError):
            flush.result()
        await wp.close()

    try:
        run_parts(body)
    finally:
        rig.close()


class GoneStore(Volume):
    """A volume whose writes fail with a VolumeError (not an OSError) once it is ``gone``."""

    gone = False

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.gone:
            raise VolumeError(f"{self.path}: the store went away")
        super().pwrite(offset, data)


def test_a_failure_while_applying_is_raised_by_the_commit_and_answers_the_waiters(
    tmp_path: Path,
) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        volume = GoneStore.open(tmp_path / "vol.img", size=VOLUME)
        assert isinstance(volume, GoneStore)
        journal = Journal.open(
            tmp_path / "vol.journal",
            volume=volume,
            journal_size=2 * MiB,
            consumers=[],
            dirty_dir=tmp_path,
            volume_name="vol",
        )
        wp = JournalWritePath(journal, volume, loop)
        wp.start()
        await settle(wp.write(0, [b"\x01" * 4096], fua=True), wp)
        volume.gone = True
        fua = wp.write(4096, [b"\x02" * 4096], fua=True)
        with pytest.raises(VolumeError):
            wp.commit()  # no gate is left that nothing would ever resolve
        assert isinstance(wp.failed, VolumeError)
        assert fua is not None
        with pytest.raises(VolumeError):
            await asyncio.wait_for(fua, 5)
        with pytest.raises(VolumeError):
            wp.write(8192, [b"\x03" * 4096], fua=False)
        await wp.close()
        volume.close()

    run(tmp_path, body)


def test_a_crash_after_pausing_enqueue_never_replays_an_older_record_over_a_newer_write(
    tmp_path: Path,
) -> None:
    """Found by the fault model. Must not be lost: a write made with enqueueing paused (it
    reached the volume, outside the journal) must not be undone at the next start by the
    replay of an older journaled record of the same block. A journal-mode consumer that has
    not acknowledged keeps the record in the ring, so only the pause's checkpoint (the volume
    durable, every applied record covered) prevents it."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, consumers=("peer",))
        caught_up(wp)
        assert wp._task is not None
        wp._task.cancel()  # no background checkpoint hides the case
        await settle(wp.write(0, [b"\x02" * 4096], fua=False), wp)
        await wp.controls.pause_enqueue(True)
        await settle(wp.write(0, [b"\x03" * 4096], fua=False), wp)
        crash(wp)  # kill -9: the page cache, and so the second write, survives
        wp2 = open_path(tmp_path, loop, consumers=("peer",))
        assert wp2.volume.pread(0, 4096) == b"\x03" * 4096
        await wp2.close()

    run(tmp_path, body)
