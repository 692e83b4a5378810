"""Applying a tail of live records from a journal's ring to its volume, in order.

:class:`RingApplier` is what a start's replay uses (:func:`.opening.replay`, when no history
keeps before-images): instead of a read of the ring and a write of the volume per record, it
reads the ring :data:`REPLAY_CHUNK` bytes at a time and writes each run of writes to consecutive
volume offsets with one call. A full 1 GiB journal of 4 KiB records is a quarter of a million
records, and the per-record calls were most of its replay (docs/benchmarks.md, "Results:
recovery of a full journal").
"""

from __future__ import annotations

from collections.abc import Sequence

from blockmirror.journal.format import EXTENT_KINDS, HEADER_SIZE, Kind
from blockmirror.journal.record import Record
from blockmirror.journal.ring import Ring
from blockmirror.journal.ringlog import apply_record
from blockmirror.journal.scan import READ_CHUNK
from blockmirror.store.base import Store

__all__ = ["REPLAY_CHUNK", "RingApplier"]

# The replay reads the ring this many bytes at a time.
REPLAY_CHUNK = READ_CHUNK
# A run of writes whose payloads are smaller than this on average is joined into one buffer.
_JOIN_BELOW = 16 * 1024


class RingApplier:
    """Applies live records of a journal's ring to its volume, in order (blocking; OSError).

    The ring is read :data:`REPLAY_CHUNK` bytes at a time (at a start the scan has just read it
    all, so it comes from the page cache), and the payloads of consecutive writes to
    consecutive volume offsets go to the volume as one write of that buffer's slices (a
    ``pwritev``, or a ``pwrite`` of the slices joined when they are small): no read per record
    and, for a log of small sequential writes, a few hundred writes per GiB instead of one per
    record. Write-zeroes and trims are applied one by one, in their place. Records are never
    reordered, and the payloads of one write never overlap (their offsets are consecutive).
    A record larger than a chunk is applied on its own, as :func:`~.ringlog.apply_record` does.
    """

    __slots__ = ("at", "file", "ring", "volume")

    def __init__(self, file: Store, ring: Ring, volume: Store) -> None:
        self.file = file
        self.ring = ring
        self.volume = volume
        # The record the write being made starts with, for the error message (0: none yet).
        self.at = 0

    def apply(self, records: Sequence[Record]) -> None:
        """Do to the volume what ``records`` (consecutive, oldest first, live) do."""
        if not records:
            return
        file, ring = self.file, self.ring
        flush = self._write
        span_end = records[-1].lpos + records[-1].size
        buf = bytearray(min(REPLAY_CHUNK, span_end - records[0].lpos))
        size = len(buf)
        view = memoryview(buf)
        # The buffer holds the ring's bytes [base, limit). Records lie in the ring in their
        # order, so one that is not in it comes after it.
        base = limit = 0
        iov: list[memoryview] = []
        run_offset = run_end = -1
        write = Kind.WRITE
        for rec in records:
            kind = rec.kind
            if kind is write:
                lpos = rec.lpos
                offset = rec.offset
                length = rec.length
                start = lpos + HEADER_SIZE
                if start + length > limit:
                    if iov:
                        flush(run_offset, run_end, iov)
                        iov = []
                        run_end = -1
                    if rec.size > size:
                        self.at = rec.seq
                        apply_record(rec, file, ring, self.volume)
                        continue
                    base = lpos
                    limit = lpos + min(size, ring.space_to_end(lpos), span_end - lpos)
                    file.preadinto(ring.physical(lpos), view[: limit - lpos])
                if offset != run_end:
                    if iov:
                        flush(run_offset, run_end, iov)
                        iov = []
                    run_offset = offset
                    self.at = rec.seq
                start -= base
                iov.append(view[start : start + length])
                run_end = offset + length
            elif kind in EXTENT_KINDS:
                if iov:
                    flush(run_offset, run_end, iov)
                    iov = []
                    run_end = -1
                self.at = rec.seq
                apply_record(rec, file, ring, self.volume)
        if iov:
            flush(run_offset, run_end, iov)

    def _write(self, offset: int, end: int, iov: list[memoryview]) -> None:
        """Write the payloads ``iov``, which fill the volume's ``[offset, end)``.

        Small ones are joined first: one copy of the bytes costs less than the store's handling
        of each buffer of a ``pwritev`` (0.1 against 0.35 us for 4 KiB in a measurement)."""
        if len(iov) > 1 and end - offset < len(iov) * _JOIN_BELOW:
            self.volume.pwrite(offset, b"".join(iov))
        else:
            self.volume.pwritev(offset, iov)
