"""Which before-image each byte of a past point comes from (sans-I/O).

The volume at point ``p`` is the current volume, except that every byte some entry at or after
``p`` covers takes its value from the *oldest* such entry (the bytes that entry overwrote were
the bytes of point ``p``, since nothing between ``p`` and it touched them). :class:`Overlay`
is that mapping as sorted, disjoint runs ``[start, end) → entry``, built once for the entries
that exist when a drill starts (:meth:`Overlay.build`, a sweep over their end points with a
heap: O(n log n), no per-byte work) and extended as new entries arrive (:meth:`fill`: a newer
entry only fills what no older one covers).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Overlay", "Piece"]


@dataclass(frozen=True, slots=True)
class Piece:
    """``[start, end)`` of the volume comes from entry ``entry``, whose range starts at
    ``entry_start``."""

    start: int
    end: int
    entry: int
    entry_start: int


@dataclass(slots=True)
class Overlay:
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)
    entry_starts: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, ranges: Iterable[tuple[int, int, int]]) -> Overlay:
        """The overlay of entries ``(entry, start, length)`` (entry numbers increase with age
        order: a lower number is older and wins)."""
        # (position, 0 = an end / 1 = a start, entry, entry's start)
        events: list[tuple[int, int, int, int]] = []
        for entry, start, length in ranges:
            if length > 0:
                events.append((start, 1, entry, start))
                events.append((start + length, 0, entry, start))
        events.sort()
        out = cls()
        active: list[tuple[int, int]] = []  # heap of (entry, entry_start)
        ended: set[int] = set()
        prev = 0
        i = 0
        while i < len(events):
            pos = events[i][0]
            while active and active[0][0] in ended:
                heapq.heappop(active)
            if active and pos > prev:
                out._append(prev, pos, *active[0])
            while i < len(events) and events[i][0] == pos:
                _, kind, entry, start = events[i]
                if kind:
                    heapq.heappush(active, (entry, start))
                    ended.discard(entry)
                else:
                    ended.add(entry)
                i += 1
            prev = pos
        return out

    def _append(self, start: int, end: int, entry: int, entry_start: int) -> None:
        if self.ends and self.ends[-1] == start and self.entries[-1] == entry:
            self.ends[-1] = end  # the same entry on both sides of an event: one run
            return
        self.starts.append(start)
        self.ends.append(end)
        self.entries.append(entry)
        self.entry_starts.append(entry_start)

    def __len__(self) -> int:
        return len(self.starts)

    def lookup(self, offset: int, length: int) -> list[Piece]:
        """The runs overlapping ``[offset, offset + length)``, clipped to it, in order."""
        end = offset + length
        i = bisect.bisect_right(self.ends, offset)
        pieces: list[Piece] = []
        while i < len(self.starts) and self.starts[i] < end:
            pieces.append(
                Piece(
                    max(self.starts[i], offset),
                    min(self.ends[i], end),
                    self.entries[i],
                    self.entry_starts[i],
                )
            )
            i += 1
        return pieces

    def fill(self, entry: int, start: int, length: int) -> None:
        """Add a newer entry: it covers only what no run covers yet."""
        end = start + length
        i = bisect.bisect_right(self.ends, start)
        at = start
        gaps: list[tuple[int, int]] = []
        while at < end:
            if i < len(self.starts) and self.starts[i] <= at:
                at = self.ends[i]
                i += 1
                continue
            gap_end = min(end, self.starts[i]) if i < len(self.starts) else end
            gaps.append((at, gap_end))
            at = gap_end
        for gap_start, gap_end in reversed(gaps):
            j = bisect.bisect_left(self.starts, gap_start)
            self.starts.insert(j, gap_start)
            self.ends.insert(j, gap_end)
            self.entries.insert(j, entry)
            self.entry_starts.insert(j, start)
