"""The journal's log: its live records in the ring file, where they are, appending, reading.

:class:`RingLog` is the part of a journal that knows the ring (docs/journal.md, "Ring" and
"Records"): the index of live records (placed, without their data), the head and tail
positions, the batch of staged records and its write and sync, and the reads the link and the
replay make. The journal (:mod:`.journal`) adds the volume, checkpoints and consumers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from blockmirror.errors import JournalError
from blockmirror.journal import identity
from blockmirror.journal.format import (
    HEADER_SIZE,
    PAYLOAD_KINDS,
    Kind,
    RecordHeader,
    record_iov,
    record_size,
)
from blockmirror.journal.record import UNKNOWN_ORIGIN, Record
from blockmirror.journal.ring import Ring
from blockmirror.journal.storage import JournalFile
from blockmirror.store.base import MAX_WRITE, Buffer, Store

__all__ = ["MAX_WRITE", "RecordsGone", "RingLog", "apply_record"]


class RecordsGone(JournalError):
    """Records a reader asked for were freed (a consumer's cursor behind the journal's head)."""


def apply_record(rec: Record, file: Store, ring: Ring, volume: Store) -> None:
    """Do to ``volume`` what the record ``rec``, live in the ring of the journal ``file``,
    does (its data is read from the ring). Blocking."""
    if rec.kind == Kind.WRITE:
        volume.pwrite(rec.offset, file.pread(ring.physical(rec.lpos) + HEADER_SIZE, rec.length))
    elif rec.kind == Kind.ZERO:
        volume.write_zeroes(rec.offset, rec.length, may_trim=False)
    elif rec.kind == Kind.TRIM:
        volume.trim(rec.offset, rec.length)


class RingLog:
    """The live records of one journal file's ring, and appending to and reading from it."""

    def __init__(self, path: Path, file: Store, ring: Ring) -> None:
        self.path = path
        # The journal file (checkpoint slots, then the ring) as a store: see storage.py.
        self.file = file
        self._closed = False
        self.ring = ring
        # Written into every record this unit's host makes (record.origin_id of the unit name).
        self.origin = UNKNOWN_ORIGIN
        # Volume offsets of the newest writes, newest first: the blocks the volume's next
        # fingerprint samples (identity.py).
        self.recent_writes: deque[int] = deque(maxlen=identity.FINGERPRINT_BLOCKS)
        # The live records, oldest first, placed in the ring and without their data.
        self.records: deque[Record] = deque()
        self.tail_lpos = 0
        self.next_seq = 1
        # Highest sequence number known durable in the journal (covered by a finished fdatasync).
        self.durable_seq = 0
        # Highest sequence number written to the ring file (page cache) by write_batch.
        self.written_seq = 0
        # Ring space before this position may be reused: it is the head of a durable checkpoint.
        self.checkpoint_head_lpos = 0
        # Set by the first failed write or sync of the ring: after an I/O error on a file no
        # later sync of it proves anything (the kernel may have dropped the dirty pages and
        # reports the error once), so every later sync fails with it too.
        self.io_error: OSError | None = None
        # The origin time of the newest record staged, and its number: what tells two
        # histories with the same numbers apart once the record itself is freed (stamp_of).
        self.last_stamp: tuple[int, int] = (0, 0)
        self._batch: list[tuple[int, list[Buffer]]] = []
        self._batch_end = -1
        self._batch_seq = 0

    # --- positions ------------------------------------------------------------------------------

    @property
    def head_seq(self) -> int:
        return self.records[0].seq if self.records else self.next_seq

    @property
    def head_lpos(self) -> int:
        return self.records[0].lpos if self.records else self.tail_lpos

    def stamp_of(self, seq: int) -> int:
        """The origin time of record ``seq`` (time_ns of the host's write at its primary),
        0 when this journal no longer knows it. Two units whose records of one number have
        different stamps hold different histories from there on."""
        records = self.records
        if records and records[0].seq <= seq <= records[-1].seq:
            return records[seq - records[0].seq].timestamp_ns
        last_seq, stamp = self.last_stamp
        return stamp if seq == last_seq else 0

    @property
    def used(self) -> int:
        return self.tail_lpos - self.checkpoint_head_lpos

    @property
    def capacity(self) -> int:
        return self.ring.capacity

    def max_payload(self) -> int:
        """The largest payload one record may carry (bigger writes are split)."""
        return self.ring.max_payload

    def max_write(self) -> int:
        """The largest write an empty ring takes for sure (:meth:`Ring.max_write`)."""
        return self.ring.max_write(MAX_WRITE)

    def fits(self, payload_len: int) -> bool:
        size = record_size(payload_len)
        return self.ring.place(self.tail_lpos, size).new_tail - self.checkpoint_head_lpos <= (
            self.ring.capacity
        )

    # --- appending ------------------------------------------------------------------------------

    def stage(
        self,
        kind: Kind,
        offset: int,
        length: int,
        payload: Sequence[Buffer] = (),
        *,
        seq: int | None = None,
        timestamp_ns: int | None = None,
        origin: int | None = None,
    ) -> Record:
        """Encode one record into the current batch; returns it as placed (without data).

        The caller checked :meth:`fits`. ``seq``: a secondary keeps its source's numbering, so
        it passes the number the record arrived with; it must be the next one (the link
        guarantees it). ``timestamp_ns`` and ``origin``: a secondary keeps those of the write at
        its primary too; a host write gets the time now and this journal's :attr:`origin`.
        """
        if seq is not None and seq != self.next_seq:
            raise JournalError(f"record seq {seq} arrived, {self.next_seq} was expected")
        payload_len = length if kind in PAYLOAD_KINDS else 0
        size = record_size(payload_len)
        placement = self.ring.place(self.tail_lpos, size)
        seq = self.next_seq
        if placement.pad_len and placement.pad_header:
            pad = RecordHeader(
                Kind.PADDING, seq, 0, 0, 0, self.durable_seq, placement.pad_payload_len
            )
            self._add_iov(placement.pad_lpos, record_iov(pad), HEADER_SIZE)
        now = time.time_ns() if timestamp_ns is None else timestamp_ns
        origin = self.origin if origin is None else origin
        header = RecordHeader(kind, seq, now, offset, length, self.durable_seq, payload_len, origin)
        self._add_iov(placement.record_lpos, record_iov(header, payload), size)
        rec = Record(
            kind=kind,
            offset=offset,
            length=length,
            seq=seq,
            timestamp_ns=now,
            origin=origin,
            lpos=placement.record_lpos,
            size=size,
        )
        rec.cum = (self.records[-1].cum if self.records else 0) + size
        self.records.append(rec)
        self.last_stamp = (seq, now)
        if kind == Kind.WRITE:
            self.recent_writes.appendleft(offset)  # for the volume's fingerprint
        self.next_seq = seq + 1
        self.tail_lpos = placement.new_tail
        self._batch_seq = seq
        return rec

    def _add_iov(self, lpos: int, iov: list[Buffer], nbytes: int) -> None:
        """Queue ``nbytes`` of buffers for ``lpos``, extending the current run when contiguous."""
        pos = self.ring.physical(lpos)
        if self._batch and self._batch_end == pos:
            self._batch[-1][1].extend(iov)
        else:
            self._batch.append((pos, iov))
        self._batch_end = pos + nbytes

    @property
    def batch_pending(self) -> bool:
        return bool(self._batch)

    def write_batch(self) -> None:
        """Write every staged record to the ring: one pwritev per contiguous run."""
        if self.io_error is not None:
            raise self.io_error
        batch, self._batch = self._batch, []
        try:
            for pos, bufs in batch:
                self.file.pwritev(pos, bufs)
        except OSError as exc:
            self.io_error = exc
            raise
        if batch:
            self.written_seq = self._batch_seq

    def sync(self) -> int:
        """Flush the journal file (blocking: call in a thread); returns the seq now durable."""
        if self.io_error is not None:
            raise self.io_error
        target = self.written_seq
        try:
            self.file.flush()
        except OSError as exc:
            self.io_error = exc
            raise
        return target

    # --- reading --------------------------------------------------------------------------------

    def read_run(self, seq: int, last_seq: int, max_bytes: int) -> tuple[list[Record], bytes]:
        """Records from ``seq`` to at most ``last_seq``, as the bytes the ring holds.

        The run is consecutive records lying contiguously in the ring (it stops at the wrap)
        and, past its first record, at most ``max_bytes`` long; the bytes are whole records in
        journal format, headers included, ready to stream. Empty when ``seq`` is past
        ``last_seq`` or not yet written. Raises :class:`RecordsGone` when ``seq`` was freed.
        Blocking only as far as the page cache is (a read of recently written bytes).
        """
        records = self.records
        if not records or seq > last_seq or seq >= self.next_seq:
            return [], b""
        if seq < records[0].seq:
            raise RecordsGone(f"journal {self.path}: records from {seq} were freed")
        index = seq - records[0].seq
        run: list[Record] = []
        total = 0
        while index < len(records):
            rec = records[index]
            if rec.seq > last_seq:
                break
            if run and (rec.lpos != run[-1].lpos + run[-1].size or total + rec.size > max_bytes):
                break
            run.append(rec)
            total += rec.size
            index += 1
        if not run:
            return [], b""
        length = run[-1].lpos + run[-1].size - run[0].lpos
        return run, self.file.pread(self.ring.physical(run[0].lpos), length)

    def read_payload(self, rec: Record) -> bytes:
        """The data of a live WRITE record, read from the ring (blocking)."""
        return self.file.pread(self.ring.physical(rec.lpos) + HEADER_SIZE, rec.length)

    # --- closing --------------------------------------------------------------------------------

    def abandon(self) -> None:
        """Drop the journal as a crash would: no checkpoint, no sync; its file is closed.

        The consumers' dirty maps stay open (the caller closes them as it needs).
        """
        if not self._closed:
            self._closed = True
            self.file.close()

    @property
    def fd(self) -> int:
        """The journal file's descriptor, for tests and tools that read the file directly;
        -1 once closed, or when the file is not a :class:`JournalFile`. Close it with
        :meth:`abandon` (or the journal's ``close``), never directly."""
        if self._closed or not isinstance(self.file, JournalFile):
            return -1
        return self.file.fileno()
