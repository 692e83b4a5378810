"""What a listing of one generation can restore, and how (sans-I/O).

A :class:`Chain` is built from the parsed keys of one generation (keys.py): the segments'
names say which records they hold, the manifests' names which base each is. That is enough
to answer, without reading an object, which points are restorable, which records are missing
(gaps) or held twice (overlaps), which base and segments restore a point, and what retention
may delete.

A point N is restorable iff some base b has ``b.end <= N`` and the segments hold every record
``b.start+1..N`` (none at all when ``b.start == N``). Segments may overlap (a re-upload after a
crash cuts a run at other seqs): coverage is the union of their ranges, and a plan names, for
each segment it uses, exactly which of its records to apply (:attr:`RestorePlan.ranges`), so
no record is applied twice and an overlap is reported, never merged away.

Points in time: a listing knows the origin timestamps of segments' last records, of base ends
and of bookmarks, not of the records inside a segment. :meth:`Chain.segment_at` names the one
segment whose records decide a time (or None when the listing does), and :meth:`Chain.seq_at`
takes the ``(seq, ts)`` pairs of that segment from the caller, who downloads and decodes it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from blockmirror.archive.base_image import Manifest
from blockmirror.archive.keys import (
    ArchiveKey,
    BookmarkKey,
    ClaimKey,
    DataKey,
    ManifestKey,
    SegmentKey,
)
from blockmirror.errors import ArchiveError

__all__ = ["Chain", "NotRestorable", "RestorePlan", "Retention", "unreferenced_data"]

# (seq, origin timestamp) pairs of one segment's records, for seq_at.
Timestamps = Callable[[SegmentKey], Iterable[tuple[int, int]]]


class NotRestorable(ArchiveError):
    """A point the archive cannot restore; the message says which and why."""


@dataclass(frozen=True, slots=True)
class RestorePlan:
    """Restore ``seq``: the base, then records ``base.start+1..seq`` from ``segments`` in
    order. The first segment may begin before ``base.start+1``, the last may end after
    ``seq``, and two may overlap: :attr:`ranges` says which records to take from each."""

    base: ManifestKey
    segments: tuple[SegmentKey, ...]
    seq: int

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """Per segment, the inclusive seqs to apply from it: together ``base.start+1..seq``,
        each once, in order."""
        out = []
        lo = self.base.start + 1
        for seg in self.segments:
            hi = min(seg.last, self.seq)
            out.append((lo, hi))
            lo = hi + 1
        return tuple(out)


class Retention(NamedTuple):
    """Segments and manifests to keep and to delete (data objects: :func:`unreferenced_data`)."""

    keep: tuple[SegmentKey | ManifestKey, ...]
    delete: tuple[SegmentKey | ManifestKey, ...]


class Chain:
    """The keys of one generation, sorted, with what they can restore.

    ``segments`` by first, ``bases`` by end, ``bookmarks`` by seq. ``runs``: the records the
    segments hold, as merged inclusive ranges. ``gaps``: ``(after, before)`` where records
    ``after+1..before-1`` are missing between two runs. ``overlaps``: inclusive seq ranges
    that more than one segment holds. ``restorable``: merged inclusive ranges of points.
    """

    def __init__(self, keys: Iterable[ArchiveKey]) -> None:
        unique = set(keys)
        gens = {k.gen for k in unique}
        if len(gens) > 1:
            raise ValueError(f"a chain is one generation, not {len(gens)}")
        self.generation: str | None = gens.pop() if gens else None
        self.claim: ClaimKey | None = next((k for k in unique if isinstance(k, ClaimKey)), None)
        self.segments = tuple(
            sorted(
                (k for k in unique if isinstance(k, SegmentKey)),
                key=lambda k: (k.first, k.last, k.last_ts),
            )
        )
        self.bases = tuple(
            sorted(
                (k for k in unique if isinstance(k, ManifestKey)),
                key=lambda k: (k.end, k.start, k.end_ts),
            )
        )
        self.data = tuple(sorted((k for k in unique if isinstance(k, DataKey)), key=_data_order))
        self.bookmarks = tuple(
            sorted(
                (k for k in unique if isinstance(k, BookmarkKey)),
                key=lambda k: (k.seq, k.ts, k.name),
            )
        )
        self.runs: list[tuple[int, int]] = []
        self.gaps: list[tuple[int, int]] = []
        self.overlaps: list[tuple[int, int]] = []
        self._sweep()
        self._run_starts = [lo for lo, _ in self.runs]
        # The newest point each base restores, or None when it restores none.
        self._reach = {b: self._reach_of(b) for b in self.bases}
        self.restorable = _merged(
            (b.end, reach) for b, reach in self._reach.items() if reach is not None
        )

    def _sweep(self) -> None:
        frontier = -1
        for seg in self.segments:
            if frontier < 0 or seg.first > frontier + 1:
                if frontier >= 0:
                    self.gaps.append((frontier, seg.first))
                self.runs.append((seg.first, seg.last))
            else:
                if seg.first <= frontier:
                    self.overlaps.append((seg.first, min(seg.last, frontier)))
                self.runs[-1] = (self.runs[-1][0], max(frontier, seg.last))
            frontier = max(frontier, seg.last)

    def _run_at(self, seq: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._run_starts, seq) - 1
        if i >= 0 and self.runs[i][1] >= seq:
            return self.runs[i]
        return None

    def _reach_of(self, b: ManifestKey) -> int | None:
        run = self._run_at(b.start + 1)
        if run is not None and run[1] >= b.end:
            return run[1]
        return b.end if b.start == b.end else None

    def _restores(self, b: ManifestKey, seq: int) -> bool:
        reach = self._reach[b]
        return reach is not None and b.end <= seq <= reach

    @property
    def newest(self) -> int | None:
        """The newest record the listing names (a segment's last or a base's end)."""
        ends = [s.last for s in self.segments] + [b.end for b in self.bases]
        return max(ends) if ends else None

    def is_restorable(self, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in self.restorable)

    def plan(self, seq: int) -> RestorePlan:
        """How to restore ``seq``: the base with the fewest records to replay (the largest
        start; of those the largest end), and the fewest segments that hold the records."""
        fit = [b for b in self.bases if self._restores(b, seq)]
        if not fit:
            raise NotRestorable(self._why(seq))
        base = max(fit, key=lambda b: (b.start, b.end))
        chosen: list[SegmentKey] = []
        want = base.start + 1
        best: SegmentKey | None = None
        i = 0
        while want <= seq:
            # Of the segments that begin by ``want``, the one reaching furthest.
            while i < len(self.segments) and self.segments[i].first <= want:
                if best is None or self.segments[i].last > best.last:
                    best = self.segments[i]
                i += 1
            assert best is not None and best.last >= want, "reach said the records are held"
            chosen.append(best)
            want = best.last + 1
        return RestorePlan(base, tuple(chosen), seq)

    def _why(self, seq: int) -> str:
        if not self.bases:
            return f"seq {seq}: the archive holds no base of this generation"
        newest = self.newest
        if newest is not None and seq > newest:
            return f"seq {seq} is newer than the newest archived record {newest}"
        older = [b for b in self.bases if b.end <= seq]
        if not older:
            return f"seq {seq} is older than the oldest base (end {self.bases[0].end})"
        base = max(older, key=lambda b: (b.end, b.start))
        run = self._run_at(base.start + 1)
        missing = base.start + 1 if run is None else run[1] + 1
        i = bisect.bisect_right(self._run_starts, missing)
        if i == len(self.runs):
            return f"seq {seq}: no record after {missing - 1} is archived"
        before = self.runs[i][0]
        if seq < before:
            return f"seq {seq} is in a gap between {missing - 1} and {before}"
        return (
            f"seq {seq} needs records {missing}..{before - 1} after the base ending at "
            f"{base.end}: a gap between {missing - 1} and {before}"
        )

    # --- points in time ---------------------------------------------------------------------

    def _known(self) -> list[tuple[int, int]]:
        known = [(s.last, s.last_ts) for s in self.segments]
        known += [(b.end, b.end_ts) for b in self.bases]
        known += [(m.seq, m.ts) for m in self.bookmarks]
        return known

    def _bracket(self, time_ns: int) -> tuple[int | None, int | None]:
        """(s0, s1): the newest named point at or before ``time_ns``, and the next named
        seq after it (every named point after s0 is newer than ``time_ns``)."""
        known = self._known()
        s0 = max((seq for seq, ts in known if ts <= time_ns), default=None)
        s1 = min((seq for seq, _ in known if s0 is None or seq > s0), default=None)
        return s0, s1

    def segment_at(self, time_ns: int) -> SegmentKey | None:
        """The segment whose records decide :meth:`seq_at` for ``time_ns``, or None when
        the listing does.

        Records between two named points s0 < s1 have unknown timestamps. Any segment holding
        one of them ends at a named point, so at s1 or later: it holds s1-1, and the one that
        begins first holds every such record the archive has.
        """
        s0, s1 = self._bracket(time_ns)
        if s1 is None or s1 - 1 < 1 or (s0 is not None and s1 - 1 <= s0):
            return None
        if self._run_at(s1 - 1) is None:
            return None
        return min(
            (s for s in self.segments if s.first <= s1 - 1 <= s.last),
            key=lambda s: (s.first, s.last),
        )

    def seq_at(self, time_ns: int, timestamps: Timestamps) -> int:
        """The newest archived record (or base end) whose origin timestamp is at most
        ``time_ns``. ``timestamps`` is called at most once, with :meth:`segment_at`'s segment,
        and returns its records' ``(seq, timestamp_ns)`` (download and decode it). Raises
        :class:`NotRestorable` when nothing archived is that old.

        Exact when origin timestamps do not decrease along the seqs, which is what a time
        means in history too (docs/history.md clamps a clock that steps back): then the
        records at or before ``time_ns`` are a prefix. Were a primary's clock to step back,
        only the records the listing and that one segment show are looked at.
        """
        s0, s1 = self._bracket(time_ns)
        seg = self.segment_at(time_ns)
        if seg is not None:
            assert s1 is not None
            low = seg.first if s0 is None else max(seg.first, s0 + 1)
            found = [seq for seq, ts in timestamps(seg) if low <= seq < s1 and ts <= time_ns]
            if found:
                return max(found)
        if s0 is None:
            raise NotRestorable(f"no archived record is as old as {time_ns} ns")
        return s0

    def bookmark(self, name: str) -> BookmarkKey:
        """The newest bookmark called ``name``."""
        marks = [m for m in self.bookmarks if m.name == name]
        if not marks:
            raise NotRestorable(f"no bookmark {name!r} in the archive")
        return max(marks, key=lambda m: (m.seq, m.ts))

    # --- retention --------------------------------------------------------------------------

    def retention(self, keep_from_seq: int) -> Retention:
        """What may go while every point from ``keep_from_seq`` on stays restorable: the
        manifests older than the newest base that restores ``keep_from_seq`` (the anchor), and
        the segments that end at or before the anchor's start. Nothing goes when no base
        restores ``keep_from_seq``: the caller learns that from :attr:`restorable`.

        Every point at or after ``keep_from_seq`` restorable before is restorable after: the
        anchor's records from its start on are all kept, and they reach as far as any deleted
        base's did.
        """
        kept: list[SegmentKey | ManifestKey] = [*self.segments, *self.bases]
        fit = [b for b in self.bases if self._restores(b, keep_from_seq)]
        if not fit:
            return Retention(tuple(kept), ())
        anchor = max(fit, key=lambda b: (b.end, b.start))
        delete: list[SegmentKey | ManifestKey] = [b for b in self.bases if b.end < anchor.end]
        delete += [s for s in self.segments if s.last <= anchor.start]
        gone = set(delete)
        return Retention(tuple(k for k in kept if k not in gone), tuple(delete))


def unreferenced_data(data_keys: Iterable[DataKey], manifests: Iterable[Manifest]) -> list[DataKey]:
    """The data objects no manifest in ``manifests`` takes a chunk from (by key; sorted).

    Pass every manifest that is kept, of every generation: a synthetic full may take chunks
    from an older generation's objects. A data object of a base still being built has no
    manifest yet; the caller must leave those out of ``data_keys``.
    """
    used: set[str] = set()
    for m in manifests:
        used.update(m.objects)
    return sorted((k for k in set(data_keys) if k.key not in used), key=lambda k: k.key)


def _data_order(k: DataKey) -> tuple[int, int]:
    return k.base_end, k.n


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
