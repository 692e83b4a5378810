"""Where a volume diverged from a peer's line: the regions it wrote (or received) past a branch.

After a failover two units may hold different data from some sequence number on: the branch
point :mod:`.lineage` finds. What this unit holds past it is exactly

- the regions of its journal's records numbered from the branch on, and
- the dirty regions of its consumer for that peer, when it is tracking (writes whose records
  were given up: every one of them came after what the peer acknowledged, so after the branch).

That is complete only while the journal still holds every record from the branch on, or the
consumer for the peer has held them since before it (records kept for it, or their bits). When
neither holds, nothing can say where the volume changed, and the answer is "all of it" (None).

The unit that gives its divergence up keeps the regions in ``STATE_DIR/VOLUME.diverged`` (a
dirty map's format) until its new source has taken them into its own resync: the source copies
the union of both sides' regions and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from blockmirror.io.fileio import sync_directory
from blockmirror.journal.consumers import DIRTY_REGION, Consumer
from blockmirror.journal.dirtymap import DirtyMap, DirtyMapError
from blockmirror.journal.format import EXTENT_KINDS
from blockmirror.journal.journal import Journal
from blockmirror.state import ConsumerMode

__all__ = [
    "Divergence",
    "add_diverged_file",
    "diverged",
    "merge_extents",
    "peer_consumer",
    "read_diverged_file",
    "remove_diverged_file",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Divergence:
    """What this unit holds past ``branch_seq``: ``extents`` (offset, length), sorted and
    merged, or None for "the whole volume" (nothing proves less)."""

    branch_seq: int
    extents: tuple[tuple[int, int], ...] | None
    volume_size: int

    @property
    def nbytes(self) -> int:
        if self.extents is None:
            return self.volume_size
        return sum(length for _, length in self.extents)

    def regions(self) -> tuple[tuple[int, int], ...]:
        """The extents rounded out to whole dirty-map regions (what a resync copies)."""
        if self.extents is None:
            return ((0, self.volume_size),) if self.volume_size else ()
        rounded = []
        for offset, length in self.extents:
            start = offset - offset % DIRTY_REGION
            end = min(-(-(offset + length) // DIRTY_REGION) * DIRTY_REGION, self.volume_size)
            rounded.append((start, end - start))
        return merge_extents(rounded)


def merge_extents(extents: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, with overlapping and touching extents joined; empty ones dropped."""
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(e for e in extents if e[1] > 0):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            merged.append((offset, length))
    return tuple(merged)


def peer_consumer(journal: Journal, peer_unit: str) -> Consumer | None:
    """The consumer whose cursor belongs to unit ``peer_unit``, if any."""
    for consumer in journal.consumers.values():
        if consumer.peer == peer_unit:
            return consumer
    return None


def diverged(journal: Journal, peer_unit: str | None, branch_seq: int) -> Divergence:
    """What ``journal``'s volume holds past ``branch_seq`` that the line of ``peer_unit`` does
    not (in memory; nothing is read or written)."""
    size = journal.volume.size
    end = journal.next_seq - 1
    if branch_seq > end:
        return Divergence(branch_seq, (), size)  # nothing past the branch
    consumer = peer_consumer(journal, peer_unit) if peer_unit is not None else None
    complete = journal.head_seq <= branch_seq or (
        consumer is not None
        and consumer.mode == ConsumerMode.TRACKING
        and consumer.acked_seq < branch_seq
    )
    if not complete:
        return Divergence(branch_seq, None, size)
    extents = [
        (rec.offset, rec.length)
        for rec in journal.records
        if rec.seq >= branch_seq and rec.kind in EXTENT_KINDS and rec.length
    ]
    if consumer is not None and consumer.mode == ConsumerMode.TRACKING:
        extents.extend(consumer.dirty.dirty_regions())
    return Divergence(branch_seq, merge_extents(extents), size)


def add_diverged_file(path: Path, volume_size: int, regions: tuple[tuple[int, int], ...]) -> None:
    """Add ``regions`` to the diverged-regions file (created if missing), durably."""
    if path.exists():
        dmap, _ = DirtyMap.open_or_all_dirty(
            path, volume_size=volume_size, region_size=DIRTY_REGION
        )
    else:
        dmap = DirtyMap.create(path, volume_size=volume_size, region_size=DIRTY_REGION)
    try:
        for offset, length in regions:
            dmap.mark(offset, length)
        dmap.sync()
    finally:
        dmap.close(sync=False)


def read_diverged_file(path: Path, volume_size: int) -> tuple[tuple[int, int], ...]:
    """The regions in the diverged-regions file; none if there is no file."""
    if not path.exists():
        return ()
    try:
        dmap = DirtyMap.open(path, volume_size=volume_size, region_size=DIRTY_REGION)
    except DirtyMapError as exc:
        # Unreadable: nothing proves less than the whole volume.
        log.error("%s; every region counts as diverged", exc)
        return ((0, volume_size),)
    try:
        return tuple(dmap.dirty_regions())
    finally:
        dmap.close(sync=False)


def remove_diverged_file(path: Path) -> None:
    """The source took the regions into its own resync: the file has done its job."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        sync_directory(path.parent)
