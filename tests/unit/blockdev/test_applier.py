"""Ordered apply: entries reach the volume in order, gates and waiters hear of it, a refusing
volume stalls the queue (nothing skipped) until a retry succeeds, a failure answers everyone."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from blockmirror.alerts import AlertLog
from blockmirror.blockdev.applier import Applier, Entry
from blockmirror.blockdev.durability import Durability, Failure
from blockmirror.journal.format import Kind
from blockmirror.journal.record import Record
from tests.unit.blockdev.rig import BLOCK, Rig, open_rig, run


class Parts:
    """An applier with its real neighbours, and what it told the write path."""

    def __init__(self, rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        self.rig = rig
        self.failure = Failure()
        self.alerts = AlertLog("test")
        self.durability = Durability(rig.journal, rig.volume, loop, self.failure, self.alerts)
        self.stalled: list[OSError] = []
        self.resumed = 0
        self.applier = Applier(
            rig.journal,
            rig.volume,
            loop,
            failure=self.failure,
            durability=self.durability,
            alerts=self.alerts,
            on_stalled=self.stalled.append,
            on_resumed=self._resumed,
        )
        self.applier.stall_retry = 0.02
        self._loop = loop

    def _resumed(self) -> None:
        self.resumed += 1

    def write(
        self, block: int, value: int, *, journaled: bool = True, waits: bool = False
    ) -> asyncio.Future[None] | None:
        data = (bytes([value]) * BLOCK,)
        record = Record(kind=Kind.WRITE, offset=block * BLOCK, length=BLOCK)
        done = self._loop.create_future() if waits else None
        self.applier.push(Entry(record, data, done=done, journaled=journaled))
        return done

    def read(self, block: int) -> int:
        return self.rig.volume.pread(block * BLOCK, 1)[0]


def test_entries_reach_the_volume_in_order_and_release_their_gate(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        parts = Parts(rig, loop)
        applier = parts.applier
        start = applier.applied_seq
        assert applier.gate() is None  # nothing queued
        parts.write(0, 1)
        parts.write(0, 2)
        done = parts.write(1, 3, waits=True)
        gate = applier.gate()
        assert gate is not None and not gate.done()
        applier.drain()
        assert gate.done() and done is not None and done.done()
        assert (parts.read(0), parts.read(1)) == (2, 3)
        assert applier.applied_seq == start + 3 and applier.applied_event.is_set()

    try:
        run(body)
    finally:
        rig.close()


def test_writes_outside_the_journal_are_counted_when_they_reach_the_volume(
    tmp_path: Path,
) -> None:
    rig = open_rig(tmp_path, consumers=("peer",))

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        parts = Parts(rig, loop)
        applier, peer = parts.applier, rig.journal.consumers["peer"]
        generation, start = peer.generation, applier.applied_seq
        record = Record(kind=Kind.WRITE, offset=0, length=BLOCK)
        applier.unjournaled_pending += 1
        applier.push(Entry(record, (b"\x05" * BLOCK,), journaled=False, outside=True))
        assert applier.unjournaled_count == 0
        applier.drain()
        assert (applier.unjournaled_pending, applier.unjournaled_count) == (0, 1)
        assert peer.generation == generation + 1  # a copy read before it must not count
        assert applier.applied_seq == start  # not a journal record

    try:
        run(body)
    finally:
        rig.close()


def test_a_slow_zeroing_holds_everything_behind_it(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        parts = Parts(rig, loop)
        applier = parts.applier
        parts.write(0, 7)
        applier.drain()
        fast = rig.volume.capabilities().fast_zero
        zero = Record(kind=Kind.ZERO, offset=0, length=BLOCK)
        applier.push(Entry(zero, may_trim=False))
        parts.write(0, 9)  # must land after the zeroing, wherever that runs
        gate = applier.gate()
        applier.drain()
        if not fast:
            assert gate is not None and not gate.done()  # the zeroing runs in a thread
        if gate is not None:
            await asyncio.wait_for(gate, 5)
        assert parts.read(0) == 9

    try:
        run(body)
    finally:
        rig.close()


def test_a_refusing_volume_stalls_the_queue_until_a_retry_succeeds(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        parts = Parts(rig, loop)
        applier = parts.applier
        start = applier.applied_seq
        rig.volume.fail("pwrite", errno.ENOSPC, times=None)
        done = parts.write(0, 1, waits=True)
        parts.write(1, 2)
        gate = applier.gate()
        applier.drain()
        assert isinstance(applier.stalled, OSError) and applier.stalled.errno == errno.ENOSPC
        assert not applier.unstalled.is_set()
        assert done is not None and gate is not None
        for fut in (done, gate):  # every waiter is answered with the error, at once
            with pytest.raises(OSError):
                await fut
        assert parts.stalled == [applier.stalled]
        assert len(applier.queue) == 2  # nothing journaled is skipped
        # More entries: their gate fails at once; a gate with nothing new is None.
        parts.write(2, 3)
        failed = applier.gate()
        assert failed is not None and failed.done()
        with pytest.raises(OSError):
            failed.result()
        assert applier.gate() is None
        await asyncio.sleep(0.1)  # retries fail: one stall, one alert
        assert applier.stalls == 1
        assert [e["kind"] for e in parts.alerts.events] == ["volume_write_failed"]
        rig.volume.heal()
        await asyncio.wait_for(applier.unstalled.wait(), 5)
        assert applier.stalled is None and not applier.queue
        assert [parts.read(b) for b in range(3)] == [1, 2, 3]
        assert applier.applied_seq == start + 3
        assert parts.resumed == 1
        assert parts.alerts.events[-1]["kind"] == "volume_write_resumed"

    try:
        run(body)
    finally:
        rig.close()


def test_a_failure_answers_every_waiter_and_releases_a_stalled_wait(tmp_path: Path) -> None:
    rig = open_rig(tmp_path)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        parts = Parts(rig, loop)
        applier = parts.applier
        rig.volume.fail("pwrite", errno.ENOSPC, times=None)
        parts.write(0, 1)
        applier.drain()
        assert not applier.unstalled.is_set()
        done = parts.write(1, 2, waits=True)
        parts.failure.fail(OSError(errno.EIO, "injected"))
        assert applier.unstalled.is_set()  # a secondary holding its link sees the failure
        assert done is not None
        with pytest.raises(OSError, match="injected"):
            await done
        await asyncio.sleep(0.05)
        assert applier.stalled is not None  # no retry after a failure
        applier.stop()

    try:
        run(body)
    finally:
        rig.close()
