"""Capturing before-images in groups: one history sync for many changes, never a wrong image.

With a barrier (docs/history.md, "Crash safety") the before-images of a group of changes are
written and synced first and only then are the changes applied. A change's before-image must
include every change before it, so a group ends at the first change that overlaps one already
in it (:class:`DisjointRanges`), and the next group is captured once this one is applied.

:func:`replay_capturing` is the start-up replay of a journal's tail done that way; the live
applier (``blockdev/applier.py``) forms its groups with the same :class:`DisjointRanges`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

from blockmirror.history.log import HistoryLog
from blockmirror.journal.format import EXTENT_KINDS, Kind
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import Record

__all__ = ["GROUP_BYTES", "DisjointRanges", "capture_record", "replay_capturing"]

# A group's before-images are at most about this many bytes.
GROUP_BYTES = 64 << 20


class DisjointRanges:
    """A set of disjoint byte ranges, and whether a new range would overlap one of them."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def overlaps(self, start: int, length: int) -> bool:
        i = bisect.bisect_left(self._starts, start + length)
        return i > 0 and self._ends[i - 1] > start

    def add(self, start: int, length: int) -> None:
        """Add a range that :meth:`overlaps` said is disjoint from the others."""
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, start + length)

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()


def capture_record(
    history: HistoryLog, journal: Journal, rec: Record, *, seq: int, journaled: bool
) -> None:
    """Capture what ``rec`` will overwrite in the journal's volume (blocking). A bookmark is
    recorded instead. Raises OSError."""
    if rec.kind in EXTENT_KINDS and rec.length:
        history.capture(
            journal.volume,
            rec.kind == Kind.WRITE,
            rec.offset,
            rec.length,
            seq=seq,
            time_ns=rec.timestamp_ns,
            origin=rec.origin,
            journaled=journaled,
        )


def replay_capturing(
    history: HistoryLog, journal: Journal, records: Sequence[Record], *, delay: float = 0.0
) -> int:
    """Replay ``records`` (live in the journal's ring) into its volume, keeping before-images;
    returns the newest record applied.

    A record already captured before the restart (``seq`` up to the history's newest) is
    applied again without a new capture: the volume may hold it already, and its before-image
    was taken before that. On a replica with ``replay_delay`` (``delay`` seconds), records
    younger than the delay are left for the write path to apply when due. Blocking; raises
    OSError.
    """
    if delay > 0 and journal.replica is not None:
        due = time.time_ns() - int(delay * 1e9)
        # Up to the first one not due yet: order is never broken.
        cut = next((i for i, rec in enumerate(records) if rec.timestamp_ns > due), len(records))
        records = records[:cut]
    group: list[Record] = []
    ranges = DisjointRanges()
    pending = 0

    def apply_group() -> None:
        nonlocal pending
        # The journal's own state says whether this is a replica (the live barrier is set
        # once it is open).
        if (history.barrier or journal.replica is not None) and pending:
            history.sync()
        for rec in group:
            journal.apply_from_ring(rec)
            if rec.kind == Kind.BOOKMARK:
                name = journal.read_payload(rec).decode("utf-8", "replace")
                history.bookmark(name, rec.seq, rec.timestamp_ns, rec.origin)
            history.applied(rec.seq, rec.timestamp_ns)
        group.clear()
        ranges.clear()
        pending = 0

    for rec in records:
        extent = rec.kind in EXTENT_KINDS and rec.length > 0
        # A before-image must include every record before it: a group never holds two
        # records of the same bytes (applied or captured in it).
        if extent and (ranges.overlaps(rec.offset, rec.length) or pending >= GROUP_BYTES):
            apply_group()
        if extent and history.capturing and rec.seq > history.captured_seq:
            capture_record(history, journal, rec, seq=rec.seq, journaled=True)
            pending += rec.length
        if extent:
            ranges.add(rec.offset, rec.length)
        group.append(rec)
    apply_group()
    history.sync()
    return records[-1].seq if records else journal.applied_seq
