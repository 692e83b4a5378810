"""Which points a history holds and where their before-images lie (sans-I/O).

The history is a list of *undo entries* in the order their changes reached the volume: entry
``i`` holds the bytes change ``i`` overwrote. A **point** is a position ``p`` between entries:
the volume as it was just before entry ``p`` was captured. Bringing the current volume back to
point ``p`` means writing the before-images of entries ``p, p+1, …`` back, newest first (or,
equivalently, for every byte the *oldest* before-image at or after ``p`` that covers it).

Positions are absolute (they never change when old entries are dropped), and everything is kept
in ``array`` columns: a million entries cost about 56 MB less than tuples would.

- ``keys``: ``(epoch << 50) | 2·seq + unjournaled``: non-decreasing, so a point by sequence
  number is one bisect. ``seq`` is the journal record the entry undoes, or for a change that
  was not a record (a resync region) the last record applied before it, with the low bit set.
- ``times``: the origin timestamp of the record (non-decreasing: a clock stepping back is
  clamped to the newest time seen, so a point by time is one bisect too).
- ``segs``/``offs``: where the entry's record lies (segment number, byte offset).
- ``voffs``/``vlens``: the range of the volume the entry covers.

Some positions are not points: those strictly inside a resync (the volume was a mix of old and
new regions there), and those before the floor (their entries were expired).
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass, field

__all__ = ["EPOCH_SHIFT", "Bookmark", "HistoryIndex", "Point", "PointError"]

EPOCH_SHIFT = 50


class PointError(ValueError):
    """The point asked for is not in the history; the message says why and what is."""


@dataclass(frozen=True, slots=True)
class Point:
    """A restorable point: position ``pos``, the newest record ``seq`` it includes and that
    record's origin time (0 when unknown)."""

    pos: int
    seq: int
    time_ns: int


@dataclass(frozen=True, slots=True)
class Bookmark:
    name: str
    seq: int
    time_ns: int
    pos: int


