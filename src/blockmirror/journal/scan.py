"""Finding the end of the log after a restart, and telling a torn tail from corruption.

:func:`scan` is pure reading: it returns what it found and never changes the file, so the
journal's start, the offline repair (:mod:`blockmirror.offline.repair`) and the tests all use
the same function. The helpers below it (reading one record, finding header candidates in a
stretch of the ring) are shared with the repair, which walks past damage the scan stops at.
:func:`erase_stale_headers`, the one writer here, is what a start does with the scan's result.

The scan and the searches read the ring in large chunks (up to :data:`READ_CHUNK`, a chunk never
crossing the ring's end) and decode the records from the buffer: a full journal of small records
is a quarter of a million of them per GiB, and two ``pread``s and a header object each were most
of the start's time (docs/benchmarks.md, "Results: recovery of a full journal"). A record the
buffer cannot decide (damaged, or larger than a chunk) is read again on its own with
:func:`read_record`, so what the scan accepts and the reason it stops are exactly that
function's.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from crc32c import crc32c

from blockmirror.errors import JournalError
from blockmirror.journal.format import (
    CRC_OFFSET,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    MAX_BOOKMARK,
    RECORD_ALIGN,
    VERSION,
    Kind,
    RecordError,
    RecordHeader,
    decode_header,
    verify_record,
)
from blockmirror.journal.record import Record
from blockmirror.journal.ring import Ring
from blockmirror.journal.storage import as_store
from blockmirror.store.base import Store

__all__ = [
    "BadRecord",
    "JournalCorruptError",
    "ScanResult",
    "erase_stale_headers",
    "header_candidates",
    "magic_positions",
    "read_header",
    "read_record",
    "scan",
]

# The most the scan reads at a time. Its first read is _FIRST_READ (most starts find a short log,
# and the offline repair scans many short runs), each next one twice as large.
READ_CHUNK = 8 * 1024 * 1024
_FIRST_READ = 256 * 1024
# Where the search for later records (past a bad one) reads, in bytes at a time.
_SCAN_CHUNK = 4 * 1024 * 1024
_MAGIC_BYTES = MAGIC.to_bytes(4, "little")
_KINDS = {int(k): k for k in Kind}
# A header's sequence number, for passing over stale headers without decoding them.
_SEQ = struct.Struct("<Q")
_SEQ_OFFSET = 8
# What _decode_chunk sets in each Record it makes (it does not call __init__): a field added to
# Record must be added there too.
_RECORD_FIELDS = (
    "kind",
    "offset",
    "length",
    "data",
    "seq",
    "timestamp_ns",
    "origin",
    "lpos",
    "size",
    "cum",
)
assert tuple(f.name for f in dataclasses.fields(Record)) == _RECORD_FIELDS, "see _decode_chunk"
# Plain ints: comparing with an enum member costs an attribute lookup on the hot path.
_WRITE = int(Kind.WRITE)
_PADDING = int(Kind.PADDING)
_BOOKMARK = int(Kind.BOOKMARK)


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
    # The valid live records, placed (``lpos``, ``size``) and without their data.
    records: list[Record]
    tail_lpos: int
    next_seq: int
    # Where the log stopped, when it stopped at something other than clean end-of-data.
    stop: BadRecord | None
    # A later valid record proving the bad one had been durable: corruption, not a torn tail.
    corruption_witness: Record | None
    # Every header past the stop numbered at or above it (``header_candidates`` from 8 bytes
    # past the stop to a lap from the head), which the search for a witness went through;
    # None when it did not go through them all (no stop, or a witness found).
    later: tuple[tuple[int, RecordHeader], ...] | None = None

    @property
    def corrupt(self) -> bool:
        return self.corruption_witness is not None


class JournalCorruptError(JournalError):
    """A record in the middle of the log is damaged; the volume must not be served."""

    def __init__(self, path: str, bad: BadRecord, witness: Record) -> None:
        self.bad = bad
        self.witness = witness
        super().__init__(
            f"journal {path} is corrupt: record seq {bad.expected_seq} at ring position "
            f"{bad.lpos} is damaged ({bad.reason}), but record seq {witness.seq} after it "
            f"shows it had been made durable; run `blockmirror journal recover` to resync"
        )


def read_record(file: Store, ring: Ring, lpos: int, expected_seq: int) -> Record:
    """The whole, valid record (or padding) at ``lpos``, without its data.

    Raises :class:`RecordError` saying why it is not: no header, another sequence number, a
    record that runs past the ring's end, a padding that does not reach it, a CRC mismatch.
    """
    pos = ring.physical(lpos)
    room = ring.space_to_end(lpos)
    head = file.pread(pos, HEADER_SIZE)
    h = decode_header(head)
    if h.seq != expected_seq:
        raise RecordError(f"sequence number {h.seq}, expected {expected_seq}")
    if h.kind == Kind.PADDING:
        if HEADER_SIZE + h.payload_len != room:
            raise RecordError(f"padding of {h.payload_len} bytes does not reach the ring end")
        verify_record(head)
    else:
        if h.size > room:
            raise RecordError(f"record of {h.size} bytes runs past the ring end ({room} left)")
        payload = file.pread(pos + HEADER_SIZE, h.payload_len) if h.payload_len else b""
        verify_record(head, payload)
    return Record.from_header(h, lpos=lpos)


def read_header(file: Store, ring: Ring, lpos: int) -> RecordHeader | None:
    """The header at ``lpos`` if the bytes there decode as one (its CRC is not checked)."""
    try:
        return decode_header(file.pread(ring.physical(lpos), HEADER_SIZE))
    except RecordError:
        return None


def magic_positions(file: Store, ring: Ring, start: int, end: int) -> Iterator[int]:
    """Every 8-aligned position in ``[start, end)`` that holds a record magic and has room
    for a header before the ring's end (where a record header could begin)."""
    for lpos, _, _ in _magic_hits(file, ring, start, end):
        yield lpos


