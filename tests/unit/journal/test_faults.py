"""The write path under storage faults: power cuts, EIO and ENOSPC (issue 7, points 1-4).

Every test runs on real files of a :class:`Machine`: the volume and the journal file on
fault-injecting stores (:class:`~blockmirror.store.faulty.FaultyStore`), the dirty maps, which
are not stores, on the os-level :class:`FaultyDisk`. Both fail chosen calls and, at a power
cut, take every page back to what was last made durable. Each test states what must not be
lost, and checks it after reopening the journal the way a restarted unit does.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.journal.format import Kind
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import Record
from blockmirror.state import ConsumerMode
from blockmirror.store.faulty import CHANGES
from tests.support.crash import crash
from tests.support.faultydisk import FaultyDisk, Machine
from tests.unit.blockdev.test_journaled import VOLUME, MiB, run, settle
from tests.unit.blockdev.test_journaled import open_path as open_plain_path

BLOCK = 4096


def open_path(
    tmp: Path,
    loop: asyncio.AbstractEventLoop,
    machine: Machine,
    *,
    journal_size: int = 2 * MiB,
    consumers: tuple[str, ...] = (),
) -> JournalWritePath:
    """The write path on the machine's stores, opened the way a unit starts."""
    volume = machine.open_volume(tmp / "vol.img", size=VOLUME)
    try:
        journal = Journal.open(
            tmp / "vol.journal",
            volume=volume,
            journal_size=journal_size,
            consumers=list(consumers),
            dirty_dir=tmp,
            volume_name="vol",
            open_ring=machine.open_journal_file,
        )
    except BaseException:
        volume.close()
        raise
    wp = JournalWritePath(journal, volume, loop)
    wp.start()
    return wp


def stop_checkpointer(wp: JournalWritePath) -> None:
    """Checkpoints run only when a test asks, so each race is placed exactly."""
    assert wp._task is not None
    wp._task.cancel()


def test_a_flush_racing_a_checkpoint_survives_a_power_cut(tmp_path: Path, machine: Machine) -> None:
    """Point 1. Must not be lost: a write acknowledged before a FLUSH that returned."""
    data = b"\xab" * BLOCK

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine)
        stop_checkpointer(wp)
        # A slow journal sync holds the FLUSH open while a checkpoint runs.
        machine.store("vol.journal").slow_flush = 0.3
        await settle(wp.write(0, [data], fua=False), wp)
        flush = wp.flush()
        wp.commit()
        await asyncio.sleep(0.05)
        await wp.checkpoint()
        assert flush is not None
        await flush
        machine.power_cut()
        crash(wp)
        wp2 = open_path(tmp_path, loop, machine)
        assert wp2.volume.pread(0, BLOCK) == data
        await wp2.close()

    run(tmp_path, body)


