"""The hold queue of a lagged replica, alone: records leave it in order, when due."""

from __future__ import annotations

import asyncio
import time

from blockmirror.blockdev.applier import Entry
from blockmirror.blockdev.replay_delay import ReplayDelay
from blockmirror.journal.format import Kind
from blockmirror.journal.record import Record


class FakeApplier:
    def __init__(self) -> None:
        self.pushed: list[int] = []

    def push(self, entry: Entry) -> None:
        self.pushed.append(entry.record.seq)


def entry(seq: int, age: float) -> Entry:
    rec = Record(kind=Kind.WRITE, offset=0, length=512, seq=seq)
    rec.timestamp_ns = time.time_ns() - int(age * 1e9)
    return Entry(rec, (), from_ring=True)


def test_records_are_released_in_order_once_due() -> None:
    async def run() -> None:
        applier = FakeApplier()
        commits: list[int] = []
        delay = ReplayDelay(applier, asyncio.get_running_loop(), lambda: commits.append(1))  # type: ignore[arg-type]
        delay.seconds = 0.3
        delay.hold(entry(1, 5.0))  # due long ago
        delay.hold(entry(2, 0.0))  # due in 0.3 s
        delay.hold(entry(3, -1.0))  # due in 1.3 s
        await asyncio.sleep(0.1)
        assert applier.pushed == [1]
        await asyncio.sleep(0.5)
        assert applier.pushed == [1, 2]
        assert delay.status()["delayed_records"] == 1 and delay.status()["delayed_from_seq"] == 3
        delay.release_all()
        assert applier.pushed == [1, 2, 3] and commits
        delay.stop()

    asyncio.run(run())


def test_a_full_journal_releases_the_oldest_early_and_says_so() -> None:
    async def run() -> None:
        applier = FakeApplier()
        said: list[str] = []
        delay = ReplayDelay(applier, asyncio.get_running_loop(), lambda: None)  # type: ignore[arg-type]
        delay.seconds = 3600
        delay.on_shortened = said.append
        for seq in range(1, 9):
            delay.hold(entry(seq, 0.0))
        delay.release_early()
        assert applier.pushed == [1, 2] and delay.shortened == 2 and said
        assert delay.discard() == 6 and not delay.held
        delay.stop()

    asyncio.run(run())