def _magic_hits(file: Store, ring: Ring, start: int, end: int) -> Iterator[tuple[int, bytes, int]]:
    """:func:`magic_positions`, each with the chunk it was found in and where in it."""
    lpos = -(-start // RECORD_ALIGN) * RECORD_ALIGN
    while lpos < end:
        length = min(_SCAN_CHUNK, end - lpos, ring.space_to_end(lpos))
        chunk = file.pread(ring.physical(lpos), length)
        at = chunk.find(_MAGIC_BYTES)
        while at != -1:
            # Chunks start 8-aligned, so alignment within a chunk is alignment in the ring,
            # and an aligned magic never straddles two chunks.
            cand = lpos + at
            if at % RECORD_ALIGN == 0 and ring.space_to_end(cand) >= HEADER_SIZE:
                yield cand, chunk, at
            at = chunk.find(_MAGIC_BYTES, at + 1)
        lpos += length


def header_candidates(
    file: Store, ring: Ring, start: int, end: int, *, min_seq: int = 0
) -> Iterator[tuple[int, RecordHeader]]:
    """Every 8-aligned position in ``[start, end)`` holding bytes that decode as a header.

    ``min_seq``: only headers numbered at least that (the others are passed over before a
    header object is made: the search past the end of a log walks every stale record of the
    ring's earlier laps). A header is decoded from the chunk the search read, or read on its
    own where it runs past the chunk. The file must not change meanwhile, except as
    :func:`erase_stale_headers` changes it.
    """
    seq_at = _SEQ.unpack_from
    for lpos, chunk, at in _magic_hits(file, ring, start, end):
        header: RecordHeader | None
        if at + HEADER_SIZE <= len(chunk):
            if seq_at(chunk, at + _SEQ_OFFSET)[0] < min_seq:
                continue
            try:
                header = decode_header(memoryview(chunk)[at : at + HEADER_SIZE])
            except RecordError:
                continue
        else:
            header = read_header(file, ring, lpos)
            if header is None or header.seq < min_seq:
                continue
        yield lpos, header


def scan(
    file: Store | int, ring: Ring, head_lpos: int, head_seq: int, durable_before: int
) -> ScanResult:
    """Walk the log from the checkpoint's head to its end.

    ``file``: the journal file as a store, or a descriptor of it. ``durable_before``: records
    with a lower sequence number were durable when the checkpoint was written (the checkpoint
    syncs the journal first), so a bad one among them is corruption even with no later record
    to witness it. Blocking I/O.

    The ring is read in chunks of up to :data:`READ_CHUNK` bytes and every record (its header
    and the CRC over its payload) is checked in the buffer. Where the buffer does not show a
    whole valid record, :func:`read_record` reads that one again on its own and has the last
    word: it says why the log stops there, or accepts a record too large for a chunk.
    """
    store = as_store(file)
    records: list[Record] = []
    end = head_lpos + ring.capacity
    lpos = ring.header_lpos(head_lpos)
    seq = head_seq
    stop: BadRecord | None = None
    want = _FIRST_READ
    buf = bytearray()
    while lpos < end and stop is None:
        # One chunk from lpos, never past the ring's end; it holds at least a header.
        lpos = ring.header_lpos(lpos)
        room = ring.space_to_end(lpos)
        length = min(want, room)
        if len(buf) < length:
            buf = bytearray(length)
        view = memoryview(buf)[:length]
        store.preadinto(ring.physical(lpos), view)
        lpos, seq, need = _decode_chunk(view, lpos, room, end, seq, records)
        if need < 0:
            # The buffer does not show a whole valid record at lpos: ask read_record.
            try:
                rec = read_record(store, ring, lpos, seq)
            except RecordError as exc:
                header = read_header(store, ring, lpos)
                stop = BadRecord(lpos, seq, str(exc), header is not None and header.seq == seq)
                break
            if rec.kind == Kind.PADDING:
                lpos += rec.size
            else:
                records.append(rec)
                seq += 1
                lpos = ring.header_lpos(lpos + rec.size)
        want = min(max(2 * want, need), READ_CHUNK)
    witness = None
    later: tuple[tuple[int, RecordHeader], ...] | None = None
    if stop is not None:
        witness, later = _find_witness(store, ring, head_lpos, stop)
        if witness is None and stop.expected_seq < durable_before:
            witness = Record(kind=Kind.FLUSH, offset=0, length=0, seq=durable_before - 1)
    return ScanResult(records, lpos, seq, stop, witness, later)


def _decode_chunk(
    view: memoryview, lpos: int, room: int, end: int, seq: int, records: list[Record]
) -> tuple[int, int, int]:
    """Decode the valid records (``seq`` on) that ``view``, the ring from ``lpos`` on, holds
    whole, appending them to ``records``; stop at ``end`` (a lap from the head).

    ``room``: bytes from ``lpos`` to the ring's end (``view`` is no longer). Returns the
    position and the sequence number reached, and what the caller does next: 0, read on from
    there (the log reached ``end``, the ring's end or the end of the buffer); a positive number
    of bytes, read a chunk of at least that many (a record runs past the buffer); -1, the
    bytes there are not a valid record that fits a chunk (:func:`read_record` decides).

    Sans-I/O. This is the loop of a start's recovery, once per record: one ``struct`` call,
    a few comparisons and the CRC, no header object.
    """
    unpack = HEADER_STRUCT.unpack_from
    new = object.__new__
    kinds = _KINDS
    append = records.append
    length = len(view)
    at = 0
    while lpos < end:
        if length - at < HEADER_SIZE:
            return lpos, seq, 0
        (
            magic,
            version,
            kind,
            rseq,
            timestamp_ns,
            offset,
            rlen,
            _durable,
            plen,
            origin,
            reserved,
            stored,
        ) = unpack(view, at)
        rest = room - at
        if magic != MAGIC or version != VERSION or reserved or rseq != seq:
            return lpos, seq, -1
        if kind == _WRITE:
            valid = plen == rlen
        elif kind == _PADDING:
            valid = HEADER_SIZE + plen == rest
        elif kind == _BOOKMARK:
            valid = plen == rlen and 0 < rlen <= MAX_BOOKMARK
        else:
            valid = plen == 0 and kind in kinds
        if not valid:
            return lpos, seq, -1
        crc = crc32c(view[at : at + CRC_OFFSET])
        if kind == _PADDING:
            # Its CRC covers its header alone; the next record is at the start of the ring.
            if crc != stored:
                return lpos, seq, -1
            return lpos + rest, seq, 0
        size = (HEADER_SIZE + plen + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)
        if size > rest:
            return lpos, seq, -1
        stop = at + HEADER_SIZE + plen
        if stop > length:
            # Runs past the buffer: read it whole from where it starts (read_record reads one
            # that no chunk holds, as it reads every record).
            return lpos, seq, size if size <= READ_CHUNK else -1
        if plen:
            crc = crc32c(view[at + HEADER_SIZE : stop], crc)
        if crc != stored:
            return lpos, seq, -1
        # Record(kind=..., ...) without the keyword call: a quarter of the loop's time.
        rec = new(Record)
        rec.kind = kinds[kind]
        rec.offset = offset
        rec.length = rlen
        rec.data = ()
        rec.seq = seq
        rec.timestamp_ns = timestamp_ns
        rec.origin = origin
        rec.lpos = lpos
        rec.size = size
        rec.cum = 0
        append(rec)
        seq += 1
        lpos += size
        at += size
        left = rest - size
        if 0 < left < HEADER_SIZE:
            # Too little before the ring's end for a header: the next lap (Ring.header_lpos).
            return lpos + left, seq, 0
    return lpos, seq, 0


def _find_witness(
    file: Store, ring: Ring, head_lpos: int, bad: BadRecord
) -> tuple[Record | None, tuple[tuple[int, RecordHeader], ...] | None]:
    """A valid record after ``bad`` whose ``durable_seq`` covers it, if the ring holds one; and
    when it does not, every header after ``bad`` numbered at or above it (ScanResult.later).

    Records of earlier laps have lower sequence numbers and do not count; records of the same
    unsynced tail have a lower ``durable_seq`` and do not count.
    """
    later: list[tuple[int, RecordHeader]] = []
    found = header_candidates(
        file, ring, bad.lpos + 8, head_lpos + ring.capacity, min_seq=bad.expected_seq
    )
    for lpos, h in found:
        later.append((lpos, h))
        if h.seq > bad.expected_seq and h.durable_seq >= bad.expected_seq:
            try:
                return read_record(file, ring, lpos, h.seq), None
            except RecordError:
                continue
    return None, tuple(later)


def erase_stale_headers(
    file: Store | int,
    ring: Ring,
    tail_lpos: int,
    head_lpos: int,
    next_seq: int,
    *,
    scanned: ScanResult | None = None,
) -> int:
    """Zero every header past the end of the log that carries a number the log will reuse.

    After a crash the end of the log may be followed by records of the same unsynced batch (the
    torn record's successors). New appends reuse their sequence numbers at the same positions,
    so one of them could line up with where a later scan expects the next record and be
    replayed over newer data. Returns how many were erased past the torn record at the cut
    itself (those are what prove a later batch was written); the caller syncs.

    ``scanned``: the scan that found this end of the log (``tail_lpos`` and ``next_seq`` its
    stop's), if the file has not changed since: the headers its search went through are
    taken instead of searching the rest of the ring again.
    """
    store = as_store(file)
    erased = 0
    erased_end = -1
    stale: Iterable[tuple[int, RecordHeader]]
    stop = scanned.stop if scanned is not None else None
    if (
        scanned is not None
        and scanned.later is not None
        and stop is not None
        and (stop.lpos, stop.expected_seq) == (tail_lpos, next_seq)
    ):
        at_tail = read_header(store, ring, tail_lpos)
        stale = [(tail_lpos, at_tail)] if at_tail is not None else []
        stale += [(lpos, h) for lpos, h in scanned.later if h.seq >= next_seq]
    else:
        end = head_lpos + ring.capacity
        stale = header_candidates(store, ring, tail_lpos, end, min_seq=next_seq)
    for lpos, h in stale:
        if lpos < erased_end:
            # Its magic lay in the header just zeroed (it begins less than 64 bytes after
            # it): there is no header there any more.
            continue
        if h.seq >= next_seq:
            store.pwrite(ring.physical(lpos), bytes(HEADER_SIZE))
            erased_end = lpos + HEADER_SIZE
            # The torn record itself sits at the cut; only records *past* it count.
            if lpos != tail_lpos:
                erased += 1
    return erased
