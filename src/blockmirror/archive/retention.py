"""Retention of an archived chain (docs/archive.md, "Retention").

Every point whose origin time is within ``history`` of now must stay restorable. The oldest of
them needs the newest base older than it (the *anchor*) and the segments after the anchor's
start, so those are kept; everything older is deleted: bases before the anchor, segments that
end at or before its start, bookmarks of points before it, and data objects no kept manifest
takes a chunk from. A data object newer than the newest manifest belongs to a base still being
built and is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from blockmirror.archive import objects as fmt
from blockmirror.archive.chain import Chain, NotRestorable

__all__ = ["Expiry", "expired", "generation_expired"]


@dataclass(frozen=True)
class Expiry:
    anchor: fmt.ManifestKey | None
    delete: tuple[fmt.ArchiveKey, ...]


def expired(
    keys: Sequence[fmt.ArchiveKey],
    cutoff_ns: int,
    objects_of: Mapping[str, frozenset[str]],
) -> Expiry:
    """What may go when no point older than ``cutoff_ns`` needs keeping.

    ``objects_of``: for each manifest key (relative) of the chain, the data objects it takes
    chunks from; a kept manifest missing here keeps every data object (nothing is deleted on
    a guess). Sans-I/O: the caller lists, reads the manifests and deletes."""
    chain = Chain(list(keys))
    # Strictly older: records may share the cutoff's time (a clamped clock), and each of them
    # is a point in the window the anchor must come before.
    candidates = [b for b in chain.bases if b.end_ts < cutoff_ns]
    anchor: fmt.ManifestKey | None = None
    for base in sorted(candidates, key=lambda b: b.end, reverse=True):
        try:
            # It must restore its own end itself: a plan through another base says nothing
            # of this one, and deleting that other base would leave nothing restorable.
            if chain.plan(base.end).base != base:
                continue
        except NotRestorable:
            continue
        anchor = base
        break
    if anchor is None:
        return Expiry(None, ())
    delete: list[fmt.ArchiveKey] = []
    kept_manifests = [b for b in chain.bases if b.end >= anchor.end]
    for base in chain.bases:
        if base.end < anchor.end:
            delete.append(base)
    for seg in chain.segments:
        if seg.last <= anchor.start:
            delete.append(seg)
    for mark in chain.bookmarks:
        if mark.seq < anchor.end:
            delete.append(mark)
    referenced: set[str] = set()
    for base in kept_manifests:
        found = objects_of.get(base.key)
        if found is None:
            return Expiry(anchor, tuple(delete))  # unknown references: keep every data object
        referenced |= found
    newest_start = max(b.start for b in chain.bases)
    for key in keys:
        # (A data object of the newest start may belong to a base still being built.)
        if (
            isinstance(key, fmt.DataKey)
            and key.key not in referenced
            and key.base_end < newest_start
        ):
            delete.append(key)
    return Expiry(anchor, tuple(delete))


def generation_expired(
    keys: Sequence[fmt.ArchiveKey], cutoff_ns: int, own_anchor: fmt.ManifestKey | None
) -> bool:
    """Whether another generation's chain (one a promote left behind) may go whole: the
    current chain restores every point of the window by itself (it has an anchor), and
    nothing of the other one is as young as the cutoff."""
    if own_anchor is None:
        return False
    for key in keys:
        if isinstance(key, fmt.SegmentKey) and key.last_ts >= cutoff_ns:
            return False
        if isinstance(key, fmt.ManifestKey) and key.end_ts >= cutoff_ns:
            return False
        if isinstance(key, fmt.BookmarkKey) and key.ts >= cutoff_ns:
            return False
    return True
