"""Group commit: every caller's sync starts after its call; concurrent callers share syncs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from blockmirror.io.syncer import Syncer


def test_waiters_share_a_sync_that_started_after_them() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        started: list[int] = []
        gate = threading.Event()
        calls = 0

        def slow_sync() -> None:
            nonlocal calls
            calls += 1
            started.append(calls)
            gate.wait(5)

        syncer = Syncer(slow_sync, loop)
        first = syncer.sync()
        await asyncio.sleep(0.05)  # the first sync is now running
        later = [syncer.sync() for _ in range(10)]
        gate.set()
        await asyncio.gather(first, *later)
        # The ten later callers arrived during sync 1, so they needed (and shared) sync 2.
        assert calls == 2 and syncer.syncs == 2

    asyncio.run(main())


def test_errors_reach_every_waiter_and_the_next_sync_runs() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fail = True

        def sync() -> None:
            if fail:
                raise OSError(5, "I/O error")

        syncer = Syncer(sync, loop)
        with pytest.raises(OSError):
            await syncer.sync()
        fail = False
        await syncer.sync()

    asyncio.run(main())
