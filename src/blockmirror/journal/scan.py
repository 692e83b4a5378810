"""Finding the end of the log after a restart, and telling a torn tail from corruption.

The scan is pure reading: it returns what it found and never changes the file, so the daemon, the
recovery command and the tests all use the same function.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from blockmirror.errors import JournalError
from blockmirror.io.fileio import pread_all
from blockmirror.journal.format import (
    HEADER_SIZE,
    MAGIC,
    Kind,
    RecordError,
    RecordHeader,
    decode_header,
    verify_record,
)
from blockmirror.journal.ring import Ring

# Where the scan for later records (past a bad one) reads, in bytes at a time.
_SCAN_CHUNK = 4 * 1024 * 1024
_MAGIC_BYTES = MAGIC.to_bytes(4, "little")


@dataclass(frozen=True, slots=True)
class FoundRecord:
    """A valid live record as found by the scan (payloads stay on disk)."""

    seq: int
    lpos: int
    size: int
    kind: Kind
    offset: int
    length: int
    timestamp_ns: int


@dataclass(frozen=True, slots=True)
class BadRecord:
    lpos: int
    expected_seq: int
    reason: str
    # The header decoded and carried the expected sequence number: a record that was being
    # written (a torn tail), as opposed to leftovers of an earlier lap or never-written space.
    torn: bool = False


@dataclass(frozen=True, slots=True)
class ScanResult:
    records: list[FoundRecord]
    tail_lpos: int
    next_seq: int
    # Where the log stopped, when it stopped at something other than clean end-of-data.
    stop: BadRecord | None
    # A later valid record proving the bad one had been durable: corruption, not a torn tail.
    corruption_witness: FoundRecord | None

    @property
    def corrupt(self) -> bool:
        return self.corruption_witness is not None


class JournalCorruptError(JournalError):
    """A record in the middle of the log is damaged; the volume must not be served."""

    def __init__(self, path: str, bad: BadRecord, witness: FoundRecord) -> None:
        self.bad = bad
        self.witness = witness
        super().__init__(
            f"journal {path} is corrupt: record seq {bad.expected_seq} at ring position "
            f"{bad.lpos} is damaged ({bad.reason}), but record seq {witness.seq} after it "
            f"shows it had been made durable; run `blockmirror journal recover` to resync"
        )


def _read_record(fd: int, ring: Ring, lpos: int, expected_seq: int) -> tuple[FoundRecord, bool]:
    """The record at ``lpos``; the flag says it is padding. Raises RecordError if invalid."""
    pos = ring.physical(lpos)
    room = ring.space_to_end(lpos)
    head = pread_all(fd, HEADER_SIZE, pos)
    h = decode_header(head)
    if h.seq != expected_seq:
        raise RecordError(f"sequence number {h.seq}, expected {expected_seq}")
    if h.kind == Kind.PADDING:
        if HEADER_SIZE + h.payload_len != room:
            raise RecordError(f"padding of {h.payload_len} bytes does not reach the ring end")
        verify_record(head)
        return FoundRecord(h.seq, lpos, room, h.kind, 0, 0, h.timestamp_ns), True
    if h.size > room:
        raise RecordError(f"record of {h.size} bytes runs past the ring end ({room} left)")
    payload = pread_all(fd, h.payload_len, pos + HEADER_SIZE) if h.payload_len else b""
    verify_record(head, payload)
    return FoundRecord(h.seq, lpos, h.size, h.kind, h.offset, h.length, h.timestamp_ns), False


def scan(fd: int, ring: Ring, head_lpos: int, head_seq: int, durable_before: int) -> ScanResult:
    """Walk the log from the checkpoint's head to its end.

    ``durable_before``: records with a lower sequence number were durable when the checkpoint was
    written (the checkpoint syncs the journal first), so a bad one among them is corruption even
    with no later record to witness it.
    """
    records: list[FoundRecord] = []
    lpos = ring.header_lpos(head_lpos)
    seq = head_seq
    stop: BadRecord | None = None
    while lpos - head_lpos < ring.capacity:
        try:
            rec, padding = _read_record(fd, ring, lpos, seq)
        except RecordError as exc:
            stop = BadRecord(lpos, seq, str(exc), _header_seq(fd, ring, lpos) == seq)
            break
        if padding:
            lpos += rec.size
            continue
        records.append(rec)
        seq += 1
        lpos = ring.header_lpos(lpos + rec.size)
    witness = None
    if stop is not None:
        witness = _find_witness(fd, ring, head_lpos, stop)
        if witness is None and stop.expected_seq < durable_before:
            witness = FoundRecord(durable_before - 1, -1, 0, Kind.FLUSH, 0, 0, 0)
    return ScanResult(records, lpos, seq, stop, witness)


def _header_seq(fd: int, ring: Ring, lpos: int) -> int | None:
    header = _try_header(fd, ring, lpos)
    return header.seq if header is not None else None


def _try_header(fd: int, ring: Ring, lpos: int) -> RecordHeader | None:
    try:
        return decode_header(pread_all(fd, HEADER_SIZE, ring.physical(lpos)))
    except RecordError:
        return None


def _candidates(fd: int, ring: Ring, start: int, end: int) -> Iterator[tuple[int, RecordHeader]]:
    """Every 8-aligned position in [start, end) holding something that decodes as a header."""
    lpos = start
    while lpos < end:
        length = min(_SCAN_CHUNK, end - lpos, ring.space_to_end(lpos))
        chunk = pread_all(fd, length, ring.physical(lpos))
        at = chunk.find(_MAGIC_BYTES)
        while at != -1:
            cand = lpos + at
            if cand % 8 == 0 and ring.space_to_end(cand) >= HEADER_SIZE:
                header = _try_header(fd, ring, cand)
                if header is not None:
                    yield cand, header
            at = chunk.find(_MAGIC_BYTES, at + 1)
        # Chunks start and end 8-aligned, so an aligned magic never straddles two of them.
        lpos += length


def _find_witness(fd: int, ring: Ring, head_lpos: int, bad: BadRecord) -> FoundRecord | None:
    """A valid record after ``bad`` whose ``durable_seq`` covers it, if the ring holds one.

    Records of earlier laps have lower sequence numbers and do not count; records of the same
    unsynced tail have a lower ``durable_seq`` and do not count.
    """
    for lpos, h in _candidates(fd, ring, bad.lpos + 8, head_lpos + ring.capacity):
        if h.seq > bad.expected_seq and h.durable_seq >= bad.expected_seq:
            try:
                rec, _ = _read_record(fd, ring, lpos, h.seq)
            except RecordError:
                continue
            return rec
    return None


def erase_stale_headers(fd: int, ring: Ring, tail_lpos: int, head_lpos: int, next_seq: int) -> int:
    """Zero every header past the end of the log that carries a number the log will reuse.

    After a crash the end of the log may be followed by records of the same unsynced batch (the
    torn record's successors). New appends reuse their sequence numbers at the same positions,
    so one of them could line up with where a later scan expects the next record and be
    replayed over newer data. Returns how many were erased past the torn record at the cut
    itself (those are what prove a later batch was written); the caller syncs.
    """
    erased = 0
    for lpos, h in _candidates(fd, ring, tail_lpos, head_lpos + ring.capacity):
        if h.seq >= next_seq:
            os.pwrite(fd, bytes(HEADER_SIZE), ring.physical(lpos))
            # The torn record itself sits at the cut; only records *past* it count.
            if lpos != tail_lpos:
                erased += 1
    return erased