@dataclass(slots=True)
class HistoryIndex:
    """The index of one volume's history (see the module docstring)."""

    base: int = 0  # absolute position of column index 0
    keys: array[int] = field(default_factory=lambda: array("q"))
    times: array[int] = field(default_factory=lambda: array("q"))
    segs: array[int] = field(default_factory=lambda: array("q"))
    offs: array[int] = field(default_factory=lambda: array("q"))
    voffs: array[int] = field(default_factory=lambda: array("q"))
    vlens: array[int] = field(default_factory=lambda: array("q"))
    epoch: int = 0
    epoch_seq: int = 0  # records below it belong to an earlier numbering
    # Positions below ``floor`` are not points (expired); ``floor_seq``/``floor_time`` describe
    # the point at ``floor`` when its entry ``floor - 1`` is no longer in the columns.
    floor: int = 0
    floor_seq: int = 0
    floor_time: int = 0
    # The newest record applied (the newest point's seq) and its time.
    last_seq: int = 0
    last_time: int = 0
    # (begin, end) positions of resyncs; end is None while one runs.
    resyncs: list[tuple[int, int | None]] = field(default_factory=list)
    # The point at a whole resync's start (its seq and time): a renumbering that skips ahead to
    # the source's next record comes before the resync's first change, so the entries after
    # the start cannot say it.
    resync_points: dict[int, tuple[int, int]] = field(default_factory=dict)
    bookmarks: dict[str, Bookmark] = field(default_factory=dict)

    # --- adding ---------------------------------------------------------------------------------

    @property
    def end(self) -> int:
        """The position after the newest entry: the current volume."""
        return self.base + len(self.keys)

    def add(
        self, seq: int, time_ns: int, journaled: bool, seg: int, off: int, voff: int, vlen: int
    ) -> int:
        """Index an entry; returns its position."""
        key = (self.epoch << EPOCH_SHIFT) | (2 * seq + (0 if journaled else 1))
        if self.keys and key < self.keys[-1]:
            key = self.keys[-1]
        t = max(time_ns, self.times[-1] if self.times else self.floor_time)
        self.keys.append(key)
        self.times.append(t)
        self.segs.append(seg)
        self.offs.append(off)
        self.voffs.append(voff)
        self.vlens.append(vlen)
        if journaled:
            self.last_seq, self.last_time = seq, t
        return self.end - 1

    def applied(self, seq: int, time_ns: int) -> None:
        """Record ``seq`` (one with nothing to undo: a flush, a bookmark) reached the volume."""
        self.last_seq = seq
        self.last_time = max(time_ns, self.last_time)

    def rebase(self, next_seq: int) -> None:
        """The numbering goes on from ``next_seq``. Going back (another source's line) starts
        an epoch, so that later keys still sort after every earlier one; skipping ahead (a
        resync that replaces the records in between) needs nothing."""
        if next_seq - 1 < self.last_seq:
            self.epoch += 1
            self.epoch_seq = next_seq - 1
            self.last_seq = next_seq - 1

    def begin_resync(
        self, *, whole: bool = True, seq: int | None = None, time_ns: int | None = None
    ) -> None:
        """A resync starts here. ``whole``: the volume is consistent now (else no point
        before the resync's end is: a first copy, or one after another was interrupted)."""
        if not self.resyncs or self.resyncs[-1][1] is not None:
            self.resyncs.append((self.end if whole else -1, None))
            if whole:
                self.resync_points[self.end] = (
                    self.last_seq if seq is None else seq,
                    self.last_time if time_ns is None else time_ns,
                )

    def end_resync(self, seq: int | None = None) -> None:
        """The resync is done; the volume now holds every record up to ``seq``."""
        if self.resyncs and self.resyncs[-1][1] is None:
            self.resyncs[-1] = (self.resyncs[-1][0], self.end)
        if seq is not None and seq > self.last_seq:
            self.last_seq = seq

    @property
    def resyncing(self) -> bool:
        return bool(self.resyncs) and self.resyncs[-1][1] is None

    @property
    def unwhole_resync(self) -> bool:
        """A resync runs that began on a volume that was not consistent."""
        return self.resyncing and self.resyncs[-1][0] < 0

    def unwhole_end(self) -> int:
        """The end of the newest resync that began on an inconsistent volume (0: none)."""
        return max((end for begin, end in self.resyncs if begin < 0 and end), default=0)

    @property
    def keeps_resync_start(self) -> bool:
        """A resync runs and the point before it is whole (so it is kept until the end)."""
        return self.resyncing and self.resyncs[-1][0] >= 0

    def bookmark(self, name: str, seq: int, time_ns: int) -> Bookmark:
        mark = Bookmark(name, seq, max(time_ns, self.last_time), self.end)
        self.bookmarks[name] = mark
        self.applied(seq, time_ns)
        return mark

    # --- points ---------------------------------------------------------------------------------

    def seq_at(self, pos: int) -> int:
        """The newest record the state at ``pos`` includes."""
        if pos >= self.end:
            return self.last_seq
        if pos < self.base:
            raise PointError(f"position {pos} is no longer indexed")
        key = self.keys[pos - self.base] & ((1 << EPOCH_SHIFT) - 1)
        seq, unjournaled = divmod(key, 2)
        return seq if unjournaled else seq - 1

    def time_at(self, pos: int) -> int:
        """The origin time of the newest change the state at ``pos`` includes."""
        if pos >= self.end:
            return self.last_time
        if pos - 1 >= self.base and pos > 0:
            return self.times[pos - 1 - self.base]
        return self.floor_time

    def point(self, pos: int) -> Point:
        known = self.resync_points.get(pos)
        if known is not None:
            return Point(pos, *known)
        return Point(pos, self.seq_at(pos), self.time_at(pos))

    def whole(self, pos: int) -> bool:
        """Whether the volume was a consistent image at ``pos`` (not inside a resync)."""
        return all(not (begin < pos and (end is None or pos < end)) for begin, end in self.resyncs)

    def first_whole(self, pos: int) -> int | None:
        """The first whole position at or after ``pos`` (None: none yet, a resync runs)."""
        for begin, end in self.resyncs:
            if begin < pos and (end is None or pos < end):
                if end is None:
                    return None
                pos = end
        return pos

    def oldest(self) -> Point | None:
        """The oldest point offered (None while a first resync runs: none is whole)."""
        pos = self.first_whole(min(self.floor, self.end))
        return self.point(pos) if pos is not None else None

    def newest(self) -> Point:
        return self.point(self.end)

    def consistent_point(self) -> Point | None:
        """The newest whole point: the current volume, or the start of a running resync
        (None: a resync runs and nothing before it was whole)."""
        if self.resyncing:
            begin = self.resyncs[-1][0]
            return self.point(max(begin, self.floor)) if begin >= 0 else None
        return self.newest()

    def _check(self, pos: int, asked: str) -> Point:
        old = self.oldest()
        if old is None:
            raise PointError("the replica's first copy is still running: it has no point yet")
        if pos < old.pos and self.whole(pos):
            raise PointError(
                f"{asked} is older than the oldest point kept (seq {old.seq}); history was "
                "expired there"
            )
        if not self.whole(pos):
            raise PointError(
                f"{asked} falls inside a resync, when the volume was a mix of old and new "
                "regions; choose a point before or after it"
            )
        return self.point(pos)

    def by_seq(self, seq: int) -> Point:
        """The state right after record ``seq`` (in the current numbering)."""
        if seq > self.last_seq:
            raise PointError(f"seq {seq} is newer than the newest record ({self.last_seq})")
        if seq < self.epoch_seq:
            raise PointError(
                f"seq {seq} is from before the volume was renumbered at seq {self.epoch_seq} "
                "(a full copy from another source); ask for that point by time"
            )
        key = (self.epoch << EPOCH_SHIFT) | (2 * seq)
        lo = bisect.bisect_left(self.keys, self.epoch << EPOCH_SHIFT)
        pos = self.base + bisect.bisect_right(self.keys, key, lo=lo)
        return self._check(pos, f"seq {seq}")

    def by_time(self, time_ns: int) -> Point:
        """The state at ``time_ns``: every change stamped at or before it, none after."""
        pos = self.base + bisect.bisect_right(self.times, time_ns)
        return self._check(max(pos, self.base), f"time {time_ns}")

    def by_bookmark(self, name: str) -> Point:
        mark = self.bookmarks.get(name)
        if mark is None:
            raise PointError(f"no bookmark {name!r} in this history")
        point = self._check(mark.pos, f"bookmark {name!r}")
        return Point(point.pos, mark.seq, mark.time_ns)

    def truncate(self, pos: int) -> None:
        """Forget every entry from ``pos`` on: the volume was brought back to that point."""
        point = self.point(pos)
        lo = pos - self.base
        for column in (self.keys, self.times, self.segs, self.offs, self.voffs, self.vlens):
            del column[lo:]
        self.last_seq, self.last_time = point.seq, point.time_ns
        self.bookmarks = {n: m for n, m in self.bookmarks.items() if m.pos <= pos}
        self.resyncs = [r for r in self.resyncs if r[1] is not None and r[1] <= pos]
        self.resync_points = {p: v for p, v in self.resync_points.items() if p <= pos}

    # --- expiry ---------------------------------------------------------------------------------

    def floor_for_age(self, cutoff_ns: int) -> int:
        """The lowest position whose point is not older than ``cutoff_ns``."""
        j = bisect.bisect_left(self.times, cutoff_ns)
        if j == 0 and self.time_at(self.base) >= cutoff_ns:
            return self.base
        return min(self.base + j + 1, self.end)

    def raise_floor(self, pos: int, keep: int) -> None:
        """Points below ``pos`` are gone. Column entries below ``keep`` (at most ``pos``; a
        restore or drill may still read older ones) that no point needs are dropped."""
        pos = min(pos, self.end)
        if pos > self.floor:
            self.floor_seq, self.floor_time = self.seq_at(pos), self.time_at(pos)
            self.floor = pos
            for name, mark in list(self.bookmarks.items()):
                if mark.pos < pos:
                    del self.bookmarks[name]
            self.resyncs = [r for r in self.resyncs if r[1] is None or r[1] > pos]
        # Keep entry floor-1 (it gives the floor point its time); drop what is older, in
        # chunks so that a steady expiry is not a memmove per entry.
        drop = min(keep, self.floor) - 1 - self.base
        if drop >= 4096:
            for column in (self.keys, self.times, self.segs, self.offs, self.voffs, self.vlens):
                del column[:drop]
            self.base += drop

    def first_in_segment(self, seg: int) -> int:
        """The position of the first entry at or after segment ``seg`` (end if none)."""
        return self.base + bisect.bisect_left(self.segs, seg)