def test_a_record_is_freed_only_once_the_volume_holds_it_durably(
    tmp_path: Path, machine: Machine
) -> None:
    """Point 1's rule, for unflushed writes too: a checkpoint never frees past the volume."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine)
        stop_checkpointer(wp)
        for i in range(20):
            await settle(wp.write(i * BLOCK, [bytes([i + 1]) * BLOCK], fua=False), wp)
        await wp.checkpoint()
        journal = wp.journal
        assert journal.head_seq <= journal.volume_durable_seq + 1
        # Everything freed is durable in the volume: nothing of it is left to lose.
        assert machine.unsynced_pages("vol.img") == 0
        await wp.close()

    run(tmp_path, body)


def test_eio_on_a_volume_sync_then_a_graceful_restart_keeps_flushed_writes(
    tmp_path: Path, machine: Machine
) -> None:
    """Point 2. Must not be lost: writes that a FLUSH made durable, after a volume sync EIO."""
    writes = {i * BLOCK: os.urandom(BLOCK) for i in range(8)}

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine)
        stop_checkpointer(wp)
        for off, data in writes.items():
            await settle(wp.write(off, [data], fua=False), wp)
        await settle(wp.flush(), wp)
        machine.fail("vol.img", "flush", errno.EIO)
        with pytest.raises(OSError):
            await wp.checkpoint()
        # The write path says so and refuses writes; reads still work.
        assert wp.failed is not None
        assert wp.status()["failed"]
        with pytest.raises(OSError):
            wp.write(0, [b"x" * BLOCK], fua=False)
        assert wp.volume.pread(0, BLOCK) == writes[0]
        # A second sync would now "succeed"; the graceful stop must not trust it.
        await wp.close()
        machine.power_cut()
        wp2 = open_path(tmp_path, loop, machine)
        assert wp2.journal.recovery is not None and wp2.journal.recovery.replayed >= len(writes)
        for off, data in writes.items():
            assert wp2.volume.pread(off, BLOCK) == data
        await wp2.close()

    run(tmp_path, body)


def test_enospc_on_the_volume_answers_with_the_error_and_recovers_by_itself(
    tmp_path: Path, machine: Machine
) -> None:
    """Point 3. Must not be lost or differ untracked: every journaled record reaches the volume."""
    before = b"\x11" * BLOCK
    failing = b"\x22" * BLOCK
    after = b"\x33" * BLOCK

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine, consumers=("peer",))
        await settle(wp.write(0, [before], fua=True), wp)
        fault = machine.fail("vol.img", CHANGES, errno.ENOSPC, times=None)
        # The host's request is answered, with the error.
        pending = wp.write(BLOCK, [failing], fua=False)
        assert pending is None
        gate = wp.commit()
        assert gate is not None
        with pytest.raises(OSError) as caught:
            await asyncio.wait_for(gate, 5)
        assert caught.value.errno == errno.ENOSPC
        # New writes are refused at once (nothing waits for room that may never come) ...
        with pytest.raises(OSError) as refused:
            wp.write(2 * BLOCK, [after], fua=False)
        assert refused.value.errno == errno.ENOSPC
        # ... a FLUSH still answers, reads still work, and status names the failure.
        flush = wp.flush()
        assert flush is not None and wp.commit() is None
        await asyncio.wait_for(flush, 5)
        assert wp.volume.pread(0, BLOCK) == before
        assert wp.stalled is not None
        alerts = wp.status()["alerts"]
        assert isinstance(alerts, list)
        kinds = [a["kind"] for a in alerts]
        assert "volume_write_failed" in kinds
        # The record that failed stays journaled and unapplied; the peer will get it.
        assert wp.applied_seq < wp.journal.next_seq - 1
        # Space comes back: the unit applies the record by itself and takes writes again.
        assert fault.fired >= 1
        machine.heal()
        for _ in range(50):
            if wp.stalled is None:
                break
            await asyncio.sleep(0.1)
        assert wp.stalled is None
        assert wp.volume.pread(BLOCK, BLOCK) == failing
        await settle(wp.write(2 * BLOCK, [after], fua=True), wp)
        assert wp.volume.pread(2 * BLOCK, BLOCK) == after
        await wp.close()

    run(tmp_path, body)


def test_enospc_then_a_graceful_restart_applies_the_record_at_the_next_start(
    tmp_path: Path, machine: Machine
) -> None:
    """Point 3, restart. Must not be lost: the journaled record that could not be applied."""
    data = b"\x5a" * BLOCK

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine)
        machine.fail("vol.img", CHANGES, errno.ENOSPC, times=None)
        wp.write(0, [data], fua=False)
        gate = wp.commit()
        assert gate is not None
        with pytest.raises(OSError):
            await gate
        await wp.close()
        machine.heal()
        machine.power_cut()
        wp2 = open_path(tmp_path, loop, machine)
        assert wp2.volume.pread(0, BLOCK) == data
        await wp2.close()

    run(tmp_path, body)


def test_enospc_at_start_names_the_volume_and_keeps_the_records(
    tmp_path: Path, machine: Machine
) -> None:
    """A replay that meets a full volume fails clearly, and a later start still replays."""
    data = b"\x77" * BLOCK

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine)
        stop_checkpointer(wp)
        await settle(wp.write(0, [data], fua=True), wp)
        machine.power_cut()  # the volume's copy is gone; the journal's is durable
        crash(wp)
        machine.fail("vol.img", CHANGES, errno.ENOSPC, times=None)
        with pytest.raises(Exception, match=r"vol\.img.*No space left"):
            open_path(tmp_path, loop, machine)
        machine.heal()
        wp2 = open_path(tmp_path, loop, machine)
        assert wp2.volume.pread(0, BLOCK) == data
        await wp2.close()

    run(tmp_path, body)


def test_a_secondary_keeps_replicated_records_through_enospc_on_the_replica(
    tmp_path: Path, machine: Machine
) -> None:
    """Point 3 on a replica. Must not be lost: records whose durability was acknowledged."""
    records = [
        Record(
            kind=Kind.WRITE,
            seq=seq,
            offset=(seq - 1) * BLOCK,
            length=BLOCK,
            data=(bytes([seq]) * BLOCK,),
        )
        for seq in (1, 2, 3)
    ]

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine)
        machine.fail("vol.img", CHANGES, errno.ENOSPC, times=None)
        durable = await wp.append_replicated(records)
        await asyncio.wait_for(durable, 5)  # what the source is told
        assert wp.stalled is not None
        await wp.close()
        machine.heal()
        machine.power_cut()
        wp2 = open_path(tmp_path, loop, machine)
        for r in records:
            assert wp2.volume.pread(r.offset, r.length) == r.data[0], r.seq
        await wp2.close()

    run(tmp_path, body)


def test_a_missing_dirty_map_of_a_tracking_consumer_comes_back_fully_dirty(
    tmp_path: Path,
) -> None:
    """Point 4. Must not differ untracked: the writes a lost dirty map had recorded."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_plain_path(tmp_path, loop, consumers=("peer",), journal_size=MiB)
        consumer = wp.journal.consumers["peer"]
        assert consumer.mode == "tracking"
        consumer.dirty.clear_all()
        await settle(wp.write(5 * MiB, [b"\x01" * BLOCK], fua=True), wp)
        assert consumer.dirty.dirty_bytes() > 0
        await wp.close()
        maps = sorted(tmp_path.glob("vol.*.dirty"))  # noqa: ASYNC240 - a test's few files
        assert len(maps) == 1
        maps[0].unlink()
        wp2 = open_plain_path(tmp_path, loop, consumers=("peer",), journal_size=MiB)
        again = wp2.journal.consumers["peer"]
        assert again.mode == "tracking"
        assert again.dirty.dirty_bytes() == wp2.volume.size
        await wp2.close()

    run(tmp_path, body)


