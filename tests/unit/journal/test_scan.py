"""The start-up scan reads the ring in chunks and decodes records from the buffer (issue 15).

What it finds must be exactly what a walk record by record with :func:`read_record` finds (the
scan before chunks, kept here as the reference): the same records, the same end of the log, the
same reason and torn flag at a bad record, the same witness of corruption. The chunk sizes are
made small here so that records straddle chunk boundaries, runs of records wrap around the
ring's end (padding, or fewer than 64 bytes skipped), and some records are larger than a chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.journal import scan as scan_module
from blockmirror.journal.format import (
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Kind,
    RecordError,
    RecordHeader,
    encode_header,
)
from blockmirror.journal.record import Record
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.ringlog import RingLog
from blockmirror.journal.scan import (
    BadRecord,
    ScanResult,
    erase_stale_headers,
    header_candidates,
    magic_positions,
    read_header,
    read_record,
    scan,
)
from blockmirror.journal.storage import JournalFile
from blockmirror.store.base import Store

CAPACITY = 64 * 1024


def reference_scan(
    store: Store, ring: Ring, head_lpos: int, head_seq: int, durable_before: int
) -> ScanResult:
    """The scan as it was before chunks: one read_record per record."""
    records: list[Record] = []
    lpos = ring.header_lpos(head_lpos)
    seq = head_seq
    stop: BadRecord | None = None
    while lpos - head_lpos < ring.capacity:
        try:
            rec = read_record(store, ring, lpos, seq)
        except RecordError as exc:
            header = read_header(store, ring, lpos)
            stop = BadRecord(lpos, seq, str(exc), header is not None and header.seq == seq)
            break
        if rec.kind == Kind.PADDING:
            lpos += rec.size
            continue
        records.append(rec)
        seq += 1
        lpos = ring.header_lpos(lpos + rec.size)
    witness = None
    later = None
    if stop is not None:
        witness = reference_witness(store, ring, head_lpos, stop)
        if witness is None:
            end = head_lpos + ring.capacity
            found = reference_candidates(store, ring, stop.lpos + 8, end)
            later = tuple((lpos, h) for lpos, h in found if h.seq >= stop.expected_seq)
        if witness is None and stop.expected_seq < durable_before:
            witness = Record(kind=Kind.FLUSH, offset=0, length=0, seq=durable_before - 1)
    return ScanResult(records, lpos, seq, stop, witness, later)


def reference_candidates(
    store: Store, ring: Ring, start: int, end: int
) -> Iterator[tuple[int, RecordHeader]]:
    """Header candidates as they were found before: a read of the header at every magic."""
    for lpos in magic_positions(store, ring, start, end):
        header = read_header(store, ring, lpos)
        if header is not None:
            yield lpos, header


def reference_witness(store: Store, ring: Ring, head_lpos: int, bad: BadRecord) -> Record | None:
    for lpos, h in reference_candidates(store, ring, bad.lpos + 8, head_lpos + ring.capacity):
        if h.seq > bad.expected_seq and h.durable_seq >= bad.expected_seq:
            try:
                return read_record(store, ring, lpos, h.seq)
            except RecordError:
                continue
    return None


def reference_erase(store: Store, ring: Ring, tail_lpos: int, head_lpos: int, next_seq: int) -> int:
    erased = 0
    for lpos, h in reference_candidates(store, ring, tail_lpos, head_lpos + ring.capacity):
        if h.seq >= next_seq:
            store.pwrite(ring.physical(lpos), bytes(HEADER_SIZE))
            if lpos != tail_lpos:
                erased += 1
    return erased


@contextlib.contextmanager
def chunks(first: int, most: int) -> Iterator[None]:
    """The scan's first read and largest read, made small."""
    with (
        mock.patch.object(scan_module, "_FIRST_READ", first),
        mock.patch.object(scan_module, "READ_CHUNK", most),
    ):
        yield


@dataclass
class Built:
    log: RingLog
    head_lpos: int
    head_seq: int

    @property
    def records(self) -> list[Record]:
        """The log's live records as a scan finds them (without the log's running sums)."""
        return [dataclasses.replace(r, cum=0) for r in self.log.records]


def build(path: Path, ops: list[tuple[int, int]], drop: int) -> Built:
    """A ring whose log is the records ``ops`` made (kind, payload length), after dropping the
    oldest ``drop`` records each time the ring has no room: laps wrap around its end."""
    ring = Ring(CAPACITY)
    log = RingLog(path, JournalFile.create(path, DATA_START + CAPACITY), ring)
    offset = 0
    for i, (kind, length) in enumerate(ops):
        payload_len = length if kind in (Kind.WRITE, Kind.BOOKMARK) else 0
        while not log.fits(payload_len):
            for _ in range(max(1, drop)):
                if log.records:
                    log.records.popleft()
            log.checkpoint_head_lpos = log.head_lpos
        payload = [os.urandom(payload_len)] if payload_len else []
        log.stage(Kind(kind), offset, length if kind != Kind.FLUSH else 0, payload)
        # Mostly sequential, sometimes back to the start: runs and breaks of runs.
        offset = 0 if i % 7 == 6 else offset + max(length, 1)
        if i % 3 == 2:
            log.write_batch()
    log.write_batch()
    return Built(log, log.head_lpos, log.head_seq)


