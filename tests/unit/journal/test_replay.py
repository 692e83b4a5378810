"""The replay of a start applies the ring's records in large reads and coalesced writes.

:class:`RingApplier` must leave the volume exactly as applying each record on its own
(:func:`apply_record`, a read of the ring and a write per record) leaves it, whatever the mix
of kinds, overlaps, runs of consecutive offsets, chunk boundaries and wraps of the ring; and it
must do it with one read per chunk and one write per run of consecutive writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.errors import JournalError
from blockmirror.journal import identity, opening
from blockmirror.journal import replay as replay_module
from blockmirror.journal.checkpoint import Checkpoint, VolumeIdentity
from blockmirror.journal.format import Kind
from blockmirror.journal.journal import Journal
from blockmirror.journal.record import Record
from blockmirror.journal.replay import RingApplier
from blockmirror.journal.ring import DATA_START, Ring
from blockmirror.journal.ringlog import RingLog, apply_record
from blockmirror.journal.storage import JournalFile
from blockmirror.store.base import Buffer, Store
from blockmirror.store.volume import Volume

CAPACITY = 64 * 1024
VOLUME = 256 * 1024
Op = tuple[int, int, int]  # kind, volume offset, length


def build(path: Path, ops: Sequence[Op]) -> RingLog:
    """A ring holding the records ``ops`` make, the oldest dropped when there is no room (so
    the log wraps around the ring's end)."""
    ring = Ring(CAPACITY)
    log = RingLog(path, JournalFile.create(path, DATA_START + CAPACITY), ring)
    for kind, offset, length in ops:
        payload_len = length if kind in (Kind.WRITE, Kind.BOOKMARK) else 0
        while not log.fits(payload_len):
            log.records.popleft()
            log.checkpoint_head_lpos = log.head_lpos
        payload = [os.urandom(payload_len)] if payload_len else []
        log.stage(Kind(kind), offset, length, payload)
    log.write_batch()
    return log


@contextlib.contextmanager
def replay_chunk(size: int, join_below: int = replay_module._JOIN_BELOW) -> Iterator[None]:
    with (
        mock.patch.object(replay_module, "REPLAY_CHUNK", size),
        mock.patch.object(replay_module, "_JOIN_BELOW", join_below),
    ):
        yield


class Counting:
    """Counts the calls a store gets (and passes them on)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: list[tuple[str, int, int]] = []

    def pread(self, offset: int, length: int) -> bytes:
        self.calls.append(("pread", offset, length))
        return self.store.pread(offset, length)

    def preadinto(self, offset: int, buf: memoryview | bytearray) -> None:
        self.calls.append(("preadinto", offset, memoryview(buf).nbytes))
        self.store.preadinto(offset, buf)

    def pwrite(self, offset: int, data: Buffer) -> None:
        self.calls.append(("pwrite", offset, memoryview(data).nbytes))
        self.store.pwrite(offset, data)

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self.calls.append(("pwritev", offset, sum(memoryview(b).nbytes for b in buffers)))
        self.store.pwritev(offset, buffers)

    def trim(self, offset: int, length: int) -> None:
        self.calls.append(("trim", offset, length))
        self.store.trim(offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        self.calls.append(("write_zeroes", offset, length))
        self.store.write_zeroes(offset, length, may_trim=may_trim)

    def writes(self) -> list[tuple[str, int, int]]:
        return [c for c in self.calls if c[0] not in ("pread", "preadinto")]

    def reads(self) -> list[tuple[str, int, int]]:
        return [c for c in self.calls if c[0] in ("pread", "preadinto")]


def volume_pair(tmp: Path) -> tuple[Volume, Volume]:
    seed = os.urandom(VOLUME)
    pair = []
    for name in ("by-record", "coalesced"):
        volume = Volume.open(tmp / name, size=VOLUME)
        volume.pwrite(0, seed)
        pair.append(volume)
    return pair[0], pair[1]


# Writes, mostly 4 KiB-aligned so that runs of consecutive offsets are common.
SMALL_WRITES = st.tuples(
    st.just(int(Kind.WRITE)),
    st.integers(0, 60).map(lambda b: b * 4096),
    st.sampled_from([4096, 4096, 4096, 8192, 512, 0]),
)
OPS = st.lists(
    st.one_of(
        SMALL_WRITES,
        SMALL_WRITES,
        SMALL_WRITES,
        st.tuples(
            st.just(int(Kind.WRITE)), st.integers(0, VOLUME - 20_000), st.integers(1, 20_000)
        ),
        st.tuples(
            st.sampled_from([int(Kind.ZERO), int(Kind.TRIM)]),
            st.integers(0, 60).map(lambda b: b * 4096),
            st.sampled_from([4096, 12288]),
        ),
        st.tuples(st.just(int(Kind.FLUSH)), st.just(0), st.just(0)),
        st.tuples(st.just(int(Kind.BOOKMARK)), st.just(0), st.integers(1, 200)),
    ),
    max_size=80,
)


def sequential(ops: list[Op]) -> list[Op]:
    """Stretches of the writes made to follow each other in the volume: long runs."""
    out: list[Op] = []
    end = 0
    for i, (kind, drawn, length) in enumerate(ops):
        offset = end if kind == Kind.WRITE and i % 5 and end + length <= VOLUME else drawn
        out.append((kind, offset, length))
        if kind == Kind.WRITE:
            end = offset + length
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=OPS.map(sequential),
    chunk=st.sampled_from([4096, 9000, 13000, 30000, 65536, 8 << 20]),
    join_below=st.sampled_from([0, 16 * 1024, 1 << 30]),
    skip=st.integers(0, 10),
)
def test_the_coalesced_replay_leaves_the_volume_as_replaying_each_record_does(
    ops: list[Op], chunk: int, join_below: int, skip: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = build(Path(tmp) / "j", ops)
        records = list(log.records)[skip:]
        by_record, coalesced = volume_pair(Path(tmp))
        for rec in records:
            apply_record(rec, log.file, log.ring, by_record)
        with replay_chunk(chunk, join_below):
            RingApplier(log.file, log.ring, coalesced).apply(records)
        assert coalesced.pread(0, VOLUME) == by_record.pread(0, VOLUME)
        for store in (by_record, coalesced, log.file):
            store.close()


def test_consecutive_writes_are_one_read_and_one_write_per_chunk(tmp_path: Path) -> None:
    log = build(tmp_path / "j", [(int(Kind.WRITE), i * 4096, 4096) for i in range(14)])
    records = list(log.records)
    assert len(records) == 14 and records[-1].lpos < CAPACITY  # one lap, no wrap
    ring_file = Counting(log.file)
    volume = Counting(Volume.open(tmp_path / "vol", size=VOLUME))
    RingApplier(ring_file, log.ring, volume).apply(records)  # type: ignore[arg-type]
    # The whole log in one read, the 14 payloads in one write (small ones: joined).
    assert ring_file.calls == [("preadinto", DATA_START, 14 * 4160)]
    assert volume.writes() == [("pwrite", 0, 14 * 4096)]
    with replay_chunk(5 * 4160 + 100):
        volume.calls.clear()
        ring_file.calls.clear()
        RingApplier(ring_file, log.ring, volume).apply(records)  # type: ignore[arg-type]
    # Chunks of five records: the runs are cut where a chunk ends, nothing else is.
    assert ring_file.reads() == [
        ("preadinto", DATA_START, 5 * 4160 + 100),
        ("preadinto", DATA_START + 5 * 4160, 5 * 4160 + 100),
        ("preadinto", DATA_START + 10 * 4160, 4 * 4160),
    ]
    assert volume.writes() == [
        ("pwrite", 0, 5 * 4096),
        ("pwrite", 5 * 4096, 5 * 4096),
        ("pwrite", 10 * 4096, 4 * 4096),
    ]
    # Large payloads are not copied into one buffer: a pwritev of the ring's slices.
    big = build(tmp_path / "big", [(int(Kind.WRITE), i * 20480, 20480) for i in range(3)])
    volume.calls.clear()
    RingApplier(big.file, big.ring, volume).apply(list(big.records))  # type: ignore[arg-type]
    assert volume.writes() == [("pwritev", 0, 3 * 20480)]


def test_a_run_ends_at_a_gap_a_trim_and_the_ring_end(tmp_path: Path) -> None:
    ops: list[Op] = [
        (int(Kind.WRITE), 0, 4096),
        (int(Kind.WRITE), 4096, 4096),
        (int(Kind.FLUSH), 0, 0),  # changes nothing, ends nothing
        (int(Kind.WRITE), 8192, 4096),
        (int(Kind.TRIM), 0, 4096),
        (int(Kind.WRITE), 12288, 4096),
        (int(Kind.WRITE), 40960, 4096),  # not where the run ends
        (int(Kind.WRITE), 0, 4096),  # rewrites what the trim trimmed: after it
    ]
    log = build(tmp_path / "j", ops)
    volume = Counting(Volume.open(tmp_path / "vol", size=VOLUME))
    RingApplier(log.file, log.ring, volume).apply(list(log.records))  # type: ignore[arg-type]
    assert volume.writes() == [
        ("pwrite", 0, 3 * 4096),
        ("trim", 0, 4096),
        ("pwritev", 12288, 4096),
        ("pwritev", 40960, 4096),
        ("pwritev", 0, 4096),
    ]
    # 20 records of 4160 bytes in a ring of 64 KiB: the log wraps; the run is cut there.
    wrapped = build(tmp_path / "w", [(int(Kind.WRITE), i * 4096, 4096) for i in range(20)])
    records = list(wrapped.records)
    assert records[0].lpos < CAPACITY < records[-1].lpos
    volume.calls.clear()
    RingApplier(wrapped.file, wrapped.ring, volume).apply(records)  # type: ignore[arg-type]
    before_end = sum(1 for r in records if r.lpos < CAPACITY)
    first = records[0].offset
    assert volume.writes() == [
        ("pwrite", first, before_end * 4096),
        ("pwrite", first + before_end * 4096, (len(records) - before_end) * 4096),
    ]


def test_a_failing_volume_names_the_first_record_of_the_failed_write(tmp_path: Path) -> None:
    ops = [(int(Kind.WRITE), 0, 4096), (int(Kind.WRITE), 4096, 4096)]
    ops += [(int(Kind.WRITE), 65536 + i * 4096, 4096) for i in range(3)]
    log = build(tmp_path / "j", ops)
    volume = Volume.open(tmp_path / "vol", size=VOLUME)
    calls: list[int] = []

    def failing(offset: int, data: Buffer) -> None:
        calls.append(offset)
        if offset == 65536:
            raise OSError(errno.ENOSPC, "No space left on device")

    applier = RingApplier(log.file, log.ring, volume)
    with mock.patch.object(volume, "pwrite", failing), pytest.raises(OSError):
        applier.apply(list(log.records))
    assert calls == [0, 65536] and applier.at == 3


def open_journal(tmp_path: Path, volume: Volume) -> Journal:
    """The journal of these tests' volume, created or recovered."""
    return Journal.open(
        tmp_path / "vol.journal",
        volume=volume,
        journal_size=DATA_START + CAPACITY,
        consumers=[],
        dirty_dir=tmp_path,
        volume_name="vol",
    )


def test_recovery_replays_a_full_ring_through_the_applier(tmp_path: Path) -> None:
    """Journal.open after a crash: the volume ends up with every record, once."""
    volume = Volume.open(tmp_path / "vol.img", size=VOLUME)
    journal = open_journal(tmp_path, volume)
    expected = bytearray(VOLUME)
    for i in range(40):
        data = os.urandom(4096)
        offset = (i % 30) * 4096
        if not journal.fits(len(data)):
            break
        journal.stage(Kind.WRITE, offset, 4096, [data])
        expected[offset : offset + 4096] = data
    staged = journal.next_seq - 1
    journal.write_batch()
    journal.abandon()  # a crash: no checkpoint; the volume never got the writes
    volume.close()
    volume = Volume.open(tmp_path / "vol.img", size=VOLUME)
    applied: list[int] = []
    original = RingApplier.apply

    def spy(self: RingApplier, records: Sequence[Record]) -> None:
        applied.extend(r.seq for r in records)
        original(self, records)

    with mock.patch.object(RingApplier, "apply", spy):
        journal = open_journal(tmp_path, volume)
    assert journal.recovery is not None and journal.recovery.replayed == staged
    assert applied == list(range(1, staged + 1))
    assert volume.pread(0, VOLUME) == bytes(expected)
    journal.close()
    volume.close()


def test_replay_reports_a_failing_volume_with_the_record(tmp_path: Path) -> None:
    volume = Volume.open(tmp_path / "vol.img", size=VOLUME)
    journal = open_journal(tmp_path, volume)
    for i in range(3):
        journal.stage(Kind.WRITE, i * 4096, 4096, [bytes(4096)])
    journal.write_batch()
    with (
        mock.patch.object(volume, "pwrite", side_effect=OSError(errno.EIO, "I/O error")),
        pytest.raises(JournalError, match="failed at record 1: I/O error"),
    ):
        opening.replay(journal)
    assert journal.applied_seq == 0  # nothing counts as applied
    journal.close()
    volume.close()


# --- the identity check's input ------------------------------------------------------------


EXTENTS = st.lists(
    st.tuples(
        st.sampled_from([Kind.WRITE, Kind.ZERO, Kind.TRIM, Kind.FLUSH, Kind.BOOKMARK]),
        st.integers(0, 40).map(lambda b: b * 2048),
        st.sampled_from([0, 2048, 4096, 6144, 100]),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    extents=EXTENTS,
    fp_seq=st.integers(0, 40),
    blocks=st.lists(st.integers(0, 20).map(lambda b: b * 4096), max_size=8, unique=True),
    good=st.lists(st.booleans(), min_size=8, max_size=8),
    lenient=st.booleans(),
)
def test_merged_extents_give_the_identity_check_the_same_answer(
    extents: list[tuple[Kind, int, int]],
    fp_seq: int,
    blocks: list[int],
    good: list[bool],
    lenient: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        volume = Volume.open(Path(tmp) / "vol", size=128 * 1024)
        volume.pwrite(0, os.urandom(128 * 1024))
        kind, dev, ino = identity.stat_volume(volume)
        fingerprint = tuple(
            (b, identity.block_hash(volume.pread(b, 4096)) if ok else "0" * 16)
            for b, ok in zip(blocks, good, strict=False)
        )
        records = [
            Record(kind=k, offset=o, length=n if k != Kind.FLUSH else 0, seq=i + 1)
            for i, (k, o, n) in enumerate(extents)
        ]
        cp = dataclasses.replace(
            _checkpoint(), volume=VolumeIdentity(kind, dev, ino, fp_seq, fingerprint)
        )
        every = [(r.seq, r.kind, r.offset, r.length) for r in records]
        merged = opening._overwrites(cp, records)
        assert len(merged) <= len(every)
        assert identity.verify(volume, cp, merged, lenient=lenient) == identity.verify(
            volume, cp, every, lenient=lenient
        )
        volume.close()


def _checkpoint() -> Checkpoint:
    return Checkpoint(
        journal_id="0" * 32,
        volume_size=128 * 1024,
        capacity=CAPACITY,
        head_lpos=0,
        head_seq=1,
        next_seq=1,
        applied_seq=0,
        boot_id="",
        clean=True,
        enqueue_paused=False,
        needs_full_resync=False,
        consumers={},
    )