def test_the_fault_disk_itself_loses_unsynced_pages_and_keeps_synced_ones(
    tmp_path: Path, faulty_disk: FaultyDisk
) -> None:
    """Self-test of the tool: a checker that cannot fail proves nothing."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"a" * BLOCK, 0)
        os.fdatasync(fd)
        os.pwrite(fd, b"b" * BLOCK, 0)
        os.pwrite(fd, b"c" * BLOCK, BLOCK)
        faulty_disk.fail("sync", "/f", errno.EIO)
        with pytest.raises(OSError):
            os.fdatasync(fd)
        os.fdatasync(fd)  # "succeeds", but the pages it failed to write stay lost
        assert faulty_disk.power_cut() == 2
        assert os.pread(fd, BLOCK, 0) == b"a" * BLOCK
        assert os.pread(fd, BLOCK, BLOCK) in (b"", bytes(BLOCK))
    finally:
        os.close(fd)
    assert isinstance(Journal, type)


def test_eio_on_the_journal_answers_the_flush_and_marks_every_peer_dirty(
    tmp_path: Path, machine: Machine
) -> None:
    """Must not differ untracked: writes the volume has but the failed ring may have lost."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine, consumers=("peer",), journal_size=MiB)
        peer = wp.journal.consumers["peer"]
        peer.dirty.clear_all()
        peer.mode = ConsumerMode.JOURNAL
        peer.acked_seq = wp.journal.next_seq - 1
        await wp.checkpoint()
        await settle(wp.write(0, [b"\x42" * BLOCK], fua=False), wp)
        machine.fail("vol.journal", "flush", errno.EIO)
        flush = wp.flush()
        assert flush is not None
        wp.commit()
        with pytest.raises(OSError):
            await flush
        assert wp.failed is not None
        with pytest.raises(OSError):
            wp.write(BLOCK, [b"\x43" * BLOCK], fua=False)
        await wp.close()
        machine.evict_lost()
        wp2 = open_path(tmp_path, loop, machine, consumers=("peer",), journal_size=MiB)
        # Every region is dirty: the sender resyncs all of it, whatever the cursor says.
        again = wp2.journal.consumers["peer"]
        assert again.dirty.dirty_bytes() == wp2.volume.size
        await wp2.close()

    run(tmp_path, body)


def test_a_flush_after_the_write_path_failed_is_answered_at_once(
    tmp_path: Path, machine: Machine
) -> None:
    """Invariant 10: a FLUSH after a fatal volume error gets the error, never waits."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine)
        stop_checkpointer(wp)
        await settle(wp.write(0, [b"\x01" * BLOCK], fua=False), wp)
        machine.fail("vol.img", "flush", errno.EIO)
        with pytest.raises(OSError):
            await wp.checkpoint()
        flush = wp.flush()
        assert flush is not None
        with pytest.raises(OSError):
            await asyncio.wait_for(flush, 2)
        await wp.close()

    run(tmp_path, body)


def test_a_stalled_replica_that_then_fails_releases_its_source(
    tmp_path: Path, machine: Machine
) -> None:
    """A secondary waiting for space that meets a fatal error answers the link, and does not
    spin on checkpoints meanwhile."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        wp = open_path(tmp_path, loop, machine, journal_size=MiB)
        wp.stall_retry = 0.05
        machine.fail("vol.img", CHANGES, errno.ENOSPC, times=None)
        seq = 1
        payload = b"\x07" * (64 * 1024)

        async def fill() -> None:
            nonlocal seq
            while True:
                batch = [
                    Record(kind=Kind.WRITE, seq=seq, offset=0, length=len(payload), data=(payload,))
                ]
                seq += 1
                await wp.append_replicated(batch)

        filler = asyncio.ensure_future(fill())
        await asyncio.sleep(0.5)
        assert not filler.done() and wp.stalled is not None
        before = wp.checkpoints
        await asyncio.sleep(0.5)
        assert wp.checkpoints - before < 5, wp.checkpoints - before  # waiting, not spinning
        # A fatal error now (a failed sync, say, as a flush or a stop would meet).
        wp._fail(OSError(errno.EIO, "injected: sync failed"))
        with pytest.raises(OSError):
            await asyncio.wait_for(filler, 2)
        await wp.close()

    run(tmp_path, body)