RECORDS = st.lists(
    st.one_of(
        st.tuples(st.just(int(Kind.WRITE)), st.integers(0, 3000)),
        st.tuples(st.just(int(Kind.WRITE)), st.integers(20_000, 30_000)),
        # 15 of these leave 16 bytes at the end of a lap: skipped without a header.
        st.tuples(st.just(int(Kind.WRITE)), st.just(4304)),
        st.tuples(st.sampled_from([int(Kind.ZERO), int(Kind.TRIM)]), st.integers(1, 9000)),
        st.tuples(st.just(int(Kind.FLUSH)), st.just(0)),
        st.tuples(st.just(int(Kind.BOOKMARK)), st.integers(1, 200)),
    ),
    min_size=0,
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=RECORDS,
    drop=st.integers(1, 4),
    first=st.sampled_from([64, 200, 4096]),
    most=st.sampled_from([4096, 8192, 1 << 20]),
    damage=st.lists(st.tuples(st.integers(0, CAPACITY - 1), st.integers(1, 255)), max_size=3),
    durable_before=st.integers(0, 80),
)
def test_the_chunked_scan_finds_what_a_record_by_record_walk_finds(
    ops: list[tuple[int, int]],
    drop: int,
    first: int,
    most: int,
    damage: list[tuple[int, int]],
    durable_before: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = build(Path(tmp) / "j", ops, drop)
        store, ring = built.log.file, built.log.ring
        for at, flip in damage:
            # Flipped bits anywhere: headers, payloads, padding, stale laps.
            pos = ring.data_start + at
            store.pwrite(pos, bytes([store.pread(pos, 1)[0] ^ flip]))
        expected = reference_scan(store, ring, built.head_lpos, built.head_seq, durable_before)
        with chunks(first, most):
            found = scan(store, ring, built.head_lpos, built.head_seq, durable_before)
        assert found == expected
        if not damage:
            assert found.records == built.records
        store.close()


def test_a_record_straddling_a_chunk_boundary_is_read_again_whole(tmp_path: Path) -> None:
    built = build(tmp_path / "j", [(int(Kind.WRITE), 1000)] * 40, 1)
    store, ring = built.log.file, built.log.ring
    reads: list[int] = []
    original = store.preadinto

    def counted(offset: int, buf: memoryview | bytearray) -> None:
        reads.append(offset - ring.data_start)
        original(offset, buf)

    with chunks(4096, 4096), mock.patch.object(store, "preadinto", counted):
        found = scan(store, ring, built.head_lpos, built.head_seq, 0)
    assert found.records == built.records and len(found.records) == 40
    assert found.stop is not None and not found.stop.torn and found.corruption_witness is None
    # Records of 1064 bytes: a read of 4096 holds three whole, the fourth straddles its end and
    # the next read starts there. 14 reads for 40 records, none of them per record.
    assert reads == [3 * 1064 * i for i in range(14)]
    assert found.tail_lpos == 40 * 1064


@pytest.mark.parametrize(
    ("length", "end"),
    [
        # 16 records of 4096 bytes fill a lap exactly.
        (4032, "exact"),
        # 15 records of 4160 bytes leave 3136 bytes: a padding record takes them.
        (4096, "padding"),
        # 15 records of 4368 bytes leave 16 bytes: too few for a header, skipped without one.
        (4304, "skipped"),
    ],
)
def test_the_scan_follows_the_log_around_the_end_of_the_ring(
    tmp_path: Path, length: int, end: str
) -> None:
    built = build(tmp_path / "j", [(int(Kind.WRITE), length)] * 40, 2)
    log, ring = built.log, built.log.ring
    records = built.records
    assert records[0].lpos // ring.capacity < records[-1].lpos // ring.capacity
    gaps = {b.lpos - (a.lpos + a.size) for a, b in itertools.pairwise(records)}
    assert gaps == {{"exact": 0, "padding": 3136, "skipped": 16}[end], 0}
    for first, most in ((64, 4096), (4096, 1 << 20), (1 << 20, 1 << 20)):
        with chunks(first, most):
            found = scan(log.file, ring, built.head_lpos, built.head_seq, 0)
        assert found.records == records
        assert found.tail_lpos == log.tail_lpos and found.next_seq == log.next_seq
        assert found == reference_scan(log.file, ring, built.head_lpos, built.head_seq, 0)
    log.file.close()


def test_a_record_larger_than_a_chunk_is_checked_by_read_record(tmp_path: Path) -> None:
    built = build(tmp_path / "j", [(int(Kind.WRITE), 20_000), (int(Kind.WRITE), 100)] * 3, 1)
    store, ring = built.log.file, built.log.ring
    calls: list[int] = []

    def counted(file: Store, ring_: Ring, lpos: int, seq: int) -> Record:
        calls.append(seq)
        return read_record(file, ring_, lpos, seq)

    with chunks(4096, 8192), mock.patch.object(scan_module, "read_record", counted):
        found = scan(store, ring, built.head_lpos, built.head_seq, 0)
    assert found.records == built.records
    # The three large ones, and the end of the log.
    assert calls == [1, 3, 5, 7]


def test_damage_is_reported_as_the_record_by_record_walk_reports_it(tmp_path: Path) -> None:
    built = build(tmp_path / "j", [(int(Kind.WRITE), 3000)] * 10, 1)
    store, ring = built.log.file, built.log.ring
    victim = built.log.records[4]
    # A payload byte of record 5: a CRC mismatch with the expected number, so a torn record.
    pos = ring.physical(victim.lpos) + HEADER_SIZE + 17
    store.pwrite(pos, bytes([store.pread(pos, 1)[0] ^ 1]))
    with chunks(4096, 8192):
        found = scan(store, ring, built.head_lpos, built.head_seq, 0)
    assert found == reference_scan(store, ring, built.head_lpos, built.head_seq, 0)
    assert found.stop is not None and found.stop.torn and found.stop.expected_seq == 5
    assert "crc mismatch" in found.stop.reason
    # Records 6.. were written with durable_seq 0 (never synced): a torn tail, not corruption.
    assert found.corruption_witness is None and len(found.records) == 4
    # Below the checkpoint's next_seq the same damage is corruption.
    with chunks(4096, 8192):
        assert scan(store, ring, built.head_lpos, built.head_seq, 6).corrupt


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=RECORDS,
    drop=st.integers(1, 4),
    cut=st.integers(0, 59),
    renumber=st.integers(-3, 3),
    overlap=st.booleans(),
)
def test_stale_headers_are_found_and_erased_as_a_header_read_at_each_magic_finds_them(
    ops: list[tuple[int, int]], drop: int, cut: int, renumber: int, overlap: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = build(Path(tmp) / "j", ops, drop)
        store, ring = built.log.file, built.log.ring
        records = built.records
        at_cut = records[cut] if cut < len(records) else None
        tail = at_cut.lpos if at_cut else built.log.tail_lpos
        next_seq = max(1, (at_cut.seq if at_cut else built.log.next_seq) + renumber)
        if overlap and ring.space_to_end(tail) >= 72:
            # Two headers 8 bytes apart, both decoding: erasing the first zeroes the second's
            # magic, so the second is no header any more (and is not erased past its end).
            second = encode_header(RecordHeader(Kind.FLUSH, next_seq + 5, 1, 0, 0, 0, 0))
            first = struct.pack("<IHH", MAGIC, VERSION, int(Kind.FLUSH))
            store.pwrite(ring.physical(tail), first + second)
        end = built.head_lpos + ring.capacity
        assert list(header_candidates(store, ring, tail, end)) == list(
            reference_candidates(store, ring, tail, end)
        )
        assert list(header_candidates(store, ring, tail, end, min_seq=next_seq)) == [
            (lpos, h)
            for lpos, h in reference_candidates(store, ring, tail, end)
            if h.seq >= next_seq
        ]
        copies = []
        for name in ("reference", "scanned", "reference-of-scanned"):
            copy = Path(tmp) / name
            copy.write_bytes(Path(tmp, "j").read_bytes())
            copies.append(JournalFile.open_existing(copy))
        reference, rescanned, reference2 = copies
        expected = reference_erase(reference, ring, tail, built.head_lpos, next_seq)
        assert erase_stale_headers(store, ring, tail, built.head_lpos, next_seq) == expected
        assert store.pread(0, store.size) == reference.pread(0, reference.size)
        # With the scan's search passed on, the same; the log ends at a torn record when
        # the one at the cut has a payload (its header is then erased too).
        if at_cut is not None and at_cut.length and at_cut.kind == Kind.WRITE:
            pos = ring.physical(at_cut.lpos) + HEADER_SIZE
            for copy_ in (rescanned, reference2):
                copy_.pwrite(pos, bytes([copy_.pread(pos, 1)[0] ^ 0x40]))
        result = scan(rescanned, ring, built.head_lpos, built.head_seq, 0)
        found = erase_stale_headers(
            rescanned, ring, result.tail_lpos, built.head_lpos, result.next_seq, scanned=result
        )
        again = reference_erase(
            reference2, ring, result.tail_lpos, built.head_lpos, result.next_seq
        )
        if result.later is not None:
            assert found == again
            assert rescanned.pread(0, rescanned.size) == reference2.pread(0, reference2.size)
        for file in (store, *copies):
            file.close()
