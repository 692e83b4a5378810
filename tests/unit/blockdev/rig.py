"""A journal and a volume on real files for the tests of the write path's parts.

The volume is wrapped in the fault-injecting store, so a test can make it refuse writes (ENOSPC
on a thin volume) or syncs, and heal it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from blockmirror.blockdev.journaled import JournalWritePath
from blockmirror.journal.journal import DIRTY_REGION, Journal
from blockmirror.state import ConsumerMode
from blockmirror.store.faulty import FaultyStore, Power
from blockmirror.store.volume import Volume

MiB = 1024 * 1024
VOLUME = 16 * MiB
BLOCK = 4096
REGION = DIRTY_REGION


@dataclass
class Rig:
    tmp: Path
    journal: Journal
    volume: FaultyStore
    power: Power = field(default_factory=Power)

    def close(self) -> None:
        """Close what is still open (the write path's close may have closed the journal)."""
        with contextlib.suppress(OSError):
            self.journal.close(clean=False)  # a no-op once closed
        self.volume.close()
        self.power.close()


def open_rig(tmp: Path, *, consumers: tuple[str, ...] = (), journal_size: int = 2 * MiB) -> Rig:
    power = Power()
    volume = FaultyStore(Volume.open(tmp / "vol.img", size=VOLUME), power=power)
    journal = Journal.open(
        tmp / "vol.journal",
        volume=volume,
        journal_size=journal_size,
        consumers=list(consumers),
        dirty_dir=tmp,
        volume_name="vol",
    )
    return Rig(tmp, journal, volume, power)


def caught_up(journal: Journal, name: str) -> None:
    """Pretend consumer ``name`` has everything: journal mode, nothing dirty."""
    consumer = journal.consumers[name]
    consumer.dirty.clear_all()
    consumer.dirty.sync()
    consumer.mode = ConsumerMode.JOURNAL
    consumer.acked_seq = journal.next_seq - 1


def write_path(rig: Rig, loop: asyncio.AbstractEventLoop, **kwargs: object) -> JournalWritePath:
    wp = JournalWritePath(rig.journal, rig.volume, loop, **kwargs)  # type: ignore[arg-type]
    wp.stall_retry = 0.02
    wp.start()
    return wp


async def settle(wp: JournalWritePath, result: asyncio.Future[None] | None = None) -> None:
    gate = wp.commit()
    if gate is not None:
        await gate
    if result is not None:
        await result


def run(body: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    async def main() -> None:
        await body(asyncio.get_running_loop())

    asyncio.run(main())
