"""A lagged replica: records are journaled (and acknowledged) at once, applied only later.

With ``replay_delay = "30m"`` on a secondary, each received record waits until 30 minutes after
its origin time before it reaches the replica: a replica half an hour behind, kept as protection
against logical damage (a deleted table, ransomware) that the primary already has. The records
are durable in the journal all that time, so the journal must hold ``replay_delay`` worth of
writes; when it fills, the oldest held records are applied early rather than stopping the link
(a ``replay_delay_shortened`` alert). ``promote`` asks what to do with the held records: apply
them all, or give them up (docs/operations.md, "A lagged replica").
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from blockmirror.blockdev.applier import Applier, Entry

__all__ = ["ReplayDelay"]


class ReplayDelay:
    """The records a secondary holds back from its replica, oldest first."""

    def __init__(
        self, applier: Applier, loop: asyncio.AbstractEventLoop, commit: Callable[[], None]
    ) -> None:
        self.seconds = 0.0
        self.held: deque[Entry] = deque()
        self._applier = applier
        self._loop = loop
        self._commit = commit
        self._task: asyncio.Task[None] | None = None
        self.shortened = 0  # records applied early because the journal was full
        self.on_shortened: Callable[[str], None] | None = None

    def hold(self, entry: Entry) -> None:
        self.held.append(entry)
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._release_when_due())

    def _release(self, count: int) -> None:
        for _ in range(min(count, len(self.held))):
            self._applier.push(self.held.popleft())
        self._commit()

    def release_all(self) -> None:
        """Apply every held record now (a resync, a promote that applies them). Never raises."""
        if self.held:
            self._release(len(self.held))

    def release_early(self) -> None:
        """The journal is full: apply the oldest quarter of what is held now."""
        count = max(1, len(self.held) // 4)
        self.shortened += count
        if self.on_shortened is not None:
            self.on_shortened(
                f"the journal is full of delayed records: {count} applied before replay_delay"
            )
        self._release(count)

    def discard(self) -> int:
        """Give up every held record (a promote that serves the replica as it is); the caller
        cuts them from the journal. Returns how many."""
        count = len(self.held)
        self.held.clear()
        return count

    async def _release_when_due(self) -> None:
        while self.held:
            due_ns = self.held[0].record.timestamp_ns + int(self.seconds * 1e9)
            wait = (due_ns - time.time_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(min(wait, 1.0))
                continue
            count = 0
            now = time.time_ns() - int(self.seconds * 1e9)
            for entry in self.held:
                if entry.record.timestamp_ns > now:
                    break
                count += 1
            self._release(count)

    def status(self) -> dict[str, object]:
        held = self.held
        return {
            "replay_delay_seconds": self.seconds,
            "delayed_records": len(held),
            "delayed_from_seq": held[0].record.seq if held else None,
            "delayed_to_seq": held[-1].record.seq if held else None,
            "delayed_applied_early": self.shortened,
        }

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
